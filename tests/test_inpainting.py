"""Inpainting against diffusers' StableDiffusionInpaintPipeline on the same tiny weights.

Two UNets: the session's tiny model (4 channels: the unmasked region is put
back after every step) and the same model with a 9-channel inpainting UNet
(latents + mask + masked image latents), exported to its own repository
and served by its own tritonserver for this module.

- golden parity in-process (the loop over the exported ONNX files), for
  several schedulers and two strengths per UNet, within one uint8 level and
  with the same NSFW flags; in the unmasked region too;
- the same, served, for a few cases per UNet;
- every bad image / mask / strength input gets INVALID_ARG with its
  sentence, and a good request right after succeeds.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from helpers import (
    bad_request_error,
    inpaint_reference,
    max_diff,
    served_generate,
    source_image,
    source_mask,
)

from sd_pipeline import Assets, OnnxComponents, generate, make_request
from sd_pipeline.request import img2img_strength

SETTINGS = {
    "prompt": "a red armchair in a garden",
    "negative_prompt": "blurry",
    "num_inference_steps": 4,
    "guidance_scale": 7.5,
    "num_images_per_prompt": 2,
}


# Unmasked pixels, away from the mask's edge by a latent pixel or more.
KEEP = (slice(26, 32), slice(0, 48))


def scheduler_input(scheduler: str | None) -> dict:
    return {} if scheduler is None else {"scheduler": scheduler}


def check_parity(images, flags, expected, expected_flags) -> None:
    assert images.shape == expected.shape == (2, 32, 48, 3)
    assert max_diff(images, expected) <= 1
    assert max_diff(images[:, KEEP[0], KEEP[1]], expected[:, KEEP[0], KEEP[1]]) <= 1
    np.testing.assert_array_equal(flags, expected_flags)
    assert not np.all(expected_flags), "every image is flagged (black): the case proves little"


def check_in_process_parity(pipe, assets, repository, scheduler, strength, seed) -> None:
    """The loop over ``repository``'s ONNX files against diffusers' inpainting on ``pipe``."""
    image, mask = source_image(), source_mask()
    settings = {**SETTINGS, "strength": strength}
    request = make_request(
        assets.config, seed=seed, scheduler=scheduler, image=image, mask_image=mask, **settings
    )
    result = generate(request, OnnxComponents(repository), assets)
    expected, flags = inpaint_reference(pipe, scheduler, seed, image, mask, **settings)
    check_parity(result.images, result.nsfw_content_detected, expected, flags)


# ---------------------------------------------------------------------------
# The 4-channel UNet (the session's tiny model)


CASES4 = [(None, 1.0), ("euler_a", 0.5), ("ddim", 1.0), ("heun", 0.5), ("dpmpp_2m", 0.75)]


@pytest.mark.parametrize(("scheduler", "strength"), CASES4, ids=str)
def test_inpaint_parity_4_channel_unet(
    reference_pipe, assets, tiny_repository, scheduler, strength
):
    check_in_process_parity(reference_pipe, assets, tiny_repository, scheduler, strength, seed=3)


def test_inpaint_default_strength_is_diffusers_one(reference_pipe, assets, tiny_repository):
    image, mask = source_image(), source_mask()
    request = make_request(assets.config, seed=5, image=image, mask_image=mask, **SETTINGS)
    assert request.strength is None and img2img_strength(request, assets.config) == 1.0
    result = generate(request, OnnxComponents(tiny_repository), assets)
    # diffusers' default strength is 1.0
    expected, flags = inpaint_reference(reference_pipe, None, 5, image, mask, **SETTINGS)
    check_parity(result.images, result.nsfw_content_detected, expected, flags)


def test_served_inpaint_4_channel_unet(triton_url, reference_pipe):
    image, mask = source_image(), source_mask()
    settings = {**SETTINGS, "strength": 0.6}
    images, flags, seeds = served_generate(
        triton_url, **settings, image=image, mask_image=mask, scheduler="euler_a", seed=9
    )
    expected, expected_flags = inpaint_reference(
        reference_pipe, "euler_a", 9, image, mask, **settings
    )
    check_parity(images, flags, expected, expected_flags)
    np.testing.assert_array_equal(seeds, [9, 9])


# ---------------------------------------------------------------------------
# The 9-channel inpainting UNet: its own checkpoint, repository and server


@pytest.fixture(scope="module")
def checkpoint9(build_dir):
    path = build_dir / "tiny-sd-inpainting"
    if not (path / "model_index.json").exists():
        cmd = [sys.executable, "-m", "sd_triton.export.tiny", str(path), "--inpainting"]
        subprocess.run(cmd, check=True)
    return path


@pytest.fixture(scope="module")
def repository9(build_dir, checkpoint9):
    from sd_triton.export import Contents, ExportOptions, Hosting, export_repository

    path = build_dir / "model_repository_inpainting"
    # Lean: one pipeline instance, no streaming twin.
    options = ExportOptions(
        contents=Contents(stream_model=False), hosting=Hosting(host="python", pipeline_instances=1)
    )
    export_repository(checkpoint9, path, options, overwrite=True)
    return path


@pytest.fixture(scope="module")
def pipe9(checkpoint9):
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(checkpoint9)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.in_channels == 9
    return pipe


@pytest.fixture(scope="module")
def assets9(repository9) -> Assets:
    assets = Assets.load(repository9 / "stable_diffusion" / "1" / "assets")
    assert assets.config.unet_in_channels == 9
    return assets


@pytest.fixture(scope="module")
def url9(repository9):
    from sd_triton.server import TritonServer

    server = TritonServer(repository9)
    server.start(timeout_s=300)
    try:
        yield server.grpc_url
    finally:
        server.stop()


CASES9 = [(None, 1.0), ("euler_a", 0.5), ("ddim", 0.5), ("heun", 1.0), ("dpmpp_2m", 0.75)]


@pytest.mark.parametrize(("scheduler", "strength"), CASES9, ids=str)
def test_inpaint_parity_9_channel_unet(pipe9, assets9, repository9, scheduler, strength):
    check_in_process_parity(pipe9, assets9, repository9, scheduler, strength, seed=7)


@pytest.mark.parametrize(("scheduler", "strength"), [("euler_a", 0.5), (None, 1.0)], ids=str)
def test_served_inpaint_9_channel_unet(url9, pipe9, scheduler, strength):
    image, mask = source_image(), source_mask()
    settings = {**SETTINGS, "strength": strength}
    images, flags, _ = served_generate(
        url9, **settings, image=image, mask_image=mask, seed=7, **scheduler_input(scheduler)
    )
    expected, expected_flags = inpaint_reference(pipe9, scheduler, 7, image, mask, **settings)
    check_parity(images, flags, expected, expected_flags)


def test_9_channel_unet_only_inpaints(url9):
    for inputs in ({}, {"image": source_image(32, 32)}):
        error = bad_request_error(url9, inputs)
        assert error.status() == "StatusCode.INVALID_ARGUMENT", error
        assert "inpainting UNet (9 input channels): send an image and a mask_image" in str(error)


# ---------------------------------------------------------------------------
# Bad input, each followed by a good request

IMAGE = source_image(32, 32)
MASK = source_mask(32, 32)

BAD_INPUTS = [
    # Triton rejects a shape or dtype the config does not allow before the model sees it.
    ({"image": np.zeros((32, 32), np.uint8)}, "unexpected shape for input 'image'"),
    ({"image": np.zeros((32, 32, 4), np.uint8)}, "unexpected shape for input 'image'"),
    ({"image": np.zeros((32, 32, 3), np.float32)}, "image"),
    ({"image": np.zeros((0, 32, 3), np.uint8)}, "input image is empty"),
    ({"image": np.zeros((132, 128, 3), np.uint8)}, "over this model's limit"),
    ({"image": np.zeros((30, 32, 3), np.uint8)}, "the image's height must be a positive multiple"),
    ({"mask_image": MASK}, "mask_image was sent without an image"),
    ({"image": IMAGE, "mask_image": MASK[:16]}, "mask_image is 16 x 32 pixels but the image"),
    ({"image": IMAGE, "mask_image": MASK[..., None]}, "unexpected shape for input 'mask_image'"),
    ({"image": IMAGE, "mask_image": MASK.astype(np.float32)}, "mask_image"),
    ({"image": IMAGE, "mask_image": MASK, "strength": 0.0}, "strength must be in (0, 1]"),
    ({"image": IMAGE, "mask_image": MASK, "strength": 1.5}, "strength must be in (0, 1]"),
    ({"image": IMAGE, "mask_image": MASK, "strength": float("nan")}, "strength must be in (0, 1]"),
    ({"image": IMAGE, "strength": float("nan")}, "strength must be in (0, 1]"),
]


@pytest.mark.parametrize(("inputs", "message"), BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_inpainting_input_is_invalid_arg(triton_url, inputs, message):
    error = bad_request_error(triton_url, {"height": None, "width": None, **inputs})
    assert error.status() == "StatusCode.INVALID_ARGUMENT", error
    assert message in error.message()
    options = {"prompt": "a cat", "num_inference_steps": 2, "seed": 1}
    images, _, _ = served_generate(triton_url, **options, image=IMAGE, mask_image=MASK)
    assert images.shape == (1, 32, 32, 3)


# ---------------------------------------------------------------------------
# Client and command line


def test_outpaint_canvas_extends_with_edge_pixels_and_masks_the_margins():
    from sd_triton.client import InvalidRequestError, outpaint_canvas

    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    canvas, mask = outpaint_canvas(image, left=2, top=1, overlap=1)
    assert canvas.shape == (5, 8, 3) and mask.shape == (5, 8) and mask.dtype == np.uint8
    np.testing.assert_array_equal(canvas[1:, 2:], image)
    np.testing.assert_array_equal(canvas[0, 2:], image[0])  # edge repeated
    np.testing.assert_array_equal(canvas[1:, 0], image[:, 0])
    keep = np.zeros((5, 8), bool)
    keep[2:, 3:] = True  # the image, less one pixel of overlap on the extended sides
    np.testing.assert_array_equal(mask == 0, keep)
    assert set(np.unique(mask)) == {0, 255}
    with pytest.raises(InvalidRequestError, match="at least one margin"):
        outpaint_canvas(image)
    with pytest.raises(InvalidRequestError, match="left must be a whole number"):
        outpaint_canvas(image, left=-4)


def test_client_inpaint_outpaint_img2img(triton_url):
    from sd_triton.client import Client, outpaint_canvas

    image, mask = source_image(32, 32), source_mask(32, 32)
    options = {"num_inference_steps": 2, "seed": 6, "scheduler": "euler_a"}
    with Client(triton_url, timeout_s=120) as client:
        result = client.inpaint("a cat", image, mask, **options)
        assert result.settings.strength == 1.0
        expected, _, _ = served_generate(
            triton_url, prompt="a cat", image=image, mask_image=mask, **options
        )
        assert max_diff(np.stack([np.asarray(i) for i in result.images]), expected) <= 1

        wide = client.outpaint("a cat", image[:, :24], left=8, right=8, overlap=2, **options)
        assert wide.images[0].size == (40, 32) and wide.settings.width == 40
        canvas, canvas_mask = outpaint_canvas(image[:, :24], left=8, right=8, overlap=2)
        expected, _, _ = served_generate(
            triton_url, prompt="a cat", image=canvas, mask_image=canvas_mask, **options
        )
        assert max_diff(np.asarray(wide.images[0])[None], expected) <= 1

        moved = client.img2img("a cat", image, strength=0.5, **options)
        assert moved.settings.strength == 0.5 and moved.images[0].size == (32, 32)


def test_cli_inpaint_and_outpaint(triton_url, tmp_path, capsys):
    from PIL import Image

    from sd_triton.client import cli

    Image.fromarray(source_image(32, 32)).save(tmp_path / "in.png")
    Image.fromarray(source_mask(32, 32)).save(tmp_path / "mask.png")
    common = [
        "--url",
        triton_url,
        "--steps",
        "2",
        "--seed",
        "1",
        "--image",
        str(tmp_path / "in.png"),
    ]
    argv = ["inpaint", "a cat", "--mask", str(tmp_path / "mask.png"), "-o", str(tmp_path / "a.png")]
    assert cli.main([*argv, *common]) == cli.EXIT_OK
    argv = ["outpaint", "a cat", "--left", "8", "--bottom", "4", "-o", str(tmp_path / "b.png")]
    assert cli.main([*argv, *common]) == cli.EXIT_OK
    argv = ["img2img", "a cat", "--strength", "0.5", "-o", str(tmp_path / "c.png")]
    assert cli.main([*argv, *common]) == cli.EXIT_OK
    assert Image.open(tmp_path / "a.png").size == (32, 32)
    assert Image.open(tmp_path / "b.png").size == (40, 36)
    assert Image.open(tmp_path / "c.png").size == (32, 32)
    # a mask of another size: one line, exit 2
    Image.fromarray(source_mask(16, 32)).save(tmp_path / "small.png")
    argv = [
        "inpaint",
        "a cat",
        "--mask",
        str(tmp_path / "small.png"),
        "-o",
        str(tmp_path / "d.png"),
    ]
    assert cli.main([*argv, *common]) == cli.EXIT_INVALID
    assert "mask_image is 16 x 32 pixels" in capsys.readouterr().err


def test_docs_examples_run(triton_url, tmp_path, monkeypatch, capsys):
    """docs/img2img.md's Python and command-line examples, on a 32x32 room."""
    import re
    import shlex
    from pathlib import Path

    from PIL import Image

    from sd_triton.client import cli

    text = (Path(__file__).resolve().parent.parent / "docs" / "img2img.md").read_text()
    python = re.findall(r"```python\n(.*?)```", text, re.S)
    console = re.findall(r"```console\n(.*?)```", text, re.S)
    assert len(python) == 1 and len(console) == 1
    monkeypatch.chdir(tmp_path)
    Image.fromarray(source_image(32, 32)).save("room.png")
    Image.fromarray(source_mask(32, 32)).save("mask.png")
    exec(compile(python[0].replace("localhost:8001", triton_url), "img2img.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "(96, 32)"  # within the tiny model's max_side
    commands = [line.removeprefix("$ sd-triton ") for line in console[0].splitlines()]
    for command in commands:
        assert cli.main([*shlex.split(command), "--url", triton_url]) == cli.EXIT_OK, command
    for name in ("wc.png", "chair.png", "wide.png"):
        assert Image.open(name).size == ((96, 32) if name == "wide.png" else (32, 32))
