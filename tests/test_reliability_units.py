"""Fast checks of the reliability pieces, without a server: limits, audit records, queue config, client errors."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from sd_pipeline import spec as S
from sd_pipeline.config import Limits, PipelineConfig
from sd_pipeline.errors import Cancelled, ComponentError, InvalidRequest
from sd_pipeline.loop import polled_at_most_every
from sd_pipeline.request import make_request, parse_request
from sd_pipeline.telemetry import Unavailable, log_line, outcome_of, record
from sd_triton.client import Client, UnavailableError
from sd_triton.client._core import backoff_delay
from sd_triton.client._errors import translate
from sd_triton.export import triton_config as T

CONFIG = PipelineConfig(
    latent_channels=4,
    unet_in_channels=4,
    vae_scaling_factor=0.18215,
    vae_scale_factor=8,
    native_height=512,
    native_width=512,
    size_step=64,
    tokenizer_max_length=77,
    unet_max_batch_size=16,
    safety_checker=False,
)


def test_limits_defaults_scale_with_the_native_area_and_read_parameters():
    limits = Limits.from_parameters({}, CONFIG)
    assert limits.max_work == 400 * 512 * 512 and limits.max_prompt_bytes == 16384
    limits = Limits.from_parameters({"max_work": "1000", "max_prompt_bytes": "10"}, CONFIG)
    assert (limits.max_work, limits.max_prompt_bytes) == (1000, 10)
    with pytest.raises(ValueError, match="max_work must be at least 1"):
        Limits.from_parameters({"max_work": "0"}, CONFIG)


def test_oversized_prompt_is_refused_before_it_is_decoded():
    limits = replace(Limits.default(512, 512), max_prompt_bytes=100)
    huge = np.array([b"\xff" * 1_000_000], dtype=object)  # not even UTF-8: never decoded
    with pytest.raises(InvalidRequest, match="prompt is 1000000 bytes, over .* 100 bytes"):
        parse_request({"prompt": huge}, CONFIG, limits)
    negative = np.array(["é" * 60], dtype=object)
    with pytest.raises(InvalidRequest, match="negative_prompt is 120 bytes"):
        parse_request(
            {"prompt": np.array([b"a cat"], dtype=object), "negative_prompt": negative},
            CONFIG,
            limits,
        )
    with pytest.raises(InvalidRequest, match="prompt is 101 bytes"):
        make_request(CONFIG, "a" * 101, seed=1, limits=limits)


def test_work_budget_counts_pixels_images_and_steps():
    limits = replace(Limits.default(512, 512), max_work=512 * 512 * 4 * 50)
    make_request(CONFIG, "a cat", seed=1, limits=limits, num_images_per_prompt=4)
    with pytest.raises(InvalidRequest, match="work budget of 52428800"):
        make_request(
            CONFIG, "a cat", seed=1, limits=limits, num_images_per_prompt=4, num_inference_steps=51
        )


def test_audit_record_has_the_settings_and_never_the_prompt():
    inputs = {"prompt": np.array([b"a secret prompt"], dtype=object)}
    request = make_request(CONFIG, "a secret prompt", seed=5, num_inference_steps=20)
    entry = record(
        request_id="r1",
        model="stable_diffusion",
        version="1",
        inputs=inputs,
        parsed=request,
        duration_s=1.23456,
        error=None,
        nsfw=np.array([False]),
    )
    assert entry["outcome"] == "success" and entry["prompt_bytes"] == 15
    assert (entry["seed"], entry["steps"], entry["height"]) == (5, 20, 512)
    assert entry["nsfw"] == [False] and entry["duration_s"] == 1.2346
    line = log_line(entry)
    assert json.loads(line) == entry and "secret" not in line


def test_outcomes():
    assert outcome_of(None) == "success"
    assert outcome_of(InvalidRequest("x")) == "invalid"
    assert outcome_of(Cancelled("x")) == "cancelled"
    assert outcome_of(Unavailable("x")) == "unavailable"
    gone = ComponentError("unet", "Request for unknown model: 'unet' is not found")
    assert outcome_of(gone) == "unavailable"
    assert outcome_of(ComponentError("unet", "out of memory")) == "error"
    assert outcome_of(RuntimeError()) == "error"


def test_unary_config_gets_a_bounded_queue_and_the_stream_model_none():
    unary = T.pipeline_config(S.STABLE_DIFFUSION, max_queue_size=5, queue_timeout_s=2.5)
    policy = unary.dynamic_batching.default_queue_policy
    assert (policy.max_queue_size, policy.default_timeout_microseconds) == (5, 2_500_000)
    assert policy.allow_timeout_override and policy.timeout_action == T.pb.ModelQueuePolicy.REJECT
    stream = T.pipeline_config(S.STABLE_DIFFUSION_STREAM, max_queue_size=5)
    assert not stream.HasField("dynamic_batching")
    assert not T.pipeline_config(S.STABLE_DIFFUSION).HasField("dynamic_batching")


class _Error(Exception):
    def __init__(self, status, message):
        self._status, self._message = status, message

    def status(self):
        return self._status

    def message(self):
        return self._message


def test_client_maps_overload_and_queue_timeout_to_unavailable():
    full = translate(_Error("StatusCode.UNAVAILABLE", "[request id: 1] Exceeds maximum queue size"))
    assert isinstance(full, UnavailableError)
    assert str(full).startswith("server busy: the model's request queue is full")
    expired = translate(_Error("StatusCode.UNAVAILABLE", "Request timeout expired"))
    assert isinstance(expired, UnavailableError)
    streamed = translate(_Error(None, "server busy: 3 requests queued (max_queue_size 3)"))
    assert isinstance(streamed, UnavailableError)
    component = translate(_Error(None, "component model unet is unavailable: unet: gone"))
    assert isinstance(component, UnavailableError)


def test_backoff_is_exponential_capped_and_jittered():
    for attempt, ceiling in [(0, 0.5), (1, 1.0), (2, 2.0), (10, 8.0)]:
        delays = [backoff_delay(attempt, 0.5, 8.0) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1
    with pytest.raises(ValueError):
        Client("127.0.0.1:1", backoff_s=-1)


def test_cancellation_is_polled_at_most_every_interval(monkeypatch):
    """Each poll is a round trip to Triton: asked once per interval, not once per step."""
    import sd_pipeline.loop as L

    clock = iter([0.0, 0.01, 0.049, 0.05, 0.06, 0.2])
    monkeypatch.setattr(L.time, "monotonic", lambda: next(clock))
    asked = []

    def poll():
        asked.append(True)
        return len(asked) == 3

    should_stop = polled_at_most_every(poll, 0.05)
    answers = [should_stop() for _ in range(6)]
    # asked at 0.0, 0.05 and 0.2; the third ask says "cancelled" and is passed on
    assert len(asked) == 3
    assert answers == [False, False, False, False, False, True]


def test_the_watchdog_gives_up_on_a_crash_loop(monkeypatch):
    """A stub that dies again and again: max_restarts within window_s, then False (the
    launcher exits and the orchestrator, with its backoff, takes over); later deaths,
    outside the window, are healed again."""
    from sd_triton.server.watchdog import Watchdog

    now = [0.0]

    class Server:
        pid, starts, stops = 1, 0, 0

        def stop(self, timeout_s):
            self.stops += 1

        def start(self, timeout_s):
            self.starts += 1

    server = Server()
    watchdog = Watchdog(server, max_restarts=2, window_s=100.0, clock=lambda: now[0])
    monkeypatch.setattr(watchdog, "dead_instances", lambda: {7: "unet_0"})
    assert watchdog.check() and watchdog.check()
    assert (server.starts, server.stops, watchdog.restarts) == (2, 2, 2)
    now[0] = 99.0
    assert not watchdog.check()  # a third death within 100 s: no restart
    assert (server.starts, server.stops) == (2, 2)
    now[0] = 150.0  # both restarts are older than the window
    assert watchdog.check() and server.starts == 3
