"""The torch host (model_repository/torch_host/model.py) in-process, over tests/fake_pb_utils.py.

Every component exported with ``--host torch`` answers batched requests with
the same tensors as the ONNX file of the same checkpoint (fp32 on the CPU),
in the config's dims and dtypes; bad requests fail alone. The real server
runs it in tests/test_versions_served.py.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from fake_pb_utils import TritonError, import_model, initialize, install, outputs, request

from sd_pipeline import spec as S
from sd_triton.export import Contents, ExportOptions, Hosting, export_repository
from sd_triton.export import components as C
from sd_triton.export import triton_config as T
from sd_triton.export.checkpoint import inspect_checkpoint

TOL = 1e-4  # max abs error relative to the ONNX output's max abs value
# The tiny SD 1.x checkpoint's components.
SD_COMPONENTS = [*C.FAMILY_COMPONENTS["sd"], "safety_checker"]


@pytest.fixture(scope="module")
def torch_repository(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("torch-host") / "repo"
    options = ExportOptions(
        contents=Contents(stream_model=False), hosting=Hosting(host="torch", pipeline_instances=1)
    )
    export_repository(tiny_checkpoint, out, options)
    return out


@pytest.fixture(scope="module")
def pb(module_monkeypatch):
    return install(module_monkeypatch)


@pytest.fixture(scope="module")
def host(pb, module_monkeypatch, torch_repository):
    """The exported model.py, imported as Triton's stub would (component_host.py and
    wrappers.py beside it)."""
    model_py = torch_repository / "unet" / "1" / "model.py"
    return import_model(module_monkeypatch, model_py, name="torch_host_under_test")


def load(host, repository, name, kind="CPU", **parameters):
    return initialize(host, repository / name, kind=kind, parameters=parameters)


@pytest.fixture(scope="module")
def sizes(tiny_checkpoint):
    return C.fixed_sizes(inspect_checkpoint(tiny_checkpoint).configs)


def _inputs(name, sizes, batch, latent_hw, seed):
    lh, lw = latent_hw
    dynamic = {S.BATCH: batch, "latent_height": lh, "latent_width": lw, "text_sequence": 77}
    dynamic.update(height=2 * lh, width=2 * lw)  # the tiny VAE's scale factor is 2
    tensors = C.sample_inputs(C.COMPONENTS[name], {**sizes, **dynamic}, seed=seed)
    return {k: v.numpy() for k, v in tensors.items()}


def _triton_form(name, arrays):
    """As a client sends them: the UNet's per-sample timestep in its config dims [B, 1]."""
    if name == "unet":
        return {**arrays, "timestep": arrays["timestep"].reshape(-1, 1)}
    return arrays


@pytest.mark.parametrize("name", SD_COMPONENTS)
def test_torch_host_matches_the_onnx_host(pb, host, torch_repository, tiny_repository, sizes, name):
    model = load(host, torch_repository, name)
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    session = ort.InferenceSession(str(tiny_repository / name / "1" / "model.onnx"))
    # Two requests batched together (same shapes), one alone (other shapes).
    batches = [
        _inputs(name, sizes, 1, (4, 6), seed=1),
        _inputs(name, sizes, 2, (4, 6), seed=2),
        _inputs(name, sizes, 1, (8, 4), seed=3),
    ]
    responses = model.execute([request(pb, **_triton_form(name, b)) for b in batches])
    assert len(responses) == 3
    config = T.read_config(torch_repository / name)
    for batch, response in zip(batches, responses, strict=True):
        assert not response.has_error(), response.error().message()
        want = session.run(None, batch)
        for entry, expected in zip(config.output, want, strict=True):
            got = outputs(response)[entry.name]
            assert got.shape[0] == len(expected) and len(got.shape) == len(entry.dims) + 1
            assert all(d in (-1, n) for d, n in zip(entry.dims, got.shape[1:], strict=True))
            expected = expected.reshape(got.shape)
            if got.dtype == np.bool_:
                np.testing.assert_array_equal(got, expected)
            else:
                assert got.dtype == np.float32
                err = np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-6)
                assert err < TOL, f"{name}.{entry.name}: relative error {err:.2e}"


def test_bad_requests_fail_alone(pb, host, torch_repository, sizes):
    model = load(host, torch_repository, "unet")
    good = _triton_form("unet", _inputs("unet", sizes, 1, (4, 4), seed=0))
    wrong_dtype = {**good, "sample": good["sample"].astype(np.float64)}
    missing = {k: v for k, v in good.items() if k != "encoder_hidden_states"}
    # The text sequence is dynamic (long prompts); the width is the checkpoint's.
    wrong_shape = {**good, "encoder_hidden_states": good["encoder_hidden_states"][:, :, :5]}
    responses = model.execute([request(pb, **r) for r in (good, wrong_dtype, missing, wrong_shape)])
    assert not responses[0].has_error()
    messages = [r.error().message() for r in responses[1:]]
    assert all(r.error().code() == TritonError.INVALID_ARG for r in responses[1:])
    assert "dtype" in messages[0] and "missing" in messages[1] and "shape" in messages[2]


def test_timestep_in_model_form_is_accepted(pb, host, torch_repository, sizes):
    """Whether Triton applies the config's reshape ([B]) or not ([B, 1])."""
    model = load(host, torch_repository, "unet")
    arrays = _inputs("unet", sizes, 2, (4, 4), seed=5)
    flat, column = model.execute(
        [request(pb, **arrays), request(pb, **_triton_form("unet", arrays))]
    )
    np.testing.assert_array_equal(outputs(flat)["out_sample"], outputs(column)["out_sample"])


def test_dtype_and_component_parameters(host, torch_repository):
    model = load(host, torch_repository, "text_encoder", dtype="float16")
    assert model.dtype == torch.float16
    assert next(model.module.parameters()).dtype == torch.float16
    with pytest.raises(ValueError, match="component"):
        load(host, torch_repository, "unet", component="vae")
    with pytest.raises(ValueError, match="dtype"):
        load(host, torch_repository, "unet", dtype="bfloat8")


def test_torch_export_has_no_onnx(torch_repository):
    for name in SD_COMPONENTS:
        version = torch_repository / name / "1"
        assert not list(version.glob("*.onnx"))
        assert {"model.py", "component_host.py", "wrappers.py"} <= {
            p.name for p in version.iterdir()
        }
        assert T.read_config(torch_repository / name).backend == "python"
    constants = json.loads(
        (torch_repository / "stable_diffusion" / "1" / "assets" / "pipeline.json").read_text()
    )
    assert constants["host"] == "torch"
    assert not (torch_repository / "stable_diffusion_stream").exists()


# ----------------------------------------------------------- the device rule (component_host.py)


def test_device_rule(host):
    """One rule for every Python-backend model: the hosts and the pipeline."""
    from component_host import choose_device

    assert choose_device("GPU", 1, cuda=True) == 1
    assert choose_device("GPU", 1, "cpu", cuda=True) is None  # on purpose
    assert choose_device("CPU", 0, "cuda", cuda=True) == 0
    for kind in ("CPU", "MODEL", "", "KIND_GPU"):  # only GPU means GPU
        assert choose_device(kind, 0, cuda=True) is None
    with pytest.raises(RuntimeError, match="KIND_GPU instance, but this runtime sees no CUDA"):
        choose_device("GPU", 0, cuda=False)
    with pytest.raises(RuntimeError, match="device cuda asked for"):
        choose_device("CPU", 0, "cuda", cuda=False)
    with pytest.raises(ValueError, match="device must be one of"):
        choose_device("GPU", 0, "tpu", cuda=True)


def test_gpu_instance_without_cuda_fails_at_load(host, torch_repository, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="model 'vae_decoder': a KIND_GPU instance"):
        load(host, torch_repository, "vae_decoder", kind="GPU")
    model = load(host, torch_repository, "vae_decoder", kind="GPU", device="cpu")
    assert model.device == torch.device("cpu")
