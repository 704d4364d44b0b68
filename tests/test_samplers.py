"""Every sampler beyond the first nine, served by a real tritonserver (tiny model, few steps).

The first nine (DDIM ... UniPC) are checked in tests/test_pipeline.py and
tests/test_served_pipeline.py; here, each newer alias of the scheduler table
(DPM++ SDE, DPM++ 2M SDE, DPM2, DPM2 a, DEIS, DDPM, LCM, TCD and the Karras /
exponential / beta sigma schedules):

- parity: the served image equals diffusers' ``StableDiffusionPipeline`` with
  that scheduler to within one uint8 level (non-square, guidance on);
- DPM++ SDE draws its noise from a Brownian tree that ignores the generator:
  the server seeds it from the request's seed, and diffusers given the same
  ``noise_sampler_seed`` agrees, negative seeds included;
- the stochastic samplers are deterministic for a seed, and the seed matters;
- requests merged into shared UNet executions equal each one alone;
- every alias has its web UI name and schedule type in the PNG infotext.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from helpers import MODEL, max_diff, sampler_reference_table, served_generate
from helpers import SETTINGS as PARITY_SETTINGS

from sd_pipeline.schedulers import SCHEDULERS, make_scheduler
from sd_triton.client import GenerationSettings, format_infotext, parse_infotext, scheduler_alias

pytestmark = pytest.mark.server

FIRST_NINE = {
    "ddim",
    "pndm",
    "lms",
    "euler",
    "euler_a",
    "heun",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "unipc",
}


REFERENCE = {a: s for a, s in sampler_reference_table().items() if a not in FIRST_NINE}
# The served-parity settings with one image; with seed 7 the tiny safety
# checker flags none of these samplers' images.
SETTINGS = {**PARITY_SETTINGS, "num_images_per_prompt": 1}
# Samplers that draw noise at every step (from the generator, or DPM++ SDE's tree).
STOCHASTIC = ["dpmpp_sde_karras", "dpmpp_2m_sde", "dpm2_a", "ddpm", "lcm", "tcd"]


def test_the_table_is_the_first_nine_plus_these():
    assert set(SCHEDULERS) == FIRST_NINE | set(REFERENCE)


def reference(pipe, scheduler: str, seed: int, noise_seed: int | None = None, **settings):
    """diffusers' uint8 image with ``scheduler``; DPM++ SDE's tree seeded with ``noise_seed``."""
    import diffusers

    cls_name, overrides = REFERENCE[scheduler]
    if cls_name == "DPMSolverSDEScheduler":
        overrides = {**overrides, "noise_sampler_seed": seed if noise_seed is None else noise_seed}
    original = pipe.scheduler
    pipe.scheduler = getattr(diffusers, cls_name).from_config(original.config, **overrides)
    try:
        out = pipe(generator=torch.Generator().manual_seed(seed), output_type="np", **settings)
    finally:
        pipe.scheduler = original
    return (out.images * 255).round().astype(np.uint8)


def served(url: str, **options) -> np.ndarray:
    """The served images; asserts none was flagged (a blacked-out pair would match trivially)."""
    images, nsfw, _ = served_generate(url, **options)
    assert not nsfw.any(), "flagged: pick another seed"
    return images


@pytest.mark.parametrize("scheduler", list(REFERENCE))
def test_served_equals_diffusers(triton_url, reference_pipe, scheduler):
    images = served(triton_url, **SETTINGS, scheduler=scheduler, seed=7)
    expected = reference(reference_pipe, scheduler, 7, **SETTINGS)
    assert images.shape == (1, 32, 48, 3)
    assert max_diff(images, expected) <= 1


def test_dpmpp_sde_reads_a_negative_seed_as_torch_does(triton_url, reference_pipe):
    images = served(triton_url, **SETTINGS, scheduler="dpmpp_sde", seed=-1)
    expected = reference(reference_pipe, "dpmpp_sde", -1, noise_seed=2**64 - 1, **SETTINGS)
    assert max_diff(images, expected) <= 1


def test_dpmpp_sde_noise_sampler_is_seeded_from_the_request():
    config = {"_class_name": "DPMSolverSDEScheduler", "num_train_timesteps": 1000}
    assert make_scheduler("dpmpp_sde_karras", config, seed=5).config.noise_sampler_seed == 5
    assert make_scheduler(None, config, seed=-1).config.noise_sampler_seed == 2**64 - 1
    assert make_scheduler("euler", config, seed=5).config.get("noise_sampler_seed") is None


@pytest.mark.parametrize("scheduler", STOCHASTIC)
def test_deterministic_for_a_seed(triton_url, scheduler):
    options = {**SETTINGS, "num_inference_steps": 2, "scheduler": scheduler}
    first = served(triton_url, **options, seed=7)
    again = served(triton_url, **options, seed=7)
    other = served(triton_url, **options, seed=8)
    assert first.tobytes() == again.tobytes()
    assert max_diff(first, other) > 1


def unet_counts(url: str) -> tuple[int, int]:
    """(UNet requests, UNet executions) so far."""
    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics("unet").model_stats[0]
    finally:
        client.close()
    return stats.inference_stats.success.count, stats.execution_count


# Seeds whose images the tiny safety checker does not flag. DPM++ SDE is left
# out: its Brownian-tree steps are slow enough that its UNet calls seldom
# coincide with others' (and its noise depends only on seed and latent shape).
CONCURRENT = [
    {"prompt": "a bowl of ramen", "seed": 5, "scheduler": "dpmpp_2m_sde_karras"},
    {"prompt": "an origami crane", "seed": 3, "scheduler": "dpm2_a"},
    {"prompt": "a cat", "seed": 9, "scheduler": "ddpm"},
]


def test_merged_with_concurrent_requests_equals_alone(triton_url):
    """Each request sent alone, then all at once, again until the UNet's batcher merged calls.

    With no queue delay, calls merge only when they queue behind a running
    UNet, which depends on timing (on a quiet machine about one round in
    six), so concurrent rounds repeat until a merge is seen, for at most a
    minute; every round must match the images alone.
    """
    base = {"height": 32, "width": 32, "num_inference_steps": 3}
    alone = [served(triton_url, **base, **o) for o in CONCURRENT]
    deadline = time.monotonic() + 60
    while True:
        requests_before, executions_before = unet_counts(triton_url)
        with ThreadPoolExecutor(len(CONCURRENT)) as pool:
            together = list(pool.map(lambda o: served(triton_url, **base, **o), CONCURRENT))
        requests_after, executions_after = unet_counts(triton_url)
        diffs = [max_diff(a, b) for a, b in zip(alone, together, strict=True)]
        assert max(diffs) <= 1, diffs
        merged = (requests_after - requests_before) - (executions_after - executions_before)
        if merged > 0:
            break
        assert time.monotonic() < deadline, "the UNet's batcher merged no calls for a minute"


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_infotext_names_the_sampler_and_reads_back(scheduler):
    settings = GenerationSettings(
        prompt="a cat",
        negative_prompt="",
        num_inference_steps=20,
        guidance_scale=7.0,
        height=512,
        width=512,
        seed=1,
        scheduler=scheduler,
        num_images_per_prompt=1,
        model=MODEL,
    )
    fields = parse_infotext(format_infotext(settings))
    assert fields["Sampler"] and fields["Sampler"] != scheduler
    assert ("Schedule type" in fields) == scheduler.endswith(("_karras", "_exponential", "_beta"))
    assert scheduler_alias(fields) == scheduler


def test_infotext_examples_of_the_web_ui():
    text = "Steps: 20, Sampler: DPM++ SDE, Schedule type: Karras, CFG scale: 7, Seed: 1"
    assert scheduler_alias(parse_infotext(text)) == "dpmpp_sde_karras"
    old = "Steps: 20, Sampler: DPM++ 2M SDE Exponential, CFG scale: 7, Seed: 1"
    assert scheduler_alias(parse_infotext(old)) == "dpmpp_2m_sde_exponential"
    assert scheduler_alias(parse_infotext("Steps: 20, Sampler: DPM fast, Seed: 1")) is None
