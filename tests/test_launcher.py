"""The server launcher on small hand-written repositories (no export needed)."""

from __future__ import annotations

import glob
import ipaddress
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from sd_triton.server import Ports, ServerError, TritonServer

ECHO_CONFIG = """
name: "echo"
backend: "python"
max_batch_size: 4
input [ { name: "x" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 2 ] } ]
"""

ECHO_MODEL = """
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy() * 2)]
            )
            for r in requests
        ]
"""


def _write_model(repo, name, config, code):
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(textwrap.dedent(config))
    (repo / name / "1" / "model.py").write_text(textwrap.dedent(code))


@pytest.fixture
def echo_repo(tmp_path):
    _write_model(tmp_path, "echo", ECHO_CONFIG, ECHO_MODEL)
    return tmp_path


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout_s:.0f} s")
        time.sleep(0.1)  # the polling interval


def _read_until_line_starting(proc: subprocess.Popen, prefix: str, timeout_s: float) -> list[str]:
    """``proc``'s output up to the first line that starts with ``prefix``, within a deadline."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + timeout_s
    seen = []
    while (left := deadline - time.monotonic()) > 0:
        try:
            seen.append(lines.get(timeout=left))
        except queue.Empty:
            break
        if seen[-1].startswith(prefix):
            return seen
    pytest.fail(f"no line starting with {prefix!r} within {timeout_s:.0f} s")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _not_answering(client: grpcclient.InferenceServerClient) -> bool:
    try:
        client.is_server_live(client_timeout=2)
    except Exception:  # noqa: BLE001 - any failure to answer will do
        return True
    return False


def _process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return pids


def _shm_held_by(pid: int) -> set[str]:
    """Python-backend shm regions opened (or mapped) by the server and its stub processes."""
    held = set()
    for p in _process_tree(pid):
        try:
            with open(f"/proc/{p}/maps") as f:
                held |= {
                    line.split()[-1] for line in f if "triton_python_backend_shm_region" in line
                }
        except OSError:
            pass
    return held


def test_start_infer_stop_leaves_nothing_behind(echo_repo):
    with TritonServer(echo_repo) as server:
        assert server.is_ready()
        client = grpcclient.InferenceServerClient(server.grpc_url)
        assert client.is_model_ready("echo")
        x = grpcclient.InferInput("x", [1, 2], "FP32")
        x.set_data_from_numpy(np.array([[1.5, -2.0]], np.float32))
        y = client.infer("echo", [x]).as_numpy("y")
        np.testing.assert_array_equal(y, [[3.0, -4.0]])
        pid = server.pid
        regions = _shm_held_by(pid)
        assert regions, "the Python backend should hold a shm region while running"
    assert server.pid is None
    assert not server._workdir.exists(), "the launcher's temporary folder was left behind"
    assert _gone(pid)
    assert {r for r in regions if glob.glob(r)} == set(), "shm regions left in /dev/shm"


def test_model_that_fails_to_load_reports_the_log(tmp_path):
    _write_model(
        tmp_path,
        "broken",
        ECHO_CONFIG.replace('"echo"', '"broken"'),
        "raise ImportError('no such thing')\n",
    )
    server = TritonServer(tmp_path)
    with pytest.raises(ServerError, match="broken"):
        server.start(timeout_s=60)
    assert server.pid is None


def test_stop_waits_for_the_servers_drain(tmp_path, monkeypatch):
    # A drain of --exit-timeout-secs is never cut short by the launcher's SIGKILL.
    assert TritonServer(tmp_path).exit_timeout_s == 30.0  # tritonserver's default
    server = TritonServer(tmp_path, extra_args=["--exit-timeout-secs=120"])
    assert server.exit_timeout_s == 120.0
    assert TritonServer(tmp_path, extra_args=["--exit-timeout-secs", "90"]).exit_timeout_s == 90.0
    waited = []

    class Running:  # a process that stops within the wait it is given
        pid, returncode = 0, 0

        def poll(self):
            return None

        def wait(self, timeout=None):
            waited.append(timeout)

    server._proc = Running()
    monkeypatch.setattr(os, "killpg", lambda pid, sig: None)
    server.stop()
    assert waited == [120.0 + 30.0]


def test_missing_repository_is_a_clear_error(tmp_path):
    with pytest.raises(ServerError, match="does not exist"):
        TritonServer(tmp_path / "nope")


def test_cli_serves_in_foreground_and_stops_on_sigterm(echo_repo):
    ports = Ports.free()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "sd_triton.server", str(echo_repo),
            "--http-port", str(ports.http),
            "--grpc-port", str(ports.grpc),
            "--metrics-port", str(ports.metrics),
            "--log-file", "-",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        *before, line = _read_until_line_starting(proc, "ready:", timeout_s=180)
        # --log-file -: the server's own log on the CLI's output (a container's log).
        assert any("Started GRPCInferenceService" in x for x in before), before
        assert f"127.0.0.1:{ports.grpc}" in line
        assert "listening on 127.0.0.1" in line and "admin APIs off" in line
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{ports.grpc}")
        assert client.is_server_ready()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        wait_until(lambda: _not_answering(client), 5, "the server stopped answering")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_server_does_not_outlive_the_process_that_started_it(echo_repo, tmp_path):
    script = tmp_path / "start.py"
    script.write_text(
        "import os, sys\n"
        "from sd_triton.server import TritonServer\n"
        f"s = TritonServer({str(echo_repo)!r}).start(timeout_s=120)\n"
        "print(s.pid, flush=True)\n"
        "os._exit(0)  # no clean-up: as if killed\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    pid = int(out.stdout.split()[-1])
    try:
        wait_until(lambda: _gone(pid), 60, "tritonserver ended after its parent died")
    finally:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)


def _non_loopback_addresses() -> list[str]:
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    return [
        a
        for a in out
        if ipaddress.ip_address(a).version == 4 and not ipaddress.ip_address(a).is_loopback
    ]


def test_listen_exposes_the_server_when_asked(echo_repo):
    """--listen 0.0.0.0 reaches other interfaces (the default does not: test_security.py)."""
    others = _non_loopback_addresses()
    assert others, "this machine has no non-loopback IPv4 address to check"
    with TritonServer(echo_repo, listen="0.0.0.0") as server:
        assert server.grpc_url == f"127.0.0.1:{server.ports.grpc}"
        with socket.create_connection((others[0], server.ports.grpc), timeout=5):
            pass
        client = grpcclient.InferenceServerClient(f"{others[0]}:{server.ports.grpc}")
        assert client.is_server_ready()
