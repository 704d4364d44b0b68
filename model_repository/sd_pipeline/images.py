"""Image and mask pre- and post-processing: diffusers' ``VaeImageProcessor``, configured as its pipelines do.

The pipeline calls the library rather than a copy of it, so the served images
follow diffusers' releases: the img2img and inpaint pipelines' image
processor (resize to a multiple of the VAE's scale factor, [0, 1] ->
[-1, 1]), the inpaint pipeline's mask processor (grayscale, binarized at
0.5, not normalized), and ``postprocess`` / ``numpy_to_pil`` for the decoded
images. Request images arrive as uint8 arrays and go in as PIL images,
exactly what a diffusers user hands the pipeline.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from .config import PipelineConfig

if TYPE_CHECKING:
    import torch
    from diffusers.image_processor import VaeImageProcessor

__all__ = ["decoded_to_numpy", "image_to_pixels", "mask_to_tensor", "to_pil", "to_uint8"]


@functools.cache
def image_processor(vae_scale_factor: int, latent_channels: int) -> VaeImageProcessor:
    """The image processor of ``StableDiffusionImg2ImgPipeline`` / ``StableDiffusionInpaintPipeline``."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=vae_scale_factor, vae_latent_channels=latent_channels)


@functools.cache
def mask_processor(vae_scale_factor: int) -> VaeImageProcessor:
    """The mask processor of ``StableDiffusionInpaintPipeline``."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(
        vae_scale_factor=vae_scale_factor,
        do_normalize=False,
        do_binarize=True,
        do_convert_grayscale=True,
    )


def image_to_pixels(image: np.ndarray, config: PipelineConfig) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> float ``[1, 3, H, W]`` in [-1, 1]."""
    import PIL.Image

    height, width = image.shape[:2]
    processor = image_processor(config.vae_scale_factor, config.latent_channels)
    return processor.preprocess(PIL.Image.fromarray(image), height=height, width=width)


def mask_to_tensor(mask: np.ndarray, config: PipelineConfig) -> torch.Tensor:
    """uint8 ``[H, W]`` (255 = repaint) -> float ``[1, 1, H, W]``, 0 or 1 (binarized at 0.5)."""
    import PIL.Image

    height, width = mask.shape
    processor = mask_processor(config.vae_scale_factor)
    return processor.preprocess(PIL.Image.fromarray(mask), height=height, width=width)


def decoded_to_numpy(decoded: torch.Tensor, config: PipelineConfig) -> np.ndarray:
    """The VAE's output ``[N, 3, H, W]`` in about [-1, 1] -> float32 ``[N, H, W, 3]`` in [0, 1]."""
    processor = image_processor(config.vae_scale_factor, config.latent_channels)
    return processor.postprocess(decoded.float(), output_type="np")


def to_pil(images: np.ndarray) -> list:
    """[0, 1] floats ``[N, H, W, 3]`` -> PIL images, as diffusers makes them."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor.numpy_to_pil(images)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] floats ``[N, H, W, 3]`` -> uint8, rounded as diffusers' ``numpy_to_pil``."""
    return np.stack([np.asarray(image) for image in to_pil(images)])
