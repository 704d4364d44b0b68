"""Triton Python-backend model that runs one component's diffusers / transformers module with torch.

The exporter writes it with ``--host torch`` (no ONNX step). The version
folder holds this file, ``wrappers.py`` (the exporter's component wrappers:
the same ``forward`` the ONNX files are traced from) and the module's weights
as ``save_pretrained`` wrote them (``unet/``, ``vae/``, ``text_encoder/`` or
``safety_checker/``). The tensor contract (names, dims, dtypes) is the ONNX
hosts', so the pipeline does not care which host serves a component.

Device: CUDA (the instance's device) when the instance is ``KIND_GPU`` and
torch sees a GPU, else the CPU. Precision: float16 on CUDA, float32 on the
CPU, whatever the weights were saved in; tensors the contract keeps float32
(the UNet timestep, the safety checker's images) stay float32. Attention:
PyTorch's scaled_dot_product_attention.

Tensors move by DLPack: with ``FORCE_CPU_ONLY_INPUT_TENSORS`` ``no`` (the
exporter sets it) a GPU tensor from the pipeline's BLS call arrives on the
GPU and the outputs leave from it, without a host copy.

With dynamic batching ``execute`` gets several requests: those whose
non-batch shapes match run as one batch and the outputs are split back; a
request that fails (bad shape or dtype, missing input) gets its own error.

Config parameters (string values):

- ``component``: which wrapper (``text_encoder``, ``unet``, ``vae_encoder``,
  ``vae_decoder``, ``safety_checker``); the model's name may carry a prefix;
- ``device``: ``auto`` (default), ``cuda`` or ``cpu``;
- ``dtype``: ``auto`` (default: float16 on CUDA, float32 on the CPU),
  ``float16`` or ``float32`` (the SD 1.x VAE decoder: it overflows in fp16);
- ``intra_op_threads``: torch's CPU threads (0: torch's default).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
import wrappers as W

_TRITON_TORCH = {
    "TYPE_BOOL": torch.bool,
    "TYPE_UINT8": torch.uint8,
    "TYPE_INT32": torch.int32,
    "TYPE_INT64": torch.int64,
    "TYPE_FP16": torch.float16,
    "TYPE_FP32": torch.float32,
}
_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class RequestError(ValueError):
    """A request the model cannot run: reported to that request only."""


@dataclass(frozen=True)
class TensorConfig:
    """One input or output of the model config: dtype, config dims and the model's shape."""

    name: str
    dtype: torch.dtype
    dims: tuple[int, ...]  # after the batch dim, as the config declares them
    shape: tuple[int, ...]  # as the module sees it (the config's reshape applied)

    @classmethod
    def parse(cls, entry: dict) -> TensorConfig:
        if entry["data_type"] not in _TRITON_TORCH:
            raise ValueError(f"tensor '{entry['name']}': unsupported {entry['data_type']}")
        dims = tuple(int(d) for d in entry["dims"])
        reshape = entry.get("reshape")
        shape = tuple(int(d) for d in reshape.get("shape", ())) if reshape is not None else dims
        return cls(entry["name"], _TRITON_TORCH[entry["data_type"]], dims, shape)

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """A request's batch in the module's shape (reshape applied), dtype and shape checked."""
        if x.dtype != self.dtype:
            raise RequestError(f"input '{self.name}' has dtype {x.dtype}, expected {self.dtype}")
        if x.dim() == 0:
            raise RequestError(f"input '{self.name}' has no batch dimension")
        tail = tuple(x.shape[1:])
        if -1 not in self.shape and tail != self.shape and _numel(tail) == _numel(self.shape):
            x = x.reshape(x.shape[0], *self.shape)  # a config reshape Triton did not apply
            tail = self.shape
        if len(tail) != len(self.shape) or any(
            want not in (-1, got) for want, got in zip(self.shape, tail, strict=True)
        ):
            want = ["B"] + [d if d >= 0 else "?" for d in self.shape]
            raise RequestError(f"input '{self.name}' has shape {list(x.shape)}, expected {want}")
        return x

    def to_config(self, x: torch.Tensor) -> torch.Tensor:
        """A module output in the config's dtype and dims."""
        x = x.to(self.dtype)
        if self.shape != self.dims:
            x = x.reshape(x.shape[0], *self.dims)
        return x.contiguous()


def _numel(shape: Sequence[int]) -> int:
    return int(np.prod(shape)) if shape else 1


def choose_device(kind: str, device_id: int, want: str = "auto") -> torch.device:
    """CUDA device ``device_id`` for a GPU instance where torch sees CUDA, else the CPU."""
    if want not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {want!r}")
    if want == "cpu":
        return torch.device("cpu")
    cuda = torch.cuda.is_available()
    if want == "cuda" and not cuda:
        raise RuntimeError("device cuda asked for, but torch sees no CUDA device")
    if cuda and (want == "cuda" or kind == "GPU"):
        return torch.device("cuda", device_id)
    return torch.device("cpu")


def run_batched(
    run: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    batches: Sequence[dict[str, torch.Tensor] | Exception],
) -> list[dict[str, torch.Tensor] | Exception]:
    """Run requests' inputs through ``run``, concatenating those whose non-batch shapes match.

    ``batches`` holds each request's inputs by name (or the exception reading
    them raised); the result holds each request's outputs or its exception.
    A failed concatenated run is retried one request at a time.
    """
    results: list[dict[str, torch.Tensor] | Exception] = list(batches)
    groups: dict[tuple, list[int]] = {}
    for i, named in enumerate(batches):
        if not isinstance(named, Exception):
            key = tuple((n, tuple(x.shape[1:]), str(x.device)) for n, x in sorted(named.items()))
            groups.setdefault(key, []).append(i)
    for group in groups.values():
        members = [batches[i] for i in group]
        sizes = [len(next(iter(m.values()))) for m in members]
        try:
            if len(group) == 1:
                outputs = run(members[0])
            else:
                outputs = run({n: torch.cat([m[n] for m in members]) for n in members[0]})
        except Exception as e:
            if len(group) == 1:
                results[group[0]] = e
            else:
                for i in group:
                    results[i] = run_batched(run, [batches[i]])[0]
            continue
        parts = {name: torch.split(out, sizes) for name, out in outputs.items()}
        for k, i in enumerate(group):
            results[i] = {name: split[k] for name, split in parts.items()}
    return results


def _parameter(config: dict, key: str, default: str) -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value if value != "" else default


def _error(message: str, invalid: bool):
    code = pb_utils.TritonError.INVALID_ARG if invalid else pb_utils.TritonError.INTERNAL
    return pb_utils.TritonError(message, code)


class TritonPythonModel:
    """Runs one component's torch module from this version folder."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.name = config.get("name", "model")
        if int(config.get("max_batch_size", 0)) < 1:
            raise ValueError(f"model '{self.name}': a component model needs max_batch_size >= 1")
        self.component = _parameter(config, "component", "")
        if self.component not in W.MODULES:
            raise ValueError(
                f"model '{self.name}': parameter component must be one of "
                f"{', '.join(W.MODULES)}, got {self.component!r}"
            )
        self.inputs = [TensorConfig.parse(e) for e in config.get("input", [])]
        self.outputs = [TensorConfig.parse(e) for e in config.get("output", [])]
        threads = _parameter(config, "intra_op_threads", "0")
        if not threads.isdigit():
            raise ValueError(f"model '{self.name}': intra_op_threads must be an integer >= 0")
        if int(threads) > 0:
            torch.set_num_threads(int(threads))

        kind = args.get("model_instance_kind", "CPU")
        device_id = int(args.get("model_instance_device_id", 0) or 0)
        self.device = choose_device(kind, device_id, _parameter(config, "device", "auto"))
        wanted = _parameter(config, "dtype", "auto")
        if wanted not in ("auto", *_DTYPES):
            raise ValueError(f"model '{self.name}': dtype must be auto, float16 or float32")
        if wanted == "auto":
            wanted = "float16" if self.device.type == "cuda" else "float32"
        self.dtype = _DTYPES[wanted]

        version_dir = Path(args["model_repository"]) / args["model_version"]
        modules = {}
        for folder in W.MODULES[self.component]:
            if not (version_dir / folder).is_dir():
                raise FileNotFoundError(f"model '{self.name}': {version_dir / folder} not found")
            module = W.load_module(folder, version_dir / folder, self.dtype)
            modules[folder] = module.to(self.device)
        self.module = W.wrap(self.component, modules, attention="sdpa")

    def _compute_dtype(self, tensor: TensorConfig) -> torch.dtype:
        if not tensor.dtype.is_floating_point or (self.component, tensor.name) in W.FP32_TENSORS:
            return tensor.dtype
        return self.dtype

    def _read(self, request) -> dict[str, torch.Tensor] | Exception:
        try:
            batch = {}
            for t in self.inputs:
                tensor = pb_utils.get_input_tensor_by_name(request, t.name)
                if tensor is None:
                    raise RequestError(f"input '{t.name}' is missing")
                if t.dtype == torch.bool:
                    x = torch.from_numpy(tensor.as_numpy().copy())
                else:
                    x = torch.utils.dlpack.from_dlpack(tensor.to_dlpack())
                batch[t.name] = t.to_model(x)
            return batch
        except Exception as e:
            return e

    def _run(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            args = [batch[t.name].to(self.device, self._compute_dtype(t)) for t in self.inputs]
            outputs = self.module(*args)
        if not isinstance(outputs, tuple):
            outputs = (outputs,)
        return {t.name: t.to_config(o) for t, o in zip(self.outputs, outputs, strict=True)}

    def _tensor(self, name: str, x: torch.Tensor):
        if x.dtype == torch.bool:  # DLPack has no portable bool before v0.8
            return pb_utils.Tensor(name, x.cpu().numpy())
        return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(x.contiguous()))

    def execute(self, requests: list) -> list:
        results = run_batched(self._run, [self._read(r) for r in requests])
        if self.device.type == "cuda":
            # The outputs must be complete before Triton reads them.
            torch.cuda.current_stream(self.device).synchronize()
        responses = []
        for result in results:
            if isinstance(result, Exception):
                invalid = isinstance(result, RequestError)
                error = _error(f"{self.name}: {result}", invalid)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            tensors = [self._tensor(t.name, result[t.name]) for t in self.outputs]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        self.module = None
