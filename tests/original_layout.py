"""Write a diffusers Stable Diffusion folder as one original-layout checkpoint, for tests.

The community shares checkpoints in the layout of the original training code
(CompVis' LDM for SD 1.x/2.x, Stability's SGM for SDXL): one state dict with
``model.diffusion_model.`` (UNet), ``first_stage_model.`` (VAE) and
``cond_stage_model.`` / ``conditioner.embedders.N.`` (text encoders).
diffusers reads that layout (``from_single_file``) but cannot write it, so
tests use this small writer, the inverse of diffusers' converters in
``diffusers.loaders.single_file_utils``:

- UNet: ``input_blocks`` / ``middle_block`` / ``output_blocks`` numbered as
  LDM's ``openaimodel`` numbers them, resnets renamed (``in_layers.0`` ...),
  transformer blocks as they are;
- VAE: ``down.i.block.j``, decoder ``up`` blocks in reverse order, mid
  attention as 1x1 convolutions;
- CLIP (SD 1.x, SDXL's first encoder): transformers' keys under
  ``cond_stage_model.transformer.text_model.`` / ``conditioner.embedders.0.transformer.``;
- OpenCLIP (SD 2.x, SDXL's second encoder): ``resblocks`` with packed
  ``in_proj`` q/k/v and ``text_projection`` transposed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "MODELS",
    "controlnet_original_layout",
    "original_layout",
    "original_state_dict",
    "write_original",
]

Tensors = dict[str, torch.Tensor]
MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _load(folder: Path) -> Tensors:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 1, f"{folder}: expected one .safetensors file, found {files}"
    return load_file(files[0])


def _config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


def _rename(src: Tensors, old: str, new: str, out: Tensors, renames=()) -> None:
    """Move every key of ``src`` under ``old`` to ``new``, applying ``renames`` to the rest."""
    for key in [k for k in src if k.startswith(old)]:
        rest = key[len(old) :]
        for a, b in renames:
            rest = rest.replace(a, b)
        out[new + rest] = src.pop(key)


_UNET_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _unet(sd: Tensors, config: dict[str, Any]) -> Tensors:
    out: Tensors = {}
    for new, old in _UNET_TOP.items():
        _rename(sd, f"{new}.", f"{old}.", out)
    layers = config["layers_per_block"]
    blocks = len(config["down_block_types"])
    k = 1
    for i in range(blocks):
        for j in range(layers):
            _rename(sd, f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", out, _UNET_RESNET)
            _rename(sd, f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.", out)
            k += 1
        if i < blocks - 1:
            _rename(sd, f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{k}.0.op.", out)
            k += 1
    _rename(sd, "mid_block.resnets.0.", "middle_block.0.", out, _UNET_RESNET)
    _rename(sd, "mid_block.attentions.0.", "middle_block.1.", out)
    _rename(sd, "mid_block.resnets.1.", "middle_block.2.", out, _UNET_RESNET)
    k = 0
    for i in range(blocks):
        for j in range(layers + 1):
            _rename(sd, f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.", out, _UNET_RESNET)
            has_attention = any(key.startswith(f"up_blocks.{i}.attentions.{j}.") for key in sd)
            _rename(sd, f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1.", out)
            if j == layers and i < blocks - 1:
                up = 2 if has_attention else 1
                _rename(
                    sd, f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{k}.{up}.conv.", out
                )
            k += 1
    assert not sd, f"UNet keys left unmapped: {sorted(sd)[:5]}"
    return out


_VAE_ATTENTION = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)


def _vae(sd: Tensors, config: dict[str, Any]) -> Tensors:
    out: Tensors = {}
    for part in ("encoder", "decoder"):
        for name in ("conv_in", "conv_out"):
            _rename(sd, f"{part}.{name}.", f"{part}.{name}.", out)
        _rename(sd, f"{part}.conv_norm_out.", f"{part}.norm_out.", out)
        for i in (0, 1):
            renames = (("conv_shortcut", "nin_shortcut"),)
            _rename(
                sd, f"{part}.mid_block.resnets.{i}.", f"{part}.mid.block_{i + 1}.", out, renames
            )
        attention: Tensors = {}
        _rename(
            sd, f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", attention, _VAE_ATTENTION
        )
        for key, value in attention.items():
            is_projection = value.ndim == 2 and not key.endswith(("norm.weight", "norm.bias"))
            out[key] = value[:, :, None, None] if is_projection else value
    blocks = len(config["down_block_types"])
    for i in range(blocks):
        renames = (("conv_shortcut", "nin_shortcut"),)
        _rename(sd, f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.", out, renames)
        _rename(
            sd, f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", out
        )
        ldm = blocks - 1 - i
        _rename(sd, f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{ldm}.block.", out, renames)
        _rename(sd, f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{ldm}.upsample.", out)
    for name in ("quant_conv", "post_quant_conv"):
        _rename(sd, f"{name}.", f"{name}.", out)
    assert not sd, f"VAE keys left unmapped: {sorted(sd)[:5]}"
    return out


def _clip(sd: Tensors) -> Tensors:
    """transformers' CLIPTextModel keys, with the ``text_model.`` prefix real checkpoints carry."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd.items()}


_OPEN_CLIP = (
    ("encoder.layers.", "transformer.resblocks."),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
    ("self_attn.out_proj", "attn.out_proj"),
)


def _open_clip(sd: Tensors) -> Tensors:
    sd = {k.removeprefix("text_model."): v for k, v in _clip(sd).items()}
    out: Tensors = {
        "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": sd.pop("final_layer_norm.weight"),
        "ln_final.bias": sd.pop("final_layer_norm.bias"),
    }
    if "text_projection.weight" in sd:
        out["text_projection"] = sd.pop("text_projection.weight").T.contiguous()
    for key in [k for k in sd if ".self_attn.q_proj." in k]:
        kind = key.rsplit(".", 1)[1]  # weight / bias
        stem = key.split(".self_attn.")[0].replace("encoder.layers.", "transformer.resblocks.")
        parts = [sd.pop(key.replace("q_proj", p)) for p in ("q_proj", "k_proj", "v_proj")]
        out[f"{stem}.attn.in_proj_{kind}"] = torch.cat(parts)
    for key in list(sd):
        new = key
        for a, b in _OPEN_CLIP:
            new = new.replace(a, b)
        out[new] = sd.pop(key)
    return out


def _prefixed(prefix: str, sd: Tensors) -> Tensors:
    return {prefix + k: v for k, v in sd.items()}


def original_layout(parts: dict[str, Tensors], configs: dict[str, dict[str, Any]]) -> Tensors:
    """The original-layout state dict of diffusers component state dicts ``parts``
    (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``; ``configs``: theirs).

    SD 2.x is told from SD 1.x by its text encoder's activation (OpenCLIP's
    ``gelu``); SDXL by ``text_encoder_2``, the refiner by its lack of ``text_encoder``.
    """
    parts = {name: dict(sd) for name, sd in parts.items()}
    out = _prefixed("model.diffusion_model.", _unet(parts["unet"], configs["unet"]))
    out |= _prefixed("first_stage_model.", _vae(parts["vae"], configs["vae"]))
    if "text_encoder_2" in parts:
        if "text_encoder" in parts:
            te = _clip(parts["text_encoder"])
            out |= _prefixed("conditioner.embedders.0.transformer.", te)
        index = 1 if "text_encoder" in parts else 0
        te2 = _open_clip(parts["text_encoder_2"])
        out |= _prefixed(f"conditioner.embedders.{index}.model.", te2)
    elif configs["text_encoder"]["hidden_act"] == "gelu":
        out |= _prefixed("cond_stage_model.model.", _open_clip(parts["text_encoder"]))
    else:
        out |= _prefixed("cond_stage_model.transformer.", _clip(parts["text_encoder"]))
    return {k: v.contiguous() for k, v in out.items()}


def controlnet_original_layout(
    sd: Tensors, config: dict[str, Any], prefix: str = "control_model."
) -> Tensors:
    """A diffusers ``ControlNetModel`` state dict in lllyasviel's (ControlNet v1.x) layout:
    the UNet encoder as LDM names it, the control image embedding as ``input_hint_block``
    (convolutions at even indices, SiLUs between), ``zero_convs`` and ``middle_block_out``.

    The embedding's last convolution goes to index 14, where the full-size embedding
    (8 convolutions) has it and where diffusers' converter reads it for any size.
    """
    sd, out = dict(sd), {}
    _rename(sd, "controlnet_cond_embedding.conv_in.", "input_hint_block.0.", out)
    blocks = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
    for i in range(blocks):
        old = f"controlnet_cond_embedding.blocks.{i}."
        _rename(sd, old, f"input_hint_block.{2 * (i + 1)}.", out)
    _rename(sd, "controlnet_cond_embedding.conv_out.", "input_hint_block.14.", out)
    for i in range(sum(k.startswith("controlnet_down_blocks.") for k in sd) // 2):
        _rename(sd, f"controlnet_down_blocks.{i}.", f"zero_convs.{i}.0.", out)
    _rename(sd, "controlnet_mid_block.", "middle_block_out.0.", out)
    out |= _unet(sd, config)
    return {prefix + k: v.contiguous() for k, v in out.items()}


def original_state_dict(folder: str | Path) -> Tensors:
    """The original-layout state dict of the diffusers SD 1.x/2.x or SDXL folder ``folder``."""
    folder = Path(folder)
    names = [n for n in MODELS if (folder / n).is_dir()]
    parts = {n: _load(folder / n) for n in names}
    return original_layout(parts, {n: _config(folder / n) for n in names})


def write_original(folder: str | Path, path: str | Path, extra: Tensors | None = None) -> Path:
    """Write ``folder`` as one original-layout ``.safetensors`` or ``.ckpt`` file at ``path``.

    ``extra``: more tensors to store (e.g. ``model_ema.*`` weights). A ``.ckpt``
    is a Lightning-style pickle, ``{"state_dict": ...}``, as the originals are.
    """
    path = Path(path)
    tensors = original_state_dict(folder) | (extra or {})
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, path)
    else:
        torch.save({"state_dict": tensors, "global_step": 0}, path)
    return path
