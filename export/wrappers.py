"""The component wrappers: a diffusers / transformers module behind the tensor contract.

``wrap(name, modules)`` returns a ``torch.nn.Module`` whose ``forward`` takes the
component's contract inputs in order and returns its outputs in order. One
implementation, two uses:

- the exporter traces it to ONNX (``attention="eager"``: with SDPA, torch.onnx's
  fp16 graph of the CLIP models mixes float types);
- the torch host (``model_repository/torch_host/model.py``) runs it inside Triton
  (``attention="sdpa"``). The exporter copies this file beside that model, so it
  imports torch only (plus diffusers / transformers in :func:`load_module`) and
  nothing from ``sd_triton``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

__all__ = ["FP32_TENSORS", "MODULE_CLASSES", "MODULES", "load_module", "unet_inputs", "wrap"]

# Checkpoint folders each component needs.
MODULES: dict[str, tuple[str, ...]] = {
    "text_encoder": ("text_encoder",),
    "text_encoder_2": ("text_encoder_2",),
    "unet": ("unet",),
    "vae_encoder": ("vae",),
    "vae_decoder": ("vae",),
    "safety_checker": ("safety_checker",),
    # ControlNet models (sd_triton.export.controlnet): a ControlNet, the UNet with residuals.
    "controlnet": ("controlnet",),
    "unet_controlled": ("unet",),
}

# Checkpoint folder -> (module, class) that loads it.
MODULE_CLASSES: dict[str, tuple[str, str]] = {
    "text_encoder": ("transformers", "CLIPTextModel"),
    # SDXL's second text encoder: its pooled output is projected (text_embeds).
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
    "unet": ("diffusers", "UNet2DConditionModel"),
    "controlnet": ("diffusers", "ControlNetModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "safety_checker": (
        "diffusers.pipelines.stable_diffusion.safety_checker",
        "StableDiffusionSafetyChecker",
    ),
}

# Float tensors that stay float32 whatever the weights' dtype: fractional
# timesteps must not be rounded, the safety checker's images only pass
# through (fp16 would cost up to a uint8 level), and a ControlNet's scale is
# the decimal the request gave (the residuals are scaled in the weights' dtype).
FP32_TENSORS = frozenset(
    {("unet", "timestep"), ("safety_checker", "images"), ("safety_checker", "out_images")}
    | {("unet_controlled", "timestep"), ("controlnet", "timestep")}
    | {("controlnet", "conditioning_scale")}
)


def load_module(folder: str, path: str | Path, dtype: Any = None) -> Any:
    """The torch module of checkpoint folder ``folder`` (``unet``, ``vae``, ...), in eval mode.

    ``dtype`` (a torch dtype): load the weights in it (None: as saved).
    """
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    module_name, class_name = MODULE_CLASSES[folder]
    cls = getattr(importlib.import_module(module_name), class_name)
    kwargs: dict[str, Any] = {}
    if module_name == "diffusers":
        # The default wants `accelerate` and warns without it.
        kwargs["low_cpu_mem_usage"] = False
        if dtype is not None:
            kwargs["torch_dtype"] = dtype
    elif dtype is not None:
        kwargs["dtype"] = dtype
    return cls.from_pretrained(path, **kwargs).eval()


def _module(forward, **modules: Any):
    import torch

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, module in modules.items():
                setattr(self, name, module)

        def forward(self, *args):
            return forward(self, *args)

    return Wrapper().eval()


def _text_encoder(folder):
    """A CLIP text model: ``input_ids`` [B, L] and ``skip_layers`` [B] -> the hidden state
    ``skip_layers`` layers before the last (as the encoder computed it), the same through
    the final layer norm, and the pooled embedding (projected where the model projects it).

    Skip 0's normed hidden state is the model's ``last_hidden_state``. ``skip_layers``
    is clamped to the model's layers (the pipeline refuses what does not fit).
    """

    def build(modules, attention):
        import torch

        encoder = modules[folder]
        encoder.set_attn_implementation(attention)
        layers = encoder.config.num_hidden_layers
        projected = hasattr(encoder, "text_projection")  # CLIPTextModelWithProjection
        # transformers 5's CLIPTextModel holds the transformer's parts itself.
        final_layer_norm = getattr(encoder, "text_model", encoder).final_layer_norm

        def forward(self, input_ids, skip_layers):
            out = self.encoder(input_ids.to(torch.int64), output_hidden_states=True)
            # [B, layers + 1, L, D]: the embeddings' output, then each layer's.
            states = torch.stack(out.hidden_states, dim=1)
            index = layers - skip_layers.to(torch.int64).clamp(0, layers)
            index = index.reshape(-1, 1, 1, 1).expand(-1, 1, *states.shape[2:])
            hidden = torch.gather(states, 1, index).squeeze(1)
            normed = final_layer_norm(hidden)
            pooled = out.text_embeds if projected else out.pooler_output
            return hidden, normed, pooled

        return _module(forward, encoder=encoder)

    return build


def unet_inputs(unet_config: Any) -> dict[str, bool]:
    """``sd_pipeline.spec.unet_spec``'s keywords for a UNet config (a mapping): SDXL's
    ``text_time`` added conditioning, LCM's ``timestep_cond`` (a UNet distilled with a
    guidance embedding)."""
    return {
        "text_time": unet_config.get("addition_embed_type") == "text_time",
        "timestep_cond": unet_config.get("time_cond_proj_dim") is not None,
    }


def _unet(modules, attention):
    """The UNet; SDXL's added conditioning (``text_embeds``, ``time_ids``) and LCM's
    guidance embedding (``timestep_cond``) follow as the UNet's config has them, in the
    order of ``sd_pipeline.spec.unet_spec``."""
    extra = unet_inputs(modules["unet"].config)
    text_time, timestep_cond = extra["text_time"], extra["timestep_cond"]

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        kwargs = {}
        if text_time:
            kwargs["added_cond_kwargs"] = {"text_embeds": extra[0], "time_ids": extra[1]}
        if timestep_cond:
            kwargs["timestep_cond"] = extra[-1]
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False, **kwargs)[0]

    return _module(forward, unet=modules["unet"])


def _vae_encoder(modules, attention):
    def forward(self, sample):
        # Mean and log-variance concatenated on channels, as diffusers'
        # DiagonalGaussianDistribution.parameters.
        return self.vae.encode(sample).latent_dist.parameters

    return _module(forward, vae=modules["vae"])


def _vae_decoder(modules, attention):
    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]

    return _module(forward, vae=modules["vae"])


def _safety_checker(modules, attention):
    """diffusers' ``StableDiffusionSafetyChecker.forward`` as one graph.

    Same decision as diffusers' eager ``forward`` (scores rounded to 3
    decimals, special-care concepts lower the other thresholds by 0.01); the
    blackout is a ``torch.where`` (the boolean-mask assignment of
    ``forward_onnx`` exports but fails in onnxruntime). Scores are computed in
    float32 whatever the weights' dtype.
    """
    import torch

    def cosine(a, b):
        a = torch.nn.functional.normalize(a.float(), dim=-1)
        b = torch.nn.functional.normalize(b.float(), dim=-1)
        return a @ b.T

    def fired(scores):
        # round(score, 3) > 0, as diffusers decides.
        return torch.round(scores * 1000.0) > 0

    modules["safety_checker"].vision_model.set_attn_implementation(attention)

    def forward(self, clip_input, images):
        c = self.checker
        embeds = c.visual_projection(c.vision_model(clip_input)[1])
        special = cosine(embeds, c.special_care_embeds) - c.special_care_embeds_weights.float()
        special_care = fired(special).any(dim=1, keepdim=True)
        adjustment = special_care.to(torch.float32) * 0.01
        concept = cosine(embeds, c.concept_embeds) - c.concept_embeds_weights.float() + adjustment
        has_nsfw = fired(concept).any(dim=1)
        blackout = has_nsfw.reshape(-1, *([1] * (images.dim() - 1)))
        out_images = torch.where(blackout, torch.zeros_like(images), images)
        return out_images, has_nsfw

    return _module(forward, checker=modules["safety_checker"])


def _controlnet(modules, attention):
    """diffusers' ``ControlNetModel``: the UNet's inputs, the control image (``controlnet_cond``),
    per-sample ``conditioning_scale`` and ``guess_mode`` (SDXL's ``text_embeds``, ``time_ids``
    after them) -> the down blocks' residuals, then the mid block's.

    The scale is applied here, per sample, exactly as diffusers applies its float
    (``residual * scale``; with ``guess_mode``, ``residual * (logspace_i * scale)``).
    """
    import torch

    def forward(self, sample, timestep, text, cond, scale, guess_mode, *added):
        added_cond = dict(zip(("text_embeds", "time_ids"), added, strict=True)) if added else None
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states=text,
            controlnet_cond=cond,
            conditioning_scale=1.0,
            added_cond_kwargs=added_cond,
            return_dict=False,
        )
        # diffusers' guess-mode factors, 0.1 .. 1, one per residual.
        steps = torch.logspace(-1, 0, len(down) + 1, device=sample.device)
        scales = torch.where(guess_mode[:, None], steps[None, :], 1.0) * scale[:, None]
        scales = scales.to(sample.dtype)[:, :, None, None, None]
        return (*(r * scales[:, i] for i, r in enumerate(down)), mid * scales[:, -1])

    return _module(forward, controlnet=modules["controlnet"])


def _unet_controlled(modules, attention):
    """The UNet (as :func:`_unet`) plus the residual inputs, summed over the request's
    ControlNets: the down blocks', then the mid block's, after the UNet's own inputs."""
    extra = unet_inputs(modules["unet"].config)
    text_time, timestep_cond = extra["text_time"], extra["timestep_cond"]
    added = 2 * text_time + timestep_cond

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        extra, res = rest[:added], rest[added:]
        kwargs = {}
        if text_time:
            kwargs["added_cond_kwargs"] = {"text_embeds": extra[0], "time_ids": extra[1]}
        if timestep_cond:
            kwargs["timestep_cond"] = extra[-1]
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            down_block_additional_residuals=tuple(res[:-1]),
            mid_block_additional_residual=res[-1],
            return_dict=False,
            **kwargs,
        )[0]

    return _module(forward, unet=modules["unet"])


_WRAPPERS = {
    "text_encoder": _text_encoder("text_encoder"),
    "text_encoder_2": _text_encoder("text_encoder_2"),
    "unet": _unet,
    "vae_encoder": _vae_encoder,
    "vae_decoder": _vae_decoder,
    "safety_checker": _safety_checker,
    "controlnet": _controlnet,
    "unet_controlled": _unet_controlled,
}


def wrap(name: str, modules: dict[str, Any], *, attention: str = "eager"):
    """Component ``name`` over ``modules`` (checkpoint folder -> module), as a ``torch.nn.Module``.

    ``attention`` is the CLIP models' attention implementation (``"eager"`` for
    ONNX export, ``"sdpa"`` to serve with torch); diffusers' UNet and VAE use
    SDPA either way.
    """
    return _WRAPPERS[name](modules, attention)
