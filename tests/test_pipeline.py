"""The sampler loop in-process against diffusers' StableDiffusionPipeline on the same tiny weights.

Golden parity: for every scheduler, with a negative prompt, two images per
prompt and a non-square size, the loop over the exported ONNX files gives
diffusers' images to within one uint8 level and the same NSFW flags; over
diffusers' own modules it gives them bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import (
    IMG2IMG,
    REFERENCE_SCHEDULERS,
    SETTINGS,
    img2img_reference,
    max_diff,
    reference,
    source_image,
)

from sd_pipeline import (
    Assets,
    DiffusersComponents,
    OnnxComponents,
    generate,
    make_request,
)
from sd_pipeline.errors import Cancelled, InvalidRequest
from sd_pipeline.schedulers import SCHEDULERS


@pytest.fixture(scope="module")
def onnx(tiny_repository) -> OnnxComponents:
    return OnnxComponents(tiny_repository)


def test_every_scheduler_alias_has_a_reference():
    # The samplers added since (DPM++ SDE, DPM2, sigma schedules, ...): tests/test_samplers.py.
    assert set(REFERENCE_SCHEDULERS) - {None} <= set(SCHEDULERS)


@pytest.mark.parametrize("scheduler", list(REFERENCE_SCHEDULERS), ids=lambda s: s or "default")
def test_golden_parity_onnx(reference_pipe, assets, onnx, scheduler):
    request = make_request(assets.config, seed=7, scheduler=scheduler, **SETTINGS)
    result = generate(request, onnx, assets)
    images, flags = reference(reference_pipe, scheduler, 7, **SETTINGS)
    assert result.images.shape == (2, 32, 48, 3)
    assert max_diff(result.images, images) <= 1
    np.testing.assert_array_equal(result.nsfw_content_detected, flags)
    np.testing.assert_array_equal(result.seeds, [7, 7])


@pytest.mark.parametrize("scheduler", [None, "euler_a", "dpmpp_2m_karras"], ids=str)
def test_diffusers_modules_are_bitwise_equal(reference_pipe, assets, scheduler):
    components = DiffusersComponents.from_pipeline(reference_pipe)
    request = make_request(assets.config, seed=11, scheduler=scheduler, **SETTINGS)
    result = generate(request, components, assets)
    images, flags = reference(reference_pipe, scheduler, 11, **SETTINGS)
    np.testing.assert_array_equal(result.images, images)
    np.testing.assert_array_equal(result.nsfw_content_detected, flags)


class CountingUnet:
    """Wraps components and records the UNet's batch sizes."""

    def __init__(self, inner):
        self.inner = inner
        self.unet_batches: list[int] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def unet(self, sample, timestep, encoder_hidden_states, added=None, **kwargs):
        assert timestep.shape == (sample.shape[0],) and timestep.dtype == torch.float32
        self.unet_batches.append(sample.shape[0])
        return self.inner.unet(sample, timestep, encoder_hidden_states, added, **kwargs)


def test_guidance_off_halves_the_unet_batch(reference_pipe, assets, onnx):
    settings = {**SETTINGS, "guidance_scale": 1.0, "num_inference_steps": 2}
    counting = CountingUnet(onnx)
    result = generate(
        make_request(assets.config, seed=5, scheduler="euler", **settings), counting, assets
    )
    assert counting.unet_batches == [2, 2]
    images, flags = reference(reference_pipe, "euler", 5, **settings)
    assert max_diff(result.images, images) <= 1
    np.testing.assert_array_equal(result.nsfw_content_detected, flags)


def test_flagged_images_are_black_and_match_diffusers(reference_pipe, assets, onnx):
    """Find a seed whose images the tiny checker partly flags; the flags must match diffusers'."""
    settings = {**SETTINGS, "num_inference_steps": 2, "num_images_per_prompt": 3}
    for seed in range(8):
        result = generate(make_request(assets.config, seed=seed, **settings), onnx, assets)
        flags = result.nsfw_content_detected
        if flags.any() and not flags.all():
            break
    else:
        pytest.fail("the tiny safety checker flagged all or none of 24 images")
    assert not result.images[flags].any(), "flagged images must be black"
    assert result.images[~flags].reshape(int((~flags).sum()), -1).std(axis=1).min() > 0
    images, ref_flags = reference(reference_pipe, None, seed, **settings)
    np.testing.assert_array_equal(flags, ref_flags)
    assert max_diff(result.images, images) <= 1


def test_same_seed_same_bytes_and_random_seed_is_reported(assets, onnx):
    settings = {**SETTINGS, "num_inference_steps": 2}
    a = generate(make_request(assets.config, seed=3, **settings), onnx, assets)
    b = generate(make_request(assets.config, seed=3, **settings), onnx, assets)
    assert a.images.tobytes() == b.images.tobytes()
    c = generate(make_request(assets.config, **settings), onnx, assets)
    assert c.seeds[0] == c.seeds[1]
    d = generate(make_request(assets.config, seed=int(c.seeds[0]), **settings), onnx, assets)
    assert c.images.tobytes() == d.images.tobytes()


def test_unet_calls_are_chunked_to_the_max_batch_size(assets, onnx):
    from dataclasses import replace

    small = Assets(
        replace(assets.config, unet_max_batch_size=3),
        assets.tokenizer,
        assets.scheduler_config,
        assets.feature_extractor,
    )
    settings = {**SETTINGS, "num_inference_steps": 1, "scheduler": "ddim"}
    counting = CountingUnet(onnx)
    chunked = generate(make_request(small.config, seed=1, **settings), counting, small)
    assert counting.unet_batches == [3, 1]  # 2 images x guidance = 4 samples
    whole = generate(make_request(assets.config, seed=1, **settings), onnx, assets)
    assert max_diff(chunked.images, whole.images) <= 1


def test_callback_sees_every_step_and_should_stop_cancels(assets, onnx):
    seen = []
    request = make_request(
        assets.config, seed=1, scheduler="heun", **{**SETTINGS, "num_inference_steps": 2}
    )
    generate(
        request, onnx, assets, callback=lambda i, n, latents: seen.append((i, n, latents.shape))
    )
    # Heun evaluates the UNet twice per step but once for the last: 2 * 2 - 1.
    assert [(i, n) for i, n, _ in seen] == [(0, 3), (1, 3), (2, 3)]
    assert seen[0][2] == (2, 4, 16, 24)

    polls = []

    def stop_at_second_poll():
        polls.append(1)
        return len(polls) >= 2

    with pytest.raises(Cancelled, match="cancelled at step 1 of 3"):
        generate(request, onnx, assets, should_stop=stop_at_second_poll)


def test_generate_validates_requests_built_by_hand(assets, onnx):
    from dataclasses import replace

    request = make_request(assets.config, seed=1, **SETTINGS)
    with pytest.raises(InvalidRequest, match="multiple of"):
        generate(replace(request, height=30), onnx, assets)
    with pytest.raises(InvalidRequest, match="unknown scheduler"):
        generate(replace(request, scheduler="nope"), onnx, assets)


# ---------------------------------------------------------------------------
# img2img: StableDiffusionImg2ImgPipeline parity


@pytest.mark.parametrize(
    ("scheduler", "strength"),
    [
        (None, 0.5),
        ("ddim", 1.0),
        ("euler_a", 0.5),
        ("heun", 0.75),
        ("dpmpp_2m_karras", 0.5),
        ("unipc", 1.0),
    ],
    ids=str,
)
def test_img2img_golden_parity(reference_pipe, assets, onnx, scheduler, strength):
    image = source_image()
    settings = {**IMG2IMG, "strength": strength}
    request = make_request(assets.config, seed=3, scheduler=scheduler, image=image, **settings)
    assert (request.height, request.width) == (32, 48)
    result = generate(request, onnx, assets)
    images, flags = img2img_reference(reference_pipe, scheduler, 3, image, **settings)
    assert max_diff(result.images, images) <= 1
    np.testing.assert_array_equal(result.nsfw_content_detected, flags)


def test_img2img_runs_only_the_last_strength_of_the_steps(assets, onnx):
    counting = CountingUnet(onnx)
    steps = []
    request = make_request(
        assets.config,
        seed=1,
        scheduler="ddim",
        image=source_image(),
        **{**IMG2IMG, "strength": 0.5},
    )
    generate(request, counting, assets, callback=lambda i, n, _: steps.append((i, n)))
    assert steps == [(0, 2), (1, 2)] and counting.unet_batches == [4, 4]
