"""Limits, deadlines, audit records and metrics of the served pipeline (session server, tiny model).

- a 1 MB prompt and a request over the work budget are refused with
  INVALID_ARG before any work is done; the limits are config parameters the
  exporter writes (with the queue policy);
- a call's deadline cancels the request on the server;
- every request leaves one JSON audit line (never the prompt's text) and
  counts in the ``sd_*`` metrics;
- the client retries UNAVAILABLE only, with bounded, jittered backoff.
"""

from __future__ import annotations

import json
import time
import uuid

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from helpers import bad_request_error, infer_inputs
from polling import metric, scrape, wait_until
from tritonclient.utils import InferenceServerException

from sd_triton.client import (
    Client,
    DeadlineExceededError,
    InvalidRequestError,
    ServerError,
    UnavailableError,
)

pytestmark = pytest.mark.server

MODEL = "stable_diffusion"
SMALL = {"height": 32, "width": 32, "num_inference_steps": 2}
CANCELLED = {"model": MODEL, "version": "1", "outcome": "cancelled"}


def test_limits_and_queue_policy_are_written_by_the_exporter(tiny_repository):
    from sd_triton.export import triton_config as T
    from sd_triton.export.pipeline_models import ADMISSION_DEFAULTS

    unary = T.read_config(tiny_repository / MODEL)
    params = {k: v.string_value for k, v in unary.parameters.items()}
    for name in ("max_steps", "max_pixels", "max_images", "max_prompt_bytes", "max_work"):
        assert int(params[name]) > 0, name
    assert int(params["max_work"]) == 400 * 64 * 64  # 400x the tiny model's native area
    policy = unary.dynamic_batching.default_queue_policy
    assert policy.max_queue_size == ADMISSION_DEFAULTS["max_queue_size"]
    assert policy.default_timeout_microseconds == ADMISSION_DEFAULTS["queue_timeout_s"] * 10**6
    assert policy.allow_timeout_override
    stream = T.read_config(tiny_repository / f"{MODEL}_stream")
    assert not stream.HasField("dynamic_batching")  # it admits requests itself
    assert stream.parameters["max_queue_size"].string_value == params["max_queue_size"]


def test_megabyte_prompt_is_refused_before_tokenizing(triton_url):
    start = time.perf_counter()
    error = bad_request_error(triton_url, {"prompt": "a" * 1_000_000})
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "prompt is 1000000 bytes, over this model's limit of 16384 bytes" in error.message()
    assert time.perf_counter() - start < 10
    error = bad_request_error(triton_url, {"negative_prompt": "é" * 10_000})
    assert "negative_prompt is 20000 bytes" in error.message()


def test_long_prompt_within_the_limit_is_truncated_and_served(triton_url):
    """diffusers' syntax truncates at 77 tokens; the web UI's (the default) chunks up to
    max_prompt_chunks and refuses more with a sentence."""
    text = "a cat " * 2000  # 12 kB, ~4000 tokens
    with Client(triton_url) as client:
        result = client.generate(text, seed=1, prompt_syntax="diffusers", **SMALL)
        assert len(result.images) == 1
        with pytest.raises(InvalidRequestError, match="chunks of 75 tokens, over this model"):
            client.generate(text, seed=1, **SMALL)
        assert len(client.generate("a cat " * 60, seed=1, **SMALL).images) == 1  # 2 chunks


def test_work_budget_refuses_what_each_single_limit_allows(triton_url):
    # Each within its own limit (steps <= 150, images <= 8, pixels <= 128 x 128), not together.
    error = bad_request_error(
        triton_url,
        {"height": 64, "width": 64, "num_images_per_prompt": 8, "num_inference_steps": 100},
    )
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "= 3276800 is over this model's work budget of 1638400" in error.message()


def test_deadline_cancels_the_request_on_the_server(triton_server, grpc_client):
    def unet_requests():
        stats = grpc_client.get_inference_statistics("unet").model_stats[0]
        return stats.inference_stats.success.count

    def cancelled():
        return metric(scrape(triton_server.metrics_url), "sd_requests_total", **CANCELLED)

    before, cancelled_before = unet_requests(), cancelled()
    with Client(triton_server.grpc_url) as client, pytest.raises(DeadlineExceededError):
        client.generate("a cat", height=64, width=64, num_inference_steps=150, timeout_s=0.5)
    wait_until(
        lambda: cancelled() == cancelled_before + 1,
        "the request whose deadline passed did not end as cancelled on the server",
    )
    ran = unet_requests() - before
    assert ran < 150, f"{ran} UNet calls: the request ran all its 150 steps after its deadline"


def audit_lines(server) -> list[dict]:
    lines = []
    for line in server.log_path.read_text(errors="replace").splitlines():
        if '\\"event\\":\\"sd_request\\"' in line or '"event":"sd_request"' in line:
            text = line[line.index("{") : line.rindex("}") + 1].replace('\\"', '"')
            lines.append(json.loads(text))
    return lines


# A prompt found nowhere else, and a seed whose 3 images the tiny safety checker
# partly flags, so the audit line's flags are checked against the response's.
AUDIT_PROMPT = "my secret prompt 5d0c2f6e-audit"
AUDIT_SEED = 0


def test_every_request_leaves_one_audit_line_without_the_prompt(triton_server):
    secret = AUDIT_PROMPT
    ok_id, bad_id = f"audit-{uuid.uuid4()}", f"audit-{uuid.uuid4()}"
    inputs = infer_inputs(prompt=secret, seed=AUDIT_SEED, num_images_per_prompt=3, **SMALL)
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        served = client.infer(MODEL, inputs, request_id=ok_id)
        with pytest.raises(InferenceServerException):
            client.infer(MODEL, infer_inputs(prompt=secret, scheduler="nope"), request_id=bad_id)
    finally:
        client.close()

    def both_logged():
        by_id = {e["request_id"]: e for e in audit_lines(triton_server)}
        return ok_id in by_id and bad_id in by_id and by_id

    by_id = wait_until(both_logged, "no audit line for one of the two requests", timeout_s=10)
    ok, bad = by_id[ok_id], by_id[bad_id]
    assert ok["outcome"] == "success" and ok["model"] == MODEL and ok["version"] == "1"
    settings = (ok["seed"], ok["steps"], ok["height"], ok["width"], ok["images"])
    assert settings == (AUDIT_SEED, 2, 32, 32, 3)
    assert ok["scheduler"] == "default"
    flags = served.as_numpy("nsfw_content_detected").tolist()
    assert ok["nsfw"] == flags
    assert 0 < sum(flags) < len(flags), f"{flags}: the tiny checker must flag some images, not all"
    assert ok["prompt_bytes"] == len(secret) and ok["duration_s"] > 0
    assert 0 < ok["denoise_s"] < ok["duration_s"]
    assert bad["outcome"] == "invalid" and "unknown scheduler" in bad["error"]
    assert secret not in triton_server.log_path.read_text(errors="replace")


def test_metrics_count_requests_by_outcome(triton_server, triton_url):
    before = scrape(triton_server.metrics_url)
    with Client(triton_url) as client:
        client.generate("a cat", seed=1, num_images_per_prompt=2, scheduler="euler", **SMALL)
        with pytest.raises(InvalidRequestError):
            client.generate("a cat", scheduler="nope")
    after = scrape(triton_server.metrics_url)
    labels = {"model": MODEL, "version": "1"}

    def delta(name: str, **extra: str) -> float:
        return metric(after, name, **labels, **extra) - metric(before, name, **labels, **extra)

    assert delta("sd_requests_total", outcome="success") == 1
    assert delta("sd_requests_total", outcome="invalid") == 1
    assert delta("sd_images_total") == 2
    assert delta("sd_request_duration_seconds_total", outcome="success") > 0
    # Denoising steps (UNet evaluations: euler's are the request's steps) of successful
    # requests only (the refused one ran none), and their time.
    assert delta("sd_denoise_steps_total") == SMALL["num_inference_steps"]
    seconds = delta("sd_denoise_seconds_total")
    assert 0 < seconds < delta("sd_request_duration_seconds_total", outcome="success")


def test_client_retries_unavailable_only_with_bounded_backoff(triton_url, monkeypatch):
    with Client(triton_url, retries=3, backoff_s=0.01, max_backoff_s=0.02) as client:
        delays = [client.backoff_delay(a) for a in range(10)]
        assert all(0.005 <= d <= 0.02 for d in delays)
        real_infer, calls = client._client.infer, []

        def flaky(*args, **kwargs):
            calls.append(1)
            if len(calls) <= 2:
                raise InferenceServerException("busy", status="StatusCode.UNAVAILABLE")
            return real_infer(*args, **kwargs)

        monkeypatch.setattr(client._client, "infer", flaky)
        assert len(client.generate("a cat", seed=1, **SMALL).images) == 1
        assert len(calls) == 3

        def counting(*args, **kwargs):
            calls.append(1)
            return real_infer(*args, **kwargs)

        calls.clear()
        monkeypatch.setattr(client._client, "infer", counting)
        with pytest.raises(InvalidRequestError):
            client.generate("a cat", scheduler="nope", **SMALL)
        assert len(calls) == 1  # not retried

        def always_busy(*args, **kwargs):
            calls.append(1)
            raise InferenceServerException(
                "[request id: <id_unknown>] Exceeds maximum queue size",
                status="StatusCode.UNAVAILABLE",
            )

        calls.clear()
        monkeypatch.setattr(client._client, "infer", always_busy)
        with pytest.raises(
            UnavailableError, match="server busy: the model's request queue is full"
        ):
            client.generate("a cat", **SMALL)
        assert len(calls) == 4  # one try, three retries
    with pytest.raises(ValueError):
        Client(triton_url, retries=-1)
    assert not issubclass(ServerError, UnavailableError)


def test_server_stays_ready_and_serving(triton_url):
    with Client(triton_url) as client:
        assert client.is_ready()
        images = np.asarray(client.generate("a cat", seed=5, **SMALL).images[0])
    assert images.shape == (32, 32, 3)
