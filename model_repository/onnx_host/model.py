"""Triton Python-backend model that runs the ``model.onnx`` beside it with onnxruntime.

The exporter copies this file into the version folder of every component
model when the repository is exported with ``--host python`` (any Triton,
including the one installed with pip, which has no onnxruntime backend).

With dynamic batching the Python backend hands ``execute`` a list of
requests without concatenating them. Requests whose non-batch shapes match
are concatenated along the batch axis, run once, and the outputs split back:
one response per request. A request that fails (bad shape, missing input)
gets its own error response; the others in the same call still succeed.

Config parameters (all optional, string values):

- ``intra_op_num_threads``: onnxruntime's intra-op thread count (0 = its default);
- ``execution_provider``: ``auto`` (CUDA on a GPU instance when onnxruntime has
  it, else CPU), ``cuda`` or ``cpu``.

Shapes: a tensor declared with a ``reshape`` (the UNet's per-sample
``timestep``: ``dims: [1]``, ``reshape: { shape: [] }``) is given to the ONNX
model in its reshaped form (``[b]``), whether Triton passes ``[b, 1]`` or
``[b]``; outputs are returned in their config shape.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

MODEL_FILE = "model.onnx"
THREADS_PARAMETER = "intra_op_num_threads"
PROVIDER_PARAMETER = "execution_provider"

# Triton config data types -> numpy dtypes, and ONNX type strings -> numpy.
_TRITON_NUMPY = {
    "TYPE_BOOL": np.bool_,
    "TYPE_UINT8": np.uint8,
    "TYPE_INT8": np.int8,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
}
_ONNX_NUMPY = {
    "tensor(bool)": np.bool_,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(float16)": np.float16,
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
}


class RequestError(ValueError):
    """A request the model cannot run: reported to that request only."""


class TensorConfig:
    """One input or output of the model config, as the ONNX model sees it."""

    def __init__(self, entry: dict, batched: bool):
        self.name = entry["name"]
        data_type = entry["data_type"]
        if data_type not in _TRITON_NUMPY:
            raise ValueError(f"tensor '{self.name}': unsupported data_type {data_type}")
        self.dtype = np.dtype(_TRITON_NUMPY[data_type])
        self.dims = tuple(int(d) for d in entry["dims"])
        reshape = entry.get("reshape")
        self.shape = (
            tuple(int(d) for d in reshape.get("shape", ())) if reshape is not None else self.dims
        )
        self.batched = batched

    def to_model(self, array: np.ndarray) -> np.ndarray:
        """A request's array in the shape the ONNX model takes (reshape applied, checked)."""
        if array.dtype != self.dtype:
            raise RequestError(
                f"input '{self.name}' has dtype {array.dtype}, expected {self.dtype}"
            )
        if self.batched and array.ndim == 0:
            raise RequestError(f"input '{self.name}' has no batch dimension")
        lead = array.shape[:1] if self.batched else ()
        tail = array.shape[len(lead) :]
        fixed = -1 not in self.shape
        if fixed and tail != self.shape and np.prod(tail) == np.prod(self.shape):
            # A config reshape (e.g. [b, 1] -> [b]) that Triton did not apply.
            array = array.reshape(lead + self.shape)
        tail = array.shape[len(lead) :]
        if len(tail) != len(self.shape) or any(
            want not in (-1, got) for want, got in zip(self.shape, tail, strict=True)
        ):
            raise RequestError(
                f"input '{self.name}' has shape {list(array.shape)}, expected "
                f"{['B'] * len(lead) + [d if d >= 0 else '?' for d in self.shape]}"
            )
        return array

    def to_config(self, array: np.ndarray) -> np.ndarray:
        """A model output in its config shape (``dims``, after the batch dim)."""
        if self.shape == self.dims:
            return array
        lead = array.shape[:1] if self.batched else ()
        return array.reshape(lead + tuple(self.dims))


def group_by_shape(arrays: Sequence[dict[str, np.ndarray] | Exception]) -> list[list[int]]:
    """Indices of the requests that can run together: same non-batch shapes (errors left out)."""
    groups: dict[tuple, list[int]] = {}
    for i, named in enumerate(arrays):
        if isinstance(named, Exception):
            continue
        key = tuple((name, a.shape[1:]) for name, a in sorted(named.items()))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def run_batched(
    run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    arrays: Sequence[dict[str, np.ndarray] | Exception],
) -> list[dict[str, np.ndarray] | Exception]:
    """Run requests' inputs through ``run``, concatenating requests with matching shapes.

    ``arrays`` holds each request's model inputs by name (batch first), or the
    exception that reading it raised. Returns, per request, its outputs by
    name or an exception. If a concatenated run fails, its requests are run
    one by one, so that one bad request does not fail the others.
    """
    results: list[dict[str, np.ndarray] | Exception] = [
        a if isinstance(a, Exception) else RuntimeError("not run") for a in arrays
    ]
    for group in group_by_shape(arrays):
        members = [arrays[i] for i in group]
        sizes = [len(next(iter(m.values()))) for m in members]
        try:
            if len(group) == 1:
                outputs = run(members[0])
            else:
                outputs = run({n: np.concatenate([m[n] for m in members]) for n in members[0]})
        except Exception as e:
            if len(group) == 1:
                results[group[0]] = e
                continue
            for i in group:
                results[i] = run_batched(run, [arrays[i]])[0]
            continue
        bounds = np.cumsum(sizes)[:-1]
        split = {name: np.split(out, bounds) for name, out in outputs.items()}
        for k, i in enumerate(group):
            results[i] = {name: parts[k] for name, parts in split.items()}
    return results


def _parameter(config: dict, key: str, default: str) -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value if value != "" else default


def _error(message: str, code_name: str = "INVALID_ARG"):
    code = getattr(pb_utils.TritonError, code_name, None)
    if code is None:
        return pb_utils.TritonError(message)
    return pb_utils.TritonError(message, code)


class TritonPythonModel:
    """Runs ``model.onnx`` from this version folder with onnxruntime."""

    def initialize(self, args: dict) -> None:
        self.config = config = json.loads(args["model_config"])
        self.name = config.get("name", "model")
        batched = int(config.get("max_batch_size", 0)) > 0
        if not config.get("input") or not config.get("output"):
            raise ValueError(f"model '{self.name}': config declares no inputs or no outputs")
        self.inputs = [TensorConfig(e, batched) for e in config["input"]]
        self.outputs = [TensorConfig(e, batched) for e in config["output"]]
        threads = _parameter(config, THREADS_PARAMETER, "0")
        provider = _parameter(config, PROVIDER_PARAMETER, "auto").lower()
        if not threads.isdigit():
            raise ValueError(f"model '{self.name}': {THREADS_PARAMETER} must be an integer >= 0")
        if provider not in ("auto", "cuda", "cpu"):
            raise ValueError(f"model '{self.name}': {PROVIDER_PARAMETER} must be auto, cuda or cpu")

        path = Path(args["model_repository"]) / args["model_version"] / MODEL_FILE
        if not path.is_file():
            raise FileNotFoundError(f"model '{self.name}': {path} not found")
        self.session = self._session(path, int(threads), provider, args)
        self._check_session()
        self.output_names = [t.name for t in self.outputs]

    def _session(self, path: Path, threads: int, provider: str, args: dict):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        available = ort.get_available_providers()
        on_gpu = args.get("model_instance_kind", "GPU") == "GPU"
        providers: list = ["CPUExecutionProvider"]
        if provider == "cuda" or (provider == "auto" and on_gpu):
            if "CUDAExecutionProvider" in available:
                device = int(args.get("model_instance_device_id", 0) or 0)
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": device}))
            elif provider == "cuda":
                raise RuntimeError(
                    f"model '{self.name}': execution_provider cuda asked for, but this "
                    f"onnxruntime has only {available} (install onnxruntime-gpu)"
                )
        return ort.InferenceSession(str(path), options, providers=providers)

    def _check_session(self) -> None:
        """Fail at load if the config and the ONNX file disagree."""
        ins = {i.name: i for i in self.session.get_inputs()}
        outs = {o.name: o for o in self.session.get_outputs()}
        if set(ins) != {t.name for t in self.inputs}:
            raise ValueError(
                f"model '{self.name}': config inputs {[t.name for t in self.inputs]} "
                f"differ from the ONNX model's {sorted(ins)}"
            )
        for tensors, model_io in ((self.inputs, ins), (self.outputs, outs)):
            for t in tensors:
                if t.name not in model_io:
                    raise ValueError(f"model '{self.name}': ONNX model has no output '{t.name}'")
                io = model_io[t.name]
                want = _ONNX_NUMPY.get(io.type)
                if want is None or np.dtype(want) != t.dtype:
                    raise ValueError(
                        f"model '{self.name}': tensor '{t.name}' is {io.type} in the ONNX "
                        f"model but {t.dtype} in the config"
                    )
                rank = len(t.shape) + (1 if t.batched else 0)
                if len(io.shape) != rank:
                    raise ValueError(
                        f"model '{self.name}': tensor '{t.name}' has rank {len(io.shape)} "
                        f"in the ONNX model, {rank} in the config"
                    )

    def _read(self, request) -> dict[str, np.ndarray] | Exception:
        try:
            arrays = {}
            for t in self.inputs:
                tensor = pb_utils.get_input_tensor_by_name(request, t.name)
                if tensor is None:
                    raise RequestError(f"input '{t.name}' is missing")
                arrays[t.name] = t.to_model(tensor.as_numpy())
            return arrays
        except Exception as e:
            return e

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, inputs)
        return dict(zip(self.output_names, outputs, strict=True))

    def execute(self, requests: list) -> list:
        results = run_batched(self._run, [self._read(r) for r in requests])
        responses = []
        for result in results:
            if isinstance(result, Exception):
                code = "INVALID_ARG" if isinstance(result, RequestError) else "INTERNAL"
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[], error=_error(f"{self.name}: {result}", code)
                    )
                )
                continue
            tensors = [
                pb_utils.Tensor(t.name, np.ascontiguousarray(t.to_config(result[t.name])))
                for t in self.outputs
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        self.session = None
