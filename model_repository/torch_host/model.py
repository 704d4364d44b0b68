"""Triton Python-backend model that runs one component's diffusers / transformers module with torch.

The exporter writes it with ``--host torch`` (no ONNX step). The version
folder holds this file, ``component_host.py`` (batching, config, errors and
the device rule, shared with the ONNX host), ``wrappers.py`` (the exporter's
component wrappers: the same ``forward`` the ONNX files are traced from) and
the module's weights as ``save_pretrained`` wrote them (``unet/``, ``vae/``,
``text_encoder/``, ``text_encoder_2/``, ``safety_checker/`` or ``controlnet/``). The tensor
contract (names, dims, dtypes) is the ONNX hosts', so the pipeline does not
care which host serves a component.

Device: CUDA (the instance's device) for a ``KIND_GPU`` instance, which
fails to load if torch sees no CUDA device; the CPU for any other kind.
Precision: float16 on CUDA, float32 on the CPU, whatever the weights were
saved in; tensors the contract keeps float32
(the UNet timestep, the safety checker's images, a ControlNet's timestep and
scale: ``wrappers.FP32_TENSORS``) stay float32. Attention:
PyTorch's scaled_dot_product_attention.

Tensors move by DLPack: with ``FORCE_CPU_ONLY_INPUT_TENSORS`` ``no`` (the
exporter sets it) a GPU tensor from the pipeline's BLS call arrives on the
GPU and the outputs leave from it, without a host copy.

Batching and errors: see ``component_host.py``.

Config parameters (string values):

- ``component``: which wrapper (``text_encoder``, ``text_encoder_2``, ``unet``,
  ``vae_encoder``, ``vae_decoder``, ``safety_checker``, and ControlNet's
  ``controlnet`` and ``unet_controlled``); the model's name may differ
  (``refiner_unet`` is a ``unet``, ``controlnet_canny`` a ``controlnet``);
- ``device``: ``auto`` (default), ``cuda`` or ``cpu``;
- ``dtype``: ``auto`` (default: float16 on CUDA, float32 on the CPU),
  ``float16`` or ``float32`` (a VAE whose config says ``force_upcast``: the SD 1.x
  and SDXL VAEs overflow in fp16);
- ``intra_op_threads``: torch's CPU threads (0: torch's default).
"""

from __future__ import annotations

from pathlib import Path

import torch
import triton_python_backend_utils as pb_utils
import wrappers as W
from component_host import ComponentHost, TensorConfig, parameter

_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def torch_dtype(tensor: TensorConfig) -> torch.dtype:
    """The torch dtype of a config tensor (torch names its dtypes as numpy does)."""
    return getattr(torch, tensor.dtype)


class TritonPythonModel(ComponentHost):
    """Runs one component's torch module from this version folder."""

    ARRAYS = "torch"  # what run() takes and returns (the pipeline's in-process UNet asks)

    def cuda_available(self) -> bool:
        return torch.cuda.is_available()

    def load(self, args: dict) -> None:
        if not self.inputs[0].batched:
            raise ValueError(f"model '{self.name}': a component model needs max_batch_size >= 1")
        self.component = parameter(self.config, "component", "")
        if self.component not in W.MODULES:
            raise ValueError(
                f"model '{self.name}': parameter component must be one of "
                f"{', '.join(W.MODULES)}, got {self.component!r}"
            )
        threads = self.threads("intra_op_threads")
        if threads > 0:
            torch.set_num_threads(threads)
        cuda = self.cuda_device is not None
        self.device = torch.device("cuda", self.cuda_device) if cuda else torch.device("cpu")
        wanted = parameter(self.config, "dtype", "auto")
        if wanted not in ("auto", *_DTYPES):
            raise ValueError(f"model '{self.name}': dtype must be auto, float16 or float32")
        if wanted == "auto":
            wanted = "float16" if cuda else "float32"
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
        dtype = torch_dtype(tensor)
        if not dtype.is_floating_point or (self.component, tensor.name) in W.FP32_TENSORS:
            return dtype
        return self.dtype

    def read(self, tensor: TensorConfig, pb_tensor) -> torch.Tensor:
        if tensor.dtype == "bool":  # DLPack has no portable bool before v0.8
            return torch.from_numpy(pb_tensor.as_numpy().copy())
        return torch.utils.dlpack.from_dlpack(pb_tensor.to_dlpack())

    def concat(self, arrays: list) -> torch.Tensor:
        return torch.cat(arrays)

    def run(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            args = [batch[t.name].to(self.device, self._compute_dtype(t)) for t in self.inputs]
            outputs = self.module(*args)
        if not isinstance(outputs, tuple):
            outputs = (outputs,)
        return {t.name: o.to(torch_dtype(t)) for t, o in zip(self.outputs, outputs, strict=True)}

    def finish(self) -> None:
        if self.device.type == "cuda":
            # The outputs must be complete before Triton reads them.
            torch.cuda.current_stream(self.device).synchronize()

    def output(self, tensor: TensorConfig, x: torch.Tensor):
        if x.dtype == torch.bool:  # DLPack has no portable bool before v0.8
            return pb_utils.Tensor(tensor.name, x.cpu().numpy())
        return pb_utils.Tensor.from_dlpack(
            tensor.name, torch.utils.dlpack.to_dlpack(x.contiguous())
        )

    def finalize(self) -> None:
        self.module = None
