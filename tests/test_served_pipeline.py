"""The stable_diffusion model in a real tritonserver, over gRPC (tiny model, few steps, small sizes).

- golden parity with diffusers for every scheduler, and for img2img;
- reproducibility (same request, same bytes);
- step-level batching: four different requests at once stay within one
  uint8 level of each alone while the UNet merges their calls;
- every bad input gets INVALID_ARG with its message, and requests in flight
  or sent right after are unaffected;
- the streaming twin (stable_diffusion_stream), which the exporter always writes.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import (
    IMG2IMG,
    MODEL,
    REFERENCE_SCHEDULERS,
    SETTINGS,
    bad_request_error,
    img2img_reference,
    max_diff,
    reference,
    source_image,
    stream,
)
from helpers import served_generate as generate
from polling import metric, scrape, wait_until
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.server

STREAM_MODEL = "stable_diffusion_stream"


def unet_counts(client) -> tuple[int, int]:
    """(UNet requests, UNet executions) so far."""
    stats = client.get_inference_statistics("unet").model_stats[0]
    return stats.inference_stats.success.count, stats.execution_count


@pytest.mark.parametrize("scheduler", list(REFERENCE_SCHEDULERS), ids=lambda s: s or "default")
def test_served_golden_parity(triton_url, reference_pipe, scheduler):
    options = {**SETTINGS, "seed": 7}
    if scheduler is not None:
        options["scheduler"] = scheduler
    images, flags, seeds = generate(triton_url, **options)
    expected, expected_flags = reference(reference_pipe, scheduler, 7, **SETTINGS)
    assert images.shape == (2, 32, 48, 3) and images.dtype == np.uint8
    assert max_diff(images, expected) <= 1
    np.testing.assert_array_equal(flags, expected_flags)
    np.testing.assert_array_equal(seeds, [7, 7])


def test_served_img2img_golden_parity(triton_url, reference_pipe):
    image = source_image()
    settings = {**IMG2IMG, "strength": 0.6}
    images, flags, _ = generate(triton_url, **settings, image=image, scheduler="euler_a", seed=3)
    expected, expected_flags = img2img_reference(reference_pipe, "euler_a", 3, image, **settings)
    assert max_diff(images, expected) <= 1
    np.testing.assert_array_equal(flags, expected_flags)


def test_same_request_twice_gives_the_same_bytes(triton_url):
    options = {**SETTINGS, "num_inference_steps": 2, "scheduler": "euler_a", "seed": 99}
    a, _, _ = generate(triton_url, **options)
    b, _, _ = generate(triton_url, **options)
    assert a.tobytes() == b.tobytes()


def test_random_seed_is_reported_and_reproduces(triton_url):
    options = {**SETTINGS, "num_inference_steps": 2}
    a, _, seeds = generate(triton_url, **options)
    assert seeds.dtype == np.int64 and seeds[0] == seeds[1]
    b, _, _ = generate(triton_url, **options, seed=int(seeds[0]))
    assert max_diff(a, b) <= 1


CONCURRENT = [
    {"prompt": "a lighthouse at dusk", "seed": 1, "scheduler": "ddim"},
    {"prompt": "a bowl of ramen", "seed": 2, "scheduler": "euler"},
    {"prompt": "an origami crane", "seed": 3, "guidance_scale": 1.0},
    {
        "prompt": "a snowy street",
        "seed": 4,
        "negative_prompt": "people",
        "num_images_per_prompt": 2,
    },
]


def unet_calls(tiny_repository, scheduler: str | None, steps: int) -> int:
    """UNet calls of one request: one per scheduler timestep."""
    from sd_pipeline import Assets, make_scheduler

    assets = Assets.load(tiny_repository / MODEL / "1" / "assets")
    s = make_scheduler(scheduler, assets.scheduler_config)
    s.set_timesteps(steps)
    return len(s.timesteps)


def test_concurrent_requests_share_unet_executions(triton_url, grpc_client, tiny_repository):
    base = {"height": 32, "width": 32, "num_inference_steps": 4}
    alone = [generate(triton_url, **base, **o)[0] for o in CONCURRENT]
    steps = base["num_inference_steps"]
    expected_calls = sum(unet_calls(tiny_repository, o.get("scheduler"), steps) for o in CONCURRENT)
    # With no queue delay (the exporter's default) the batcher merges only calls
    # that arrive while the UNet is busy, which depends on timing: send the
    # concurrent set again until a round merged, for at most a minute. Every
    # round's images must equal the ones sent alone.
    deadline = time.monotonic() + 60
    while True:
        requests_before, executions_before = unet_counts(grpc_client)
        with ThreadPoolExecutor(len(CONCURRENT)) as pool:
            together = list(pool.map(lambda o: generate(triton_url, **base, **o)[0], CONCURRENT))
        requests_after, executions_after = unet_counts(grpc_client)
        diffs = [max_diff(a, b) for a, b in zip(alone, together, strict=True)]
        assert max(diffs) <= 1, diffs
        unet_requests = requests_after - requests_before
        executions = executions_after - executions_before
        assert unet_requests == expected_calls
        if executions < unet_requests:
            break
        assert time.monotonic() < deadline, (
            "the UNet's dynamic batcher merged no calls for a minute"
        )
    print(
        f"\nconcurrent vs alone: max diffs {diffs} (bitwise: {max(diffs) == 0}); "
        f"{unet_requests} UNet calls in {executions} executions"
    )


IMAGE = np.zeros((32, 32, 3), np.uint8)


def text(value: bytes) -> np.ndarray:
    return np.array([value], dtype=object)


# (inputs besides a valid prompt, text the error must contain). Triton itself
# rejects undeclared inputs and wrong dtypes / fixed shapes before the model
# sees them; the model answers the rest.
BAD_INPUTS = [
    ({"prompt": None}, "prompt"),
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": text(b"\xff\xfe")}, "prompt is not valid UTF-8"),
    ({"prompt": np.array([b"a", b"b"], dtype=object)}, "prompt"),
    ({"num_inference_steps": 0}, "num_inference_steps must be at least 1"),
    ({"num_inference_steps": 100000}, "over this model's limit"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
    ({"guidance_scale": float("inf")}, "guidance_scale must be a finite number"),
    ({"guidance_scale": -2.0}, "guidance_scale must be a finite number >= 0"),
    ({"height": 30}, "height must be a positive multiple of 4"),
    ({"width": 4096}, "over this model's limit"),
    (
        {"scheduler": "karras_magic"},
        "unknown scheduler 'karras_magic'; known schedulers: default, ddim",
    ),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt must be at least 1"),
    ({"num_images_per_prompt": 1000}, "over this model's limit"),
    ({"num_inference_steps": np.array([3], np.int64)}, "num_inference_steps"),
    ({"guidance_scale": np.array([7.5], np.float64)}, "guidance_scale"),
    ({"height": np.array([32, 32], np.int32)}, "height"),
    ({"mask_image": np.zeros((32, 32), np.uint8)}, "mask_image was sent without an image"),
    (
        {"mask_image": np.zeros((16, 32), np.uint8), "image": IMAGE},
        "mask_image is 16 x 32 pixels but the image is 32 x 32",
    ),
    ({"image": np.zeros((32, 32, 4), np.uint8)}, "image"),
    ({"image": np.zeros((16, 16, 3), np.uint8)}, "leave height and width out with an image"),
    ({"image": IMAGE, "strength": 0.0}, "strength must be in (0, 1]"),
    ({"strength": 0.5}, "strength applies to img2img only"),
]


@pytest.mark.parametrize(("inputs", "message"), BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_is_invalid_arg(triton_url, inputs, message):
    error = bad_request_error(triton_url, inputs)
    assert error.status() == "StatusCode.INVALID_ARGUMENT", error
    assert message in error.message()


def test_bad_inputs_do_not_disturb_other_requests(triton_url):
    good = {**SETTINGS, "num_inference_steps": 3, "seed": 5}
    expected, _, _ = generate(triton_url, **good)
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(generate, triton_url, **good)
        for inputs, message in BAD_INPUTS[:6]:
            assert message in bad_request_error(triton_url, inputs).message()
        during = in_flight.result(timeout=120)[0]
    after, _, _ = generate(triton_url, **good)
    assert max_diff(during, expected) <= 1 and max_diff(after, expected) <= 1


# ---------------------------------------------------------------------------
# The streaming twin


@pytest.fixture
def stream_model(grpc_client):
    assert grpc_client.is_model_ready(STREAM_MODEL), f"the exporter always writes {STREAM_MODEL}"
    return STREAM_MODEL


def test_stream_reports_each_step_then_the_images(triton_url, stream_model, reference_pipe):
    options = {**SETTINGS, "seed": 7, "scheduler": "heun"}
    progress, final = stream(triton_url, stream_model, preview=True, **options)
    assert [int(p["step"][0]) for p in progress] == [1, 2, 3, 4, 5]  # Heun: 2 * 3 - 1 UNet steps
    assert {int(p["total_steps"][0]) for p in progress} == {5}
    elapsed = [float(p["elapsed_s"][0]) for p in progress]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    assert progress[0]["preview_images"].shape == (2, 16, 24, 3)
    expected, flags = reference(reference_pipe, "heun", 7, **SETTINGS)
    assert max_diff(final.as_numpy("images"), expected) <= 1
    np.testing.assert_array_equal(final.as_numpy("nsfw_content_detected"), flags)


def test_stream_bad_input_is_invalid_arg(triton_url, stream_model):
    progress, error = stream(triton_url, stream_model, prompt="a cat", scheduler="nope")
    assert progress == [] and isinstance(error, InferenceServerException)
    assert "unknown scheduler 'nope'" in error.message()


def test_stream_cancel_leaves_the_server_serving(triton_server, stream_model):
    def cancelled() -> float:
        labels = {"model": stream_model, "version": "1", "outcome": "cancelled"}
        return metric(scrape(triton_server.metrics_url), "sd_requests_total", **labels)

    url, before = triton_server.grpc_url, cancelled()
    options = {"prompt": "a cat", "height": 32, "width": 32, "num_inference_steps": 30}
    progress, _ = stream(url, stream_model, cancel_after=2, **options)
    assert len(progress) == 2
    wait_until(lambda: cancelled() == before + 1, "the cancelled stream did not end as cancelled")
    progress, final = stream(url, stream_model, **{**options, "num_inference_steps": 2})
    assert len(progress) == 3 and final is not None  # PNDM: steps + 1


def test_concurrent_streams_run_together(triton_url, stream_model):
    options = {"height": 32, "width": 32, "num_inference_steps": 3}
    starts = threading.Barrier(3)

    def one(i):
        starts.wait()
        return stream(triton_url, stream_model, prompt=f"a cat #{i}", seed=i, **options)

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(one, range(3)))
    for i, (progress, final) in enumerate(results):
        assert final is not None and len(progress) == 4
        alone, _, _ = generate(triton_url, prompt=f"a cat #{i}", seed=i, **options)
        assert max_diff(final.as_numpy("images"), alone) <= 1
