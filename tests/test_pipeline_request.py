"""Request parsing and validation (no models): every bad input is an InvalidRequest with a clear message."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from sd_pipeline import spec as S
from sd_pipeline.config import Limits, PipelineConfig
from sd_pipeline.errors import InvalidRequest
from sd_pipeline.request import img2img_strength, make_request, parse_request
from sd_pipeline.schedulers import SCHEDULERS, make_scheduler

CONFIG = PipelineConfig.from_dict(
    {
        "latent_channels": 4,
        "unet_in_channels": 4,
        "vae_scaling_factor": 0.18215,
        "vae_scale_factor": 2,
        "native_height": 64,
        "native_width": 64,
        "size_step": 4,
        "text_width": 32,
        "tokenizer_max_length": 77,
        "unet_max_batch_size": 16,
        "a_key_from_a_newer_exporter": True,
    }
)
IMAGE = np.zeros((8, 12, 3), np.uint8)
LIMITS = replace(Limits.default(64, 64), max_steps=60, max_pixels=96 * 96, max_images=4)


def text(value: str | bytes) -> np.ndarray:
    return np.array([value.encode() if isinstance(value, str) else value], dtype=object)


def i32(value: int) -> np.ndarray:
    return np.array([value], dtype=np.int32)


def f32(value: float) -> np.ndarray:
    return np.array([value], dtype=np.float32)


def parse(**inputs):
    inputs.setdefault("prompt", text("a cat"))
    inputs = {k: v for k, v in inputs.items() if v is not None}
    return parse_request(inputs, CONFIG, LIMITS)


def test_defaults_follow_the_contract():
    r = parse()
    # Absent negative prompt: None (SD encodes "", SDXL base uses zeros), not "".
    assert (r.prompt, r.negative_prompt) == ("a cat", None)
    assert (r.height, r.width) == (CONFIG.native_height, CONFIG.native_width)
    assert r.num_inference_steps == S.STABLE_DIFFUSION.input("num_inference_steps").default == 50
    assert r.guidance_scale == 7.5 and r.do_classifier_free_guidance
    assert r.num_images_per_prompt == 1
    assert r.scheduler is None
    assert 0 <= r.seed < 2**63


def test_all_options_parse():
    r = parse(
        prompt=text("ein Bild, ünïcödé ✓"),
        negative_prompt=text("blurry"),
        height=i32(32),
        width=i32(48),
        num_inference_steps=i32(3),
        guidance_scale=f32(1.0),
        seed=np.array([-5], np.int64),
        scheduler=text("euler_a"),
        num_images_per_prompt=i32(2),
    )
    assert r.prompt == "ein Bild, ünïcödé ✓"
    assert (r.height, r.width, r.num_inference_steps, r.seed) == (32, 48, 3, -5)
    assert not r.do_classifier_free_guidance
    assert (r.scheduler, r.num_images_per_prompt) == ("euler_a", 2)


def test_img2img_takes_its_size_from_the_image():
    r = parse(image=IMAGE, num_inference_steps=i32(4))
    assert (r.height, r.width, r.strength, img2img_strength(r, CONFIG)) == (8, 12, None, 0.8)
    r = parse(image=IMAGE, strength=f32(0.5), height=i32(8), width=i32(12))
    assert img2img_strength(r, CONFIG) == 0.5


def test_random_seeds_differ():
    assert len({parse().seed for _ in range(4)}) == 4


def test_empty_scheduler_means_default():
    assert parse(scheduler=text("")).scheduler is None
    assert parse(scheduler=text("default")).scheduler == "default"


def test_deployment_default_scheduler_applies_when_none_is_named():
    def with_default(**inputs):
        return parse_request(
            {"prompt": text("a cat"), **inputs}, CONFIG, LIMITS, default_scheduler="euler"
        )

    assert with_default().scheduler == "euler"
    assert with_default(scheduler=text("")).scheduler == "euler"
    assert with_default(scheduler=text("ddim")).scheduler == "ddim"


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"prompt": None}, "prompt is required"),
        ({"prompt": text("")}, "prompt is empty"),
        ({"prompt": text("   ")}, "prompt is empty"),
        ({"prompt": text(b"\xff\xfe cat")}, "prompt is not valid UTF-8"),
        ({"negative_prompt": text(b"\xc3")}, "negative_prompt is not valid UTF-8"),
        ({"prompt": np.array([b"a", b"b"], dtype=object)}, "one request is one prompt"),
        ({"prompt": np.array([[b"a"]], dtype=object)}, "input prompt must have shape [1]"),
        ({"num_inference_steps": i32(0)}, "num_inference_steps must be at least 1, got 0"),
        ({"num_inference_steps": i32(-3)}, "num_inference_steps must be at least 1"),
        ({"num_inference_steps": i32(61)}, "over this model's limit of 60"),
        ({"guidance_scale": f32(float("nan"))}, "guidance_scale must be a finite number"),
        ({"guidance_scale": f32(float("inf"))}, "guidance_scale must be a finite number"),
        ({"guidance_scale": f32(-1.0)}, "guidance_scale must be a finite number >= 0"),
        ({"height": i32(30)}, "height must be a positive multiple of 4 pixels"),
        ({"width": i32(0)}, "width must be a positive multiple of 4"),
        ({"width": i32(-64)}, "width must be a positive multiple of 4"),
        ({"height": i32(128), "width": i32(128)}, "over this model's limit of 9216 pixels"),
        (
            {"scheduler": text("karras_magic")},
            "unknown scheduler 'karras_magic'; known schedulers: default, ddim",
        ),
        ({"num_images_per_prompt": i32(0)}, "num_images_per_prompt must be at least 1"),
        (
            {"num_images_per_prompt": i32(5)},
            "num_images_per_prompt 5 is over this model's limit of 4",
        ),
        (
            {"num_inference_steps": np.array([3], np.int64)},
            "num_inference_steps must be INT32, got int64",
        ),
        ({"guidance_scale": np.array([7.5], np.float64)}, "guidance_scale must be FP32"),
        ({"seed": np.array([1], np.int32)}, "seed must be INT64"),
        ({"prompt": np.array([1], np.int32)}, "prompt must be BYTES"),
        ({"height": np.array([32, 32], np.int32)}, "height must have shape [1]"),
        ({"mask_image": np.zeros((8, 8), np.uint8)}, "mask_image was sent without an image"),
        (
            {"mask_image": np.zeros((8, 8), np.uint8), "image": IMAGE},
            "mask_image is 8 x 8 pixels but the image is 8 x 12: they must be the same size",
        ),
        ({"image": np.zeros((0, 12, 3), np.uint8)}, "input image is empty (shape [0, 12, 3])"),
        ({"image": np.zeros((8, 8), np.uint8)}, "image must have shape ['height', 'width', 3]"),
        ({"image": np.zeros((8, 8, 4), np.uint8)}, "image must have shape ['height', 'width', 3]"),
        ({"image": np.zeros((8, 8, 3), np.float32)}, "input image must be UINT8, got float32"),
        ({"image": np.zeros((30, 32, 3), np.uint8)}, "height must be a positive multiple of 4"),
        ({"image": IMAGE, "height": i32(16)}, "leave height and width out with an image"),
        ({"image": IMAGE, "strength": f32(0.0)}, "strength must be in (0, 1], got 0.0"),
        ({"image": IMAGE, "strength": f32(1.5)}, "strength must be in (0, 1]"),
        ({"image": IMAGE, "strength": f32(float("nan"))}, "strength must be in (0, 1]"),
        ({"image": IMAGE, "strength": f32(0.01)}, "leaves no denoising step"),
        ({"strength": f32(0.5)}, "strength applies to img2img only"),
        ({"steps": i32(3)}, "unknown input steps"),
    ],
)
def test_bad_input_is_invalid_request(inputs, message):
    with pytest.raises(InvalidRequest) as e:
        parse(**inputs)
    assert message in str(e.value)


def test_limits_from_parameters():
    limits = Limits.from_parameters({"max_steps": "30", "max_images": ""}, CONFIG)
    assert limits == Limits(
        max_steps=30,
        max_pixels=4 * 64 * 64,
        max_images=8,
        max_prompt_bytes=16 * 1024,
        max_work=400 * 64 * 64,
        max_side=2 * 64,
    )
    assert Limits.from_parameters({}, CONFIG) == Limits.default(64, 64)
    with pytest.raises(ValueError, match="max_pixels must be an integer"):
        Limits.from_parameters({"max_pixels": "lots"}, CONFIG)
    with pytest.raises(ValueError, match="max_steps must be at least 1"):
        Limits.from_parameters({"max_steps": "0"}, CONFIG)


def test_pipeline_json_missing_key_is_named():
    with pytest.raises(ValueError, match="lacks .*size_step"):
        PipelineConfig.from_dict({k: 1 for k in ("latent_channels", "unet_in_channels")})


def test_make_request_validates():
    r = make_request(CONFIG, "a cat", seed=3, num_inference_steps=2)
    assert (r.height, r.seed) == (64, 3)
    with pytest.raises(InvalidRequest, match="multiple of 4"):
        make_request(CONFIG, "a cat", height=33)


SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}


@pytest.mark.parametrize("name", [None, "default", *SCHEDULERS])
def test_every_scheduler_builds_fresh_from_the_model_config(name):
    a = make_scheduler(name, SD15_SCHEDULER)
    b = make_scheduler(name, SD15_SCHEDULER)
    assert a is not b
    expected = SCHEDULERS[name].class_name if name in SCHEDULERS else "PNDMScheduler"
    assert type(a).__name__ == expected
    assert a.config.beta_schedule == "scaled_linear" and a.config.steps_offset == 1
    a.set_timesteps(4)
    assert len(a.timesteps) >= 4


def test_karras_alias_sets_karras_sigmas():
    assert make_scheduler("dpmpp_2m_karras", SD15_SCHEDULER).config.use_karras_sigmas
    assert not make_scheduler("dpmpp_2m", SD15_SCHEDULER).config.use_karras_sigmas


@pytest.mark.parametrize(("strength", "steps", "runs"), [(0.7, 10, 7), (0.9, 20, 18), (0.3, 10, 3)])
def test_float_inputs_mean_the_decimal_sent(strength, steps, runs):
    """FP32 0.7 is 0.69999999: 10 x that truncates to 6 steps; diffusers runs int(10 x 0.7) = 7."""
    from sd_pipeline.loop import set_timesteps

    r = parse(
        image=IMAGE,
        strength=f32(strength),
        guidance_scale=f32(7.3),
        num_inference_steps=i32(steps),
    )
    assert (r.strength, r.guidance_scale) == (strength, 7.3)
    assert type(r.strength) is float and type(r.guidance_scale) is float
    timesteps = set_timesteps(make_scheduler("ddim", SD15_SCHEDULER), r)
    assert len(timesteps) == runs == int(steps * strength)
    # One step left in decimal (50 x 0.02), none in float32: served, not refused.
    r = parse(image=IMAGE, strength=f32(0.02), num_inference_steps=i32(50))
    assert len(set_timesteps(make_scheduler("ddim", SD15_SCHEDULER), r)) == 1
