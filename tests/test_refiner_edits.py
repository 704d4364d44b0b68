"""The SDXL refiner after img2img and inpainting, served == diffusers' ensemble of experts.

On the families server (``xl_``: the tiny SDXL base with the tiny refiner beside it,
tests/conftest.py), a request with an ``image`` (and a ``mask_image``) and
``refiner_switch_at`` equals, within one uint8 level, diffusers'

- img2img: ``StableDiffusionXLImg2ImgPipeline(base)(image, strength=s, denoising_end=f,
  output_type="latent")`` then the refiner's ``StableDiffusionXLImg2ImgPipeline(image=latents,
  strength=s, denoising_start=f)``;
- inpainting: ``StableDiffusionXLInpaintPipeline(base)(image, mask_image, strength=s,
  denoising_end=f, output_type="latent")`` then the refiner's
  ``StableDiffusionXLInpaintPipeline(image=latents, mask_image, denoising_start=f)``,

one generator for both. Strengths and switches not exact in binary, an ancestral sampler
(it draws from the generator in both stages) and a second-order one, 32x48; a switch that
leaves the base no step of the strength's share is INVALID_ARG; the CLI's infotext of such
an inpainting gives the same image again.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from helpers import max_diff, source_image, source_mask
from test_sdxl import BASE, XL_MODEL, _run, served, served_error

pytestmark = pytest.mark.server

HEIGHT, WIDTH = 32, 48
SETTINGS = {"prompt": "a cat", "num_inference_steps": 10, "guidance_scale": 5.0}


@pytest.fixture(scope="module")
def inpaint_pipes(xl_pipes, family_checkpoints):
    """diffusers' SDXL inpainting pipelines: the base's, and the refiner's (as its docs load it)."""
    from diffusers import StableDiffusionXLInpaintPipeline

    refiner = StableDiffusionXLInpaintPipeline.from_pretrained(
        family_checkpoints["tiny-sdxl-refiner"]
    )
    refiner.set_progress_bar_config(disable=True)
    return StableDiffusionXLInpaintPipeline(**xl_pipes.base.components), refiner


def _ensemble(pipes, scheduler, seed: int, switch: float, **settings) -> np.ndarray:
    """uint8 images of ``base(denoising_end=switch)`` then ``refiner(denoising_start=switch)``."""
    base, refiner = pipes
    generator = torch.Generator().manual_seed(seed)
    latents = _run(
        base, scheduler, generator, seed=seed, denoising_end=switch, output_type="latent",
        **settings,
    )  # fmt: skip
    settings = {k: v for k, v in settings.items() if k != "image"}
    out = _run(
        refiner, scheduler, generator, seed=seed, image=latents, denoising_start=switch,
        output_type="np", **settings,
    )  # fmt: skip
    return (out * 255).round().astype(np.uint8)


IMG2IMG_CASES = {
    "euler_a": ("euler_a", 0.7, 0.65, {"num_images_per_prompt": 2}),
    "heun": ("heun", 0.65, 0.7, {"negative_prompt": "blurry"}),
}


@pytest.mark.parametrize("case", IMG2IMG_CASES)
def test_img2img_then_refiner_equals_diffusers(families_url, xl_pipes, case):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    scheduler, strength, switch, extra = IMG2IMG_CASES[case]
    image = source_image(HEIGHT, WIDTH)
    settings = {**SETTINGS, "strength": strength, **extra}
    images = served(
        families_url, XL_MODEL, seed=4, scheduler=scheduler, image=image,
        refiner_switch_at=switch, **settings,
    )  # fmt: skip
    base = StableDiffusionXLImg2ImgPipeline(**xl_pipes.base.components)
    expected = _ensemble(
        (base, xl_pipes.refiner), scheduler, 4, switch, image=PIL.Image.fromarray(image),
        **settings,
    )  # fmt: skip
    assert max_diff(images, expected) <= 1
    # Not vacuous: the refiner ran (the base alone, at the same strength, differs).
    alone = served(families_url, XL_MODEL, seed=4, scheduler=scheduler, image=image, **settings)
    assert max_diff(images, alone) > 1


INPAINT_CASES = {
    # strength absent: SDXL inpainting's default, 0.9999 (guidance too: 7.5)
    "euler_a": ("euler_a", 0.7, 0.65, {"num_images_per_prompt": 2}),
    "dpmpp_2m_default_strength": ("dpmpp_2m", None, 0.7, {"guidance_scale": None}),
}


@pytest.mark.parametrize("case", INPAINT_CASES)
def test_inpainting_then_refiner_equals_diffusers(families_url, inpaint_pipes, case):
    scheduler, strength, switch, extra = INPAINT_CASES[case]
    image, mask = source_image(HEIGHT, WIDTH), source_mask(HEIGHT, WIDTH)
    settings = {**SETTINGS, "strength": strength, **extra}
    settings = {k: v for k, v in settings.items() if v is not None}
    images = served(
        families_url, XL_MODEL, seed=6, scheduler=scheduler, image=image, mask_image=mask,
        refiner_switch_at=switch, **settings,
    )  # fmt: skip
    expected = _ensemble(
        inpaint_pipes, scheduler, 6, switch, image=PIL.Image.fromarray(image),
        mask_image=PIL.Image.fromarray(mask), height=HEIGHT, width=WIDTH, **settings,
    )  # fmt: skip
    assert max_diff(images, expected) <= 1
    alone = served(
        families_url, XL_MODEL, seed=6, scheduler=scheduler, image=image, mask_image=mask,
        **settings,
    )  # fmt: skip
    assert max_diff(images, alone) > 1


@pytest.mark.parametrize(
    ("options", "words"),
    [
        # strength 0.3 of 10 steps runs timesteps below 300; a switch at 0.5 hands over at 500
        (
            {"image": source_image(HEIGHT, WIDTH), "strength": 0.3, "refiner_switch_at": 0.5},
            ["refiner_switch_at 0.5", "leaves the base no step", "strength", "raise strength"],
        ),
        (
            {"image": source_image(HEIGHT, WIDTH), "mask_image": source_mask(HEIGHT, WIDTH),
             "strength": 0.3, "refiner_switch_at": 0.5},
            ["leaves the base no step", "lower refiner_switch_at"],
        ),
        (
            {"image": source_image(HEIGHT, WIDTH), "refiner_switch_at": 0.7, "enable_hr": True},
            ["enable_hr", "leave out the image"],
        ),
    ],
    ids=["img2img_base_no_step", "inpaint_base_no_step", "hires"],
)  # fmt: skip
def test_bad_combinations_are_invalid_arg(families_url, options, words):
    error = served_error(families_url, XL_MODEL, num_inference_steps=10, **options)
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    for word in words:
        assert word in error.message()
    assert served(families_url, XL_MODEL, seed=1, **{**BASE, "num_inference_steps": 1}).shape == (
        1, HEIGHT, WIDTH, 3,
    )  # fmt: skip


def test_cli_inpainting_with_refiner_infotext_reproduces_it(families_url, tmp_path):
    from sd_triton.client import cli, infotext_options, parse_infotext, read_infotext

    image, mask = source_image(HEIGHT, WIDTH), source_mask(HEIGHT, WIDTH)
    PIL.Image.fromarray(image).save(tmp_path / "image.png")
    PIL.Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    argv = ["inpaint", "a cat", "-o", str(out), "--url", families_url]
    argv += ["--model", XL_MODEL, "--image", str(tmp_path / "image.png")]
    argv += ["--mask", str(tmp_path / "mask.png"), "--strength", "0.7", "--steps", "6"]
    argv += ["--seed", "8", "--scheduler", "euler_a", "--refiner-switch-at", "0.65"]
    assert cli.main(argv) == cli.EXIT_OK
    fields = parse_infotext(read_infotext(out))
    assert fields["Refiner"].startswith("tiny-sdxl-refiner")
    options = infotext_options(fields)
    assert options["refiner_switch_at"] == 0.65 and options["strength"] == 0.7
    again = served(families_url, XL_MODEL, image=image, mask_image=mask, **options)
    assert max_diff(np.asarray(PIL.Image.open(out).convert("RGB")), again[0]) == 0
