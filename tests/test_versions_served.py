"""Model versions, namespaces and the torch host in a real tritonserver (explicit model control).

One server, one repository holding two namespaces, run the way docs/gpu.md
tells an operator to:

- ``v_``: the tiny model (Python-backend ONNX host) at version 1; a second
  export with ``new_version`` adds version 2 (a UNet with other weights)
  while the server runs; the components are loaded again (both versions
  stay served), then the pipeline: it serves version 2 and says so in every
  response; a load with a config override (``version_policy specific``)
  rolls it back to version 1, which calls the version-1 components;
- ``torch_``: the torch host, exported beside it without ``--overwrite``;
  its UNet serves on the CPU and matches the ONNX host.

Expected images come from the in-process loop over the same ONNX files.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from sd_triton.client import Client
from sd_triton.export import (
    Contents,
    ExportError,
    ExportOptions,
    Hosting,
    Naming,
    export_repository,
)
from sd_triton.export import components as C
from sd_triton.export import triton_config as T

pytestmark = [pytest.mark.server, pytest.mark.slow]

PREFIX = "v_"
PIPELINE = f"{PREFIX}stable_diffusion"
# What txt2img needs; the VAE encoder is only called for img2img.
COMPONENTS = [f"{PREFIX}{n}" for n in ("text_encoder", "unet", "vae_decoder")]
SD_COMPONENTS = [*C.FAMILY_COMPONENTS["sd"], "safety_checker"]  # the tiny SD 1.x checkpoint's
EXPORTED = [n for n in SD_COMPONENTS if n != "safety_checker"]  # exported without it
REQUEST = dict(prompt="a red bicycle", num_inference_steps=2, height=32, width=24, seed=7)


@pytest.fixture(scope="module")
def export(tiny_checkpoint, copy_onnx_export):
    """Export the tiny checkpoint into ``out`` with ``onnx_source``'s ONNX files."""

    def run(out, onnx_source, *, new_version=False, precision="fp32"):
        options = ExportOptions(
            contents=Contents(precision=precision, safety_checker=False, stream_model=False),
            hosting=Hosting(host="python", pipeline_instances=1),
            naming=Naming(model_prefix=PREFIX, new_version=new_version),
        )
        with pytest.MonkeyPatch.context() as mp:
            copy_onnx_export(mp, onnx_source)
            export_repository(tiny_checkpoint, out, options)

    return run


@pytest.fixture(scope="module")
def other_weights(tiny_repository, tmp_path_factory):
    """The session repository's ONNX files with a different UNet (its output bias moved)."""
    out = tmp_path_factory.mktemp("other-weights")
    for name in SD_COMPONENTS:
        (out / name / "1").mkdir(parents=True)
        shutil.copyfile(
            tiny_repository / name / "1" / "model.onnx", out / name / "1" / "model.onnx"
        )
    model = onnx.load(str(out / "unet" / "1" / "model.onnx"))
    bias = next(t for t in model.graph.initializer if t.name == "unet.conv_out.bias")
    values = onnx.numpy_helper.to_array(bias) + 0.5
    bias.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), bias.name))
    onnx.save(model, str(out / "unet" / "1" / "model.onnx"))
    return out


@pytest.fixture(scope="module")
def repository(tiny_checkpoint, tiny_repository, tmp_path_factory, export):
    out = tmp_path_factory.mktemp("versions") / "repo"
    export(out, tiny_repository)
    # A second namespace beside the first: no --overwrite needed, nothing of v_ touched.
    options = ExportOptions(
        contents=Contents(safety_checker=False, stream_model=False),
        hosting=Hosting(host="torch", pipeline_instances=1),
        naming=Naming(model_prefix="torch_"),
    )
    export_repository(tiny_checkpoint, out, options)
    return out


@pytest.fixture(scope="module")
def server(repository):
    from sd_triton.server import TritonServer

    server = TritonServer(
        repository,
        model_control="explicit",
        load_models=[*COMPONENTS, "torch_unet"],
        admin_key="versions-test-admin-key",
    )
    with server.start(timeout_s=300):
        yield server


@pytest.fixture(scope="module")
def grpc(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


def expected_image(repository, version: int) -> np.ndarray:
    """The in-process loop over version ``version``'s ONNX files and assets."""
    from sd_pipeline import Assets, OnnxComponents, generate, make_request

    view = repository.parent / f"view-{version}"  # OnnxComponents reads <repo>/<name>/<v>/
    view.mkdir(exist_ok=True)
    for name in SD_COMPONENTS:
        if not (view / name).exists() and (repository / f"{PREFIX}{name}").exists():
            (view / name).symlink_to(repository / f"{PREFIX}{name}")
    assets = Assets.load(repository / PIPELINE / str(version) / "assets")
    options = {k: v for k, v in REQUEST.items() if k not in ("prompt", "height", "width", "seed")}
    request = make_request(
        assets.config,
        REQUEST["prompt"],
        height=REQUEST["height"],
        width=REQUEST["width"],
        seed=REQUEST["seed"],
        **options,
    )
    return generate(request, OnnxComponents(view, version=str(version)), assets).images[0]


def generate_served(server):
    with Client(server.grpc_url, model=PIPELINE, timeout_s=120) as client:
        result = client.generate(**REQUEST)
    return np.asarray(result.images[0]), result.model_version


def max_diff(a, b) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def test_namespaces_share_one_repository(repository):
    for name in EXPORTED:
        assert T.read_config(repository / f"v_{name}").name == f"v_{name}"
        assert T.read_config(repository / f"torch_{name}").backend == "python"
    constants = json.loads(
        (repository / "torch_stable_diffusion/1/assets/pipeline.json").read_text()
    )
    assert constants["component_models"]["unet"] == "torch_unet"
    assert not (repository / "unet").exists()


def test_torch_host_serves_like_the_onnx_host(grpc, tiny_repository):
    assert grpc.is_model_ready("torch_unet")
    rng = np.random.default_rng(0)
    arrays = {
        "sample": rng.standard_normal((2, 4, 8, 12), dtype=np.float32),
        "timestep": np.array([[10.0], [900.5]], np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32),
    }
    inputs = []
    for name, a in arrays.items():
        inputs.append(grpcclient.InferInput(name, list(a.shape), "FP32"))
        inputs[-1].set_data_from_numpy(a)
    got = grpc.infer("torch_unet", inputs).as_numpy("out_sample")
    session = ort.InferenceSession(str(tiny_repository / "unet" / "1" / "model.onnx"))
    want = session.run(None, {**arrays, "timestep": arrays["timestep"].reshape(-1)})[0]
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


@pytest.fixture(scope="module")
def version_2(repository, other_weights, server, grpc, export):
    """Export version 2 next to the running version 1, load it as docs/gpu.md says."""
    export(repository, other_weights, new_version=True)
    for model in COMPONENTS:
        # version_policy latest 2: versions 1 and 2 both served
        grpc.load_model(model, headers=server.grpc_admin_headers)
    # latest 1: version 2, which calls the version-2 components
    grpc.load_model(PIPELINE, headers=server.grpc_admin_headers)
    return repository


def test_new_version_sits_beside_the_old(version_2):
    for name in (*EXPORTED, "stable_diffusion"):
        assert sorted(p.name for p in (version_2 / f"{PREFIX}{name}").iterdir() if p.is_dir()) == [
            "1",
            "2",
        ]
    constants = json.loads((version_2 / PIPELINE / "2" / "assets" / "pipeline.json").read_text())
    assert constants["version"] == 2
    assert set(constants["component_versions"].values()) == {2}


def test_both_component_versions_are_served(version_2, server, grpc):
    index = {
        (m.name, m.version): m.state
        for m in grpc.get_model_repository_index(headers=server.grpc_admin_headers).models
    }
    for model in COMPONENTS:
        assert index[(model, "1")] == "READY" and index[(model, "2")] == "READY"
    assert index[(PIPELINE, "2")] == "READY"
    assert grpc.is_model_ready(PIPELINE, "2") and not grpc.is_model_ready(PIPELINE, "1")


def test_served_version_is_reported_and_rolled_back(version_2, server, grpc):
    image_2, served = generate_served(server)
    assert served == "2"
    assert max_diff(image_2, expected_image(version_2, 2)) <= 1
    image_1 = expected_image(version_2, 1)
    assert max_diff(image_1, image_2) > 2, "the two versions' weights give the same image"

    # Roll back: the same config, with version_policy pinned to version 1.
    config = grpc.get_model_config(PIPELINE, as_json=True)["config"]
    config["version_policy"] = {"specific": {"versions": [1]}}
    grpc.load_model(PIPELINE, config=json.dumps(config), headers=server.grpc_admin_headers)
    assert grpc.is_model_ready(PIPELINE, "1") and not grpc.is_model_ready(PIPELINE, "2")
    rolled_back, served = generate_served(server)
    assert served == "1"
    assert max_diff(rolled_back, image_1) <= 1  # version 1 called the version-1 components


def test_new_version_must_keep_the_contract(tiny_checkpoint, version_2, tiny_repository, export):
    before = sorted(p.name for p in (version_2 / f"{PREFIX}unet").iterdir())
    with pytest.raises(ExportError, match="would change its (input|output)"):
        export(version_2, tiny_repository, new_version=True, precision="fp16-vae-fp32")
    with pytest.raises(ExportError, match="choose one"):
        options = ExportOptions(naming=Naming(new_version=True))
        export_repository(tiny_checkpoint, version_2, options, overwrite=True)
    assert sorted(p.name for p in (version_2 / f"{PREFIX}unet").iterdir()) == before
    assert not [p for p in version_2.iterdir() if p.name.startswith(".")]  # no staging left
