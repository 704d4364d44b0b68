"""A request's FP32 values mean the decimal the client sent (served, against diffusers).

``strength`` travels as FP32. The float32 nearest to 0.7 is 0.69999999; times
10 steps that truncates to 6 denoising steps where diffusers (a Python float)
runs 7, and the image differs completely. The pipeline reads every FP32 input
as the shortest decimal that round-trips the float32 (0.7), so img2img and
inpainting match diffusers at strengths that are not exact in binary.

The cases are chosen where the bug shows: at 0.7 and 0.9, 10 and 20 steps
lose a step in float32 (0.3 does not, at any step count up to 150: it is the
control). Every strength meets every scheduler (one of them ancestral, which
draws noise per step) in each pipeline, and each (strength, steps, scheduler)
triple is run once, by img2img or by inpainting, which keeps it to 18 served
requests.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    bad_request_error,
    img2img_reference,
    inpaint_reference,
    max_diff,
    served_generate,
    source_image,
    source_mask,
)

pytestmark = pytest.mark.server

SETTINGS = {
    "prompt": "a watercolor of a fox",
    "negative_prompt": "photo",
    "guidance_scale": 7.5,
    "num_images_per_prompt": 2,
}
STRENGTHS = (0.3, 0.7, 0.9)
STEPS = (10, 20)
SCHEDULERS = ("ddim", "euler_a", "dpmpp_2m")


def cases(parity: int) -> list[tuple[float, int, str]]:
    """Every strength with every scheduler; the steps alternate (img2img 0, inpainting 1)."""
    return [
        (strength, STEPS[(i + j + parity) % 2], scheduler)
        for i, strength in enumerate(STRENGTHS)
        for j, scheduler in enumerate(SCHEDULERS)
    ]


IMG2IMG_CASES, INPAINT_CASES = cases(0), cases(1)


def test_the_cases_cover_the_grid_and_lose_a_step_in_float32():
    grid = {(s, n, k) for s in STRENGTHS for n in STEPS for k in SCHEDULERS}
    assert set(IMG2IMG_CASES) | set(INPAINT_CASES) == grid
    for pipeline_cases in (IMG2IMG_CASES, INPAINT_CASES):
        assert {(n, k) for _, n, k in pipeline_cases} == {(n, k) for n in STEPS for k in SCHEDULERS}
    lost = {(s, n) for s, n, _ in grid if int(n * float(np.float32(s))) != int(n * s)}
    assert lost == {(0.7, 10), (0.7, 20), (0.9, 10), (0.9, 20)}


def check(images, flags, expected, expected_flags) -> None:
    assert images.shape == expected.shape == (2, 32, 48, 3)
    assert max_diff(images, expected) <= 1
    np.testing.assert_array_equal(flags, expected_flags)
    assert not expected_flags.all(), "every image is flagged (black): the case proves little"


@pytest.mark.parametrize(("strength", "steps", "scheduler"), IMG2IMG_CASES, ids=str)
def test_served_img2img_matches_diffusers(triton_url, reference_pipe, strength, steps, scheduler):
    image = source_image()  # 32 x 48: not square
    settings = {**SETTINGS, "num_inference_steps": steps, "strength": strength}
    images, flags, _ = served_generate(
        triton_url, **settings, image=image, scheduler=scheduler, seed=4
    )
    expected, expected_flags = img2img_reference(reference_pipe, scheduler, 4, image, **settings)
    check(images, flags, expected, expected_flags)


@pytest.mark.parametrize(("strength", "steps", "scheduler"), INPAINT_CASES, ids=str)
def test_served_inpaint_matches_diffusers(triton_url, reference_pipe, strength, steps, scheduler):
    image, mask = source_image(), source_mask()
    settings = {**SETTINGS, "num_inference_steps": steps, "strength": strength}
    images, flags, _ = served_generate(
        triton_url, **settings, image=image, mask_image=mask, scheduler=scheduler, seed=6
    )
    expected, expected_flags = inpaint_reference(
        reference_pipe, scheduler, 6, image, mask, **settings
    )
    check(images, flags, expected, expected_flags)


def test_strength_that_leaves_one_step_in_decimal_is_served(triton_url):
    """0.01 x 100 steps is one step (float32 0.01 is 0.0099999998: zero steps, refused before)."""
    options = {"prompt": "a cat", "num_inference_steps": 100, "seed": 1}
    image = source_image(32, 32)
    images, _, _ = served_generate(triton_url, **options, image=image, strength=0.01)
    assert images.shape == (1, 32, 32, 3)
    error = bad_request_error(
        triton_url, {**options, "height": None, "width": None, "image": image, "strength": 0.009}
    )
    assert error.status() == "StatusCode.INVALID_ARGUMENT", error
    assert "strength 0.009 x num_inference_steps 100 leaves no denoising step" in error.message()
