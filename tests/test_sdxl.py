"""SDXL served by a real tritonserver == diffusers' SDXL pipelines (tiny models, CPU).

One repository and one server hold two families side by side
(``--model-prefix``, ``families_repository`` in tests/conftest.py): the SDXL
base with its refiner (``xl_``), the refiner alone (``xlr_``), a Turbo-style
SDXL (``turbo_``) and an LCM-style SD 1.x (``lcm_``). Every image is compared with diffusers' pipeline on the same
weights and seed, to within one uint8 level:

- txt2img: samplers, negative prompts and ``prompt_2``, an absent negative
  prompt (zeros) against an empty one, non-square sizes, size and crop
  conditioning, guidance off, ``guidance_rescale``, ``clip_skip``, several
  images per prompt;
- the ensemble of experts: the base up to ``refiner_switch_at``, the refiner
  after, in one request (diffusers' ``denoising_end`` / ``denoising_start``
  with one generator);
- img2img and inpainting on the base, img2img on the refiner alone;
- Turbo (trailing timesteps, guidance off, 1 step by default) and LCM (the
  guidance embedding of a ``time_cond_proj_dim`` UNet, 4 steps by default);
- bad input: SDXL-only inputs on SD 1.x, refiner inputs without a refiner,
  sizes off the size step, text-to-image on the refiner.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import pytest
import torch
import tritonclient.grpc as grpcclient
from helpers import (
    infer_inputs,
    max_diff,
    sampler_reference_table,
    source_image,
    source_mask,
)
from tritonclient.utils import InferenceServerException

from sd_pipeline.schedulers import SCHEDULERS, make_scheduler
from sd_triton.export.options import PRESETS

pytestmark = pytest.mark.server

XL_MODEL = "xl_stable_diffusion"
REFINER_MODEL = "xlr_stable_diffusion"
TURBO_MODEL = "turbo_stable_diffusion"
LCM_MODEL = "lcm_stable_diffusion"

BASE = {"prompt": "a red cube", "height": 32, "width": 48, "num_inference_steps": 4}


def served(url: str, model: str, **options) -> np.ndarray:
    client = grpcclient.InferenceServerClient(url)
    try:
        return client.infer(model, infer_inputs(**_arrays(options))).as_numpy("images")
    finally:
        client.close()


def served_error(url: str, model: str, **options) -> InferenceServerException:
    options = {"prompt": "a cat", "num_inference_steps": 2, **options}
    client = grpcclient.InferenceServerClient(url)
    try:
        with pytest.raises(InferenceServerException) as e:
            client.infer(model, infer_inputs(**_arrays(options)))
    finally:
        client.close()
    return e.value


def _arrays(options: dict) -> dict:
    """Pairs (sizes, crops) as INT32 [2]."""
    return {
        k: np.array(v, np.int32) if isinstance(v, tuple) else v
        for k, v in options.items()
        if v is not None
    }


def _run(pipe, scheduler, generator, **settings):
    """``pipe`` with the served alias's scheduler (the pipeline's scheduler table: the
    aliases themselves are checked against diffusers in tests/test_samplers.py)."""
    original = pipe.scheduler
    config = {**original.config, "_class_name": type(original).__name__}
    pipe.scheduler = make_scheduler(scheduler, config, settings.pop("seed"))
    try:
        return pipe(generator=generator, **settings).images
    finally:
        pipe.scheduler = original


def reference(pipe, scheduler, seed, **settings) -> np.ndarray:
    """diffusers' uint8 images (rounded as numpy_to_pil)."""
    generator = torch.Generator().manual_seed(seed)
    out = _run(pipe, scheduler, generator, seed=seed, output_type="np", **settings)
    return (out * 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------
# txt2img


TXT2IMG_CASES = {
    "plain": {},
    "negative_and_prompt_2": {"negative_prompt": "blurry", "prompt_2": "oil painting"},
    "empty_negative_is_encoded": {"negative_prompt": ""},
    "negative_prompt_2": {"negative_prompt": "blurry", "negative_prompt_2": "dark"},
    "size_conditioning": {
        "original_size": (96, 64),
        "crops_coords_top_left": (4, 8),
        "target_size": (40, 56),
        "negative_original_size": (16, 16),
        "negative_target_size": (32, 32),
        "num_images_per_prompt": 2,
    },
    "guidance_off": {"guidance_scale": 1.0, "num_images_per_prompt": 2},
    "guidance_rescale": {"guidance_scale": 6.0, "guidance_rescale": 0.7},
    "clip_skip": {"clip_skip": 1, "negative_prompt": "blurry"},
    "square_64": {"height": 64, "width": 64},
}


@pytest.mark.parametrize("case", TXT2IMG_CASES, ids=str)
@pytest.mark.parametrize("scheduler", [None, "euler_a", "dpmpp_2m_karras"], ids=str)
def test_txt2img_equals_diffusers(families_url, xl_pipes, case, scheduler):
    settings = {**BASE, "guidance_scale": 5.0, **TXT2IMG_CASES[case]}
    images = served(families_url, XL_MODEL, seed=7, scheduler=scheduler, **settings)
    expected = reference(xl_pipes.base, scheduler, 7, **settings)
    assert max_diff(images, expected) <= 1


SAMPLERS = sampler_reference_table()
# Samplers that draw noise at every step (from the generator, or DPM++ SDE's tree).
STOCHASTIC = {"euler_a", "dpm2_a", "dpmpp_sde", "dpmpp_2m_sde", "ddpm", "lcm", "tcd"}


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_sampler_equals_diffusers_on_sdxl(families_url, xl_pipes, scheduler):
    """Each alias against diffusers' class written independently (tests/helpers.py); the
    stochastic ones give the same bytes again for the seed."""
    import diffusers

    settings = {**BASE, "num_inference_steps": 3, "guidance_scale": 5.0, "negative_prompt": "dim"}
    images = served(families_url, XL_MODEL, seed=7, scheduler=scheduler, **settings)
    cls_name, overrides = SAMPLERS[scheduler]
    if cls_name == "DPMSolverSDEScheduler":
        overrides = {**overrides, "noise_sampler_seed": 7}
    pipe = xl_pipes.base
    original = pipe.scheduler
    pipe.scheduler = getattr(diffusers, cls_name).from_config(original.config, **overrides)
    try:
        out = pipe(generator=torch.Generator().manual_seed(7), output_type="np", **settings)
    finally:
        pipe.scheduler = original
    assert max_diff(images, (out.images * 255).round().astype(np.uint8)) <= 1
    if scheduler.removesuffix("_karras").removesuffix("_exponential") in STOCHASTIC:
        again = served(families_url, XL_MODEL, seed=7, scheduler=scheduler, **settings)
        assert again.tobytes() == images.tobytes()


def test_absent_and_empty_negative_prompts_differ(families_url):
    """diffusers' distinction: absent = zero embeddings (force_zeros_for_empty_prompt), "" encoded."""
    absent = served(families_url, XL_MODEL, seed=3, **BASE)
    empty = served(families_url, XL_MODEL, seed=3, negative_prompt="", **BASE)
    assert max_diff(absent, empty) > 1


# ---------------------------------------------------------------------------
# Refiner


@pytest.mark.parametrize("switch", [0.8, 0.55], ids=str)
@pytest.mark.parametrize("scheduler", [None, "euler_a", "heun", "dpmpp_2m"], ids=str)
def test_base_and_refiner_in_one_request(families_url, xl_pipes, scheduler, switch):
    """diffusers' ensemble of experts: base(denoising_end) -> latents -> refiner(denoising_start)."""
    settings = {**BASE, "num_inference_steps": 7, "guidance_scale": 5.0, "num_images_per_prompt": 2}
    images = served(
        families_url, XL_MODEL, seed=9, scheduler=scheduler, refiner_switch_at=switch, **settings
    )
    generator = torch.Generator().manual_seed(9)
    latents = _run(
        xl_pipes.base, scheduler, generator, seed=9, denoising_end=switch, output_type="latent",
        **settings,
    )  # fmt: skip
    settings.pop("height"), settings.pop("width")
    out = _run(
        xl_pipes.refiner, scheduler, generator, seed=9, image=latents, denoising_start=switch,
        output_type="np", **settings,
    )  # fmt: skip
    assert max_diff(images, (out * 255).round().astype(np.uint8)) <= 1


@pytest.mark.parametrize("scheduler", [None, "dpmpp_2m"], ids=str)
def test_refiner_alone_serves_img2img(families_url, xl_pipes, scheduler):
    image = source_image(32, 48)
    settings = {"prompt": "a cat", "num_inference_steps": 10, "guidance_scale": 5.0}
    settings |= {"strength": 0.7, "aesthetic_score": 7.5, "negative_aesthetic_score": 2.0}
    images = served(
        families_url, REFINER_MODEL, seed=5, scheduler=scheduler, image=image, **settings
    )
    expected = reference(
        xl_pipes.refiner, scheduler, 5, image=PIL.Image.fromarray(image), **settings
    )
    assert max_diff(images, expected) <= 1


# ---------------------------------------------------------------------------
# img2img and inpainting on the base


@pytest.mark.parametrize("strength", [None, 0.7], ids=str)
@pytest.mark.parametrize("scheduler", [None, "euler_a"], ids=str)
def test_img2img_equals_diffusers(families_url, xl_pipes, scheduler, strength):
    """strength absent: SDXL img2img's default, 0.3 (SD 1.x's is 0.8)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    image = source_image(32, 48)
    settings = {"prompt": "a cat", "num_inference_steps": 10, "guidance_scale": 5.0}
    settings |= {"strength": strength, "negative_prompt": "blurry"}
    settings = {k: v for k, v in settings.items() if v is not None}
    images = served(families_url, XL_MODEL, seed=3, scheduler=scheduler, image=image, **settings)
    pipe = StableDiffusionXLImg2ImgPipeline(**xl_pipes.base.components)
    expected = reference(pipe, scheduler, 3, image=PIL.Image.fromarray(image), **settings)
    assert max_diff(images, expected) <= 1


@pytest.mark.parametrize("strength", [None, 0.7], ids=str)
@pytest.mark.parametrize("scheduler", [None, "euler_a"], ids=str)
def test_inpainting_equals_diffusers(families_url, xl_pipes, scheduler, strength):
    """strength absent: SDXL inpainting's default, 0.9999."""
    from diffusers import StableDiffusionXLInpaintPipeline

    image, mask = source_image(32, 48), source_mask(32, 48)
    settings = {"prompt": "a cat", "num_inference_steps": 10, "guidance_scale": 5.0}
    settings = {**settings, **({"strength": strength} if strength else {})}
    images = served(
        families_url,
        XL_MODEL,
        seed=3,
        scheduler=scheduler,
        image=image,
        mask_image=mask,
        **settings,
    )
    pipe = StableDiffusionXLInpaintPipeline(**xl_pipes.base.components)
    expected = reference(
        pipe, scheduler, 3, image=PIL.Image.fromarray(image),
        mask_image=PIL.Image.fromarray(mask), height=32, width=48, **settings,
    )  # fmt: skip
    assert max_diff(images, expected) <= 1


# ---------------------------------------------------------------------------
# Distilled models


def test_turbo_defaults_and_parity(families_url, xl_pipes):
    """The Turbo preset's defaults (1 step, no guidance) apply when the request names none."""
    preset = PRESETS["turbo"]
    images = served(families_url, TURBO_MODEL, seed=4, prompt="a cat", height=32, width=48)
    expected = reference(
        xl_pipes.turbo, preset["default_scheduler"], 4, prompt="a cat", height=32, width=48,
        num_inference_steps=preset["default_num_inference_steps"],
        guidance_scale=preset["default_guidance_scale"],
    )  # fmt: skip
    assert preset["default_num_inference_steps"] == 1 and preset["default_guidance_scale"] == 0
    assert max_diff(images, expected) <= 1
    two = served(families_url, TURBO_MODEL, seed=4, prompt="a cat", height=32, width=48,
                 num_inference_steps=2)  # fmt: skip
    assert max_diff(two, images) > 1


@pytest.mark.parametrize("guidance_scale", [None, 3.0], ids=str)
def test_lcm_guidance_embedding_and_parity(families_url, lcm_pipe, guidance_scale):
    """An LCM UNet gets guidance as an embedding (time_cond_proj_dim), never as two batches."""
    images = served(
        families_url, LCM_MODEL, seed=6, prompt="a cat", height=32, width=48,
        guidance_scale=guidance_scale,
    )  # fmt: skip
    preset = PRESETS["lcm"]
    settings = {
        "num_inference_steps": preset["default_num_inference_steps"],
        "guidance_scale": guidance_scale or preset["default_guidance_scale"],
    }
    expected = reference(lcm_pipe, None, 6, prompt="a cat", height=32, width=48, **settings)
    assert max_diff(images, expected) <= 1


# ---------------------------------------------------------------------------
# Concurrency


def test_concurrent_sdxl_and_sd_requests_each_equal_alone(families_url):
    """SDXL and SD 1.x requests in flight together, in one server, merged where they can."""
    requests = [(XL_MODEL, {**BASE, "seed": s, "scheduler": "euler_a"}) for s in range(3)] + [
        (LCM_MODEL, {**BASE, "seed": 1}),
        (XL_MODEL, {**BASE, "seed": 2, "refiner_switch_at": 0.5}),
    ]
    alone = [served(families_url, m, **o) for m, o in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: served(families_url, r[0], **r[1]), requests))
    for a, b in zip(alone, together, strict=True):
        assert max_diff(a, b) <= 1


# ---------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("model", "options", "words"),
    [
        (LCM_MODEL, {"prompt_2": "x"}, ["prompt_2", "SDXL", "SD 1.x"]),
        (LCM_MODEL, {"original_size": (64, 64)}, ["original_size", "SDXL"]),
        (LCM_MODEL, {"refiner_switch_at": 0.8}, ["refiner_switch_at", "SDXL"]),
        (TURBO_MODEL, {"refiner_switch_at": 0.8}, ["refiner", "--refiner"]),
        (XL_MODEL, {"refiner_switch_at": 1.0}, ["refiner_switch_at", "(0, 1)"]),
        (XL_MODEL, {"refiner_switch_at": 0.0}, ["refiner_switch_at", "(0, 1)"]),
        (XL_MODEL, {"guidance_rescale": 1.5}, ["guidance_rescale", "[0, 1]"]),
        (XL_MODEL, {"crops_coords_top_left": (-1, 0)}, ["crops_coords_top_left", ">= 0"]),
        (TURBO_MODEL, {"aesthetic_score": 6.0}, ["aesthetic_score", "refiner"]),
        (REFINER_MODEL, {"height": 32, "width": 32}, ["refiner", "image"]),
        (REFINER_MODEL, {"prompt_2": "x", "image": source_image(32, 32)}, ["prompt_2", "one text"]),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input_is_invalid_arg_with_a_sentence(families_url, model, options, words):
    error = served_error(families_url, model, **options)
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    for word in words:
        assert word in error.message()
    # The server is still serving.
    assert served(families_url, XL_MODEL, seed=1, **{**BASE, "num_inference_steps": 1}).shape == (
        1, 32, 48, 3,
    )  # fmt: skip


def test_size_off_the_size_step_is_refused(families_url, families_repository):
    """The size step is the VAE's scale factor times the UNet's downsampling, read from the
    checkpoint (the tiny SDXL's is 4; the real SDXL's 32)."""
    pipeline_json = families_repository / XL_MODEL / "1" / "assets" / "pipeline.json"
    step = json.loads(pipeline_json.read_text())["size_step"]
    error = served_error(families_url, XL_MODEL, height=10 * step + 2, width=8 * step)
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert f"height must be a positive multiple of {step} pixels" in error.message()


def test_pipelines_publish_their_family_and_refiner(families_repository):
    """Clients read them from the model config (the infotext's Refiner, SDXL's default strength)."""
    from sd_triton.export.triton_config import read_config

    def parameters(model):
        config = read_config(families_repository / model)
        return {k: v.string_value for k, v in config.parameters.items()}

    assert parameters(XL_MODEL)["family"] == "sdxl"
    assert parameters(XL_MODEL)["refiner_model_name"] == "tiny-sdxl-refiner"
    assert parameters(REFINER_MODEL)["family"] == "sdxl-refiner"
    assert "refiner_model_name" not in parameters(TURBO_MODEL)
    assert parameters(LCM_MODEL)["family"] == "sd"


# ---------------------------------------------------------------------------
# Defaults: guidance_scale as diffusers' SDXL pipelines


def test_guidance_defaults_are_diffusers():
    """SD's 7.5 in every mode; SDXL's pipelines 5.0 but inpainting 7.5; SDXL's ControlNet
    pipelines 5.0: checked against the installed diffusers' signatures."""
    import inspect

    import diffusers

    from sd_pipeline.request import default_guidance_scale

    pipelines = {  # (xl, image, mask, controlnet) -> the pipeline diffusers runs
        (False, None, None, False): "StableDiffusionPipeline",
        (False, 1, None, False): "StableDiffusionImg2ImgPipeline",
        (False, 1, 1, False): "StableDiffusionInpaintPipeline",
        (False, None, None, True): "StableDiffusionControlNetPipeline",
        (True, None, None, False): "StableDiffusionXLPipeline",
        (True, 1, None, False): "StableDiffusionXLImg2ImgPipeline",
        (True, 1, 1, False): "StableDiffusionXLInpaintPipeline",
        (True, None, None, True): "StableDiffusionXLControlNetPipeline",
        (True, 1, None, True): "StableDiffusionXLControlNetImg2ImgPipeline",
        (True, 1, 1, True): "StableDiffusionXLControlNetInpaintPipeline",
    }
    for key, name in pipelines.items():
        call = getattr(diffusers, name).__call__
        assert (
            default_guidance_scale(*key)
            == inspect.signature(call).parameters["guidance_scale"].default
        ), name


def test_sdxl_without_guidance_is_diffusers_default_and_reported(families_url, xl_pipes):
    """No guidance_scale sent: the served image is diffusers' called without one (5.0), and
    the client's settings (the PNG's CFG scale) say 5.0."""
    from sd_triton.client import Client

    settings = {**BASE, "negative_prompt": "dim"}
    images = served(families_url, XL_MODEL, seed=4, **settings)
    pipe = xl_pipes.base
    out = pipe(generator=torch.Generator().manual_seed(4), output_type="np", **settings).images
    assert max_diff(images, (out * 255).round().astype(np.uint8)) <= 1
    at_7_5 = served(families_url, XL_MODEL, seed=4, guidance_scale=7.5, **settings)
    assert max_diff(images, at_7_5) > 1  # beyond the tolerance: the parity above has power
    with Client(families_url, model=XL_MODEL) as client:
        result = client.generate(seed=4, **settings)
    assert result.settings.guidance_scale == 5.0
    assert max_diff(np.asarray(result.images[0].convert("RGB")), images[0]) == 0
