"""The torch host (model_repository/torch_host/model.py) in-process, over a fake pb_utils.

Every component exported with ``--host torch`` answers batched requests with
the same tensors as the ONNX file of the same checkpoint (fp32 on the CPU),
in the config's dims and dtypes; bad requests fail alone. The real server
runs it in tests/test_versions_served.py.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import onnxruntime as ort
import pytest
import torch
from google.protobuf import json_format

from sd_pipeline import spec as S
from sd_triton.export import Contents, ExportOptions, Hosting, export_repository
from sd_triton.export import components as C
from sd_triton.export import triton_config as T
from sd_triton.export.checkpoint import inspect_checkpoint

TOL = 1e-4  # max abs error relative to the ONNX output's max abs value


class Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array

    def to_dlpack(self):
        return torch.utils.dlpack.to_dlpack(torch.from_numpy(np.ascontiguousarray(self._array)))

    @staticmethod
    def from_dlpack(name, capsule):
        return Tensor(name, torch.utils.dlpack.from_dlpack(capsule).numpy().copy())


class TritonError:
    INTERNAL, INVALID_ARG = "INTERNAL", "INVALID_ARG"

    def __init__(self, message, code=None):
        self._message, self.code = message, code

    def message(self):
        return self._message


class Response:
    def __init__(self, output_tensors=(), error=None):
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors}
        self.error = error


class Request:
    def __init__(self, **arrays):
        self.inputs = {k: Tensor(k, v) for k, v in arrays.items()}


@pytest.fixture(scope="module")
def torch_repository(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("torch-host") / "repo"
    options = ExportOptions(
        contents=Contents(stream_model=False), hosting=Hosting(host="torch", pipeline_instances=1)
    )
    export_repository(tiny_checkpoint, out, options)
    return out


@pytest.fixture(scope="module")
def host():
    """model.py imported as Triton's stub would: fake pb_utils, wrappers.py beside it."""
    from sd_triton.export import component_models as R
    from sd_triton.export import wrappers

    pb = types.ModuleType("triton_python_backend_utils")
    pb.Tensor, pb.TritonError, pb.InferenceResponse = Tensor, TritonError, Response
    pb.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    saved = {k: sys.modules.get(k) for k in ("triton_python_backend_utils", "wrappers")}
    sys.modules.update(triton_python_backend_utils=pb, wrappers=wrappers)
    try:
        spec = importlib.util.spec_from_file_location(
            "torch_host_under_test", R.TORCH_HOST_TEMPLATE
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("torch_host_under_test", None)
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def load(host, repository, name, **parameters):
    config = json_format.MessageToDict(
        T.read_config(repository / name), preserving_proto_field_name=True
    )
    for key, value in parameters.items():
        config["parameters"][key] = {"string_value": value}
    model = host.TritonPythonModel()
    model.initialize(
        {
            "model_config": json.dumps(config),
            "model_repository": str(repository / name),
            "model_version": "1",
            "model_instance_kind": "CPU",
            "model_instance_device_id": "0",
        }
    )
    return model


@pytest.fixture(scope="module")
def sizes(tiny_checkpoint):
    return C.fixed_sizes(inspect_checkpoint(tiny_checkpoint).configs)


def _inputs(name, sizes, batch, latent_hw, seed):
    lh, lw = latent_hw
    dynamic = {S.BATCH: batch, "latent_height": lh, "latent_width": lw}
    dynamic.update(height=2 * lh, width=2 * lw)  # the tiny VAE's scale factor is 2
    tensors = C.sample_inputs(C.COMPONENTS[name], {**sizes, **dynamic}, seed=seed)
    return {k: v.numpy() for k, v in tensors.items()}


def _triton_form(name, arrays):
    """As a client sends them: the UNet's per-sample timestep in its config dims [B, 1]."""
    if name == "unet":
        return {**arrays, "timestep": arrays["timestep"].reshape(-1, 1)}
    return arrays


@pytest.mark.parametrize("name", list(C.COMPONENTS))
def test_torch_host_matches_the_onnx_host(host, torch_repository, tiny_repository, sizes, name):
    model = load(host, torch_repository, name)
    assert model.device.type == "cpu" and model.dtype == torch.float32
    session = ort.InferenceSession(str(tiny_repository / name / "1" / "model.onnx"))
    # Two requests batched together (same shapes), one alone (other shapes).
    batches = [
        _inputs(name, sizes, 1, (4, 6), seed=1),
        _inputs(name, sizes, 2, (4, 6), seed=2),
        _inputs(name, sizes, 1, (8, 4), seed=3),
    ]
    responses = model.execute([Request(**_triton_form(name, b)) for b in batches])
    assert len(responses) == 3
    config = T.read_config(torch_repository / name)
    for batch, response in zip(batches, responses, strict=True):
        assert response.error is None, response.error.message()
        want = session.run(None, batch)
        for entry, expected in zip(config.output, want, strict=True):
            got = response.outputs[entry.name]
            assert got.shape[0] == len(expected) and len(got.shape) == len(entry.dims) + 1
            assert all(d in (-1, n) for d, n in zip(entry.dims, got.shape[1:], strict=True))
            expected = expected.reshape(got.shape)
            if got.dtype == np.bool_:
                np.testing.assert_array_equal(got, expected)
            else:
                assert got.dtype == np.float32
                err = np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-6)
                assert err < TOL, f"{name}.{entry.name}: relative error {err:.2e}"


def test_bad_requests_fail_alone(host, torch_repository, sizes):
    model = load(host, torch_repository, "unet")
    good = _triton_form("unet", _inputs("unet", sizes, 1, (4, 4), seed=0))
    wrong_dtype = {**good, "sample": good["sample"].astype(np.float64)}
    missing = {k: v for k, v in good.items() if k != "encoder_hidden_states"}
    wrong_shape = {**good, "encoder_hidden_states": good["encoder_hidden_states"][:, :5]}
    responses = model.execute(
        [Request(**good), Request(**wrong_dtype), Request(**missing), Request(**wrong_shape)]
    )
    assert responses[0].error is None
    messages = [r.error.message() for r in responses[1:]]
    assert all(r.error.code == TritonError.INVALID_ARG for r in responses[1:])
    assert "dtype" in messages[0] and "missing" in messages[1] and "shape" in messages[2]


def test_timestep_in_model_form_is_accepted(host, torch_repository, sizes):
    """Whether Triton applies the config's reshape ([B]) or not ([B, 1])."""
    model = load(host, torch_repository, "unet")
    arrays = _inputs("unet", sizes, 2, (4, 4), seed=5)
    flat, column = model.execute([Request(**arrays), Request(**_triton_form("unet", arrays))])
    np.testing.assert_array_equal(flat.outputs["out_sample"], column.outputs["out_sample"])


def test_dtype_and_component_parameters(host, torch_repository):
    model = load(host, torch_repository, "text_encoder", dtype="float16")
    assert model.dtype == torch.float16
    assert next(model.module.parameters()).dtype == torch.float16
    with pytest.raises(ValueError, match="component"):
        load(host, torch_repository, "unet", component="vae")
    with pytest.raises(ValueError, match="dtype"):
        load(host, torch_repository, "unet", dtype="bfloat8")


def test_torch_export_has_no_onnx(torch_repository):
    for name in C.COMPONENTS:
        version = torch_repository / name / "1"
        assert not list(version.glob("*.onnx"))
        assert (version / "model.py").is_file() and (version / "wrappers.py").is_file()
        assert T.read_config(torch_repository / name).backend == "python"
    constants = json.loads(
        (torch_repository / "stable_diffusion" / "1" / "assets" / "pipeline.json").read_text()
    )
    assert constants["host"] == "torch"
    assert not (torch_repository / "stable_diffusion_stream").exists()
