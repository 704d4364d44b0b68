"""Triton Python-backend model that runs the ``model.onnx`` beside it with onnxruntime.

The exporter copies this file, with ``component_host.py`` (batching, config,
errors and the device rule, shared with the torch host), into the version
folder of every component model when the repository is exported with
``--host python`` (any Triton, including the one installed with pip, which
has no onnxruntime backend).

Config parameters (all optional, string values):

- ``intra_op_num_threads``: onnxruntime's intra-op thread count (0 = its default);
- ``allow_spinning``: ``0`` (the default here) or ``1`` (onnxruntime's default):
  whether the intra-op threads spin, burning a core, while they wait for work.
  Every model here is a process of its own on the same cores (text encoders,
  UNet, VAE, the pipeline's loop); a spinning thread of one takes the CPU the
  others need, and a denoising step waits on all of them in turn
  (``benchmarks/results/cpu-overhead.md`` measures the difference);
- ``device``: ``auto`` (CUDA for a ``KIND_GPU`` instance, the CPU for any
  other kind), ``cuda`` or ``cpu``. An instance meant for CUDA whose session
  does not get the CUDA execution provider (onnxruntime without CUDA, or its
  CUDA libraries missing, where onnxruntime would quietly run on the CPU)
  fails to load, saying so.

Shapes: a tensor declared with a ``reshape`` (the UNet's per-sample
``timestep``: ``dims: [1]``, ``reshape: { shape: [] }``) is given to the ONNX
model in its reshaped form (``[b]``), whether Triton passes ``[b, 1]`` or
``[b]``; outputs are returned in their config shape.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from component_host import ComponentHost, TensorConfig, parameter

MODEL_FILE = "model.onnx"
THREADS_PARAMETER = "intra_op_num_threads"
SPINNING_PARAMETER = "allow_spinning"
CUDA = "CUDAExecutionProvider"


def _onnx_dtype(type_string: str) -> str:
    """An ONNX type string (``tensor(float)``) as a numpy dtype name (``float32``).

    ONNX names its types as numpy does, except these two.
    """
    name = type_string.removeprefix("tensor(").removesuffix(")")
    return {"float": "float32", "double": "float64"}.get(name, name)


class TritonPythonModel(ComponentHost):
    """Runs ``model.onnx`` from this version folder with onnxruntime."""

    ARRAYS = "numpy"  # what run() takes and returns (the pipeline's in-process UNet asks)

    def cuda_available(self) -> bool:
        import onnxruntime as ort

        return CUDA in ort.get_available_providers()

    def load(self, args: dict) -> None:
        import onnxruntime as ort

        threads = self.threads(THREADS_PARAMETER)
        spinning = parameter(self.config, SPINNING_PARAMETER, "0")
        if spinning not in ("0", "1"):
            raise ValueError(f"model '{self.name}': {SPINNING_PARAMETER} must be 0 or 1")
        path = Path(args["model_repository"]) / args["model_version"] / MODEL_FILE
        if not path.is_file():
            raise FileNotFoundError(f"model '{self.name}': {path} not found")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        providers: list = ["CPUExecutionProvider"]
        if self.cuda_device is not None:
            providers.insert(0, (CUDA, {"device_id": self.cuda_device}))
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        if self.cuda_device is not None and CUDA not in self.session.get_providers():
            raise RuntimeError(
                f"model '{self.name}': CUDA asked for, but the onnxruntime session runs on "
                f"{self.session.get_providers()} (CUDA or cuDNN libraries missing?); set "
                "the config parameter device to cpu to run on the CPU on purpose"
            )
        self._check_session()
        self.output_names = [t.name for t in self.outputs]

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
                self._check_tensor(t, model_io[t.name])

    def _check_tensor(self, t: TensorConfig, io) -> None:
        if _onnx_dtype(io.type) != t.dtype:
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

    def read(self, tensor: TensorConfig, pb_tensor) -> np.ndarray:
        return pb_tensor.as_numpy()

    def concat(self, arrays: list) -> np.ndarray:
        return np.concatenate(arrays)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, inputs)
        return dict(zip(self.output_names, outputs, strict=True))

    def output(self, tensor: TensorConfig, x: np.ndarray):
        return pb_utils.Tensor(tensor.name, np.ascontiguousarray(x))

    def finalize(self) -> None:
        self.session = None
