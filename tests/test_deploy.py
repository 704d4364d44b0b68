"""docker-compose.yml and its Dockerfile, checked without a Docker engine.

The development machines have no Docker engine, so these tests check what
can be checked: the file parses, names NVIDIA's image of the Triton release
we test against, reserves a GPU, publishes the three ports, mounts the
repository, has a readiness health check, and that the commands it runs are
ones our tools accept.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _targets(volumes: list[str]) -> dict[str, str]:
    """Container path -> volume spec, for "SRC:DST[:MODE]" with ${VAR:-default} sources."""
    out = {}
    for v in volumes:
        parts = re.sub(r"\$\{[^}]*\}", "HOST", v).split(":")
        out[parts[1]] = v
    return out


def _dockerfile(compose: dict, service: str) -> str:
    build = compose["services"][service]["build"]
    return (ROOT / build["context"] / build["dockerfile"]).read_text()


def test_triton_service_uses_nvidia_image_of_our_release(compose):
    text = _dockerfile(compose, "triton")
    version = compose["services"]["triton"]["build"]["args"]["TRITON_VERSION"]
    assert version == "24.10"  # tritonserver 2.51, as in the nvidia-pytriton wheel we test with
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:\$\{TRITON_VERSION\}-py3$", text, re.M)
    assert "ARG TRITON_VERSION=24.10" in text


def test_triton_service_ports_gpu_mounts_healthcheck(compose):
    svc = compose["services"]["triton"]
    published = {int(p.split(":")[-1]) for p in svc["ports"]}
    assert published == {8000, 8001, 8002}
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    mounts = _targets(svc["volumes"])
    assert "/models" in mounts and mounts["/models"].endswith(":ro")
    assert "--model-repository=/models" in svc["command"]
    assert svc["command"][0] == "tritonserver"
    health = " ".join(svc["healthcheck"]["test"])
    assert "/v2/health/ready" in health and "8000" in health
    assert svc["shm_size"]  # Python backend needs more than Docker's 64 MB default


def test_export_service_runs_a_command_our_exporter_accepts(compose):
    from sd_triton.export.cli import build_parser

    svc = compose["services"]["export"]
    assert svc["profiles"] == ["export"]
    cmd = svc["command"]
    assert cmd[0] == "sd-triton-export"
    args = build_parser().parse_args(cmd[1:])
    assert str(args.src) == "/checkpoint" and str(args.out) == "/models"
    assert args.host == "onnxruntime"
    mounts = set(_targets(svc["volumes"]))
    assert {"/checkpoint", "/models"} <= mounts


def test_dockerfile_copies_every_package_folder(compose):
    text = _dockerfile(compose, "triton")
    import tomllib

    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for folder in {d.split("/")[0] for d in package_dirs.values()} | {"sd_triton"}:
        assert re.search(rf"^COPY {folder} ", text, re.M), f"Dockerfile does not copy {folder}/"
