"""The Python-backend ONNX host (model_repository/onnx_host/model.py), with a fake pb_utils.

Unit tests of the glue: batching of a request list, per-request errors,
reshape handling and config validation. The real server runs it in the
end-to-end tests.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format

from sd_triton.export import triton_config as T

HOST = Path(__file__).resolve().parents[1] / "model_repository" / "onnx_host" / "model.py"


# ----------------------------------------------------------- fake pb_utils


class FakeTensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class FakeRequest:
    def __init__(self, **arrays):
        self.inputs = {k: FakeTensor(k, v) for k, v in arrays.items()}


class FakeError:
    INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

    def __init__(self, message, code=None):
        self._message, self.code = message, code

    def message(self):
        return self._message


class FakeResponse:
    def __init__(self, output_tensors=(), error=None):
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors}
        self.error = error


def _fake_pb_utils():
    m = types.ModuleType("triton_python_backend_utils")
    m.Tensor = FakeTensor
    m.TritonError = FakeError
    m.InferenceResponse = FakeResponse
    m.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    return m


@pytest.fixture(scope="module")
def host(monkeypatch_module):
    monkeypatch_module.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    spec = importlib.util.spec_from_file_location("onnx_host_model", HOST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _args(folder: Path, config=None) -> dict:
    config = config or _config(folder)
    return {
        "model_config": json.dumps(config),
        "model_repository": str(folder),
        "model_version": "1",
        "model_instance_kind": "CPU",
        "model_instance_device_id": "0",
    }


@pytest.fixture(scope="module")
def unet(host, tiny_repository):
    model = host.TritonPythonModel()
    model.initialize(_args(tiny_repository / "unet"))
    return model


def _unet_inputs(rng, b, h=8, w=12, t_shape=None):
    return {
        "sample": rng.standard_normal((b, 4, h, w), dtype=np.float32),
        "timestep": (rng.random(b, dtype=np.float32) * 999).reshape(t_shape or (b, 1)),
        "encoder_hidden_states": rng.standard_normal((b, 77, 32), dtype=np.float32),
    }


def _direct(unet, inputs):
    feeds = dict(inputs, timestep=inputs["timestep"].reshape(-1))
    return unet.session.run(None, feeds)[0]


# ----------------------------------------------------------- pure batching


def test_run_batched_concatenates_matching_shapes(host):
    calls = []

    def run(inputs):
        calls.append({k: v.shape for k, v in inputs.items()})
        return {"y": inputs["x"] * 2, "n": inputs["x"].sum(axis=tuple(range(1, inputs["x"].ndim)))}

    arrays = [
        {"x": np.ones((1, 3))},
        {"x": np.full((2, 3), 2.0)},
        {"x": np.ones((1, 5))},
        ValueError("bad request"),
        {"x": np.full((3, 3), 3.0)},
    ]
    results = host.run_batched(run, arrays)
    assert sorted(c["x"] for c in calls) == [(1, 5), (6, 3)]
    assert isinstance(results[3], ValueError)
    for arr, res in zip(arrays, results, strict=True):
        if isinstance(arr, dict):
            np.testing.assert_array_equal(res["y"], arr["x"] * 2)
            assert res["n"].shape == (len(arr["x"]),)


def test_failed_group_falls_back_to_one_by_one(host):
    def run(inputs):
        if np.isnan(inputs["x"]).any():
            raise RuntimeError("nan")
        return {"y": inputs["x"] + 1}

    arrays = [{"x": np.zeros((1, 2))}, {"x": np.full((1, 2), np.nan)}, {"x": np.ones((2, 2))}]
    results = host.run_batched(run, arrays)
    assert isinstance(results[1], RuntimeError)
    np.testing.assert_array_equal(results[0]["y"], np.ones((1, 2)))
    np.testing.assert_array_equal(results[2]["y"], np.full((2, 2), 2.0))


# ----------------------------------------------------------- the model


def test_execute_batches_requests_and_matches_single_runs(unet):
    rng = np.random.default_rng(0)
    inputs = [
        _unet_inputs(rng, 1),
        _unet_inputs(rng, 2),
        _unet_inputs(rng, 1, h=16, w=8),  # another shape: its own run
        _unet_inputs(rng, 1, t_shape=(1,)),  # timestep already reshaped by Triton
    ]
    runs = []
    real_run = unet._run
    unet._run = lambda feeds: runs.append(len(feeds["sample"])) or real_run(feeds)
    try:
        responses = unet.execute([FakeRequest(**i) for i in inputs])
    finally:
        unet._run = real_run
    assert sorted(runs) == [1, 4]
    assert len(responses) == len(inputs)
    for inp, resp in zip(inputs, responses, strict=True):
        assert resp.error is None
        np.testing.assert_allclose(resp.outputs["out_sample"], _direct(unet, inp), atol=1e-5)


def test_bad_request_fails_alone(unet):
    rng = np.random.default_rng(1)
    good = _unet_inputs(rng, 2)
    wrong_dtype = dict(_unet_inputs(rng, 1), sample=np.zeros((1, 4, 8, 12), np.float64))
    missing = _unet_inputs(rng, 1)
    del missing["encoder_hidden_states"]
    wrong_shape = dict(_unet_inputs(rng, 1), encoder_hidden_states=np.zeros((1, 7, 32), np.float32))
    responses = unet.execute([FakeRequest(**r) for r in (good, wrong_dtype, missing, wrong_shape)])
    assert responses[0].error is None
    np.testing.assert_allclose(responses[0].outputs["out_sample"], _direct(unet, good), atol=1e-5)
    messages = [r.error.message() for r in responses[1:]]
    assert "dtype" in messages[0]
    assert "encoder_hidden_states" in messages[1] and "missing" in messages[1]
    assert "shape" in messages[2]
    assert all(r.error.code == FakeError.INVALID_ARG for r in responses[1:])


def test_runtime_failure_is_internal_and_isolated(unet):
    rng = np.random.default_rng(2)
    good = _unet_inputs(rng, 1)
    odd = _unet_inputs(rng, 1, h=9)  # not a multiple of the UNet's downsampling
    odd2 = _unet_inputs(rng, 1, h=9)
    responses = unet.execute([FakeRequest(**r) for r in (good, odd, odd2)])
    assert responses[0].error is None
    assert responses[1].error is not None and responses[1].error.code == FakeError.INTERNAL
    assert responses[2].error is not None


def test_output_reshape_to_config_dims(host, tiny_repository):
    model = host.TritonPythonModel()
    model.initialize(_args(tiny_repository / "safety_checker"))
    rng = np.random.default_rng(3)
    request = FakeRequest(
        clip_input=rng.standard_normal((2, 3, 224, 224), dtype=np.float32),
        images=rng.random((2, 8, 8, 3), dtype=np.float32),
    )
    (response,) = model.execute([request])
    assert response.error is None
    assert response.outputs["has_nsfw_concepts"].shape == (2, 1)  # config dims [1]
    assert response.outputs["out_images"].shape == (2, 8, 8, 3)


def _config(folder: Path) -> dict:
    """The config as Triton hands it to the model: JSON with proto field names."""
    message = T.read_config(folder)
    return json.loads(json_format.MessageToJson(message, preserving_proto_field_name=True))


def test_initialize_rejects_config_that_disagrees_with_onnx(host, tiny_repository):
    config = _config(tiny_repository / "unet")
    config["input"][0]["name"] = "latents"
    with pytest.raises(ValueError, match="differ"):
        host.TritonPythonModel().initialize(_args(tiny_repository / "unet", config))
    config = _config(tiny_repository / "unet")
    config["output"][0]["data_type"] = "TYPE_FP16"
    with pytest.raises(ValueError, match="out_sample"):
        host.TritonPythonModel().initialize(_args(tiny_repository / "unet", config))


def test_initialize_rejects_bad_parameters(host, tiny_repository):
    config = _config(tiny_repository / "unet")
    config["parameters"]["intra_op_num_threads"] = {"string_value": "many"}
    with pytest.raises(ValueError, match="intra_op_num_threads"):
        host.TritonPythonModel().initialize(_args(tiny_repository / "unet", config))


def test_initialize_needs_the_onnx_file(host, tiny_repository, tmp_path):
    shutil.copy(tiny_repository / "unet" / "config.pbtxt", tmp_path)
    with pytest.raises(FileNotFoundError):
        host.TritonPythonModel().initialize(_args(tmp_path, _config(tiny_repository / "unet")))


def test_threads_parameter_is_used(host, tiny_repository):
    config = _config(tiny_repository / "vae_decoder")
    config["parameters"]["intra_op_num_threads"] = {"string_value": "1"}
    model = host.TritonPythonModel()
    model.initialize(_args(tiny_repository / "vae_decoder", config))
    assert model.session.get_session_options().intra_op_num_threads == 1
    assert model.session.get_providers() == ["CPUExecutionProvider"]
