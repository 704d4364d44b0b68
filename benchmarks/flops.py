"""Work per image, counted from the checkpoint's own configs (DESIGN.md, "Work per image").

The UNet and VAE decoder are built on PyTorch's ``meta`` device (shapes, no
weights, no memory) and run once under ``torch.utils.flop_counter``: exact
for any architecture and size, in about a second. For SD 1.5 at a 64x64
latent, batch 1, this gives the 803 GFLOP per UNet forward that DESIGN.md
quotes (attention counted).

The floor is that work at a device's peak rate. DESIGN.md's 790 TFLOP/s
(bf16 matrix work measured on an H100/H200) is the default for GPUs; a CPU
has no quoted peak, so for CPU runs the report gives the achieved rate instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

H100_TFLOPS = 790.0


@dataclass(frozen=True)
class Work:
    unet_gflop: float  # one UNet forward, one sample
    vae_decoder_gflop: float  # one image
    guidance: bool  # classifier-free guidance doubles the UNet batch

    @property
    def step_gflop(self) -> float:
        return self.unet_gflop * (2 if self.guidance else 1)

    def image_gflop(self, steps: int) -> float:
        return steps * self.step_gflop + self.vae_decoder_gflop


def _count(fn) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops() / 1e9


def count(checkpoint: str | os.PathLike, *, height: int, width: int, guidance: bool = True) -> Work:
    """UNet GFLOP per sample-step and VAE decoder GFLOP per image for a diffusers checkpoint folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    checkpoint = Path(checkpoint)
    return count_configs(
        UNet2DConditionModel.load_config(checkpoint / "unet"),
        AutoencoderKL.load_config(checkpoint / "vae"),
        height=height,
        width=width,
        guidance=guidance,
    )


def count_configs(
    unet_config: dict, vae_config: dict, *, height: int, width: int, guidance: bool = True
) -> Work:
    """As :func:`count`, from the UNet's and VAE's config dicts."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        h, w = height // factor, width // factor
        sample = torch.empty(1, unet.config.in_channels, h, w)
        timestep = torch.empty(1)
        text = torch.empty(1, 77, unet.config.cross_attention_dim)
        latent = torch.empty(1, vae.config.latent_channels, h, w)
        added = _added_conditioning(unet.config)
    return Work(
        unet_gflop=_count(lambda: unet(sample, timestep, text, added_cond_kwargs=added)),
        vae_decoder_gflop=_count(lambda: vae.decode(latent)),
        guidance=guidance,
    )


def _added_conditioning(config) -> dict | None:
    """SDXL's ``text_embeds`` and ``time_ids`` for a ``text_time`` UNet (meta tensors), else None.

    The UNet embeds each time id and concatenates them with ``text_embeds`` into
    one linear layer of ``projection_class_embeddings_input_dim`` inputs, so six
    ids and the rest as ``text_embeds`` give a refiner's (five ids) work as well.
    """
    import torch

    if config.get("addition_embed_type") != "text_time":
        return None
    ids = 6
    pooled = (
        config["projection_class_embeddings_input_dim"] - ids * config["addition_time_embed_dim"]
    )
    return {"text_embeds": torch.empty(1, pooled), "time_ids": torch.empty(1, ids)}
