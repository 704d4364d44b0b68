"""The Python-backend ONNX host (model_repository/onnx_host/model.py), over tests/fake_pb_utils.py.

Unit tests of the glue (component_host.py and the host): batching of a
request list, per-request errors, reshape handling, config validation and
the device rule (no silent CPU fallback). The model.py and component_host.py
under test are the ones the exporter copied into the tiny repository. The
real server runs them in the end-to-end tests.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fake_pb_utils import (
    TritonError,
    import_model,
    initialize,
    install,
    model_config,
    outputs,
    request,
)


@pytest.fixture(scope="module")
def pb(module_monkeypatch):
    return install(module_monkeypatch)


@pytest.fixture(scope="module")
def host(pb, module_monkeypatch, tiny_repository):
    model_py = tiny_repository / "unet" / "1" / "model.py"
    return import_model(module_monkeypatch, model_py, name="onnx_host_model")


@pytest.fixture(scope="module")
def shared(host):
    """component_host.py, as the host imported it."""
    import component_host

    return component_host


@pytest.fixture(scope="module")
def unet(host, tiny_repository):
    return initialize(host, tiny_repository / "unet")


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


def test_run_batched_concatenates_matching_shapes(shared):
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
    results = shared.run_batched(run, arrays, np.concatenate)
    assert sorted(c["x"] for c in calls) == [(1, 5), (6, 3)]
    assert isinstance(results[3], ValueError)
    for arr, res in zip(arrays, results, strict=True):
        if isinstance(arr, dict):
            np.testing.assert_array_equal(res["y"], arr["x"] * 2)
            assert res["n"].shape == (len(arr["x"]),)


def test_failed_group_falls_back_to_one_by_one(shared):
    def run(inputs):
        if np.isnan(inputs["x"]).any():
            raise RuntimeError("nan")
        return {"y": inputs["x"] + 1}

    arrays = [{"x": np.zeros((1, 2))}, {"x": np.full((1, 2), np.nan)}, {"x": np.ones((2, 2))}]
    results = shared.run_batched(run, arrays, np.concatenate)
    assert isinstance(results[1], RuntimeError)
    np.testing.assert_array_equal(results[0]["y"], np.ones((1, 2)))
    np.testing.assert_array_equal(results[2]["y"], np.full((2, 2), 2.0))


# ----------------------------------------------------------- the model


def test_execute_batches_requests_and_matches_single_runs(pb, unet):
    rng = np.random.default_rng(0)
    inputs = [
        _unet_inputs(rng, 1),
        _unet_inputs(rng, 2),
        _unet_inputs(rng, 1, h=16, w=8),  # another shape: its own run
        _unet_inputs(rng, 1, t_shape=(1,)),  # timestep already reshaped by Triton
    ]
    runs = []
    real_run = unet.run
    unet.run = lambda feeds: runs.append(len(feeds["sample"])) or real_run(feeds)
    try:
        responses = unet.execute([request(pb, **i) for i in inputs])
    finally:
        del unet.run
    assert sorted(runs) == [1, 4]
    assert len(responses) == len(inputs)
    for inp, resp in zip(inputs, responses, strict=True):
        assert not resp.has_error()
        np.testing.assert_allclose(outputs(resp)["out_sample"], _direct(unet, inp), atol=1e-5)


def test_bad_request_fails_alone(pb, unet):
    rng = np.random.default_rng(1)
    good = _unet_inputs(rng, 2)
    wrong_dtype = dict(_unet_inputs(rng, 1), sample=np.zeros((1, 4, 8, 12), np.float64))
    missing = _unet_inputs(rng, 1)
    del missing["encoder_hidden_states"]
    # The text sequence is dynamic (long prompts); the text width is fixed.
    wrong_shape = dict(_unet_inputs(rng, 1), encoder_hidden_states=np.zeros((1, 77, 7), np.float32))
    responses = unet.execute([request(pb, **r) for r in (good, wrong_dtype, missing, wrong_shape)])
    assert not responses[0].has_error()
    np.testing.assert_allclose(outputs(responses[0])["out_sample"], _direct(unet, good), atol=1e-5)
    messages = [r.error().message() for r in responses[1:]]
    assert "has dtype float64, expected float32" in messages[0]
    assert "encoder_hidden_states" in messages[1] and "missing" in messages[1]
    assert "shape" in messages[2]
    assert all(r.error().code() == TritonError.INVALID_ARG for r in responses[1:])


def test_runtime_failure_is_internal_and_isolated(pb, unet):
    rng = np.random.default_rng(2)
    good = _unet_inputs(rng, 1)
    odd = _unet_inputs(rng, 1, h=9)  # not a multiple of the UNet's downsampling
    odd2 = _unet_inputs(rng, 1, h=9)
    responses = unet.execute([request(pb, **r) for r in (good, odd, odd2)])
    assert not responses[0].has_error()
    assert responses[1].error().code() == TritonError.INTERNAL
    assert responses[2].has_error()


def test_output_reshape_to_config_dims(pb, host, tiny_repository):
    model = initialize(host, tiny_repository / "safety_checker")
    rng = np.random.default_rng(3)
    checker_request = request(
        pb,
        clip_input=rng.standard_normal((2, 3, 224, 224), dtype=np.float32),
        images=rng.random((2, 8, 8, 3), dtype=np.float32),
    )
    (response,) = model.execute([checker_request])
    assert not response.has_error()
    assert outputs(response)["has_nsfw_concepts"].shape == (2, 1)  # config dims [1]
    assert outputs(response)["out_images"].shape == (2, 8, 8, 3)


def test_initialize_rejects_config_that_disagrees_with_onnx(host, tiny_repository):
    config = model_config(tiny_repository / "unet")
    config["input"][0]["name"] = "latents"
    with pytest.raises(ValueError, match="differ"):
        initialize(host, tiny_repository / "unet", config=config)
    config = model_config(tiny_repository / "unet")
    config["output"][0]["data_type"] = "TYPE_FP16"
    with pytest.raises(ValueError, match="out_sample"):
        initialize(host, tiny_repository / "unet", config=config)


def test_initialize_rejects_bad_parameters(host, tiny_repository):
    with pytest.raises(ValueError, match="intra_op_num_threads"):
        initialize(host, tiny_repository / "unet", parameters={"intra_op_num_threads": "many"})
    with pytest.raises(ValueError, match="allow_spinning must be 0 or 1"):
        initialize(host, tiny_repository / "unet", parameters={"allow_spinning": "yes"})


def test_initialize_needs_the_onnx_file(host, tiny_repository, tmp_path):
    shutil.copy(tiny_repository / "unet" / "config.pbtxt", tmp_path)
    with pytest.raises(FileNotFoundError):
        initialize(host, tmp_path, config=model_config(tiny_repository / "unet"))


def test_threads_parameter_is_used(host, tiny_repository):
    parameters = {"intra_op_num_threads": "1"}
    model = initialize(host, tiny_repository / "vae_decoder", parameters=parameters)
    assert model.session.get_session_options().intra_op_num_threads == 1
    assert model.session.get_providers() == ["CPUExecutionProvider"]


@pytest.mark.parametrize(("given", "expected"), [(None, "0"), ("1", "1"), ("0", "0")])
def test_spinning_is_off_unless_asked_for(host, tiny_repository, given, expected):
    """onnxruntime spins its idle threads by default; beside the other models' processes on
    the same cores that costs every step (benchmarks/results/cpu-overhead.md)."""
    folder = tiny_repository / "vae_decoder"
    config = model_config(folder)
    del config["parameters"]["allow_spinning"]  # None: the host's own default
    parameters = {} if given is None else {"allow_spinning": given}
    model = initialize(host, folder, config=config, parameters=parameters)
    options = model.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == expected


def test_the_export_writes_spinning_off(tiny_repository):
    for name in ("text_encoder", "unet", "vae_decoder", "safety_checker"):
        assert model_config(tiny_repository / name)["parameters"]["allow_spinning"] == {
            "string_value": "0"
        }


# ----------------------------------------------------------- device: no silent CPU fallback


@pytest.fixture
def sessions(monkeypatch):
    """onnxruntime as onnxruntime-gpu without its CUDA libraries: it lists the CUDA
    provider, and a session asked for it quietly runs on the CPU. Records the
    providers each session was asked for."""
    asked = []
    real = ort.InferenceSession

    def session(path, options=None, providers=None, **kwargs):
        asked.append([p[0] if isinstance(p, tuple) else p for p in providers or []])
        return real(path, options, providers=["CPUExecutionProvider"], **kwargs)

    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(ort, "InferenceSession", session)
    return asked


def _load(host, folder: Path, kind: str | None, device: str | None = None):
    return initialize(host, folder, kind=kind, parameters={"device": device} if device else None)


def test_gpu_instance_without_cuda_session_fails_at_load(host, tiny_repository, sessions):
    with pytest.raises(RuntimeError, match="CUDA asked for, but the onnxruntime session runs on"):
        _load(host, tiny_repository / "vae_decoder", "GPU")
    assert sessions == [["CUDAExecutionProvider", "CPUExecutionProvider"]]


def test_gpu_instance_without_cuda_provider_fails_at_load(host, tiny_repository, monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match="KIND_GPU instance, but this runtime sees no CUDA"):
        _load(host, tiny_repository / "vae_decoder", "GPU")
    with pytest.raises(RuntimeError, match="device cuda asked for"):
        _load(host, tiny_repository / "vae_decoder", "CPU", device="cuda")


@pytest.mark.parametrize("kind", [None, "CPU", "MODEL", "KIND_GPU"])
def test_other_instance_kinds_never_default_to_cuda(host, tiny_repository, sessions, kind):
    model = _load(host, tiny_repository / "vae_decoder", kind)
    assert model.cuda_device is None
    assert sessions == [["CPUExecutionProvider"]]


def test_device_cpu_runs_a_gpu_instance_on_the_cpu_on_purpose(host, tiny_repository, sessions):
    model = _load(host, tiny_repository / "vae_decoder", "GPU", device="cpu")
    assert model.cuda_device is None and sessions == [["CPUExecutionProvider"]]
    with pytest.raises(ValueError, match="device must be one of auto, cuda, cpu"):
        _load(host, tiny_repository / "vae_decoder", "GPU", device="tpu")
