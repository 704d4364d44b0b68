"""Shared fixtures: the tiny checkpoint, its exported repository and a real tritonserver.

Everything is built once per session from code (fixed seeds, nothing
downloaded). Set ``SD_TRITON_TEST_BUILD=<dir>`` to keep and reuse the built
checkpoint and repository across runs while iterating locally; CI builds
them fresh.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory) -> Path:
    keep = os.environ.get("SD_TRITON_TEST_BUILD")
    if keep:
        path = Path(keep).resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("sd-triton-build")


@pytest.fixture(scope="session")
def tiny_checkpoint(build_dir) -> Path:
    """The embedded tiny SD 1.x model in diffusers format."""
    path = build_dir / "tiny-sd"
    if not (path / "model_index.json").exists():
        subprocess.run([sys.executable, "-m", "sd_triton.export.tiny", str(path)], check=True)
    return path


@pytest.fixture(scope="session")
def tiny_repository(build_dir, tiny_checkpoint) -> Path:
    """The tiny model exported to a Triton model repository (Python-backend ONNX host)."""
    from sd_triton.export import export_repository

    path = build_dir / "model_repository"
    export_repository(tiny_checkpoint, path, overwrite=True)  # the Python-backend ONNX host
    return path


# The other families' tiny checkpoints (``python -m sd_triton.export.tiny`` arguments).
FAMILY_CHECKPOINTS = {
    "tiny-sdxl": ["--family", "sdxl"],
    "tiny-sdxl-refiner": ["--family", "sdxl-refiner"],
    "tiny-sdxl-turbo": ["--family", "sdxl", "--variant", "turbo"],
    "tiny-sd-lcm": ["--variant", "lcm"],
}


@pytest.fixture(scope="session")
def family_checkpoints(build_dir) -> dict[str, Path]:
    """Tiny SDXL base, refiner and Turbo, and an LCM-style SD 1.x, in diffusers format."""
    paths = {}
    for name, args in FAMILY_CHECKPOINTS.items():
        paths[name] = path = build_dir / name
        if not (path / "model_index.json").exists():
            tiny = [sys.executable, "-m", "sd_triton.export.tiny", str(path), *args]
            subprocess.run(tiny, check=True)
    return paths


@pytest.fixture(scope="session")
def families_repository(build_dir, family_checkpoints) -> Path:
    """Two families in one repository: the SDXL base with its refiner (``xl_``), the
    refiner alone (``xlr_``), Turbo (``turbo_``) and an LCM-style SD 1.x (``lcm_``).

    Apart from the session repository (SD 1.x), served by its own server that only the
    tests needing it start: one pipeline instance each (two for the base, whose
    concurrency is tested), no stream models, no LCM safety checker.
    """
    from sd_triton.export import Contents, ExportOptions, Hosting, Naming, export_repository

    path = build_dir / "families_repository"
    exports = {
        "xl_": ("tiny-sdxl", {"refiner": family_checkpoints["tiny-sdxl-refiner"]}, 2),
        "xlr_": ("tiny-sdxl-refiner", {}, 1),
        "turbo_": ("tiny-sdxl-turbo", {"preset": "turbo"}, 1),
        "lcm_": ("tiny-sd-lcm", {"preset": "lcm", "safety_checker": False}, 1),
    }
    for prefix, (name, contents, instances) in exports.items():
        options = ExportOptions(
            contents=Contents(stream_model=False, **contents),
            hosting=Hosting(pipeline_instances=instances),
            naming=Naming(model_prefix=prefix),
        )
        export_repository(family_checkpoints[name], path, options, overwrite=True)
    return path


@pytest.fixture(scope="session")
def families_url(families_repository) -> str:
    """gRPC address of a real tritonserver serving :func:`families_repository`."""
    from sd_triton.server import TritonServer

    with TritonServer(families_repository).start(timeout_s=600) as server:
        yield server.grpc_url


@pytest.fixture(scope="session")
def extras_server(tmp_path_factory):
    """ONE tritonserver for the modules that serve an export of their own (adapters, prompt
    syntax, watermark): explicit model control on a repository that starts empty. Each
    module exports its models under its own ``--model-prefix`` into
    ``extras_server.repository`` and serves them with :func:`serve_extras`."""
    from sd_triton.server import TritonServer

    path = tmp_path_factory.mktemp("extras-repository")
    server = TritonServer(path, model_control="explicit", admin_key="test-extras-key-0123456789")
    with server.start(timeout_s=300):
        yield server


@pytest.fixture(scope="session")
def serve_extras(extras_server):
    """``with serve_extras(prefix) as url``: the models named ``prefix*`` in the extras
    repository loaded (components first, then the pipeline models), unloaded after.
    ``only``: just these models (full names), all at once (a pipeline calls its components
    only when it serves a request), for an export whose other models a module never calls."""
    import contextlib
    from concurrent.futures import ThreadPoolExecutor

    import tritonclient.grpc as grpcclient

    headers = extras_server.grpc_admin_headers

    @contextlib.contextmanager
    def serve(prefix: str, only: list[str] | None = None):
        from sd_triton.client._core import load_waves  # the order of `sd-triton load --all`

        names = [p.name for p in extras_server.repository.iterdir()]
        components, pipelines = (only, []) if only else load_waves(names, prefix)
        assert components and (pipelines or only), (
            f"no {prefix}* models in {extras_server.repository}"
        )
        client = grpcclient.InferenceServerClient(extras_server.grpc_url)
        try:
            with ThreadPoolExecutor(len(components)) as pool:
                list(pool.map(lambda n: client.load_model(n, headers=headers), components))
            for name in pipelines:
                client.load_model(name, headers=headers)
            yield extras_server.grpc_url
            for name in pipelines + components:  # the memory back for the next module's
                client.unload_model(name, headers=headers)
        finally:
            client.close()

    return serve


@pytest.fixture(scope="session")
def xl_pipes(family_checkpoints):
    """diffusers' SDXL base, refiner and Turbo pipelines on the tiny checkpoints."""
    from types import SimpleNamespace

    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    def load(cls, name):
        pipe = cls.from_pretrained(family_checkpoints[name])
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return SimpleNamespace(
        base=load(StableDiffusionXLPipeline, "tiny-sdxl"),
        refiner=load(StableDiffusionXLImg2ImgPipeline, "tiny-sdxl-refiner"),
        turbo=load(StableDiffusionXLPipeline, "tiny-sdxl-turbo"),
    )


@pytest.fixture(scope="session")
def lcm_pipe(family_checkpoints):
    """diffusers' StableDiffusionPipeline on the tiny LCM-style checkpoint, without a checker."""
    from diffusers import StableDiffusionPipeline

    # Exported without its safety checker (one model fewer to serve).
    pipe = StableDiffusionPipeline.from_pretrained(
        family_checkpoints["tiny-sd-lcm"], safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def copy_onnx_export():
    """``copy_onnx_export(monkeypatch, source)``: the exporter copies ``source``'s ONNX files.

    For exports of the tiny checkpoint whose weights are ``source``'s (the session
    repository, or a variant of it): no tracing again, only the configs differ.
    """
    from sd_triton.export import component_models as CM

    def patch(monkeypatch, source: Path) -> None:
        def copy(component, modules, sizes, trace_sizes, dtype, version_dir, opts):
            version_dir.mkdir(parents=True, exist_ok=True)
            onnx = version_dir / CM.ONNX_NAME
            shutil.copyfile(source / component.name / "1" / CM.ONNX_NAME, onnx)
            return onnx

        monkeypatch.setattr(CM, "_export_onnx", copy)

    return patch


@pytest.fixture(scope="session")
def reference_pipe(tiny_checkpoint):
    """diffusers' ``StableDiffusionPipeline`` on the tiny checkpoint: the reference side of parity."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def assets(tiny_repository):
    """The pipeline's assets (config, tokenizer, scheduler config) in the tiny repository."""
    from sd_pipeline import Assets

    return Assets.load(tiny_repository / "stable_diffusion" / "1" / "assets")


@pytest.fixture(scope="module")
def module_monkeypatch():
    """A ``MonkeyPatch`` undone at the end of the test module (e.g. for tests/fake_pb_utils.py)."""
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="session")
def triton_server(tiny_repository):
    """A real tritonserver process serving the tiny repository on free ports."""
    from sd_triton.server import TritonServer

    with TritonServer(tiny_repository).start(timeout_s=300) as server:
        yield server


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> dict[str, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (the certificate is its own root)."""
    path = tmp_path_factory.mktemp("tls")
    files = {"cert": path / "server.crt", "key": path / "server.key"}
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
        + ["-keyout", str(files["key"]), "-out", str(files["cert"])],
        check=True,
        capture_output=True,
    )
    return files


@pytest.fixture(scope="session")
def locked_server(tiny_repository, tls_files):
    """The tiny repository locked as deployed: admin APIs behind a key, gRPC over TLS.

    Explicit model control with only what txt2img needs loaded (no VAE encoder, no
    stream model: a faster start); ``locked_server.admin_key`` is the key. Tests
    that unload a model load it again, and models they load stay loaded.
    """
    from sd_triton.server import TritonServer
    from sd_triton.server.security import GrpcTls

    server = TritonServer(
        tiny_repository,
        model_control="explicit",
        load_models=["text_encoder", "unet", "vae_decoder", "safety_checker", "stable_diffusion"],
        admin_key="test-admin-key-0123456789",
        grpc_tls=GrpcTls(tls_files["cert"], tls_files["key"]),
    )
    with server.start(timeout_s=300):
        yield server


@pytest.fixture(scope="session")
def triton_url(triton_server) -> str:
    """gRPC address of the session's server, e.g. ``127.0.0.1:40123``."""
    return triton_server.grpc_url


@pytest.fixture
def grpc_client(triton_url):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(triton_url)
    try:
        yield client
    finally:
        client.close()
