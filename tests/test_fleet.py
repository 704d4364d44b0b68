"""A fleet on one machine: two servers on a repository in S3, behind Envoy, all on loopback.

The repository (lean: one pipeline instance, no streaming model, no safety
checker) is uploaded to a moto S3 server; two ``sd-triton-server``
instances load it from ``s3://http://127.0.0.1:PORT/...``; Envoy balances
gRPC over them with health checks on ``/v2/health/ready`` and retries on
refused connections and UNAVAILABLE, as a Kubernetes Service with readiness
probes and a gRPC-aware proxy would. In order:

1. both instances serve, and the chart's autoscaling expression evaluated on
   their ``/metrics`` under a known load gives the value its rule would;
2. a component's Python stub killed under load (as the OOM killer would):
   no request ends INTERNAL, the node stops being ready within seconds, and
   its watchdog brings it back (``server/watchdog.py``);
3. a rolling update: one instance taken out of the balancer, stopped with
   SIGTERM and replaced by a new repository version while clients run: no
   request fails;
4. an instance killed outright mid-run: clients with retries lose nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from fleet_support import S3, AutoscalingRule, Envoy, Instance, autoscaling_value
from polling import scrape as read_metrics
from polling import wait_until
from tritonclient.utils import InferenceServerException

from sd_triton.client import Client, UnavailableError

pytestmark = [pytest.mark.server, pytest.mark.slow]

MODEL = "stable_diffusion"
SMALL = {"height": 32, "width": 32, "num_inference_steps": 2}
# Long enough that eight of them are all in flight at once, and stay so for a
# few scrapes, on a loaded 2-core machine and on a quiet one.
LONG = {"height": 64, "width": 64, "num_inference_steps": 30}
PROMPT = "a fleet test"
SEED = 7
READY_DROP_S = 10.0  # readiness gone this long after a stub dies, at most
HEAL_S = 240.0  # serving again this long after a stub dies (a server restart), at most


@dataclass
class Fleet:
    a: Instance
    b: Instance
    envoy: Envoy
    v2_url: str
    v1_image: np.ndarray


def _export_versions(tiny_checkpoint: Path, work: Path) -> tuple[Path, Path]:
    """v1: the lean tiny repository; v2: the same with another default scheduler (other images)."""
    from sd_triton.export import export_repository
    from sd_triton.export import triton_config as T
    from sd_triton.export.options import Contents, ExportOptions, Hosting

    v1, v2 = work / "v1", work / "v2"
    lean = ExportOptions(
        contents=Contents(safety_checker=False, stream_model=False),
        hosting=Hosting(pipeline_instances=1),
    )
    export_repository(tiny_checkpoint, v1, lean, overwrite=True)
    shutil.copytree(v1, v2)
    config = T.read_config(v2 / MODEL)
    config.parameters["default_scheduler"].string_value = "euler"
    T.write_config(config, v2 / MODEL)
    return v1, v2


def _image(url: str, **options) -> np.ndarray:
    with Client(url) as client:
        return np.asarray(client.generate(PROMPT, seed=SEED, **{**SMALL, **options}).images[0])


@pytest.fixture(scope="module")
def fleet(tiny_checkpoint, tmp_path_factory):
    from sd_triton.server.launcher import _remove_orphan_shm

    work = tmp_path_factory.mktemp("fleet")
    v1, v2 = _export_versions(tiny_checkpoint, work)
    s3 = S3()
    instances, envoy = [], None
    try:
        v1_url, v2_url = s3.upload(v1, "models", "sd/v1"), s3.upload(v2, "models", "sd/v2")
        instances = [Instance.create(n, v1_url, work).start() for n in ("a", "b")]
        for instance in instances:
            instance.wait_ready()
        envoy = Envoy(instances, work)
        ports = {i.grpc_port for i in instances}
        wait_until(lambda: _healthy(envoy) == ports, "Envoy sees both instances healthy", 30)
        yield Fleet(*instances, envoy, v2_url, _image(instances[0].grpc_url))
    finally:
        if envoy is not None:
            envoy.stop()
        for instance in instances:
            instance.stop()
        s3.stop()
        _remove_orphan_shm()


def _healthy(envoy: Envoy) -> set[int]:
    with contextlib.suppress(OSError, ValueError):
        return envoy.healthy_ports()
    return set()


class Load:
    """Clients sending small requests in a loop until stopped; every outcome is kept."""

    def __init__(self, url: str, clients: int, *, retries: int) -> None:
        self.url, self.retries = url, retries
        self.outcomes: list[tuple[float, str, np.ndarray | str]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(clients)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        with Client(self.url, retries=self.retries, backoff_s=0.2, max_backoff_s=2.0) as client:
            while not self._stop.is_set():
                try:
                    image = client.generate(PROMPT, seed=SEED, timeout_s=120, **SMALL).images[0]
                    outcome = ("ok", np.asarray(image))
                except UnavailableError as e:
                    outcome = ("unavailable", str(e))
                except Exception as e:  # noqa: BLE001 - counted; the test fails on it
                    outcome = (f"{type(e).__name__}", str(e))
                with self._lock:
                    self.outcomes.append((time.monotonic(), *outcome))
                if outcome[0] != "ok":
                    self._stop.wait(0.1)  # a client without retries would spin on a closed port

    def count(self, kind: str = "ok", since: float = 0.0) -> int:
        with self._lock:
            return sum(1 for t, k, _ in self.outcomes if k == kind and t >= since)

    def stop(self) -> Counter:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=180)
        return Counter(k for _, k, _ in self.outcomes)

    def failures(self) -> list[str]:
        return [f"{k}: {v}"[:300] for _, k, v in self.outcomes if k != "ok"]


def _success_count(url: str) -> int:
    client = grpcclient.InferenceServerClient(url)
    try:
        return client.get_inference_statistics(MODEL).model_stats[0].inference_stats.success.count
    finally:
        client.close()


def test_both_instances_serve_and_the_autoscaling_rule_sees_the_queue(fleet):
    """8 long requests in flight on 2 instances that run one each: 6 wait, 3 per pod."""
    rule = AutoscalingRule.from_chart()
    assert rule.series == "nv_inference_pending_request_count"
    before = {i.name: _success_count(i.grpc_url) for i in (fleet.a, fleet.b)}
    in_flight, executing = 8, 2
    expected_average = (in_flight - executing) / 2

    def scrape():
        scrapes = {i.name: read_metrics(i.metrics_url) for i in (fleet.a, fleet.b)}
        value = autoscaling_value(rule, scrapes)
        return value if value[0] == expected_average else None

    with ThreadPoolExecutor(in_flight) as pool:
        futures = [pool.submit(_image, fleet.envoy.url, **LONG) for _ in range(in_flight)]
        average, desired = wait_until(scrape, f"{expected_average} waiting requests per pod", 60)
        for f in futures:
            f.result(timeout=300)
    # The HPA grows the fleet from 2 to ceil(2 * 3 / target 2) = 3 pods.
    assert desired == int(np.ceil(2 * average / rule.target_per_pod)) == 3
    # Locked like every node: through the balancer, the admin API needs the key.
    control = grpcclient.InferenceServerClient(fleet.envoy.url)
    try:
        with pytest.raises(InferenceServerException):
            control.unload_model("unet")
        assert control.is_model_ready("unet")
    finally:
        control.close()
    after = {i.name: _success_count(i.grpc_url) for i in (fleet.a, fleet.b)}
    served = {name: after[name] - before[name] for name in after}
    assert sum(served.values()) == in_flight and all(n > 0 for n in served.values()), served


def _instance_of(model: str) -> str:
    """Triton's instance names of ``model``: ``unet_0``, ``unet_0_0`` (group, then instance)."""
    return rf"{model}(_\d+)+"


def _stub_of(instance: Instance, model: str) -> int:
    from sd_triton.server.watchdog import stub_instance, stub_processes

    server = instance.tritonserver_pid()
    stubs = [
        p
        for p in stub_processes(server)
        if re.fullmatch(_instance_of(model), stub_instance(p) or "")
    ]
    assert len(stubs) == 1, stubs
    return stubs[0]


def _serves(url: str) -> bool:
    """One image from ``url`` (True), an UNAVAILABLE answer (False); anything else fails."""
    try:
        _image(url)
        return True
    except UnavailableError:
        return False


def test_a_dead_component_stub_is_unavailable_not_ready_and_heals(fleet):
    """SIGKILL the UNet's stub of instance a under load (what the OOM killer does)."""
    direct = Load(fleet.a.grpc_url, 1, retries=0)  # sees what a itself answers
    balanced = Load(fleet.envoy.url, 2, retries=3)
    try:
        wait_until(lambda: direct.count() >= 1 and balanced.count() >= 2, "load running", 60)
        killed_at = time.monotonic()
        os.kill(_stub_of(fleet.a, "unet"), signal.SIGKILL)
        wait_until(lambda: not fleet.a.is_ready(), "a stops being ready", READY_DROP_S)
        not_ready_s = time.monotonic() - killed_at
        wait_until(
            lambda: fleet.a.is_ready() and _serves(fleet.a.grpc_url), "a serves again", HEAL_S
        )
        healed_s = time.monotonic() - killed_at
    finally:
        seen_direct, seen_balanced = direct.stop(), balanced.stop()
    print(
        f"\nstub killed: a not ready after {not_ready_s:.1f} s, serving again after "
        f"{healed_s:.1f} s; direct to a: {dict(seen_direct)}; through Envoy: {dict(seen_balanced)}"
    )
    assert set(seen_direct) <= {"ok", "unavailable"}, direct.failures()
    assert seen_direct["unavailable"] >= 1, (
        "no request saw the broken node: the test proves nothing"
    )
    assert any("unet" in f for f in direct.failures()), direct.failures()
    assert not balanced.failures(), balanced.failures()
    assert re.search(rf"watchdog: stub process of {_instance_of('unet')} \(pid", fleet.a.log())
    both = {fleet.a.grpc_port, fleet.b.grpc_port}
    wait_until(lambda: _healthy(fleet.envoy) == both, "a back in the balancer", 10)


def _verify(new: Instance, old: Instance, folder: Path, **options) -> int:
    """``sd-triton verify`` of one small case on ``new`` against ``old``: its exit status."""
    from sd_triton.client.cli import main

    cases = folder / "cases.json"
    case = {"name": "fleet", "prompt": PROMPT, "seed": SEED, **SMALL, **options}
    cases.write_text(json.dumps({"cases": [case]}))
    argv = ["verify", "--url", new.grpc_url, "--against-url", old.grpc_url, "--cases", str(cases)]
    return main(argv)


def test_rolling_update_to_a_new_version_fails_no_request(fleet, tmp_path):
    """Replace b by v2 while clients run through the balancer, as a Deployment rolls a pod.

    The order is Kubernetes': the pod leaves the Service's endpoints, then gets
    SIGTERM; the new pod joins once it is ready. (SIGTERM alone is not a drain:
    Triton then answers new requests NOT_FOUND as it unloads, and refuses the
    BLS calls of those in flight, see docs/reliability.md.)
    """
    both = {fleet.a.grpc_port, fleet.b.grpc_port}
    load = Load(fleet.envoy.url, 3, retries=3)
    try:
        wait_until(lambda: load.count() >= 3, "load running", 60)
        fleet.envoy.set_endpoints([fleet.a])
        wait_until(lambda: _healthy(fleet.envoy) == {fleet.a.grpc_port}, "b out of the Service", 10)
        assert fleet.b.stop() == 0  # SIGTERM; the launcher exits cleanly
        fleet.b.start(fleet.v2_url)
        fleet.b.wait_ready()
        v2_image = _image(fleet.b.grpc_url)
        assert np.abs(v2_image.astype(int) - fleet.v1_image).max() > 1, "v2 must differ from v1"
        # The golden-set gate before it takes traffic: a case that names its scheduler
        # renders as on v1; one that relies on the default shows v2's change.
        assert _verify(fleet.b, fleet.a, tmp_path, scheduler="ddim") == 0
        assert _verify(fleet.b, fleet.a, tmp_path) == 1
        fleet.envoy.set_endpoints([fleet.a, fleet.b])
        wait_until(lambda: _healthy(fleet.envoy) == both, "b (v2) in the Service", 10)

        def served_v2():
            with load._lock:
                return any(k == "ok" and _same(v, v2_image) for _, k, v in load.outcomes)

        wait_until(served_v2, "the balancer sends requests to the new version", 60)
    finally:
        seen = load.stop()
    print(f"\nrolling update: {dict(seen)}")
    assert not load.failures(), load.failures()
    images = [v for _, _, v in load.outcomes]
    assert all(_same(im, fleet.v1_image) or _same(im, v2_image) for im in images)


def test_an_instance_killed_mid_run_loses_no_request(fleet):
    from sd_triton.server.launcher import _remove_orphan_shm

    load = Load(fleet.envoy.url, 3, retries=5)
    try:
        wait_until(lambda: load.count() >= 3, "load running", 60)
        killed_at = time.monotonic()
        os.killpg(fleet.a.tritonserver_pid(), signal.SIGKILL)  # a crash, no drain
        wait_until(lambda: fleet.a.proc.poll() is not None, "a's launcher notices and exits", 30)
        wait_until(lambda: load.count(since=killed_at) >= 6, "requests go on after the kill", 120)
    finally:
        seen = load.stop()
        _remove_orphan_shm()
    print(f"\nkilled instance: {dict(seen)}")
    assert fleet.a.proc.returncode != 0
    assert not load.failures(), load.failures()


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and int(np.abs(a.astype(int) - b.astype(int)).max()) <= 1


def test_watchdog_and_probe_command_see_a_dead_stub():
    """A child named like the stub that exited unreaped (a zombie): what a killed stub leaves."""
    import subprocess
    import sys

    from sd_triton.server.watchdog import PROBE_COMMAND, STUB_COMM, Watchdog

    name = f"import ctypes; ctypes.CDLL(None).prctl(15, b'{STUB_COMM}')"
    child = subprocess.Popen([sys.executable, "-c", name])
    try:
        server = type("Server", (), {"pid": os.getpid()})()
        watchdog = Watchdog(server)
        wait_until(
            lambda: Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1][0] == "Z",
            "the child is a zombie",
            30,
        )
        assert watchdog.dead_instances() == {}  # seen once: could be an unload reaping it
        assert watchdog.dead_instances() == {child.pid: "?"}
        assert subprocess.run(PROBE_COMMAND).returncode == 1
    finally:
        child.wait()
    assert child.pid not in Watchdog(server).dead_instances()


def test_a_dead_stub_or_a_stopping_server_is_unavailable_not_internal():
    """Triton's words for them (2.51, measured in the tests above) are retryable outcomes."""
    from sd_pipeline.errors import ComponentError
    from sd_pipeline.telemetry import outcome_of

    for message in (
        "Stub process 'unet_0' is not healthy.",
        "Model text_encoder - Error when running inference: Server not ready",
    ):
        assert outcome_of(ComponentError("unet", message)) == "unavailable", message
    assert outcome_of(ComponentError("unet", "onnxruntime: invalid shape")) == "error"
