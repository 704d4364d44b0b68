"""Hostile input over gRPC, property-based: the server answers, never crashes, never hangs.

Hypothesis throws arbitrary dtypes, shapes and values at every input of the
``stable_diffusion`` contract (and at names it does not have): huge and
empty strings, random bytes, NaN and extreme numbers, empty and oversized
tensors. Each request must end, within a bounded time, in a result or an
INVALID_ARGUMENT, and the server must stay READY. Bounded (max_examples,
fixed seed) so that it runs in ``make test``.
"""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from sd_pipeline import spec as S

pytestmark = pytest.mark.server

MODEL = "stable_diffusion"
CALL_TIMEOUT_S = 60.0  # far above any answer these requests need: a hang fails, not waits
NAMES = [t.name for t in S.STABLE_DIFFUSION.inputs] + ["preview", "bogus_input"]
SPEC = {t.name: t for t in S.STABLE_DIFFUSION.inputs}
# Triton's names of the types a hostile client may send (tritonclient maps them to numpy).
DTYPES = ("BYTES", "INT32", "INT64", "FP32", "FP64", "UINT8", "BOOL")
# Few enough pixels and steps that an accidentally valid request stays cheap.
INTS = st.one_of(
    st.integers(-3, 4),
    st.sampled_from([0, 8, 12, 32, 64, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63)]),
)
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, 1.0, 7.5, -1.0, 1e30]),
)
TEXTS = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=64).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from(
        [b"", b" ", b"a cat", b"\x00" * 10, b"\xff\xfe\xfd", b"x" * 70_000, b"euler_a", b"ddim"]
    ),
)
SHAPES = st.one_of(
    st.just([1]),
    st.lists(st.integers(0, 3), min_size=0, max_size=3),
    st.sampled_from([[32, 32, 3], [32, 32], [0, 32, 3], [8, 12, 3], [2, 1]]),
)


@st.composite
def tensors(draw):
    """(name, dtype name, array) for one input, possibly of the wrong dtype or shape."""
    name = draw(st.sampled_from(NAMES))
    spec = SPEC.get(name)
    # Mostly the declared dtype and shape, so that the values reach the model
    # (Triton itself rejects wrong dtypes and fixed dims of the wrong size).
    if spec is not None and draw(st.integers(0, 3)):
        dtype = spec.datatype
    else:
        dtype = draw(st.sampled_from(DTYPES))
    if spec is not None and draw(st.integers(0, 3)):
        shape = [
            d if isinstance(d, int) else draw(st.sampled_from([0, 1, 8, 32])) for d in spec.dims
        ]
    else:
        shape = draw(SHAPES)
    size = int(np.prod(shape)) if shape else 1
    if dtype == "BYTES":
        values = draw(st.lists(TEXTS, min_size=size, max_size=size))
        array = np.array(values + [b""], dtype=object)[:-1]  # keep bytes objects as they are
    elif dtype in ("FP32", "FP64"):
        array = np.array(
            draw(st.lists(FLOATS, min_size=size, max_size=size)), triton_to_np_dtype(dtype)
        )
    elif dtype == "BOOL":
        array = np.array(draw(st.lists(st.booleans(), min_size=size, max_size=size)), bool)
    elif dtype == "UINT8":
        array = np.frombuffer(draw(st.binary(min_size=size, max_size=size)), np.uint8).copy()
    else:
        info = np.iinfo(triton_to_np_dtype(dtype))
        values = [
            min(max(v, info.min), info.max)
            for v in draw(st.lists(INTS, min_size=size, max_size=size))
        ]
        array = np.array(values, triton_to_np_dtype(dtype))
    return name, dtype, array.reshape(shape)


@st.composite
def requests(draw):
    """A request: usually a valid prompt plus hostile inputs, sometimes nothing valid at all."""
    chosen = {}
    if draw(st.booleans()):
        chosen["prompt"] = ("BYTES", np.array([b"a cat"], dtype=object))
        chosen["num_inference_steps"] = ("INT32", np.array([2], np.int32))
        chosen["height"] = ("INT32", np.array([32], np.int32))
        chosen["width"] = ("INT32", np.array([32], np.int32))
    for name, dtype, array in draw(st.lists(tensors(), min_size=0, max_size=4)):
        chosen[name] = (dtype, array)
    return chosen


def send(client, chosen) -> str:
    inputs = []
    for name, (dtype, array) in chosen.items():
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    try:
        client.infer(MODEL, inputs, client_timeout=CALL_TIMEOUT_S)
    except InferenceServerException as e:
        return f"{e.status()}: {e.message()}"
    return "ok"


@pytest.fixture(scope="module")
def client(triton_url):
    c = grpcclient.InferenceServerClient(triton_url)
    yield c
    c.close()


@settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(chosen=requests())
def test_hostile_request_gets_a_result_or_invalid_arg(client, chosen):
    answer = send(client, chosen)
    assert answer == "ok" or answer.startswith("StatusCode.INVALID_ARGUMENT"), answer


def test_server_stays_ready_after_hostile_input(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL)
    good = {
        "prompt": ("BYTES", np.array([b"a cat"], dtype=object)),
        "num_inference_steps": ("INT32", np.array([2], np.int32)),
        "height": ("INT32", np.array([32], np.int32)),
        "width": ("INT32", np.array([32], np.int32)),
    }
    assert send(client, good) == "ok"
