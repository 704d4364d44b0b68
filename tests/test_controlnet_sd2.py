"""SD 2.x ControlNets from single files (thibaud's controlnet-sd21 and the like), as SD 1.x's.

An SD 2.x ControlNet in lllyasviel's layout differs from an SD 1.x one only in sizes:
cross-attention width 1024 (OpenCLIP's), SD 2.x's per-block attention heads and linear
``proj_in`` / ``proj_out``. The exporter tells it from the file's cross-attention width
and reads it with the shipped ``export/configs/controlnet-sd2``:

- that config is diffusers' ``ControlNetModel.from_unet`` of the shipped SD 2.x UNets,
  fits both (meta device: full size, no weights), and its lllyasviel layout is told as
  SD 2.x and converted back by diffusers to every tensor, in its shape;
- a tiny SD 2.x-shaped ControlNet (width 1024, per-block heads, linear projections; built
  here with fixed seeds) written in lllyasviel's layout (``control_model.*`` in a
  ``.safetensors``, unprefixed in a ``.pth``) and in diffusers' layout is read with the
  controlnet-sd2 config when none is given, and exports its folder's ONNX byte for byte;
- a ControlNet of another family than the checkpoint is refused before anything is
  written, with a sentence naming both families.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from original_layout import controlnet_original_layout
from safetensors.torch import save_file

from sd_triton.export import components as C
from sd_triton.export import controlnet as CN
from sd_triton.export.checkpoint import ExportError
from sd_triton.export.single_file import config_folder

# SD 2.x's sizes, small: two blocks (cross-attention first, as SD 2.x's), heads per block
# (SD 2.x's attention_head_dim is (5, 10, 20, 20)), linear projections, width 1024.
TINY_SD2_CONTROLNET = {
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "cross_attention_dim": CN.SD2_CROSS_ATTENTION_DIM,
    "norm_num_groups": 32,
    # The tiny VAE's images are 2x its latents: one downsampling in the control embedding.
    "conditioning_embedding_out_channels": (16, 32),
}
TRACE = {"B": 2, "latent_height": 12, "latent_width": 20, "text_sequence": 77}
SD2_UNETS = ("sd2-base", "sd2-v", "sd2-inpainting")


def unet_config(family: str) -> dict:
    return json.loads((config_folder(family) / "unet" / "config.json").read_text())


def shipped(family: str) -> dict:
    return ControlNetModel.load_config(config_folder(CN.CONTROLNET_CONFIGS[family]))


def test_shipped_sd2_config_is_diffusers_controlnet_of_the_sd2_unets():
    """Every key of the shipped config is what diffusers' ``from_unet`` makes of SD 2.x's
    UNet (base and 768-v: the same architecture), and it fits every SD 2.x UNet shipped
    (the inpainting one too, whose 9 input channels a ControlNet does not take)."""
    config = shipped("sd2")
    # upcast_attention is the 768-v UNet's fp16 setting, not part of the architecture.
    keys = [k for k in config if not k.startswith("_") and k != "upcast_attention"]
    for family in SD2_UNETS:
        CN.check_compatible(config, unet_config(family), 8)
        if family == "sd2-inpainting":
            continue
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_config(family))
            derived = ControlNetModel.from_unet(unet).config
        assert {k: CN._norm(config[k]) for k in keys} == {k: CN._norm(derived[k]) for k in keys}


def test_full_size_sd2_original_layout_is_told_and_converted():
    """The full-size architecture in lllyasviel's layout (thibaud's files' layout) is SD 2.x
    by its keys' shapes, and diffusers converts it back to every tensor of the shipped
    config, in its shape. diffusers' own detection calls SD 1.x and 2.x ControlNets alike
    (``controlnet``), which is why the width is read here."""
    from diffusers.loaders.single_file_utils import (
        convert_controlnet_checkpoint,
        infer_diffusers_model_type,
    )

    for family in ("sd1", "sd2"):
        with torch.device("meta"):
            model = ControlNetModel.from_config(shipped(family))
        state = model.state_dict()
        shapes = CN.shapes_of(state)
        original = controlnet_original_layout(state, dict(model.config))
        converted = convert_controlnet_checkpoint(checkpoint=original, config=dict(model.config))
        assert CN.shapes_of(converted) == shapes
        assert CN.single_file_family(CN.shapes_of(original)) == family
        assert CN.single_file_family(shapes) == family  # diffusers' layout in one file
        assert infer_diffusers_model_type(original) == "controlnet"
    assert original["control_model.input_blocks.1.1.proj_in.weight"].ndim == 2  # linear


def test_full_size_families_that_differ_are_refused():
    """Each shipped ControlNet fits its family's UNet and no other, with a sentence naming
    both families (before the architecture keys that differ)."""
    unets = {"sd1": "sd1", "sd2": "sd2-base", "sdxl": "sdxl-base"}
    for family in CN.CONTROLNET_CONFIGS:
        for other, base in unets.items():
            if other == family:
                CN.check_compatible(shipped(family), unet_config(base), 8)
                continue
            sentence = (
                f"a ControlNet for {CN.FAMILY_NAMES[family]}, the checkpoint is "
                f"{CN.FAMILY_NAMES[other]} "
            )
            with pytest.raises(ExportError, match=f"^{sentence}"):
                CN.check_compatible(shipped(family), unet_config(base), 8)


# ---------------------------------------------------------------------------
# A tiny SD 2.x-shaped ControlNet in files


@pytest.fixture(scope="module")
def tiny_sd2(tmp_path_factory) -> dict[str, Path]:
    """The tiny ControlNet as a diffusers folder (``folder``) and single files: lllyasviel's
    layout prefixed in a ``.safetensors`` (``original``) and unprefixed in a ``.pth``
    (``pth``), and diffusers' layout in a ``.safetensors`` (``diffusers``). Every weight
    random (the zero convolutions too), so a tensor read into the wrong place shows."""
    torch.manual_seed(0)
    model = ControlNetModel(**TINY_SD2_CONTROLNET).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    root = tmp_path_factory.mktemp("controlnet-sd2")
    model.save_pretrained(root / "folder")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    original = controlnet_original_layout(state, dict(model.config))
    files = {"folder": root / "folder"}
    for name, tensors in (("original", original), ("diffusers", state)):
        files[name] = root / f"control_tiny_sd21_{name}.safetensors"
        save_file(tensors, files[name])
    files["pth"] = root / "control_tiny_sd21.pth"
    unprefixed = {k.removeprefix(CN.ORIGINAL_PREFIX): v for k, v in original.items()}
    torch.save(unprefixed, files["pth"])
    return files


def trace_sizes(config) -> dict[str, int]:
    """Every dim of the ControlNet component at :data:`TRACE` (an SD 2.x-width text)."""
    width = int(config["cross_attention_dim"])
    text = {"hidden_size": width, "projection_dim": width, "vocab_size": 49408}
    configs = {
        "unet": dict(config),
        "vae": {"latent_channels": 4},
        "scheduler": {"num_train_timesteps": 1000},
        "tokenizer": {"model_max_length": 77},
        "text_encoder": text,
    }
    pixels = {"height": TRACE["latent_height"] * 2, "width": TRACE["latent_width"] * 2}
    sizes = {**C.fixed_sizes(configs), **TRACE, **pixels}
    return {**sizes, **CN.residual_sizes(config, sizes)}


def test_tiny_sd2_files_are_read_with_the_sd2_config(tiny_sd2):
    """No --controlnet-config: each single file is told SD 2.x and read with the shipped
    controlnet-sd2 config (whose full sizes the tiny model's do not fit, as the message
    says)."""
    folder_config = ControlNetModel.load_config(tiny_sd2["folder"])
    assert CN.config_family(folder_config) == "sd2"
    for name in ("original", "pth", "diffusers"):
        source = CN.ControlNetSource(tiny_sd2[name])
        config, name_of_shipped = CN._config(source)
        assert name_of_shipped == "controlnet-sd2", name
        assert config == json.loads((config_folder("controlnet-sd2") / "config.json").read_text())
        with pytest.raises(ExportError, match="read with the shipped controlnet-sd2 config"):
            CN.check_fit({"depth": source}, folder_config, 2)


def test_tiny_sd2_single_files_export_as_the_folder(tiny_sd2, tmp_path):
    """lllyasviel's layout (prefixed .safetensors, unprefixed .pth) and diffusers' layout,
    converted by diffusers against the folder's config: the folder's ONNX file byte for
    byte (the command line around the loader is the SD 1.x test's)."""
    config = tiny_sd2["folder"]
    onnx_files = {}
    for name in ("folder", "original", "pth", "diffusers"):
        source = CN.ControlNetSource(tiny_sd2[name], None if name == "folder" else config)
        model = CN._load_controlnet(name, source)
        component = CN.controlnet_component(model.config, "controlnet_sd2")
        path = tmp_path / name / "model.onnx"
        sizes = trace_sizes(model.config)
        onnx_files[name] = CN.export_onnx(component, {"controlnet": model}, path, sizes)
    expected = onnx_files.pop("folder").read_bytes()
    for name, path in onnx_files.items():
        assert path.read_bytes() == expected, name


def test_family_mismatch_is_refused_before_anything_is_written(
    tiny_checkpoint, tiny_sd2, tmp_path, capsys
):
    """An SD 2.x ControlNet with the tiny SD 1.x checkpoint: exit 2, one sentence naming
    both families (no --controlnet-config hint: no config would help), nothing written;
    with its own config too. Against the shipped SD 1.x and SDXL UNets likewise."""
    from sd_triton.export import cli

    out, path = tmp_path / "out", tiny_sd2["original"]
    lean = ["-q", "--no-stream-model", "--no-safety-checker"]
    sentence = (
        f"--controlnet depth={path}: a ControlNet for SD 2.x, the checkpoint is SD 1.x "
        "(a ControlNet works only with the model family it was trained for)"
    )
    for extra in ([], ["--controlnet-config", f"depth={tiny_sd2['folder']}"]):
        argv = [str(tiny_checkpoint), str(out), *lean, "--controlnet", f"depth={path}", *extra]
        assert cli.main(argv) == 2, extra
        err = capsys.readouterr().err
        assert sentence in err and len(err.strip().splitlines()) == 1, err
        assert "shipped" not in err and "--controlnet-config" not in err, err
        assert not out.exists()
    for base, name in (("sd1", "SD 1.x"), ("sdxl-base", "SDXL")):
        with pytest.raises(ExportError, match=f"for SD 2.x, the checkpoint is {name} "):
            CN.check_fit({"depth": path}, unet_config(base), 8)
