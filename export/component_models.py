"""The component models: weights (ONNX, or torch modules), host code and ``config.pbtxt``.

Per component, in ``<name>/<version>/``:

- host ``python``: ``model.onnx``, ``model.py`` (onnx_host) and ``component_host.py``;
- host ``onnxruntime``: ``model.onnx`` (Triton's own backend runs it);
- host ``torch``: the diffusers module's weights, ``model.py`` (torch_host),
  ``component_host.py`` and ``wrappers.py`` (no ONNX step).
"""

from __future__ import annotations

import importlib.resources
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sd_pipeline import spec as S
from sd_pipeline.config import Limits

from . import components as C
from . import triton_config as T
from .checkpoint import ExportError
from .options import ExportOptions
from .tensorrt import TRT_COMPONENTS, tensorrt_parameters

__all__ = [
    "BACKENDS",
    "ONNX_NAME",
    "check_host_code",
    "component_config",
    "copy_code",
    "write_component",
]

# Triton backend of each host: the ONNX and torch runners are Python-backend models.
BACKENDS = {"python": "python", "onnxruntime": "onnxruntime", "torch": "python"}
ONNX_NAME = "model.onnx"

# Hand-written parts: package data of ``sd_triton.model_repository`` (the
# top-level ``model_repository/`` folder), so a wheel install finds them too.
_TEMPLATES = Path(str(importlib.resources.files("sd_triton.model_repository")))
HOST_TEMPLATES = {
    "python": _TEMPLATES / "onnx_host" / "model.py",
    "torch": _TEMPLATES / "torch_host" / "model.py",
}
TORCH_HOST_TEMPLATE = HOST_TEMPLATES["torch"]
# Shared by the python and torch hosts: copied beside their model.py.
COMPONENT_HOST_SOURCE = _TEMPLATES / "component_host.py"
WRAPPERS_SOURCE = Path(__file__).resolve().parent / "wrappers.py"


def _host_files(host: str) -> dict[str, Path]:
    """A Python-backend host's code (name in the version folder -> source); none for
    Triton's own backend."""
    if host not in HOST_TEMPLATES:
        return {}
    files = {"model.py": HOST_TEMPLATES[host], COMPONENT_HOST_SOURCE.name: COMPONENT_HOST_SOURCE}
    if host == "torch":
        files[WRAPPERS_SOURCE.name] = WRAPPERS_SOURCE
    return files


def _required(source: Path) -> Path:
    """``source``, package data no exported repository runs without, or an ExportError."""
    if not source.is_file():
        raise ExportError(
            f"{source.name} not found at {source}: the sd-triton install is incomplete "
            "(package data of sd_triton.model_repository); reinstall it"
        )
    return source


def copy_code(files: Mapping[str, Path], version_dir: Path) -> None:
    """Copy each hand-written source to ``version_dir/<name>``; a missing one is an ExportError."""
    for name, source in files.items():
        shutil.copyfile(_required(source), version_dir / name)


def check_host_code(host: str) -> None:
    """Fail before any work when code the repository needs is missing from the install:
    the host's, and ``component_host.py`` (the pipeline model imports it too)."""
    for source in (*_host_files(host).values(), COMPONENT_HOST_SOURCE):
        _required(source)


def _convert(modules: dict[str, Any], folders: tuple[str, ...], dtype: str) -> None:
    """Cast the checkpoint modules in ``folders`` to ``dtype`` (in place)."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    for name in folders:
        if next(modules[name].parameters()).dtype != getattr(torch, dtype):
            # diffusers warns on .to(dtype) when a model has fp32-only modules;
            # SD 1.x models have none.
            level = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()
            try:
                modules[name].to(getattr(torch, dtype))
            finally:
                diffusers_logging.set_verbosity(level)


def _export_onnx(
    component: C.Component,
    modules: dict[str, Any],
    sizes: Mapping[str, int],
    trace_sizes: Mapping[str, int],
    dtype: str,
    version_dir: Path,
    opts: ExportOptions,
) -> Path:
    """Trace ``component`` (converted to ``dtype``) to ``version_dir/model.onnx``."""
    _convert(modules, component.modules, dtype)
    wrapper = component.wrap(modules)
    inputs = C.sample_inputs(component, {**sizes, **trace_sizes}, dtype)
    return C.export_onnx(
        component,
        wrapper,
        inputs,
        version_dir / ONNX_NAME,
        sizes=dict(sizes),
        opset=opts.contents.opset,
        dynamo=opts.contents.dynamo,
    )


def _save_torch_modules(
    component: C.Component, modules: dict[str, Any], dtype: str, version_dir: Path
) -> None:
    """The torch host's weights: the component's diffusers modules, saved in ``dtype``."""
    _convert(modules, component.modules, dtype)
    version_dir.mkdir(parents=True, exist_ok=True)
    for folder in component.modules:
        modules[folder].save_pretrained(version_dir / folder)


def _copy_host_code(host: str, version_dir: Path) -> None:
    """A Python-backend host's code beside the weights: its model.py and the modules it imports."""
    copy_code(_host_files(host), version_dir)


def _host_parameters(name: str, opts: ExportOptions) -> dict[str, Any]:
    """The config parameters each host reads."""
    threads = opts.hosting.intra_op_threads
    if opts.hosting.host == "python":
        # allow_spinning 0: no onnxruntime thread spins on a core the other models need.
        return {"intra_op_num_threads": threads or 0, "allow_spinning": 0}
    if opts.hosting.host == "torch":
        return {
            "component": name,
            "dtype": "float32" if opts.keeps_fp32(name) else "auto",
            "intra_op_threads": threads or 0,
            # GPU tensors from the pipeline's BLS calls stay on the GPU.
            "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
        }
    return {"intra_op_thread_count": threads} if threads else {}


def component_config(
    component: C.Component,
    opts: ExportOptions,
    sizes: Mapping[str, int],
    constants: Mapping[str, Any],
    limits: Limits,
) -> tuple[Any, dict[str, str]]:
    """The ``ModelConfig`` of ``component`` and its tensors' dtypes (before any export)."""
    name, hosting = component.name, opts.hosting
    dtype = opts.component_dtype(name)
    tensors = component.spec.inputs + component.spec.outputs
    tensor_dtypes = {t.name: C.tensor_dtype(name, t, dtype) for t in tensors}
    is_unet = name == S.UNET.name
    max_batch = hosting.unet_max_batch_size if is_unet else hosting.max_batch_size
    config = T.component_config(
        component.spec,
        sizes=sizes,
        dtypes=tensor_dtypes,
        backend=BACKENDS[hosting.host],
        max_batch_size=max_batch,
        dynamic_batching=is_unet,
        max_queue_delay_us=hosting.max_queue_delay_us,
        preferred_batch_sizes=hosting.preferred_batch_sizes,
        parameters=_host_parameters(name, opts),
    )
    config.name = opts.model_name(name)
    # Always an explicit kind: a CPU export runs on the CPU even on a GPU node.
    T.set_instance_group(config, gpu=hosting.on_gpu, count=hosting.component_instances)
    T.set_version_policy(config, opts.naming.keep_versions)
    if hosting.tensorrt and name in TRT_COMPONENTS:
        trt = tensorrt_parameters(
            component,
            dtype,
            sizes=sizes,
            constants=constants,
            limits=limits,
            max_batch=max_batch,
            cache=hosting.trt_cache,
        )
        T.add_tensorrt(config, trt)
    return config, tensor_dtypes


def write_component(
    component: C.Component,
    modules: dict[str, Any],
    sizes: Mapping[str, int],
    trace_sizes: Mapping[str, int],
    opts: ExportOptions,
    folder: Path,
    version: str,
    config: Any,
) -> None:
    """Write ``component`` to ``folder``: ``version/`` (weights, host code) and config."""
    dtype = opts.component_dtype(component.name)
    version_dir = folder / version
    if opts.hosting.host == "torch":
        _save_torch_modules(component, modules, dtype, version_dir)
    else:
        _export_onnx(component, modules, sizes, trace_sizes, dtype, version_dir, opts)
    _copy_host_code(opts.hosting.host, version_dir)
    T.write_config(config, folder)
