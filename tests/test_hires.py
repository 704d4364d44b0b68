"""The hires fix (enable_hr) == the same composition of diffusers pipelines (tiny models).

The reference is written here from diffusers alone: ``StableDiffusion(XL)Pipeline``
with ``output_type="latent"``, the web UI's upscale (the latents through
``torch.nn.functional.interpolate``, bilinear without antialiasing, as its
"Latent"; or decode, PIL's Lanczos, and the images as img2img's ``image``), then
``StableDiffusion(XL)Img2ImgPipeline`` with ``strength=hr_denoising_strength``,
``hr_second_pass_steps`` steps and a fresh generator seeded with the same seed.

- in-process over diffusers' own modules: SD 1.x bit for bit, SDXL within one level;
- served (ONNX components; SD 1.x by the session's tritonserver, SDXL by the
  families server): within one uint8 level, both upscalers, non-square sizes,
  hr_scale 1.5 and 1.7 (not exact in binary: the size is truncated as the web UI
  does), two images per prompt, an ancestral sampler;
- progress counts both passes (in-process callback, and the streaming model);
- bad input: INVALID_ARG with a sentence (size off the step, over the limits,
  strength out of (0, 1], hires inputs without enable_hr, hires with an image).
"""

from __future__ import annotations

import queue

import numpy as np
import PIL.Image
import pytest
import torch
import tritonclient.grpc as grpcclient
from helpers import (
    REFERENCE_SCHEDULERS,
    bad_request_error,
    infer_inputs,
    max_diff,
    served_generate,
    source_image,
)

from sd_pipeline import Assets, DiffusersComponents, generate, make_request
from sd_pipeline.config import Limits
from sd_pipeline.errors import InvalidRequest
from sd_pipeline.hires import SecondPass, second_pass_request
from sd_pipeline.schedulers import make_scheduler

BASE = {
    "prompt": "a castle on a hill",
    "negative_prompt": "blurry",
    "num_inference_steps": 3,
    "guidance_scale": 7.5,
}
# (upscaler, scheduler, hr_scale, height, width, images, second-pass steps, strength)
CASES = {
    "latent_1.5": ("latent", None, 1.5, 32, 48, 2, 0, 0.7),
    "lanczos_1.7_euler_a": ("lanczos", "euler_a", 1.7, 24, 40, 1, 4, 0.6),
}

# A seed whose images the tiny safety checker flags in neither case (it flags about
# half of them): black images would make the comparisons vacuous.
SEED = 14


def hires_settings(case: str) -> dict:
    upscaler, scheduler, scale, height, width, n, steps, strength = CASES[case]
    return {
        **BASE,
        "scheduler": scheduler,
        "height": height,
        "width": width,
        "num_images_per_prompt": n,
        "enable_hr": True,
        "hr_scale": scale,
        "hr_upscaler": upscaler,
        "hr_second_pass_steps": steps,
        "hr_denoising_strength": strength,
    }


# ---------------------------------------------------------------------------
# The reference: diffusers' pipelines, composed


def _run(pipe, scheduler: str | None, seed: int, **settings):
    """``pipe``'s output with the alias's scheduler (a fresh one) and a fresh seeded generator."""
    original = pipe.scheduler
    if REFERENCE_SCHEDULERS[scheduler] is not None:
        import diffusers

        cls_name, overrides = REFERENCE_SCHEDULERS[scheduler]
        pipe.scheduler = getattr(diffusers, cls_name).from_config(original.config, **overrides)
    try:
        return pipe(generator=torch.Generator().manual_seed(seed), **settings)
    finally:
        pipe.scheduler = original


def _upscale(pipe, latents: torch.Tensor, upscaler: str, height: int, width: int):
    """The web UI's upscale: "Latent" interpolates the latents; "Lanczos" resizes images."""
    if upscaler == "latent":
        f = pipe.vae_scale_factor
        size = (height // f, width // f)
        return torch.nn.functional.interpolate(latents, size=size, mode="bilinear", antialias=False)
    assert upscaler == "lanczos"
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    images = pipe.image_processor.postprocess(decoded, output_type="pil")
    return [image.resize((width, height), PIL.Image.LANCZOS) for image in images]


def hires_reference(pipe, img2img, seed: int, settings: dict):
    """uint8 images and NSFW flags of txt2img -> upscale -> img2img, as the web UI's hires fix."""
    settings = dict(settings)
    scheduler = settings.pop("scheduler")
    del settings["enable_hr"]
    scale, upscaler = settings.pop("hr_scale"), settings.pop("hr_upscaler")
    steps = settings.pop("hr_second_pass_steps") or settings["num_inference_steps"]
    strength = settings.pop("hr_denoising_strength")
    latents = _run(pipe, scheduler, seed, output_type="latent", **settings).images
    height, width = int(settings.pop("height") * scale), int(settings.pop("width") * scale)
    image = _upscale(pipe, latents, upscaler, height, width)
    settings.update(num_inference_steps=steps, strength=strength)
    out = _run(img2img, scheduler, seed, image=image, output_type="np", **settings)
    images = (out.images * 255).round().astype(np.uint8)
    return images, getattr(out, "nsfw_content_detected", None)


@pytest.fixture(scope="module")
def img2img_pipe(reference_pipe):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**reference_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------
# In-process, SD 1.x


@pytest.mark.parametrize("case", list(CASES))
def test_in_process_is_the_composition_bit_for_bit(reference_pipe, img2img_pipe, assets, case):
    settings = hires_settings(case)
    request = make_request(assets.config, seed=SEED, **settings)
    result = generate(request, DiffusersComponents.from_pipeline(reference_pipe), assets)
    images, flags = hires_reference(reference_pipe, img2img_pipe, SEED, settings)
    assert not any(flags), "choose a SEED whose images the tiny safety checker keeps"
    height, width = (
        int(settings["height"] * settings["hr_scale"]),
        int(settings["width"] * settings["hr_scale"]),
    )
    assert result.images.shape == (settings["num_images_per_prompt"], height, width, 3)
    np.testing.assert_array_equal(result.images, images)
    np.testing.assert_array_equal(result.nsfw_content_detected, flags)


def test_progress_counts_both_passes(reference_pipe, assets):
    """3 first-pass steps at 32 x 48, then int(4 x 0.5) = 2 second-pass steps at 48 x 72."""
    settings = {**hires_settings("latent_1.5"), "hr_second_pass_steps": 4}
    settings.update(hr_denoising_strength=0.5, scheduler="euler", num_images_per_prompt=1)
    seen = []

    def callback(i, total, latents):
        seen.append((i, total, tuple(latents.shape[-2:])))

    components = DiffusersComponents.from_pipeline(reference_pipe)
    generate(make_request(assets.config, seed=1, **settings), components, assets, callback=callback)
    f = assets.config.vae_scale_factor
    small, large = (32 // f, 48 // f), (48 // f, 72 // f)
    assert seen == [(0, 5, small), (1, 5, small), (2, 5, small), (3, 5, large), (4, 5, large)]


def test_second_pass_is_img2img_by_its_strength_without_an_image(reference_pipe, assets):
    """No placeholder image: the stage is img2img (the last int(4 x 0.6) = 2 of a fresh
    4-step schedule, diffusers' get_timesteps) from its strength alone."""
    request = make_request(assets.config, seed=1, **hires_settings("lanczos_1.7_euler_a"))
    components = DiffusersComponents.from_pipeline(reference_pipe)
    stage = SecondPass.after(request, components, assets, torch.device("cpu"))
    assert second_pass_request(request).image is None
    assert stage.request.image is None and stage.request.strength is None
    assert (stage.request.height, stage.request.width) == (40, 68)
    schedule = make_scheduler("euler_a", assets.scheduler_config)
    schedule.set_timesteps(4)
    torch.testing.assert_close(stage.timesteps, schedule.timesteps[2:], rtol=0, atol=0)


# ---------------------------------------------------------------------------
# In-process, SDXL (diffusers' SDXL modules, the assets of the session's SDXL export)


@pytest.fixture(scope="module")
def sdxl(xl_pipes, families_repository):
    """(txt2img pipeline, img2img pipeline, Assets) of the tiny SDXL base exported as ``xl_``."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = xl_pipes.base
    img2img = StableDiffusionXLImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    assets = Assets.load(families_repository / "xl_stable_diffusion" / "1" / "assets")
    assert assets.config.family == "sdxl"
    assert assets.config.watermark == (img2img.watermark is not None)
    return pipe, img2img, assets


@pytest.mark.parametrize("case", list(CASES))
def test_sdxl_in_process_is_the_composition(sdxl, case):
    pipe, img2img, assets = sdxl
    settings = {**hires_settings(case), "prompt_2": "oil painting"}
    request = make_request(assets.config, seed=3, **settings)
    result = generate(request, DiffusersComponents.from_pipeline(pipe), assets)
    images, _ = hires_reference(pipe, img2img, 3, settings)
    assert result.images.shape[1:3] == (
        int(settings["height"] * settings["hr_scale"]),
        int(settings["width"] * settings["hr_scale"]),
    )
    assert max_diff(result.images, images) <= 1


def test_sdxl_second_pass_time_ids_are_img2img(sdxl):
    """diffusers' img2img time ids ([negative x N, positive x N]; the negative sizes
    default to the positive ones one by one), not txt2img's (negative ids only when
    both negative sizes are sent), though the second pass has no image."""
    pipe, _, assets = sdxl
    settings = {**hires_settings("latent_1.5"), "negative_original_size": (40, 40)}
    request = make_request(assets.config, seed=3, **settings)
    components = DiffusersComponents.from_pipeline(pipe)
    stage = SecondPass.after(request, components, assets, torch.device("cpu"))
    assert stage.request.image is None
    positive, negative = [48, 72, 0, 0, 48, 72], [40, 40, 0, 0, 48, 72]
    expected = torch.tensor([negative, negative, positive, positive], dtype=torch.float32)
    torch.testing.assert_close(stage.conditioning.added["time_ids"], expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# Validation (in-process; the served tests check that the sentences travel)


@pytest.fixture(scope="module")
def limits(assets) -> Limits:
    return Limits.default(assets.config.native_height, assets.config.native_width)


def _refused(assets, limits, **options) -> str:
    options = {"prompt": "a cat", "num_inference_steps": 2, "height": 32, "width": 48, **options}
    with pytest.raises(InvalidRequest) as e:
        make_request(assets.config, seed=1, limits=limits, **options)
    return str(e.value)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"hr_scale": 2.0}, "hr_scale: hires fix inputs; they need enable_hr true"),
        ({"enable_hr": True, "hr_scale": 0.5}, "hr_scale must be a number >= 1"),
        ({"enable_hr": True, "hr_scale": float("nan")}, "hr_scale must be a number >= 1"),
        (
            {"enable_hr": True, "hr_scale": 1.7},
            "hr_scale 1.7 makes the second pass int(32 x 1.7) x int(48 x 1.7) = 54 x 81 pixels "
            "(truncated, as the web UI), not multiples of 4 pixels for this model: use a "
            "multiple of 0.25, such as 1.5 or 1.75",
        ),
        (
            {"enable_hr": True, "hr_scale": 3.0},
            "int(32 x 3) x int(48 x 3) = 96 x 144 pixels, over this model's limit of 128 pixels "
            "a side (max_side)",
        ),
        ({"enable_hr": True, "hr_denoising_strength": 0.0}, "must be in (0, 1], got 0.0"),
        ({"enable_hr": True, "hr_denoising_strength": 1.5}, "must be in (0, 1], got 1.5"),
        ({"enable_hr": True, "hr_second_pass_steps": -1}, "hr_second_pass_steps must be >= 0"),
        ({"enable_hr": True, "hr_second_pass_steps": 151}, "over this model's limit of 150"),
        ({"enable_hr": True, "hr_denoising_strength": 0.4}, "leaves no denoising step"),
        ({"enable_hr": True, "hr_upscaler": "esrgan"}, "unknown hr_upscaler 'esrgan'; known: "),
        ({"enable_hr": True, "image": source_image()}, "leave out the image"),
        ({"enable_hr": True, "guidance_rescale": 0.5}, "leave it out with enable_hr"),
    ],
    ids=lambda v: "" if isinstance(v, str) else "-".join(f"{k}" for k in v if k != "enable_hr"),
)
def test_bad_hires_input_is_refused(assets, limits, options, expected):
    assert expected in _refused(assets, limits, **options)


def test_the_limits_count_the_second_pass(assets, limits):
    # 64 x 64 is within the limits; its second pass at 2 x is 128 x 128 = 16384 pixels, the
    # limit itself (max_pixels 4 x 64 x 64): accepted; 4 images of 40 steps at both sizes
    # are over the work budget (400 x 64 x 64) that the first pass alone fits.
    ok = {"height": 64, "width": 64, "enable_hr": True}
    make_request(assets.config, prompt="a cat", seed=1, limits=limits, **ok)
    work = {**ok, "num_images_per_prompt": 4, "num_inference_steps": 40}
    assert limits.max_work >= 64 * 64 * 4 * 40
    message = _refused(assets, limits, **work)
    assert "the second pass's 128 x 128 x 4 x 28 steps" in message
    assert f"over this model's work budget of {limits.max_work}" in message
    small = Limits(**{**limits.parameters(), "max_pixels": 128 * 127})
    message = _refused(assets, small, **ok)
    assert "= 128 x 128 pixels = 16384 pixels, over this model's limit of 16256" in message


def test_web_ui_upscaler_names_are_accepted(assets):
    for name in ("Latent", "Latent (bicubic antialiased)", "Latent (nearest-exact)", "Lanczos"):
        make_request(assets.config, prompt="a cat", seed=1, enable_hr=True, hr_upscaler=name)


# ---------------------------------------------------------------------------
# Served: the session's tritonserver (tiny SD 1.x, ONNX components)


@pytest.mark.server
@pytest.mark.parametrize("case", list(CASES))
def test_served_equals_the_composition(triton_url, reference_pipe, img2img_pipe, case):
    settings = hires_settings(case)
    options = {k: v for k, v in settings.items() if v is not None}
    images, flags, seeds = served_generate(triton_url, seed=SEED, **options)
    expected, expected_flags = hires_reference(reference_pipe, img2img_pipe, SEED, settings)
    assert not any(expected_flags), "choose a SEED whose images the tiny safety checker keeps"
    assert images.shape == expected.shape
    assert max_diff(images, expected) <= 1
    np.testing.assert_array_equal(flags, expected_flags)
    assert set(seeds) == {SEED}


@pytest.mark.server
@pytest.mark.parametrize("case", list(CASES))
def test_served_sdxl_equals_the_composition(families_url, sdxl, case):
    """The SDXL base of the families repository (``xl_``, tests/conftest.py)."""
    pipe, img2img, _ = sdxl
    settings = {**hires_settings(case), "prompt_2": "oil painting"}
    options = {k: v for k, v in settings.items() if v is not None}
    client = grpcclient.InferenceServerClient(families_url)
    try:
        result = client.infer("xl_stable_diffusion", infer_inputs(seed=4, **options))
    finally:
        client.close()
    expected, _ = hires_reference(pipe, img2img, 4, settings)
    assert max_diff(result.as_numpy("images"), expected) <= 1


@pytest.mark.server
@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ({"hr_scale": 5.0}, "int(32 x 5) x int(32 x 5) = 160 x 160 pixels, over this model's"),
        ({"hr_scale": 1.3}, "not multiples of 4 pixels for this model: use a multiple of 0.125"),
        ({"hr_denoising_strength": 0.0}, "hr_denoising_strength must be in (0, 1], got 0.0"),
        ({"hr_denoising_strength": 1.25}, "hr_denoising_strength must be in (0, 1], got 1.25"),
    ],
    ids=["scale_over_max_side", "scale_off_step", "strength_0", "strength_over_1"],
)
def test_served_bad_input_is_invalid_arg(triton_url, inputs, expected):
    error = bad_request_error(triton_url, {"enable_hr": True, **inputs})
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert expected in error.message()


@pytest.mark.server
def test_stream_progress_counts_both_passes(triton_url):
    """The streaming model: 3 + int(4 x 0.5) = 5 progress responses, then 48 x 72 images."""
    options = {**hires_settings("latent_1.5"), "scheduler": "euler", "num_images_per_prompt": 1}
    options.update(hr_second_pass_steps=4, hr_denoising_strength=0.5, seed=2)
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(triton_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer("stable_diffusion_stream", infer_inputs(**options))
        steps = []
        while True:
            result, error = responses.get(timeout=120)
            assert error is None, error
            if result.as_numpy("images") is not None:
                break
            steps.append((int(result.as_numpy("step")[0]), int(result.as_numpy("total_steps")[0])))
    finally:
        client.stop_stream()
        client.close()
    assert steps == [(i, 5) for i in range(1, 6)]
    assert result.as_numpy("images").shape == (1, 48, 72, 3)
