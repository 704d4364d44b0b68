"""The invisible watermark (issue 15.6): diffusers' SDXL watermarker, bit for bit, and served.

Unit checks against diffusers' ``StableDiffusionXLWatermarker`` on random
tensors, then the tiny SD 1.x model exported with ``watermark`` on, served by
a real tritonserver at 256 x 256 (the smallest size the watermark fits): its
images equal diffusers' pipeline followed by diffusers' watermarker within one
uint8 level, and the watermark's 48 bits decode from them.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion_xl.watermark import (
    WATERMARK_BITS,
    StableDiffusionXLWatermarker,
)
from helpers import SETTINGS, max_diff, served_generate

from sd_pipeline import Assets
from sd_pipeline import watermark as W
from sd_triton.export import Contents, ExportOptions, Hosting, Naming, export_repository
from sd_triton.export.cli import build_parser, options_from_args

# Stability AI's detector calls 35 or more matching bits of 48 "very likely
# marked"; unmarked images match about 24 by chance.
MARKED_MIN_BITS = 35
# The smallest image the watermark fits: 256 x 256 (the tiny model's native size is 64,
# and its UNet's attention at 128 x 128 latents is slow on a CPU: one step, one image,
# no guidance).
SERVED = {
    **SETTINGS,
    "height": 256,
    "width": 256,
    "num_inference_steps": 1,
    "guidance_scale": 1.0,
    "num_images_per_prompt": 1,
}


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


def test_export_flag():
    def watermark(*flags):
        args = build_parser().parse_args(["src", "out", *flags])
        return options_from_args(args).contents.watermark

    assert watermark() is None
    assert watermark("--watermark") is True
    assert watermark("--no-watermark") is False


def test_sd_export_does_not_watermark_by_default(assets):
    assert assets.config.watermark is False


# ---------------------------------------------------------------------------
# Served: the tiny SD 1.x exported with --watermark

MODEL = "wm_stable_diffusion"


@pytest.fixture(scope="module")
def watermarked_url(
    extras_server, serve_extras, tiny_checkpoint, tiny_repository, copy_onnx_export
):
    """The tiny model exported with the watermark on (the session export's ONNX files), as
    ``wm_*`` models of conftest's extras server."""
    path = extras_server.repository
    options = ExportOptions(
        contents=Contents(watermark=True, safety_checker=False, stream_model=False),
        hosting=Hosting(pipeline_instances=1),
        naming=Naming(model_prefix="wm_"),
        parameters={"max_side": 256, "max_pixels": 256 * 256},
    )
    with pytest.MonkeyPatch.context() as mp:
        copy_onnx_export(mp, tiny_repository)
        export_repository(tiny_checkpoint, path, options, overwrite=True)
    record = path / f"{MODEL}/1/assets/pipeline.json"
    assert json.loads(record.read_text())["watermark"]
    with serve_extras("wm_") as url:
        yield url


def watermarked_reference(pipe, seed: int, **settings) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' pipeline, then its SDXL watermarker as ``StableDiffusionXLPipeline`` applies it
    (on the VAE's output, before postprocessing): (marked, unmarked) uint8 images."""
    generator = torch.Generator().manual_seed(seed)
    latents = pipe(generator=generator, output_type="latent", **settings).images
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    marked = StableDiffusionXLWatermarker().apply_watermark(decoded.clone())
    return to_images(marked), to_images(decoded)


def test_served_images_equal_diffusers_and_carry_the_watermark(watermarked_url, reference_pipe):
    images, flags, _ = served_generate(watermarked_url, **SERVED, seed=3, model=MODEL)
    expected, unmarked = watermarked_reference(reference_pipe, 3, **SERVED)
    assert images.shape == (1, 256, 256, 3) and not flags.any()
    assert max_diff(images, expected) <= 1
    assert max_diff(images, unmarked) > 3  # the watermark is there
    marked, plain = W.matching_bits(images[0]), W.matching_bits(unmarked[0])
    print(f"matching bits of {len(W.WATERMARK_BITS)}: served {marked}, unmarked {plain}")
    assert marked >= MARKED_MIN_BITS and plain < MARKED_MIN_BITS
