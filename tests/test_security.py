"""Lock the node: admin APIs behind the key, loopback by default, gRPC TLS, safe weights.

Two servers, both the session's, on the tiny repository:

- ``locked_server``: explicit model control with an admin key and gRPC over TLS
  (the session's throwaway self-signed certificate, ``tls_files``); the client
  tests use it too. Every admin call is tried without the key, with a wrong key
  and with the key; inference, health, metadata and statistics are used without
  one throughout.
- the session's ``triton_server`` (the launcher's defaults: no key): admin APIs
  are unavailable on every port, and every port listens on loopback only.

Without a server: the key's sources, the refusals of the launcher and CLI, and
a pickle carrying a callable, which the exporter's loader refuses without
running it.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import pickle
import socket
import subprocess
import urllib.error
import urllib.request
from multiprocessing import shared_memory

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from sd_pipeline.spec import ADMIN_KEY_ENV, ADMIN_KEY_FILE_ENV, ADMIN_KEY_HEADER
from sd_triton.server import ServerError, TritonServer
from sd_triton.server.launcher import main as server_main
from sd_triton.server.security import ADMIN_APIS, SecurityError, read_admin_key

KEY = "test-admin-key-0123456789"
WRONG = {ADMIN_KEY_HEADER: "not-the-key-0123456789"}
PROBE_CONFIG = {
    "backend": "python",
    "max_batch_size": 0,
    "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [1]}],
    "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [1]}],
}
# What an attacker would send: code that runs on the server as it loads.
PROBE_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")

class TritonPythonModel:
    def execute(self, requests):
        raise RuntimeError("never called")
"""


# ---------------------------------------------------------------- helpers
def http(server, method: str, path: str, body: dict | None = None, headers=None, port=None):
    """(status, body text) of one HTTP request to the server."""
    port = port or server.ports.http
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def grpc_refused(call, *args, **kwargs) -> str:
    with pytest.raises(InferenceServerException) as e:
        call(*args, **kwargs)
    assert e.value.status() == "StatusCode.UNAVAILABLE", e.value
    assert "restricted" in e.value.message()
    return e.value.message()


def probe_body(name: str, marker) -> dict:
    code = PROBE_CODE.format(marker=str(marker)).encode()
    return {
        "parameters": {
            "config": json.dumps({"name": name, **PROBE_CONFIG}),
            "file:1/model.py": base64.b64encode(code).decode(),
        }
    }


def generate(client: grpcclient.InferenceServerClient) -> np.ndarray:
    """One small image from ``stable_diffusion`` with plain tritonclient (no key)."""
    values = {
        "prompt": np.array([b"a cat"], np.object_),
        "height": np.array([32], np.int32),
        "width": np.array([32], np.int32),
        "num_inference_steps": np.array([2], np.int32),
        "seed": np.array([7], np.int64),
    }
    inputs = []
    for name, value in values.items():
        tensor = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    images = client.infer("stable_diffusion", inputs, client_timeout=120).as_numpy("images")
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8
    return images


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tls_client(locked_server, tls_files):
    client = grpcclient.InferenceServerClient(
        locked_server.grpc_url, ssl=True, root_certificates=str(tls_files["cert"])
    )
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def admin(locked_server):
    return locked_server.grpc_admin_headers


# ------------------------------------------------ the locked_server server (TLS gRPC)
def test_remote_code_probe_over_http_needs_the_key(locked_server, tls_client, tmp_path):
    marker = tmp_path / "ran"
    body = probe_body("probe_http", marker)
    for headers in (None, WRONG):
        status, text = http(
            locked_server, "POST", "/v2/repository/models/probe_http/load", body, headers
        )
        assert status == 403 and ADMIN_KEY_HEADER in text, (status, text)
    assert not marker.exists(), "the server ran code from a request without the key"
    assert locked_server.is_ready() and not tls_client.is_model_ready("probe_http")
    generate(tls_client)

    # The same request with the key: the operator may load code (that is what the key is for).
    status, text = http(
        locked_server,
        "POST",
        "/v2/repository/models/probe_http/load",
        body,
        locked_server.http_admin_headers,
    )
    assert status == 200, text
    assert marker.read_text() == "ran" and tls_client.is_model_ready("probe_http")
    # Left loaded: with --strict-readiness an unloaded model would make the server not ready.
    assert locked_server.is_ready()


def test_remote_code_probe_over_grpc_needs_the_key(locked_server, tls_client, admin, tmp_path):
    marker = tmp_path / "ran"
    body = probe_body("probe_grpc", marker)["parameters"]
    config = body["config"]
    files = {"file:1/model.py": base64.b64decode(body["file:1/model.py"])}
    grpc_refused(tls_client.load_model, "probe_grpc", config=config, files=files)
    assert not marker.exists(), "the server ran code from a request without the key"
    tls_client.load_model("probe_grpc", config=config, files=files, headers=admin)
    assert marker.read_text() == "ran" and locked_server.is_ready()


def test_unload_needs_the_key_and_inference_carries_on(locked_server, tls_client, admin):
    status, _ = http(locked_server, "POST", "/v2/repository/models/unet/unload", {})
    assert status == 403
    grpc_refused(tls_client.unload_model, "unet")
    grpc_refused(tls_client.get_model_repository_index)
    assert tls_client.is_model_ready("unet") and locked_server.is_ready()
    generate(tls_client)

    tls_client.unload_model("unet", headers=admin)
    try:
        with pytest.raises(InferenceServerException, match="unet"):
            generate(tls_client)
        index = tls_client.get_model_repository_index(headers=admin)
        assert {m.name for m in index.models} >= {"unet", "stable_diffusion"}
    finally:
        tls_client.load_model("unet", headers=admin)
    generate(tls_client)


def test_log_settings_need_the_key(locked_server, tls_client, admin):
    for headers in (None, WRONG):
        status, _ = http(locked_server, "POST", "/v2/logging", {"log_verbose_level": 1}, headers)
        assert status == 403
    grpc_refused(tls_client.update_log_settings, {"log_verbose_level": 1})
    grpc_refused(tls_client.get_log_settings)
    status, text = http(
        locked_server, "GET", "/v2/logging", headers=locked_server.http_admin_headers
    )
    assert status == 200 and json.loads(text)["log_verbose_level"] == 0

    tls_client.update_log_settings({"log_verbose_level": 1}, headers=admin)
    try:
        settings = tls_client.get_log_settings(headers=admin, as_json=True)["settings"]
        assert settings["log_verbose_level"]["uint32_param"] == 1
    finally:
        tls_client.update_log_settings({"log_verbose_level": 0}, headers=admin)


def test_trace_settings_need_the_key(locked_server, tls_client, admin):
    assert http(locked_server, "GET", "/v2/trace/setting")[0] == 403
    assert (
        http(locked_server, "POST", "/v2/trace/setting", {"trace_level": ["TIMESTAMPS"]})[0] == 403
    )
    grpc_refused(tls_client.get_trace_settings)
    status, _ = http(
        locked_server, "GET", "/v2/trace/setting", headers=locked_server.http_admin_headers
    )
    assert status == 200
    assert tls_client.get_trace_settings(headers=admin) is not None


def test_shared_memory_registration_needs_the_key(locked_server, tls_client, admin):
    regions = [shared_memory.SharedMemory(create=True, size=64) for _ in range(2)]
    try:
        body = {"key": f"/{regions[0].name}", "offset": 0, "byte_size": 64}
        path = "/v2/systemsharedmemory/region/sd_http/register"
        grpc_key = f"/{regions[1].name}"
        for headers in (None, WRONG):
            assert http(locked_server, "POST", path, body, headers)[0] == 403
        assert http(locked_server, "GET", "/v2/systemsharedmemory/status")[0] == 403
        grpc_refused(tls_client.register_system_shared_memory, "sd_grpc", grpc_key, 64)
        grpc_refused(tls_client.get_system_shared_memory_status)
        status = tls_client.get_system_shared_memory_status(headers=admin, as_json=True)
        assert status.get("regions", {}) == {}, "a refused registration went through"

        assert http(locked_server, "POST", path, body, locked_server.http_admin_headers)[0] == 200
        tls_client.register_system_shared_memory("sd_grpc", grpc_key, 64, headers=admin)
        status = tls_client.get_system_shared_memory_status(headers=admin, as_json=True)
        assert set(status["regions"]) == {"sd_http", "sd_grpc"}
        tls_client.unregister_system_shared_memory(headers=admin)
    finally:
        for region in regions:
            region.close()
            region.unlink()


def test_open_apis_need_no_key(locked_server, tls_client):
    for path in (
        "/v2/health/ready",
        "/v2",
        "/v2/models/stable_diffusion",
        "/v2/models/stable_diffusion/config",
        "/v2/models/stable_diffusion/stats",
    ):
        assert http(locked_server, "GET", path)[0] == 200, path
    assert tls_client.is_server_ready() and tls_client.is_model_ready("stable_diffusion")
    assert tls_client.get_model_metadata("stable_diffusion").name == "stable_diffusion"
    assert tls_client.get_inference_statistics("stable_diffusion").model_stats
    assert tls_client.get_model_config("stable_diffusion").config.name == "stable_diffusion"


def test_grpc_over_tls_serves_and_refuses_plain_text(locked_server, tls_client):
    assert generate(tls_client).shape == (1, 32, 32, 3)
    plain = grpcclient.InferenceServerClient(locked_server.grpc_url)
    try:
        with pytest.raises(InferenceServerException):
            plain.is_server_live(client_timeout=10)
    finally:
        plain.close()


# ------------------------------------------- the launcher's defaults (no key)
def test_without_a_key_admin_apis_are_off_on_every_port(triton_server):
    server = triton_server
    assert server.admin_key is None and server.http_admin_headers == {}
    refused = [
        ("POST", "/v2/repository/index", {}),
        ("POST", "/v2/repository/models/unet/unload", {}),
        ("POST", "/v2/repository/models/probe/load", probe_body("probe", "/nonexistent/x")),
        ("POST", "/v2/logging", {"log_verbose_level": 1}),
        ("GET", "/v2/trace/setting", None),
        ("GET", "/v2/systemsharedmemory/status", None),
    ]
    for method, path, body in refused:
        assert http(server, method, path, body)[0] == 403, path
        # The metrics port serves /metrics only: other paths get an error or an empty page.
        status, text = http(server, method, path, body, port=server.ports.metrics)
        assert status in (404, 405) or (status == 200 and text == ""), (path, status, text)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        grpc_refused(client.get_model_repository_index)
        grpc_refused(client.unload_model, "unet")
        grpc_refused(client.update_log_settings, {"log_verbose_level": 1})
        grpc_refused(client.get_trace_settings)
        grpc_refused(client.get_system_shared_memory_status)
        assert client.is_model_ready("unet") and client.is_server_ready()
    finally:
        client.close()


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket in LISTEN state on ``port`` (from /proc/net/tcp*)."""
    found = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, port_hex = local.split(":")
                if state == "0A" and int(port_hex, 16) == port:
                    raw = bytes.fromhex(address)
                    # The kernel prints each 32-bit word in host (little-endian) order.
                    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))
                    address = ipaddress.ip_address(raw)
                    # gRPC listens on an IPv6 socket bound to ::ffff:127.0.0.1.
                    found.add(str(getattr(address, "ipv4_mapped", None) or address))
    return found


def _other_addresses() -> list[str]:
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    return [a for a in out if not ipaddress.ip_address(a).is_loopback]


def test_default_listens_on_loopback_only(triton_server):
    ports = triton_server.ports
    for port in (ports.http, ports.grpc, ports.metrics):
        assert _listening_addresses(port) == {"127.0.0.1"}, port
    others = _other_addresses()
    for address in others:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family) as s:
            s.settimeout(5)
            assert s.connect_ex((address, ports.grpc)) != 0, f"gRPC reachable on {address}"
    with socket.create_connection(("127.0.0.1", ports.grpc), timeout=5):
        pass  # and reachable where it is meant to be


# ---------------------------------------------------------- without a server
def test_admin_key_comes_from_the_environment_or_a_file(tmp_path):
    assert read_admin_key({}) is None
    assert read_admin_key({ADMIN_KEY_ENV: KEY}) == KEY
    secret = tmp_path / "admin_key"
    secret.write_text(KEY + "\n")
    assert read_admin_key({ADMIN_KEY_FILE_ENV: str(secret)}) == KEY
    with pytest.raises(SecurityError, match="not both"):
        read_admin_key({ADMIN_KEY_ENV: KEY, ADMIN_KEY_FILE_ENV: str(secret)})
    with pytest.raises(SecurityError, match="cannot read"):
        read_admin_key({ADMIN_KEY_FILE_ENV: str(tmp_path / "missing")})
    with pytest.raises(SecurityError, match="at least 16"):
        read_admin_key({ADMIN_KEY_ENV: "short"})
    with pytest.raises(SecurityError, match="at least 16"):
        read_admin_key({ADMIN_KEY_ENV: "with:colon,and-comma-0123456789"})


def test_launcher_flags_restrict_admin_apis_and_bind_loopback(tmp_path, monkeypatch):
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    monkeypatch.delenv(ADMIN_KEY_FILE_ENV, raising=False)
    keyed = TritonServer(tmp_path, model_control="explicit", admin_key=KEY).command()
    group = f"{','.join(ADMIN_APIS)}:{ADMIN_KEY_HEADER}={KEY}"
    assert f"--http-restricted-api={group}" in keyed
    assert f"--grpc-restricted-protocol={group}" in keyed
    for api in ("http", "grpc", "metrics"):
        assert f"--{api}-address=127.0.0.1" in keyed
    assert set(ADMIN_APIS) == {"model-repository", "shared-memory", "logging", "trace"}
    from sd_triton.server.launcher import _redact

    logged = " ".join(_redact(keyed))  # what start() logs
    assert KEY not in logged and f"{ADMIN_KEY_HEADER}=<key>" in logged

    # No key: restricted to a random key nobody is told, a new one each time.
    first, second = (
        {a for a in TritonServer(tmp_path).command() if a.startswith("--http-restricted-api=")}
        for _ in range(2)
    )
    assert len(first) == 1 and first != second and KEY not in str(first)
    with pytest.raises(ServerError, match=ADMIN_KEY_ENV):
        TritonServer(tmp_path, model_control="explicit")
    with pytest.raises(ServerError, match="--listen"):
        TritonServer(tmp_path, extra_args=["--http-address=0.0.0.0"])
    monkeypatch.setenv(ADMIN_KEY_ENV, KEY)
    assert ADMIN_KEY_ENV not in TritonServer(tmp_path)._env()  # not handed to model code


def test_cli_takes_the_key_from_the_environment_only(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    monkeypatch.delenv(ADMIN_KEY_FILE_ENV, raising=False)
    assert server_main([str(tmp_path), "--model-control", "explicit"]) == 1
    assert ADMIN_KEY_FILE_ENV in capsys.readouterr().err
    restricted = f"--http-restricted-api=logging:{ADMIN_KEY_HEADER}={KEY}"
    assert server_main([str(tmp_path), restricted]) == 1
    assert "set by the launcher" in capsys.readouterr().err

    from sd_triton.server.launcher import build_parser, server_from_args

    secret = tmp_path / "admin_key"
    secret.write_text(KEY)
    monkeypatch.setenv(ADMIN_KEY_FILE_ENV, str(secret))
    args, extra = build_parser().parse_known_args([str(tmp_path), "--model-control=explicit"])
    server = server_from_args(args, extra)
    assert server.admin_key == KEY and server.listen == "127.0.0.1"


class _Payload:
    """Unpickling this calls ``os.system``: what a malicious checkpoint carries."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickled_checkpoint_with_a_callable_is_refused(tmp_path, suffix):
    import torch

    from sd_triton.export.checkpoint import ExportError, load_state_dict

    marker = tmp_path / "pwned"
    path = tmp_path / f"model{suffix}"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hook": _Payload(marker)}, path)
    with pytest.raises(ExportError, match=r"refused.*posix\.system.*could run code"):
        load_state_dict(path)
    assert not marker.exists(), "the pickle's callable ran"

    # The same container without the payload loads (the Lightning wrapper unwrapped).
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, path)
    assert {k: v.tolist() for k, v in load_state_dict(path).items()} == {"w": [1.0, 1.0]}


def test_safetensors_loads_and_other_formats_are_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    from sd_triton.export.checkpoint import ExportError, load_state_dict

    save_file({"w": torch.arange(3.0)}, tmp_path / "lora.safetensors")
    assert load_state_dict(tmp_path / "lora.safetensors")["w"].tolist() == [0.0, 1.0, 2.0]
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ExportError, match="not a readable .safetensors"):
        load_state_dict(tmp_path / "bad.safetensors")
    (tmp_path / "model.pkl").write_bytes(b"")
    with pytest.raises(ExportError, match="unknown weights format .pkl"):
        load_state_dict(tmp_path / "model.pkl")


@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_component_folders_load_without_running_pickles(tiny_checkpoint, tmp_path, component):
    """A diffusers/transformers folder whose weights are a pickle with a callable: refused, never run.

    The exporter and the torch host load component folders through ``load_module``.
    """
    import shutil

    import torch

    from sd_triton.export.wrappers import load_module

    marker = tmp_path / "pwned"
    folder = tmp_path / component
    folder.mkdir()
    shutil.copy(tiny_checkpoint / component / "config.json", folder)
    weights = "diffusion_pytorch_model.bin" if component == "unet" else "pytorch_model.bin"
    torch.save({"hook": _Payload(marker)}, folder / weights)
    with pytest.raises(Exception) as refused:  # diffusers wraps torch's error in an OSError
        load_module(component, folder)
    chain, error = [], refused.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any(
        isinstance(e, pickle.UnpicklingError) and "GLOBAL posix.system" in str(e) for e in chain
    ), chain
    assert not marker.exists(), "loading a component folder ran the pickle's callable"
