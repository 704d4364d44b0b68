"""What the Python-backend models of this repository share: the component hosts' glue
and the one rule for an instance's device.

The exporter copies this file beside the ``model.py`` of every component
model it hosts in Python (``onnx_host``: the ONNX file with onnxruntime;
``torch_host``: the diffusers module with torch) and beside the pipeline's
``model.py``: Triton models are separate folders, and none of them ships the
others' code. Inside Triton it imports ``triton_python_backend_utils``; it
needs neither torch nor onnxruntime.

A host subclasses :class:`ComponentHost` and says how to read one input,
concatenate a batch, run it and wrap one output. The base class does the
rest, the same for every host: the config (tensors, ``reshape``, the
``device`` parameter), dynamic batching (requests whose non-batch shapes
match are concatenated along the batch axis, run once, and the outputs split
back), and one response per request: a request that cannot run (missing
input, wrong dtype or shape) gets its own INVALID_ARG error, a run that fails
gets INTERNAL, and the others in the same call still succeed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

__all__ = [
    "ComponentHost",
    "RequestError",
    "TensorConfig",
    "choose_device",
    "dtype_name",
    "instance_device",
    "parameter",
    "run_batched",
]

DEVICES = ("auto", "cuda", "cpu")


class RequestError(ValueError):
    """A request the model cannot run: reported to that request only (INVALID_ARG)."""


def choose_device(kind: str, device_id: int, want: str = "auto", *, cuda: bool) -> int | None:
    """The CUDA device an instance runs on, or ``None`` for the CPU.

    ``kind`` is Triton's ``model_instance_kind``; ``want`` the config's
    ``device`` parameter; ``cuda`` whether the runtime (torch, onnxruntime)
    can run on CUDA here. ``auto`` follows the instance kind: a ``GPU``
    instance runs on GPU ``device_id`` or fails to load, never silently on the
    CPU (tens of times slower); any other kind (``CPU``, ``MODEL``, missing or
    unknown) runs on the CPU. ``cuda`` and ``cpu`` override the kind.
    """
    if want not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {want!r}")
    if want == "cpu" or (want == "auto" and kind != "GPU"):
        return None
    if not cuda:
        reason = "device cuda asked for" if want == "cuda" else "a KIND_GPU instance"
        raise RuntimeError(
            f"{reason}, but this runtime sees no CUDA device (a CPU-only build, or "
            "CUDA libraries missing); set the config parameter device to cpu to run "
            "on the CPU on purpose"
        )
    return int(device_id)


def instance_device(args: dict, config: dict, *, cuda: bool) -> int | None:
    """:func:`choose_device` for a model's ``initialize`` arguments and config."""
    return choose_device(
        args.get("model_instance_kind", ""),
        int(args.get("model_instance_device_id") or 0),
        parameter(config, "device", "auto").lower(),
        cuda=cuda,
    )


def parameter(config: dict, key: str, default: str) -> str:
    """A config parameter's string value (``default`` when absent or empty)."""
    value = config.get("parameters", {}).get(key, {}).get("string_value", "").strip()
    return value if value != "" else default


def dtype_name(x: Any) -> str:
    """A numpy array's or torch tensor's dtype by its numpy name (``float32``, ``bool``)."""
    return str(x.dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorConfig:
    """One input or output of the model config, as the model sees it."""

    name: str
    dtype: str  # numpy name: "float32", "bool", ...
    dims: tuple[int, ...]  # after the batch dim, as the config declares them
    shape: tuple[int, ...]  # as the model sees it (the config's reshape applied)
    batched: bool

    @classmethod
    def parse(cls, entry: dict, batched: bool) -> TensorConfig:
        try:
            dtype = pb_utils.triton_string_to_numpy(entry["data_type"])
        except KeyError:
            raise ValueError(
                f"tensor '{entry['name']}': unsupported data_type {entry['data_type']}"
            ) from None
        dims = tuple(int(d) for d in entry["dims"])
        reshape = entry.get("reshape")
        shape = tuple(int(d) for d in reshape.get("shape", ())) if reshape is not None else dims
        return cls(entry["name"], np.dtype(dtype).name, dims, shape, batched)

    def to_model(self, x):
        """A request's array (numpy or torch) in the model's shape, dtype and shape checked.

        A config ``reshape`` that Triton did not apply (the UNet's timestep
        ``[B, 1]`` for a model that takes ``[B]``) is applied here.
        """
        if dtype_name(x) != self.dtype:
            raise RequestError(
                f"input '{self.name}' has dtype {dtype_name(x)}, expected {self.dtype}"
            )
        if self.batched and len(x.shape) == 0:
            raise RequestError(f"input '{self.name}' has no batch dimension")
        lead = tuple(x.shape[:1]) if self.batched else ()
        tail = tuple(x.shape[len(lead) :])
        if -1 not in self.shape and tail != self.shape and _numel(tail) == _numel(self.shape):
            x = x.reshape(lead + self.shape)
            tail = self.shape
        if len(tail) != len(self.shape) or any(
            want not in (-1, got) for want, got in zip(self.shape, tail, strict=True)
        ):
            want = ["B"] * len(lead) + [d if d >= 0 else "?" for d in self.shape]
            raise RequestError(f"input '{self.name}' has shape {list(x.shape)}, expected {want}")
        return x

    def to_config(self, x):
        """A model output in the config's dims (the batch dim kept)."""
        if self.shape == self.dims:
            return x
        lead = tuple(x.shape[:1]) if self.batched else ()
        return x.reshape(lead + self.dims)


def _numel(shape: Sequence[int]) -> int:
    return int(np.prod(shape)) if shape else 1


Batch = dict[str, Any]


def run_batched(
    run: Callable[[Batch], Batch],
    batches: Sequence[Batch | Exception],
    concat: Callable[[list], Any],
) -> list[Batch | Exception]:
    """Run requests' inputs through ``run``, concatenating those whose non-batch shapes match.

    ``batches`` holds each request's inputs by name, batch first (or the
    exception reading them raised); the result holds each request's outputs by
    name or its exception. A concatenated run that fails is retried one
    request at a time, so that one bad request does not fail the others.
    """
    results: list[Batch | Exception] = list(batches)
    groups: dict[tuple, list[int]] = {}
    for i, named in enumerate(batches):
        if not isinstance(named, Exception):
            key = tuple(
                (n, tuple(x.shape[1:]), str(getattr(x, "device", "cpu")))
                for n, x in sorted(named.items())
            )
            groups.setdefault(key, []).append(i)
    for group in groups.values():
        members = [batches[i] for i in group]
        try:
            if len(group) == 1:
                outputs = run(members[0])
            else:
                outputs = run({n: concat([m[n] for m in members]) for n in members[0]})
        except Exception as e:
            if len(group) == 1:
                results[group[0]] = e
            else:
                for i in group:
                    results[i] = run_batched(run, [batches[i]], concat)[0]
            continue
        start = 0
        for i, member in zip(group, members, strict=True):
            size = len(next(iter(member.values())))
            results[i] = {n: out[start : start + size] for n, out in outputs.items()}
            start += size
    return results


class ComponentHost:
    """The ``TritonPythonModel`` of a component host, less what is particular to its runtime.

    Subclasses implement :meth:`load` (make the runtime on ``self.cuda_device``,
    the CUDA device index, or the CPU where it is ``None``), :meth:`read` (one request tensor -> an array),
    :meth:`concat`, :meth:`run` (inputs by name -> outputs by name, in the
    model's shapes) and :meth:`output` (one output -> a ``pb_utils.Tensor``).
    ``cuda_available`` says whether the runtime can use CUDA here.
    """

    def initialize(self, args: dict) -> None:
        self.config = config = json.loads(args["model_config"])
        self.name = config.get("name", "model")
        batched = int(config.get("max_batch_size", 0)) > 0
        if not config.get("input") or not config.get("output"):
            raise ValueError(f"model '{self.name}': config declares no inputs or no outputs")
        self.inputs = [TensorConfig.parse(e, batched) for e in config["input"]]
        self.outputs = [TensorConfig.parse(e, batched) for e in config["output"]]
        try:
            self.cuda_device = instance_device(args, config, cuda=self.cuda_available())
        except (ValueError, RuntimeError) as e:
            raise type(e)(f"model '{self.name}': {e}") from None
        self.load(args)

    def cuda_available(self) -> bool:
        raise NotImplementedError

    def load(self, args: dict) -> None:
        raise NotImplementedError

    def read(self, tensor: TensorConfig, pb_tensor) -> Any:
        raise NotImplementedError

    def concat(self, arrays: list) -> Any:
        raise NotImplementedError

    def run(self, inputs: Batch) -> Batch:
        raise NotImplementedError

    def output(self, tensor: TensorConfig, x) -> Any:
        raise NotImplementedError

    def threads(self, key: str) -> int:
        """The config's thread-count parameter ``key`` (0: the runtime's default)."""
        value = parameter(self.config, key, "0")
        if not value.isdigit():
            raise ValueError(f"model '{self.name}': {key} must be an integer >= 0")
        return int(value)

    def _read_request(self, request) -> Batch | Exception:
        try:
            batch = {}
            for t in self.inputs:
                pb_tensor = pb_utils.get_input_tensor_by_name(request, t.name)
                if pb_tensor is None:
                    raise RequestError(f"input '{t.name}' is missing")
                batch[t.name] = t.to_model(self.read(t, pb_tensor))
            return batch
        except Exception as e:
            return e

    def execute(self, requests: list) -> list:
        results = run_batched(self.run, [self._read_request(r) for r in requests], self.concat)
        self.finish()
        return [self._response(result) for result in results]

    def finish(self) -> None:
        """Called after a batch ran, before its outputs are handed to Triton."""

    def _response(self, result: Batch | Exception):
        if isinstance(result, Exception):
            code = (
                pb_utils.TritonError.INVALID_ARG
                if isinstance(result, RequestError)
                else pb_utils.TritonError.INTERNAL
            )
            error = pb_utils.TritonError(f"{self.name}: {result}", code)
            return pb_utils.InferenceResponse(output_tensors=[], error=error)
        tensors = [self.output(t, t.to_config(result[t.name])) for t in self.outputs]
        return pb_utils.InferenceResponse(output_tensors=tensors)
