"""Overload and faults, on a dedicated server (explicit model control, tiny model).

The repository is a copy of the session's with a queue of one: one
``stable_diffusion`` instance with ``max_queue_size`` 1, and the streaming
model with ``max_concurrency`` 1 and ``max_queue_size`` 1. Then:

- a burst beyond running + queued is refused at once with UNAVAILABLE
  ("server busy"), unary and streamed; the accepted requests complete;
- a request whose client deadline passes while it is queued is never computed;
- a component model unloaded under a request in flight fails that request
  with UNAVAILABLE naming the component; requests succeed once it is back;
- a server that dies while a client waits gives it an UnavailableError, and
  a client with ``retries`` gets its image from the restarted server.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import tritonclient.grpc as grpcclient

from sd_triton.client import Client, DeadlineExceededError, UnavailableError

pytestmark = pytest.mark.server

MODEL = "stable_diffusion"
MODELS = [
    "text_encoder",
    "unet",
    "vae_encoder",
    "vae_decoder",
    "safety_checker",
    "stable_diffusion",
    "stable_diffusion_stream",
]
# Explicit model control needs the admin key (docs/security.md); the unload test uses it.
ADMIN_KEY = "faults-test-admin-key"
SMALL = {"height": 32, "width": 32, "num_inference_steps": 2}
# Long enough (tens of UNet calls) that others arrive while it runs.
LONG = {"height": 64, "width": 64, "num_inference_steps": 30}
# Seconds of UNet work even on a quiet machine (LONG can end in under 0.5 s
# there): for tests that must act while a request is still running. Within the
# tiny model's limits (max_side 128, max_work 400 x 64 x 64).
HOLD = {"height": 128, "width": 128, "num_inference_steps": 90}


@pytest.fixture(scope="module")
def fault_repository(tiny_repository, tmp_path_factory):
    from sd_triton.export import triton_config as T

    repo = tmp_path_factory.mktemp("fault-repo") / "model_repository"
    shutil.copytree(tiny_repository, repo)
    unary = T.read_config(repo / MODEL)
    unary.instance_group[0].count = 1
    unary.dynamic_batching.default_queue_policy.max_queue_size = 1
    unary.parameters["max_queue_size"].string_value = "1"
    T.write_config(unary, repo / MODEL)
    stream = T.read_config(repo / f"{MODEL}_stream")
    stream.parameters["max_concurrency"].string_value = "1"
    stream.parameters["max_queue_size"].string_value = "1"
    T.write_config(stream, repo / f"{MODEL}_stream")
    return repo


class ServerBox:
    """The module's server; the crash test replaces it."""

    def __init__(self, repository):
        from sd_triton.server import TritonServer

        self.server = TritonServer(
            repository, model_control="explicit", load_models=MODELS, admin_key=ADMIN_KEY
        )
        self.server.start(timeout_s=300)

    @property
    def url(self) -> str:
        return self.server.grpc_url


@pytest.fixture(scope="module")
def box(fault_repository):
    box = ServerBox(fault_repository)
    try:
        yield box
    finally:
        box.server.stop()


def model_stats(url: str, model: str):
    client = grpcclient.InferenceServerClient(url)
    try:
        return client.get_inference_statistics(model).model_stats[0]
    finally:
        client.close()


def unet_executions(url: str) -> int:
    return model_stats(url, "unet").execution_count


def wait_until_denoising(url: str, before: int, timeout_s: float = 60.0) -> None:
    """Return once the UNet has run since ``before`` (a request is in its denoising loop)."""
    deadline = time.monotonic() + timeout_s
    while unet_executions(url) <= before:
        if time.monotonic() > deadline:
            raise AssertionError(f"no UNet execution within {timeout_s:.0f} s")
        time.sleep(0.05)


def test_burst_beyond_the_queue_is_refused_at_once(box):
    def one(i):
        start = time.perf_counter()
        with Client(box.url) as client:
            try:
                client.generate("a cat", seed=i, **(LONG if i == 0 else SMALL))
                return "ok", time.perf_counter() - start, ""
            except UnavailableError as e:
                return "busy", time.perf_counter() - start, str(e)

    with ThreadPoolExecutor(5) as pool:
        steps = unet_executions(box.url)
        first = pool.submit(one, 0)
        wait_until_denoising(
            box.url, steps
        )  # the long one runs: one more may wait, the rest are refused
        rest = list(pool.map(one, range(1, 5)))
        outcomes = [first.result(timeout=120), *rest]
    busy = [o for o in outcomes if o[0] == "busy"]
    assert outcomes[0][0] == "ok" and len(busy) >= 2, outcomes
    assert all(t < 2.0 for _, t, _ in busy), busy
    assert "server busy" in busy[0][2] and "queue is full" in busy[0][2]
    with Client(box.url) as client:
        assert len(client.generate("a cat", seed=9, **SMALL).images) == 1


def test_stream_burst_beyond_its_queue_is_refused_at_once(box):
    def one(i):
        with Client(box.url) as client:
            try:
                options = LONG if i == 0 else SMALL
                events = list(client.stream("a cat", seed=i, **options))
                return "ok", events[-1]
            except UnavailableError as e:
                return "busy", str(e)

    with ThreadPoolExecutor(4) as pool:
        steps = unet_executions(box.url)
        first = pool.submit(one, 0)
        wait_until_denoising(box.url, steps)
        rest = list(pool.map(one, range(1, 4)))
        outcomes = [first.result(timeout=120), *rest]
    busy = [o for o in outcomes if o[0] == "busy"]
    assert outcomes[0][0] == "ok" and busy, outcomes
    assert "server busy: 1 requests queued (max_queue_size 1)" in busy[0][1]


def test_deadline_passed_in_the_queue_is_not_computed(box):
    before = model_stats(box.url, MODEL).execution_count
    with Client(box.url) as client:
        steps = unet_executions(box.url)
        running = client.submit("a cat", seed=1, **HOLD)
        wait_until_denoising(box.url, steps)
        with pytest.raises(DeadlineExceededError):
            client.generate("a dog", seed=2, timeout_s=0.5, **SMALL)
        running.result(timeout_s=120)
    # One instance, first come first served: once a request sent after them is done,
    # the expired one has left the queue (run or dropped). It may still hold the
    # queue's one place for a moment: the probe retries "server busy".
    with Client(box.url, retries=20, backoff_s=0.1, max_backoff_s=0.5) as probe:
        probe.generate("a probe", seed=3, **SMALL)
    assert model_stats(box.url, MODEL).execution_count - before == 2  # the long one, the probe


def test_component_unloaded_in_flight_fails_clearly_then_recovers(box):
    control = grpcclient.InferenceServerClient(box.url)
    try:
        with Client(box.url) as client:
            steps = unet_executions(box.url)
            in_flight = client.submit("a cat", seed=1, **HOLD)
            wait_until_denoising(box.url, steps)
            control.unload_model("unet", headers=box.server.grpc_admin_headers)
            with pytest.raises(UnavailableError, match="unet"):
                in_flight.result(timeout_s=120)
            with pytest.raises(UnavailableError, match="unet"):
                client.generate("a cat", seed=2, **SMALL)
            control.load_model("unet", headers=box.server.grpc_admin_headers)
            assert len(client.generate("a cat", seed=3, **SMALL).images) == 1
    finally:
        if not control.is_model_ready("unet"):
            control.load_model("unet", headers=box.server.grpc_admin_headers)
        control.close()


def test_server_death_gives_unavailable_and_a_retry_reaches_the_restarted_server(box):
    from sd_triton.server import TritonServer
    from sd_triton.server.launcher import _remove_orphan_shm

    old = box.server
    errors = []

    def wait_for_long():
        with Client(old.grpc_url) as client:
            try:
                client.generate("a cat", seed=1, **HOLD)
            except Exception as e:  # noqa: BLE001 - the test inspects it
                errors.append(e)

    steps = unet_executions(old.grpc_url)
    waiter = threading.Thread(target=wait_for_long)
    waiter.start()
    wait_until_denoising(old.grpc_url, steps)
    os.killpg(old.pid, signal.SIGKILL)  # a crash, not a graceful stop
    waiter.join(timeout=60)
    assert not waiter.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], UnavailableError), errors
    old.stop()
    _remove_orphan_shm()

    box.server = TritonServer(
        old.repository,
        ports=old.ports,
        model_control="explicit",
        load_models=MODELS,
        admin_key=ADMIN_KEY,
    )
    box.server.start(wait=False)
    # Refused while it starts (no listener, then models not ready): retried with backoff.
    with Client(box.url, retries=60, backoff_s=0.5, max_backoff_s=3.0) as client:
        result = client.generate("a cat", seed=4, **SMALL)
    assert len(result.images) == 1
