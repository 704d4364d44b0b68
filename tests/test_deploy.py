"""docker-compose.yml and its Dockerfile, checked without a Docker engine.

The development machines have no Docker engine, so these tests check what
can be checked: the file parses, names NVIDIA's image of the Triton release
we test against, reserves a GPU, publishes the ports where it says, mounts the
repository, has a readiness health check, takes the admin key from a secret,
and that the commands it runs are ones our tools accept and build the
tritonserver command they mean.
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


def _defaults(text: str) -> str:
    """``${VAR:-default}`` replaced by its default, as compose does with VAR unset."""
    return re.sub(r"\$\{[^}:]*:-([^}]*)\}", r"\1", text)


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
    published = {int(p.split(":")[-1]): _defaults(p).split(":")[0] for p in svc["ports"]}
    # gRPC for clients on every interface; plain-text HTTP and metrics on host loopback.
    assert published == {8001: "0.0.0.0", 8000: "127.0.0.1", 8002: "127.0.0.1"}
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    mounts = _targets(svc["volumes"])
    assert "/models" in mounts and mounts["/models"].endswith(":ro")
    assert svc["command"][:2] == ["sd-triton-server", "/models"]
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

    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    for folder in {d.split("/")[0] for d in package_dirs.values()} | {"sd_triton"}:
        assert re.search(rf"^COPY {folder} ", text, re.M), f"Dockerfile does not copy {folder}/"


def _tritonserver_flags() -> set[str]:
    """The options of the pip-installed tritonserver (2.51, the release of NGC 24.10)."""
    import subprocess

    from sd_triton.server.launcher import pytriton_root, server_env

    binary = pytriton_root() / "bin" / "tritonserver"
    proc = subprocess.run(
        [str(binary), "--help"], capture_output=True, text=True, env=server_env(), timeout=30
    )
    return set(re.findall(r"^\s+(--[a-z0-9-]+)", proc.stdout + proc.stderr, re.M))


def _compose_server(compose: dict, repository: Path, monkeypatch, *overlays: dict):
    """The TritonServer the triton service's command describes, with its environment.

    ``/models`` becomes ``repository`` and each /run/secrets file a file
    under it, as Docker would mount them.
    """
    from sd_triton.server.launcher import build_parser, server_from_args

    environment = dict(compose["services"]["triton"]["environment"])
    for overlay in overlays:
        environment.update(overlay["services"]["triton"]["environment"])
    for name, value in environment.items():
        if value.startswith("/run/secrets/"):
            local = repository / Path(value).name
            local.write_text("compose-test-admin-key-0123456789\n")
            value = str(local)
        monkeypatch.setenv(name, value)
    cmd = compose["services"]["triton"]["command"]
    assert cmd[0] == "sd-triton-server"
    args, extra = build_parser().parse_known_args([str(repository), *cmd[2:]])
    return args, server_from_args(args, extra)


def test_triton_command_uses_flags_of_our_release(compose, tmp_path, monkeypatch):
    from sd_pipeline.spec import ADMIN_KEY_ENV

    flags = _tritonserver_flags()
    assert "--model-repository" in flags  # the help text was read
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    args, server = _compose_server(compose, tmp_path, monkeypatch)
    assert args.tritonserver == "/opt/tritonserver/bin/tritonserver"  # the image's own
    cmd = server.command()
    assert cmd[0] == "/opt/tritonserver/bin/tritonserver"
    used = {arg.split("=", 1)[0] for arg in cmd[1:]}
    assert used <= flags, f"flags tritonserver 2.51 does not know: {used - flags}"
    assert "--model-control-mode=explicit" in cmd and "--load-model=*" in cmd
    pool = next(a for a in cmd if a.startswith("--cuda-memory-pool-byte-size="))
    assert re.fullmatch(r"--cuda-memory-pool-byte-size=0:\d+", pool)
    # No CPU-only flags of the pip-installed server on the GPU node.
    assert not any(a.startswith(("--pinned-memory-pool", "--allow-gpu-metrics")) for a in cmd)


def test_admin_key_comes_from_a_secret_and_guards_the_admin_apis(compose, tmp_path, monkeypatch):
    from sd_pipeline.spec import ADMIN_KEY_ENV, ADMIN_KEY_FILE_ENV, ADMIN_KEY_HEADER

    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    svc = compose["services"]["triton"]
    assert ADMIN_KEY_ENV not in svc["environment"], "the key itself must not be in the file"
    secret = Path(svc["environment"][ADMIN_KEY_FILE_ENV]).name
    assert svc["secrets"] == [secret]
    assert _defaults(compose["secrets"][secret]["file"]) == "./secrets/admin_key"
    assert "secrets/" in (ROOT / ".gitignore").read_text().split()
    assert "secrets" in (ROOT / "docker" / "Dockerfile.dockerignore").read_text().split()

    args, server = _compose_server(compose, tmp_path, monkeypatch)
    cmd = server.command()
    key = "compose-test-admin-key-0123456789"
    group = f"model-repository,shared-memory,logging,trace:{ADMIN_KEY_HEADER}={key}"
    assert f"--http-restricted-api={group}" in cmd and f"--grpc-restricted-protocol={group}" in cmd
    # Every interface inside the container; the host side is decided by ports:.
    assert args.listen == "0.0.0.0" and "--grpc-address=0.0.0.0" in cmd
    assert not any(key in a for a in svc["command"])


def test_tls_overlay_turns_on_grpc_tls(compose, tmp_path, monkeypatch):
    overlay = yaml.safe_load((ROOT / "docker" / "compose.tls.yml").read_text())
    svc = overlay["services"]["triton"]
    assert set(svc["secrets"]) <= set(overlay["secrets"])
    for name in svc["secrets"]:
        assert _defaults(overlay["secrets"][name]["file"]).startswith("./secrets/")
    args, server = _compose_server(compose, tmp_path, monkeypatch, overlay)
    cmd = server.command()
    assert "--grpc-use-ssl=true" in cmd
    assert f"--grpc-server-cert={tmp_path / 'sd_triton_grpc_cert'}" in cmd
    assert f"--grpc-server-key={tmp_path / 'sd_triton_grpc_key'}" in cmd


def test_trt_cache_is_mounted_where_the_exporter_points(compose):
    from sd_triton.export.cli import build_parser

    mounts = _targets(compose["services"]["triton"]["volumes"])
    default_cache = build_parser().parse_args(["src", "out"]).trt_cache
    assert default_cache in mounts and not mounts[default_cache].endswith(":ro")


def test_export_service_writes_the_gpu_flavour(compose):
    from sd_triton.export.cli import build_parser

    svc = compose["services"]["export"]
    args = build_parser().parse_args(svc["command"][1:])
    assert args.fp16 and args.gpu and not args.fp16_vae_decoder
    assert "deploy" not in svc  # exporting runs on the CPU; the GPU stays with the server
    source = _targets(svc["volumes"])["/checkpoint"]
    assert source.endswith(":ro")


def test_dockerfile_installs_the_project_editable(compose):
    """The exporter copies model_repository/... from beside its source: an editable install."""
    from sd_pipeline import spec
    from sd_triton.export import component_models as CM
    from sd_triton.export import pipeline_models as PM

    text = _dockerfile(compose, "triton")
    assert re.search(r"pip install [^\n]*-e /opt/sd-triton", text)
    copied = set(re.findall(r"^COPY (\S+) /opt/sd-triton/", text, re.M))
    for path in (
        *CM.HOST_TEMPLATES.values(),
        CM.COMPONENT_HOST_SOURCE,
        CM.WRAPPERS_SOURCE,
        PM.PIPELINE_MODEL_TEMPLATE,
        spec.__file__,
    ):
        top = Path(path).resolve().relative_to(ROOT).parts[0]
        assert top in copied, f"the image lacks {path}"


def test_dockerfile_pins_what_its_python_can_install(compose):
    """The image's Python is 3.10: transformers 5 needs torch >= 2.6; pins are exact."""
    text = _dockerfile(compose, "triton")
    torch_version = re.search(r"ARG TORCH_VERSION=(\d+)\.(\d+)", text)
    assert (int(torch_version[1]), int(torch_version[2])) >= (2, 6)
    for package in ("diffusers", "transformers", "onnxruntime-gpu"):
        assert re.search(rf'"{package}==[\d.]+"', text), package


def test_build_context_leaves_out_the_environment(compose):
    build = compose["services"]["triton"]["build"]
    ignore = ROOT / build["context"] / f"{build['dockerfile']}.dockerignore"
    patterns = set(ignore.read_text().split())
    assert {".venv", "build", ".git"} <= patterns
