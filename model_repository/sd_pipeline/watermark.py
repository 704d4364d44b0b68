"""The invisible watermark of Stability AI's reference scripts and diffusers' SDXL pipelines.

diffusers' ``StableDiffusionXLWatermarker`` (``StableDiffusionXLPipeline`` and
its img2img / inpaint siblings, when the ``invisible-watermark`` package is
installed) hides a fixed 48-bit message in every image with that package's
``dwtDct`` method: in the DWT of the Y and U channels, one bit per 4 x 4 DCT
block, repeated over the image. :func:`apply_watermark` does exactly what it
does, on the same tensor (the VAE's output), so a watermarking model's served
images still equal diffusers'. SD 1.x / 2.x pipelines never watermark.

The ``invisible-watermark`` package (``pip install sd-triton[watermark]``,
it pulls opencv-python) is imported only when a model watermarks:
:func:`require` fails at model load when it is missing.
"""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import torch

__all__ = [
    "METHOD",
    "MIN_SIDE",
    "WATERMARK_BITS",
    "apply_watermark",
    "available",
    "decode_watermark",
    "diffusers_default",
    "matching_bits",
    "require",
]

# Stability AI's message (generative-models, scripts/demo/streamlit_helpers.py),
# as diffusers' pipelines/stable_diffusion_xl/watermark.py copies it.
WATERMARK_MESSAGE = 0b101100111110110010010000011110111011000110011110
WATERMARK_BITS: tuple[int, ...] = tuple(int(bit) for bit in bin(WATERMARK_MESSAGE)[2:])
METHOD = "dwtDct"
# The encoder refuses images of fewer than MIN_SIDE**2 pixels; diffusers skips
# images narrower than MIN_SIDE (and raises on a wide one of too few pixels).
MIN_SIDE = 256


def available() -> bool:
    """Whether the ``invisible-watermark`` package is installed."""
    return importlib.util.find_spec("imwatermark") is not None


def require() -> None:
    """Raise ``RuntimeError`` with the fix when the ``invisible-watermark`` package is missing."""
    if not available():
        raise RuntimeError(
            "the model watermarks its images (pipeline.json: watermark true) but the "
            "invisible-watermark package is not installed: pip install 'sd-triton[watermark]'"
        )


def diffusers_default(family: str) -> bool:
    """Whether diffusers' pipeline of ``family`` ("sd", "sdxl", "sdxl-refiner") watermarks.

    The SDXL pipelines' ``add_watermarker`` defaults to "the package is
    installed"; the SD 1.x / 2.x pipelines have no watermarker.
    """
    return family != "sd" and available()


@functools.cache
def _encoder():
    from imwatermark import WatermarkEncoder

    encoder = WatermarkEncoder()
    encoder.set_watermark("bits", list(WATERMARK_BITS))
    return encoder


def _too_small(height: int, width: int) -> bool:
    return width < MIN_SIDE or height * width < MIN_SIDE * MIN_SIDE


def apply_watermark(decoded: torch.Tensor) -> torch.Tensor:
    """The VAE's output ``[N, 3, H, W]`` in about [-1, 1], watermarked, clamped to [-1, 1].

    As diffusers' ``StableDiffusionXLWatermarker.apply_watermark``: to
    [0, 255] float32 BGR, ``dwtDct``-encode each image, back to RGB in
    [-1, 1] (float32, on ``decoded``'s device). Images narrower than
    ``MIN_SIDE`` are returned unchanged, as diffusers does; so are wider
    ones of fewer than ``MIN_SIDE**2`` pixels, which diffusers' encoder
    refuses with an error.
    """
    height, width = decoded.shape[-2:]
    if _too_small(height, width):
        return decoded
    images = (255 * (decoded / 2 + 0.5)).cpu().permute(0, 2, 3, 1).float().numpy()
    bgr = images[:, :, :, ::-1]
    marked = np.array([_encoder().encode(image, METHOD)[:, :, ::-1] for image in bgr])
    out = torch.from_numpy(marked).permute(0, 3, 1, 2)
    return torch.clamp(2 * (out / 255 - 0.5), min=-1.0, max=1.0).to(decoded.device)


def decode_watermark(image: np.ndarray) -> np.ndarray:
    """The ``len(WATERMARK_BITS)`` bits read from a uint8 RGB image ``[H, W, 3]`` (uint8 0/1).

    The pixels are read as float32: given uint8, the decoder's colour
    conversion rounds the Y and U channels to integers, and on smooth images
    it then reads far more bits wrong (measured on marked 256 x 320 and
    512 x 512 images: 10-21 of 48 wrong from uint8, 0-9 from the same pixels
    as float32). Raises ``ValueError`` for an image too small to carry the
    watermark.
    """
    from imwatermark import WatermarkDecoder

    height, width = image.shape[:2]
    if image.ndim != 3 or image.shape[2] != 3 or _too_small(height, width):
        raise ValueError(
            f"an image of shape {image.shape} carries no watermark: it needs [H, W, 3] "
            f"at least {MIN_SIDE} wide and {MIN_SIDE * MIN_SIDE} pixels"
        )
    bgr = np.ascontiguousarray(image[:, :, ::-1], dtype=np.float32)
    bits = WatermarkDecoder("bits", len(WATERMARK_BITS)).decode(bgr, METHOD)
    return np.asarray(bits, dtype=np.uint8)


def matching_bits(image: np.ndarray) -> int:
    """How many of the watermark's bits :func:`decode_watermark` reads back from ``image``.

    Stability AI's detector (generative-models, scripts/demo/detect.py) calls
    35 or more of 48 "very likely marked", 20 or fewer "unmarked"; an
    unmarked image matches about half by chance.
    """
    return int((decode_watermark(image) == np.asarray(WATERMARK_BITS)).sum())
