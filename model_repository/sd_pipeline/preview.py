"""Cheap RGB previews of latents, for streaming progress (no VAE call).

The first three latent channels are stretched to [0, 255] per image: a
rough picture of the composition, good enough to show progress. The preview
has the latents' resolution (1/vae_scale_factor of the image).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["latents_to_preview"]


def latents_to_preview(latents: torch.Tensor) -> np.ndarray:
    """``[N, C, h, w]`` latents -> uint8 ``[N, h, w, 3]``."""
    rgb = latents.detach().float().cpu()[:, :3].permute(0, 2, 3, 1)
    if rgb.shape[-1] < 3:
        rgb = rgb.mean(-1, keepdim=True).expand(*rgb.shape[:-1], 3)
    low = rgb.amin(dim=(1, 2, 3), keepdim=True)
    high = rgb.amax(dim=(1, 2, 3), keepdim=True)
    rgb = (rgb - low) / (high - low).clamp_min(1e-6)
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
