"""The Triton glue (model.py + TritonComponents) in-process, over tests/fake_pb_utils.py.

The fake answers BLS calls by running the exported ONNX files, so these
tests cover what the real server tests cover (parsing, error codes,
responses, the streaming protocol, DLPack conversions, the timestep's
config reshape) in a few seconds; tests/test_served_pipeline.py runs the
same model.py in a real tritonserver.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
from fake_pb_utils import InferenceResponse, Tensor, TritonError, install, outputs, request
from google.protobuf import json_format

from sd_pipeline import OnnxComponents
from sd_pipeline import spec as S


class ComponentServer:
    """Answers BLS calls with onnxruntime, as the component models would (config reshape applied)."""

    def __init__(self, repository):
        self.onnx = OnnxComponents(repository)
        self.calls: list[tuple[str, dict[str, tuple]]] = []

    def infer(self, model_name, inputs, requested_output_names):
        spec = S.COMPONENTS[model_name]
        arrays = {t.name(): t.as_numpy() for t in inputs}
        self.calls.append((model_name, {k: (a.shape, a.dtype) for k, a in arrays.items()}))
        for t in spec.inputs:
            declared = (len(arrays[t.name]),) + t.triton_dims
            shape = arrays[t.name].shape
            if len(shape) != len(declared) or any(
                d not in (-1, n) for d, n in zip(declared, shape, strict=False)
            ):
                err = f"unexpected shape for input '{t.name}': {arrays[t.name].shape}, expected {declared}"
                return InferenceResponse(error=TritonError(err))
            if t.reshape is not None:
                arrays[t.name] = arrays[t.name].reshape(len(arrays[t.name]), *t.reshape)
        session = self.onnx._session(spec)
        outs = session.run(requested_output_names, {k: a for k, a in arrays.items()})
        return InferenceResponse(
            [Tensor(n, o) for n, o in zip(requested_output_names, outs, strict=True)]
        )


# ---------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def server(tiny_repository):
    return ComponentServer(tiny_repository)


@pytest.fixture(scope="module")
def pb(server, module_monkeypatch):
    """tests/fake_pb_utils.py; BLS calls answered by ``server`` (component models on a GPU)."""

    def answer(r):
        return server.infer(r.model_name, r.inputs(), r.requested_output_names())

    return install(module_monkeypatch, answer, callee_kind="GPU")


@pytest.fixture(scope="module")
def model_module(pb, tiny_repository):
    """The exported repository's model.py, imported as Triton would (its folder on sys.path)."""
    version_dir = tiny_repository / "stable_diffusion" / "1"
    sys.path.insert(0, str(version_dir))
    try:
        spec = importlib.util.spec_from_file_location(
            "sd_model_under_test", version_dir / "model.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(version_dir))


def model_config(tiny_repository, *, decoupled: bool) -> dict:
    """The exported config.pbtxt as Triton hands it to initialize() (JSON)."""
    from sd_triton.export import triton_config as T

    config = T.read_config(tiny_repository / "stable_diffusion")
    if decoupled:
        stream = T.pipeline_config(S.STABLE_DIFFUSION_STREAM)
        del config.input[:]
        del config.output[:]
        config.input.extend(stream.input)
        config.output.extend(stream.output)
        config.name = S.STABLE_DIFFUSION_STREAM.name
        config.model_transaction_policy.decoupled = True
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


def load(model_module, tiny_repository, *, decoupled=False, parameters=None):
    config = model_config(tiny_repository, decoupled=decoupled)
    for key, value in (parameters or {}).items():
        config.setdefault("parameters", {})[key] = {"string_value": str(value)}
    model = model_module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config)})
    return model


GOOD = {
    "prompt": "a red bicycle",
    "height": np.array([32], np.int32),
    "width": np.array([24], np.int32),
    "num_inference_steps": np.array([2], np.int32),
    "seed": np.array([42], np.int64),
    "num_images_per_prompt": np.array([2], np.int32),
}


# ---------------------------------------------------------------------------
# Tests


def test_one_response_per_request_with_errors_kept_apart(pb, model_module, tiny_repository, server):
    model = load(model_module, tiny_repository)
    bad = request(pb, **{**GOOD, "num_inference_steps": np.array([0], np.int32)})
    responses = model.execute([request(pb, **GOOD), bad, request(pb, **{**GOOD, "prompt": ""})])
    assert len(responses) == 3
    ok, steps, empty = responses
    assert not ok.has_error(), ok.error().message()
    assert outputs(ok)["images"].shape == (2, 32, 24, 3) and outputs(ok)["images"].dtype == np.uint8
    assert outputs(ok)["nsfw_content_detected"].dtype == np.bool_
    np.testing.assert_array_equal(outputs(ok)["seeds"], [42, 42])
    assert steps.error().code() == TritonError.INVALID_ARG
    assert "num_inference_steps must be at least 1" in steps.error().message()
    assert (
        empty.error().code() == TritonError.INVALID_ARG
        and "prompt is empty" in empty.error().message()
    )


def test_bls_calls_follow_the_component_configs(pb, model_module, tiny_repository, server):
    model = load(model_module, tiny_repository)
    server.calls.clear()
    (response,) = model.execute([request(pb, **GOOD)])
    assert not response.has_error()
    names = [name for name, _ in server.calls]
    assert names == [
        "text_encoder",
        "unet",
        "unet",
        "unet",
        "vae_decoder",
        "safety_checker",
    ]  # PNDM: 2 steps -> 3 UNet calls
    unet = dict(server.calls[1][1])
    assert unet["timestep"] == ((4, 1), np.float32)  # per sample, declared dims [1]
    assert unet["sample"][0] == (4, 4, 16, 12)
    assert dict(server.calls[0][1])["input_ids"][1] == np.int32


def assert_images_are_in_process_euler_a(response, tiny_repository, assets) -> None:
    """The response's images are the in-process loop's for GOOD with the euler_a scheduler."""
    from sd_pipeline import generate, make_request

    req = make_request(
        assets.config,
        "a red bicycle",
        height=32,
        width=24,
        num_inference_steps=2,
        seed=42,
        num_images_per_prompt=2,
        scheduler="euler_a",
    )
    expected = generate(req, OnnxComponents(tiny_repository), assets)
    np.testing.assert_array_equal(outputs(response)["images"], expected.images)


def test_result_matches_the_in_process_loop(pb, model_module, tiny_repository, assets):
    model = load(model_module, tiny_repository)
    (response,) = model.execute([request(pb, **GOOD, scheduler="euler_a")])
    assert_images_are_in_process_euler_a(response, tiny_repository, assets)


def test_component_error_is_internal_and_names_the_component(
    pb, model_module, tiny_repository, server
):
    model = load(model_module, tiny_repository)
    original = server.infer

    def failing(model_name, *args):
        if model_name == "unet":
            return InferenceResponse(error=TritonError("out of memory"))
        return original(model_name, *args)

    server.infer = failing
    try:
        (response,) = model.execute([request(pb, **GOOD)])
    finally:
        server.infer = original
    assert response.error().code() == TritonError.INTERNAL
    assert "unet: out of memory" in response.error().message()


def test_cancelled_request_gets_cancelled(pb, model_module, tiny_repository):
    model = load(model_module, tiny_repository)
    r = request(pb, **GOOD)
    r.cancelled = True
    (response,) = model.execute([r])
    assert response.error().code() == TritonError.CANCELLED


def test_limits_come_from_config_parameters(pb, model_module, tiny_repository):
    model = load(model_module, tiny_repository, parameters={"max_steps": 3, "max_images": 2})
    too_many = request(pb, **{**GOOD, "num_inference_steps": np.array([4], np.int32)})
    (response,) = model.execute([too_many])
    assert "over this model's limit of 3" in response.error().message()


def test_default_scheduler_parameter(pb, model_module, tiny_repository, assets):
    model = load(model_module, tiny_repository, parameters={"default_scheduler": "euler_a"})
    (response,) = model.execute([request(pb, **GOOD)])
    assert_images_are_in_process_euler_a(response, tiny_repository, assets)
    with pytest.raises(ValueError, match="unknown scheduler 'nope'"):
        load(model_module, tiny_repository, parameters={"default_scheduler": "nope"})


def test_config_that_does_not_match_the_contract_fails_at_load(model_module, tiny_repository):
    config = model_config(tiny_repository, decoupled=False)
    config["input"] = [t for t in config["input"] if t["name"] != "seed"]
    model = model_module.TritonPythonModel()
    with pytest.raises(ValueError, match="input seed is missing"):
        model.initialize({"model_config": json.dumps(config)})


def test_stream_sends_progress_then_images_with_the_final_flag(pb, model_module, tiny_repository):
    model = load(model_module, tiny_repository, decoupled=True)
    good = request(pb, **GOOD, preview=np.array([True]))
    bad = request(pb, **{**GOOD, "scheduler": "nope"})
    assert model.execute([good, bad]) is None
    assert good.sender.done.wait(60) and bad.sender.done.wait(5)
    model.finalize()

    ((error, flags),) = bad.sender.sent
    assert flags == 1 and error.error().code() == TritonError.INVALID_ARG
    assert "unknown scheduler 'nope'" in error.error().message()

    *progress, (final, flags) = good.sender.sent
    assert flags == 1 and not final.has_error()
    assert [int(outputs(p)["step"][0]) for p, _ in progress] == [1, 2, 3]
    assert {int(outputs(p)["total_steps"][0]) for p, _ in progress} == {3}
    assert all(f == 0 for _, f in progress)
    assert outputs(progress[0][0])["preview_images"].shape == (2, 16, 12, 3)
    assert outputs(final)["images"].shape == (2, 32, 24, 3)
    assert outputs(final)["elapsed_s"][0] >= outputs(progress[-1][0])["elapsed_s"][0] > 0


def test_stream_cancellation_ends_with_a_cancelled_final_response(
    pb, model_module, tiny_repository
):
    model = load(model_module, tiny_repository, decoupled=True)
    r = request(pb, **{**GOOD, "num_inference_steps": np.array([20], np.int32)})
    r.sender.cancelled = True
    model.execute([r])
    assert r.sender.done.wait(60)
    model.finalize()
    response, flags = r.sender.sent[-1]
    assert flags == 1 and response.error().code() == TritonError.CANCELLED


# ---------------------------------------------------------------------------
# Which sd_pipeline the served model imports

SHOW_IMPORTED = """
import importlib.util, json, sys, types
installed = importlib.util.find_spec("sd_pipeline").origin  # before model.py runs
sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
spec = importlib.util.spec_from_file_location("model", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
imported = {n: m.__file__ for n, m in sys.modules.items() if n.split(".")[0] == "sd_pipeline"}
shipped = getattr(sys.modules["sd_pipeline"], "SHIPPED_COPY", None)
print(json.dumps({"installed": installed, "imported": imported, "shipped": shipped}))
"""


def test_model_imports_the_sd_pipeline_shipped_beside_it(tiny_repository, tmp_path):
    """A version folder's own sd_pipeline wins over the installed one (a rollback runs old code).

    A fresh interpreter in which ``sd_pipeline`` is installed imports the
    exported ``model.py`` (pb_utils faked: only its import matters) from a
    copy of the version folder whose ``sd_pipeline`` carries a sentinel.
    """
    import shutil
    import subprocess

    version = tmp_path / "1"
    exported = tiny_repository / "stable_diffusion" / "1"
    shutil.copytree(exported, version, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    with open(version / "sd_pipeline" / "__init__.py", "a") as f:
        f.write("\nSHIPPED_COPY = 'the copy beside model.py'\n")
    out = subprocess.run(
        [sys.executable, "-c", SHOW_IMPORTED, str(version / "model.py")],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert not seen["installed"].startswith(str(version)), (
        "no installed copy: the test proves nothing"
    )
    assert seen["shipped"] == "the copy beside model.py"
    assert len(seen["imported"]) > 5  # the package and the modules model.py imports
    for name, path in seen["imported"].items():
        assert path.startswith(str(version / "sd_pipeline")), f"{name} came from {path}"
