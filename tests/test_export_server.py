"""The exported component models in a real tritonserver (Python-backend ONNX host).

Uses the session's server (conftest). Checks what only a real server shows:
the configs load, Triton's reshape of the per-sample timestep, and dynamic
batching of concurrent UNet requests with results equal to single runs.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import onnxruntime as ort
import pytest

from sd_triton.export import components as C
from sd_triton.export import triton_config as T

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def unet_inputs(tiny_repository):
    """``make(rng, b, h, w)``: random UNet inputs whose fixed dims (latent channels, the
    text width) are read from the written config, and one prompt chunk of the tokenizer's
    model_max_length tokens (the text sequence is dynamic)."""
    dims = {i.name: list(i.dims) for i in T.read_config(tiny_repository / "unet").input}
    channels = dims["sample"][0]
    dynamic, width = dims["encoder_hidden_states"]
    assert dynamic == -1
    assets = tiny_repository / "stable_diffusion" / "1" / "assets" / "pipeline.json"
    sequence = json.loads(assets.read_text())["tokenizer_max_length"]

    def make(rng, b, h=8, w=12):
        return {
            "sample": rng.standard_normal((b, channels, h, w), dtype=np.float32),
            "timestep": (rng.random((b, 1), dtype=np.float32) * 999),
            "encoder_hidden_states": rng.standard_normal((b, sequence, width), dtype=np.float32),
        }

    return make


def _infer_inputs(arrays):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, a in arrays.items():
        x = grpcclient.InferInput(name, list(a.shape), np_to_triton_dtype(a.dtype))
        x.set_data_from_numpy(a)
        inputs.append(x)
    return inputs


@pytest.fixture(scope="module")
def unet_session(tiny_repository):
    return ort.InferenceSession(str(tiny_repository / "unet" / "1" / "model.onnx"))


def _direct(session, arrays):
    return session.run(None, dict(arrays, timestep=arrays["timestep"].reshape(-1)))[0]


@pytest.mark.parametrize("name", [*C.FAMILY_COMPONENTS["sd"], "safety_checker"])
def test_component_loaded_with_its_config(grpc_client, tiny_repository, name):
    assert grpc_client.is_model_ready(name)
    served = grpc_client.get_model_config(name).config
    written = T.read_config(tiny_repository / name)
    assert [i.name for i in served.input] == [i.name for i in written.input]
    assert served.max_batch_size == written.max_batch_size
    # The CPU export's kind is the server's: a CPU instance (not one Triton chose).
    assert [g.kind for g in served.instance_group] == [T.pb.ModelInstanceGroup.KIND_CPU]


def test_concurrent_unet_requests_batch_and_match(
    grpc_client, unet_session, unet_inputs, triton_url
):
    import tritonclient.grpc as grpcclient

    rng = np.random.default_rng(0)
    requests = [unet_inputs(rng, b, h) for b, h in [(1, 8), (2, 8), (1, 16), (1, 8)] * 3]
    before = grpc_client.get_inference_statistics("unet").model_stats[0]

    results: dict[int, object] = {}
    done = threading.Event()
    lock = threading.Lock()

    def callback(i, result, error):
        with lock:
            results[i] = error if error is not None else result.as_numpy("out_sample")
            if len(results) == len(requests):
                done.set()

    client = grpcclient.InferenceServerClient(triton_url)
    try:
        for i, arrays in enumerate(requests):  # a burst: they queue while one runs
            client.async_infer(
                "unet", _infer_inputs(arrays), lambda result, error, i=i: callback(i, result, error)
            )
        assert done.wait(120), "UNet requests did not complete"
    finally:
        client.close()

    for i, arrays in enumerate(requests):
        assert not isinstance(results[i], Exception), results[i]
        np.testing.assert_allclose(results[i], _direct(unet_session, arrays), atol=1e-5)
    after = grpc_client.get_inference_statistics("unet").model_stats[0]
    inferences = after.inference_count - before.inference_count
    executions = after.execution_count - before.execution_count
    assert inferences == sum(len(r["sample"]) for r in requests)
    assert executions < len(requests), "no two requests were batched together"


def test_per_sample_scalar_outputs(grpc_client):
    rng = np.random.default_rng(1)
    arrays = {
        "clip_input": rng.standard_normal((3, 3, 224, 224), dtype=np.float32),
        "images": rng.random((3, 8, 12, 3), dtype=np.float32),
    }
    result = grpc_client.infer("safety_checker", _infer_inputs(arrays))
    assert result.as_numpy("has_nsfw_concepts").shape == (3, 1)
    assert result.as_numpy("out_images").shape == (3, 8, 12, 3)


def test_bad_request_does_not_disturb_others(grpc_client, unet_session, unet_inputs):
    from tritonclient.utils import InferenceServerException

    rng = np.random.default_rng(2)
    bad = unet_inputs(rng, 1, h=9)  # the UNet needs multiples of its downsampling
    with pytest.raises(InferenceServerException):
        grpc_client.infer("unet", _infer_inputs(bad))
    good = unet_inputs(rng, 2)
    out = grpc_client.infer("unet", _infer_inputs(good)).as_numpy("out_sample")
    np.testing.assert_allclose(out, _direct(unet_session, good), atol=1e-5)
