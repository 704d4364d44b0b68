"""Export a diffusers Stable Diffusion folder to a complete Triton model repository.

Layout written (see docs/TEAM_NOTES.md)::

    OUT/
      text_encoder/ unet/ vae_encoder/ vae_decoder/ safety_checker/
          config.pbtxt, 1/model.onnx (+ 1/model.py with host "python")
                        (host "torch": 1/model.py, 1/wrappers.py, 1/<module>/ weights)
      stable_diffusion/
          config.pbtxt, 1/model.py, 1/sd_pipeline/, 1/assets/...

Every constant the pipeline needs (latent channels, VAE scaling, native
size, size step, text width, dtypes) is read from the checkpoint's configs
and written to ``stable_diffusion/1/assets/pipeline.json``, with the names
and versions of the component models the pipeline calls.

Several checkpoints share one repository under ``model_prefix`` namespaces
(``sd21_unet``, ..., ``sd21_stable_diffusion``). ``new_version`` writes
version N+1 of every model of the namespace beside the old ones; pipeline
version N calls component version N, so any pipeline version that is loaded
serves exactly the weights it was exported with (rollback: docs/gpu.md).
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import os
import shutil
import string
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd_pipeline import spec as S

from . import components as C
from . import triton_config as T
from .checkpoint import Checkpoint, ExportError, inspect_checkpoint, load_modules

__all__ = [
    "DEFAULT_PIPELINE_PARAMETERS",
    "HOSTS",
    "ExportOptions",
    "export_repository",
    "pipeline_constants",
]

log = logging.getLogger("sd_triton.export")

HOSTS = ("python", "onnxruntime", "torch")
# Triton backend of each host: the ONNX and torch runners are Python-backend models.
BACKENDS = {"python": "python", "onnxruntime": "onnxruntime", "torch": "python"}
VERSION = "1"
ONNX_NAME = "model.onnx"
# The public pipeline models (stable_diffusion and, where the contract has
# it, its decoupled streaming twin): same code and assets, own config.
PIPELINE_MODELS: dict[str, S.ModelSpec] = dict(
    getattr(S, "PIPELINES", {S.STABLE_DIFFUSION.name: S.STABLE_DIFFUSION})
)

# The stable_diffusion models' config parameters, in one place (documented
# in docs/reliability.md). Request limits: ``max_pixels`` defaults to 4x the
# model's native area (1024x1024 for SD 1.x at 512x512), ``max_work``
# (height x width x images x steps) to 400x it. Admission: ``max_queue_size``
# requests may wait (the unary model: Triton's queue policy; the streaming
# model: its own counter, beyond ``max_concurrency`` running), for at most
# ``queue_timeout_s`` seconds (0: no limit). Override or add with
# ``pipeline_parameters``.
DEFAULT_PIPELINE_PARAMETERS: dict[str, Any] = {
    "max_steps": 150,
    "max_images": 8,
    "max_pixels": None,
    "max_work": None,
    "max_prompt_bytes": 16 * 1024,
    "max_queue_size": 32,
    "queue_timeout_s": 120,
}
MAX_PIXELS_FACTOR = 4
MAX_WORK_FACTOR = 400

# Hand-written parts of the repository: package data of ``sd_triton.model_repository``
# (the top-level ``model_repository/`` folder), so a wheel install finds them too.
_TEMPLATES = Path(str(importlib.resources.files("sd_triton.model_repository")))
ONNX_HOST_TEMPLATE = _TEMPLATES / "onnx_host" / "model.py"
TORCH_HOST_TEMPLATE = _TEMPLATES / "torch_host" / "model.py"
PIPELINE_MODEL_TEMPLATE = _TEMPLATES / "stable_diffusion" / "model.py"
WRAPPERS_SOURCE = Path(__file__).resolve().parent / "wrappers.py"
# Shared by the python and torch hosts: copied beside their model.py.
COMPONENT_HOST_SOURCE = _TEMPLATES / "component_host.py"

# TensorRT (onnxruntime backend, --tensorrt): the components it builds engines
# for (the safety checker runs once per request and stays on CUDA), and the
# workspace it may use while building.
TRT_COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
TRT_WORKSPACE_BYTES = 4 << 30
# The TensorRT keys we write; Triton 24.10's onnxruntime backend knows them
# (the shape profiles since onnxruntime_backend#237, February 2024) and refuses to
# load a model with a key it does not know.
TRT_PARAMETERS = (
    "precision_mode",
    "max_workspace_size_bytes",
    "trt_engine_cache_enable",
    "trt_engine_cache_path",
    "trt_profile_min_shapes",
    "trt_profile_opt_shapes",
    "trt_profile_max_shapes",
)
MODEL_PREFIX_CHARS = frozenset(string.ascii_letters + string.digits + "_-.")


def _native_side(sample_size: Any) -> tuple[int, int]:
    if isinstance(sample_size, list | tuple):
        return int(sample_size[0]), int(sample_size[1])
    return int(sample_size), int(sample_size)


def pipeline_constants(configs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The model constants of ``pipeline.json``, read from a checkpoint's configs."""
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    vae_scale_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    unet_downsamplings = len(unet["down_block_types"]) - 1
    height, width = _native_side(unet["sample_size"])
    constants = {
        "latent_channels": int(vae["latent_channels"]),
        "unet_in_channels": int(unet["in_channels"]),
        "vae_scaling_factor": float(vae["scaling_factor"]),
        "vae_shift_factor": vae.get("shift_factor"),
        "vae_scale_factor": vae_scale_factor,
        "native_height": height * vae_scale_factor,
        "native_width": width * vae_scale_factor,
        "size_step": vae_scale_factor * 2**unet_downsamplings,
        "text_width": int(text["hidden_size"]),
        "tokenizer_max_length": int(configs["tokenizer"]["model_max_length"]),
        "prediction_type": configs["scheduler"].get("prediction_type", "epsilon"),
    }
    if "safety_checker" in configs:
        side = int(configs["safety_checker"]["vision_config"]["image_size"])
        constants["clip_image_size"] = side
    return constants


def _check_output(out: Path, opts: ExportOptions, overwrite: bool) -> None:
    """``out`` may be new, empty, or a repository: with models of this export only
    when replacing them (``overwrite``) or adding a version (``new_version``)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"output {out} exists and is not a folder")
    entries = [p for p in out.iterdir() if not p.name.startswith(".")]
    if not entries:
        return
    ours = set(opts.model_names())
    if any(p.name in ours for p in entries):
        if overwrite or opts.new_version:
            return
        raise ExportError(
            f"output folder {out} already holds a model repository "
            "(use --overwrite to replace it, or --new-version to add a version)"
        )
    if any(p.is_dir() and (p / T.CONFIG_NAME).is_file() for p in entries):
        return  # other models (another --model-prefix): ours go beside them
    if not overwrite:
        raise ExportError(f"output folder {out} is not empty (use --overwrite to replace it)")
    raise ExportError(f"output folder {out} is not empty and holds no model repository")


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


def _export_component(
    component: C.Component,
    modules: dict[str, Any],
    sizes: dict[str, int],
    trace_sizes: dict[str, int],
    dtype: str,
    version_dir: Path,
    opset: int,
    dynamo: bool,
) -> Path:
    _convert(modules, component.modules, dtype)
    wrapper = component.wrap(modules)
    inputs = C.sample_inputs(component, {**sizes, **trace_sizes}, dtype)
    return C.export_onnx(
        component,
        wrapper,
        inputs,
        version_dir / ONNX_NAME,
        sizes=sizes,
        opset=opset,
        dynamo=dynamo,
    )


def _save_torch_component(
    component: C.Component, modules: dict[str, Any], dtype: str, version_dir: Path
) -> None:
    """The torch host: its model.py, the wrappers it runs, the module weights (no ONNX)."""
    _convert(modules, component.modules, dtype)
    version_dir.mkdir(parents=True, exist_ok=True)
    for folder in component.modules:
        modules[folder].save_pretrained(version_dir / folder)


def _trace_sizes(constants: Mapping[str, Any]) -> dict[str, int]:
    """Dynamic-dim sizes to trace with: small, non-square, valid for the UNet."""
    latent_step = constants["size_step"] // constants["vae_scale_factor"]
    lh, lw = 3 * latent_step, 5 * latent_step
    f = constants["vae_scale_factor"]
    return {S.BATCH: 2, "latent_height": lh, "latent_width": lw, "height": lh * f, "width": lw * f}


def _write_assets(ckpt: Checkpoint, assets: Path, pipeline_json: dict[str, Any]) -> None:
    tokenizer = assets / "tokenizer"
    tokenizer.mkdir(parents=True)
    for f in ckpt.tokenizer_files:
        shutil.copyfile(f, tokenizer / f.name)
    for folder, name in (
        ("scheduler", "scheduler_config.json"),
        ("feature_extractor", "preprocessor_config.json"),
    ):
        src = ckpt.path / folder / name
        if src.is_file():
            (assets / folder).mkdir(parents=True)
            shutil.copyfile(src, assets / folder / name)
    (assets / "pipeline.json").write_text(json.dumps(pipeline_json, indent=2) + "\n")


def _copy_pipeline_code(version_dir: Path) -> None:
    """The pipeline model: its ``model.py`` and the installed ``sd_pipeline`` package."""
    package = Path(S.__file__).resolve().parent
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(package, version_dir / "sd_pipeline", ignore=ignore)
    shutil.copyfile(PIPELINE_MODEL_TEMPLATE, version_dir / "model.py")


def _make_readable(out: Path) -> None:
    """Folders 755, files 644: the server may run as another user."""
    for root, dirs, files in os.walk(out):
        for d in dirs:
            os.chmod(Path(root) / d, 0o755)
        for f in files:
            os.chmod(Path(root) / f, 0o644)


@dataclass(frozen=True)
class ExportOptions:
    """What to export and how; the keyword arguments of :func:`export_repository`.

    ``host``: ``"python"`` (a Python-backend model runs each ONNX file with
    onnxruntime: any Triton, also the pip-installed one), ``"onnxruntime"``
    (Triton's own backend, in NVIDIA's container) or ``"torch"`` (a
    Python-backend model runs the diffusers module itself: fp16 on CUDA, fp32
    on CPU; no ONNX step). ``fp16``: float16
    weights, except the UNet timestep and, unless ``fp16_vae_decoder``, the
    VAE decoder (SD 1.x's overflows in fp16). ``unet_max_batch_size``: the
    UNet's ``max_batch_size`` (dynamic batching across requests);
    ``max_batch_size``: the other components'. ``pipeline_parameters``:
    config parameters of the pipeline models, over
    :data:`DEFAULT_PIPELINE_PARAMETERS`. ``name``: the checkpoint name
    recorded as ``source`` in pipeline.json (default: the source path).

    Deployment: ``gpu``: ``KIND_GPU`` instance groups (``component_instances``
    per GPU for each component, ``pipeline_instances`` for the pipeline);
    ``tensorrt`` (host onnxruntime, implies ``gpu``): the TensorRT execution
    provider, FP16 where the weights are, engines cached in ``trt_cache``,
    shape profiles from one image at the smallest size up to
    ``unet_max_batch_size`` / ``max_batch_size`` at ``trt_max_size`` pixels a
    side (default twice the native size). ``model_prefix``: a namespace for
    every model name. ``new_version``: add version N+1 next to the old ones
    (components keep their ``keep_versions`` latest versions loaded).
    ``stream_model``: also write the streaming twin.
    """

    host: str = "python"
    fp16: bool = False
    fp16_vae_decoder: bool = False
    opset: int = 17
    dynamo: bool = False
    unet_max_batch_size: int = 16
    max_batch_size: int = 8
    max_queue_delay_us: int = 2000
    preferred_batch_sizes: tuple[int, ...] = ()
    intra_op_threads: int | None = None
    safety_checker: bool = True
    pipeline_instances: int = 4
    pipeline_parameters: Mapping[str, Any] = field(default_factory=dict)
    name: str | None = None
    gpu: bool = False
    tensorrt: bool = False
    trt_cache: str = "/trt_cache"
    trt_max_size: int | None = None
    component_instances: int = 1
    model_prefix: str = ""
    new_version: bool = False
    keep_versions: int = 2
    stream_model: bool = True

    def check(self) -> None:
        if self.host not in HOSTS:
            raise ExportError(f"unknown host {self.host!r}; choose one of {', '.join(HOSTS)}")
        for label in (
            "unet_max_batch_size",
            "max_batch_size",
            "pipeline_instances",
            "component_instances",
            "keep_versions",
        ):
            if getattr(self, label) < 1:
                raise ExportError(f"{label} must be at least 1, got {getattr(self, label)}")
        if self.host == "python" and not ONNX_HOST_TEMPLATE.is_file():
            raise ExportError(f"Python-backend host template not found: {ONNX_HOST_TEMPLATE}")
        if self.host == "torch" and not TORCH_HOST_TEMPLATE.is_file():
            raise ExportError(f"torch host template not found: {TORCH_HOST_TEMPLATE}")
        if self.tensorrt and self.host != "onnxruntime":
            raise ExportError("--tensorrt needs --host onnxruntime (Triton's onnxruntime backend)")
        if self.tensorrt and not self.trt_cache:
            raise ExportError("--tensorrt needs an engine cache folder (--trt-cache)")
        if not set(self.model_prefix) <= MODEL_PREFIX_CHARS:
            raise ExportError(
                f"model prefix {self.model_prefix!r} may hold only letters, digits, '_', '-', '.'"
            )

    @property
    def on_gpu(self) -> bool:
        return self.gpu or self.tensorrt

    def model_name(self, name: str) -> str:
        """The served name of component or pipeline model ``name``."""
        return f"{self.model_prefix}{name}"

    def pipeline_models(self) -> dict[str, S.ModelSpec]:
        return {
            n: m
            for n, m in PIPELINE_MODELS.items()
            if self.stream_model or not m.extra.get("decoupled")
        }

    def model_names(self) -> list[str]:
        """Every model name this export may own (all components, both pipeline models)."""
        return [self.model_name(n) for n in (*C.COMPONENTS, *PIPELINE_MODELS)]

    def keeps_fp32(self, name: str) -> bool:
        """Components that stay float32 in any precision: SD 1.x's VAE decoder overflows in fp16."""
        return name == "vae_decoder" and not self.fp16_vae_decoder

    def component_dtype(self, name: str) -> str:
        return "float16" if self.fp16 and not self.keeps_fp32(name) else "float32"


def _trt_profiles(
    component: C.Component,
    sizes: Mapping[str, int],
    constants: Mapping[str, Any],
    opts: ExportOptions,
    max_batch: int,
) -> dict[str, str]:
    """TensorRT shape profiles: one image at the smallest size, the typical call at the
    native size (the UNet: 2 samples, classifier-free guidance), the most at ``trt_max_size``."""
    f, step = constants["vae_scale_factor"], constants["size_step"]
    top = opts.trt_max_size or 2 * max(constants["native_height"], constants["native_width"])
    if top < step or top % step:
        raise ExportError(f"--trt-max-size {top} must be a positive multiple of {step}")
    typical = min(2, max_batch) if component.name == S.UNET.name else 1
    points = {
        "min": (1, step, step),
        "opt": (typical, constants["native_height"], constants["native_width"]),
        "max": (max_batch, top, top),
    }
    profiles = {}
    for label, (batch, height, width) in points.items():
        dynamic = {S.BATCH: batch, "height": height, "width": width}
        dynamic.update(latent_height=height // f, latent_width=width // f)
        shapes = [
            f"{t.name}:" + "x".join(map(str, C.resolve(C.model_dims(t), {**sizes, **dynamic})))
            for t in component.spec.inputs
        ]
        profiles[f"trt_profile_{label}_shapes"] = ",".join(shapes)
    return profiles


def _component_config(
    name: str, opts: ExportOptions, sizes: Mapping[str, int], constants: Mapping[str, Any]
) -> tuple[Any, dict[str, str]]:
    """The ``ModelConfig`` of component ``name`` and its tensors' dtypes (before any export)."""
    component = C.COMPONENTS[name]
    dtype = opts.component_dtype(name)
    tensors = component.spec.inputs + component.spec.outputs
    tensor_dtypes = {t.name: C.tensor_dtype(name, t, dtype) for t in tensors}
    parameters: dict[str, Any] = {}
    if opts.host == "python":
        parameters["intra_op_num_threads"] = opts.intra_op_threads or 0
    elif opts.host == "torch":
        parameters.update(
            component=name,
            dtype="float32" if opts.keeps_fp32(name) else "auto",
            intra_op_threads=opts.intra_op_threads or 0,
            # GPU tensors from the pipeline's BLS calls stay on the GPU.
            FORCE_CPU_ONLY_INPUT_TENSORS="no",
        )
    elif opts.intra_op_threads:
        parameters["intra_op_thread_count"] = opts.intra_op_threads
    is_unet = name == S.UNET.name
    max_batch = opts.unet_max_batch_size if is_unet else opts.max_batch_size
    config = T.component_config(
        component.spec,
        sizes=sizes,
        dtypes=tensor_dtypes,
        backend=BACKENDS[opts.host],
        max_batch_size=max_batch,
        dynamic_batching=is_unet,
        max_queue_delay_us=opts.max_queue_delay_us,
        preferred_batch_sizes=opts.preferred_batch_sizes,
        parameters=parameters,
    )
    config.name = opts.model_name(name)
    if opts.on_gpu:
        T.set_instance_group(config, gpu=True, count=opts.component_instances)
    elif opts.component_instances != 1:
        T.set_instance_group(config, gpu=None, count=opts.component_instances)
    T.set_version_policy(config, opts.keep_versions)
    if opts.tensorrt and name in TRT_COMPONENTS:
        trt = {
            "precision_mode": "FP16" if dtype == "float16" else "FP32",
            "max_workspace_size_bytes": TRT_WORKSPACE_BYTES,
            "trt_engine_cache_enable": 1,
            "trt_engine_cache_path": opts.trt_cache,
        }
        trt.update(_trt_profiles(component, sizes, constants, opts, max_batch))
        T.add_tensorrt(config, trt)
    return config, tensor_dtypes


def _write_component(
    name: str,
    modules: dict[str, Any],
    sizes: dict[str, int],
    trace_sizes: dict[str, int],
    opts: ExportOptions,
    folder: Path,
    version: str,
    config: Any,
) -> None:
    """Write component ``name`` to ``folder``: ``version/`` (ONNX or torch weights, host) and config."""
    component = C.COMPONENTS[name]
    dtype = opts.component_dtype(name)
    version_dir = folder / version
    if opts.host == "torch":
        _save_torch_component(component, modules, dtype, version_dir)
    else:
        _export_component(
            component, modules, sizes, trace_sizes, dtype, version_dir, opts.opset, opts.dynamo
        )
    _copy_host_files(opts.host, version_dir)
    T.write_config(config, folder)


def _copy_host_files(host: str, version_dir: Path) -> None:
    """The Python-backend host's code beside the weights: its model.py and the modules it imports."""
    if host == "onnxruntime":
        return  # Triton's own backend: no code
    template = ONNX_HOST_TEMPLATE if host == "python" else TORCH_HOST_TEMPLATE
    shutil.copyfile(template, version_dir / "model.py")
    if COMPONENT_HOST_SOURCE.is_file():
        shutil.copyfile(COMPONENT_HOST_SOURCE, version_dir / COMPONENT_HOST_SOURCE.name)
    if host == "torch":
        shutil.copyfile(WRAPPERS_SOURCE, version_dir / "wrappers.py")


def _write_pipeline_models(
    ckpt: Checkpoint,
    pipeline_json: dict[str, Any],
    opts: ExportOptions,
    staging: Path,
    version: str = VERSION,
) -> None:
    params = {**DEFAULT_PIPELINE_PARAMETERS, **opts.pipeline_parameters}
    if params.get("max_pixels") is None:
        native_area = pipeline_json["native_height"] * pipeline_json["native_width"]
        params["max_pixels"] = MAX_PIXELS_FACTOR * native_area
    if params.get("max_work") is None:
        native_area = pipeline_json["native_height"] * pipeline_json["native_width"]
        params["max_work"] = MAX_WORK_FACTOR * native_area
    for base_name, model_spec in opts.pipeline_models().items():
        model_name = opts.model_name(base_name)
        version_dir = staging / model_name / version
        version_dir.mkdir(parents=True)
        _copy_pipeline_code(version_dir)
        _write_assets(ckpt, version_dir / "assets", pipeline_json)
        # A decoupled model runs requests on its own threads: one instance.
        decoupled = bool(model_spec.extra.get("decoupled"))
        instances = 1 if decoupled else opts.pipeline_instances
        config = T.pipeline_config(
            model_spec,
            parameters=params,
            instance_count=instances,
            max_queue_size=int(params.get("max_queue_size") or 0),
            queue_timeout_s=float(params.get("queue_timeout_s") or 0),
        )
        config.name = model_name
        if opts.on_gpu:
            T.set_instance_group(config, gpu=True, count=instances)
        # The served pipeline version picks the component versions (pipeline.json).
        T.set_version_policy(config, 1)
        T.write_config(config, staging / model_name)


def _versions(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def _next_version(out: Path, opts: ExportOptions) -> str:
    """One more than the highest version of any model of this export's namespace."""
    found = [v for name in opts.model_names() for v in _versions(out / name)]
    return str(max(found, default=0) + 1)


# What every version of a model shares from its one config.pbtxt and must agree on.
_SHARED_FIELDS = ("backend", "max_batch_size", "input", "output", "model_transaction_policy")


def _check_compatible(config: Any, existing: Path) -> None:
    """A new version must keep the contract the existing versions are served with."""
    if not (existing / T.CONFIG_NAME).is_file():
        return
    old = T.read_config(existing)
    for name in _SHARED_FIELDS:
        if getattr(old, name) != getattr(config, name):
            raise ExportError(
                f"a new version of {config.name} would change its {name} (one config.pbtxt "
                "serves every version); export with --overwrite, or under another --model-prefix"
            )


def _publish(staging: Path, out: Path, opts: ExportOptions, replace: bool) -> None:
    """Move the staged models into ``out``.

    ``replace``: drop every model of this namespace first (also stale ones).
    Otherwise a staged model new to ``out`` moves in whole, and one that
    exists gets the staged version folder and config.pbtxt (the config last).
    """
    if replace:
        for name in opts.model_names():
            if (out / name).exists():
                shutil.rmtree(out / name)
    for folder in staging.iterdir():
        dest = out / folder.name
        if not dest.exists():
            folder.rename(dest)
            continue
        for child in sorted(folder.iterdir(), key=lambda p: p.name == T.CONFIG_NAME):
            os.replace(child, dest / child.name)
        folder.rmdir()
    staging.rmdir()


def export_repository(
    src: str | Path, out: str | Path, *, overwrite: bool = False, **options: Any
) -> Path:
    """Export the diffusers SD folder ``src`` to the Triton model repository ``out``.

    ``options`` are :class:`ExportOptions`' fields (``host="python"``,
    ``fp16=False``, ``unet_max_batch_size=16``, ...). The models are written
    to a hidden staging folder inside ``out`` and moved into place at the
    end, so a failed export leaves ``out`` as it was. Raises
    :class:`ExportError` for a bad checkpoint, output folder or option.
    """
    opts = ExportOptions(**options)
    opts.check()
    if overwrite and opts.new_version:
        raise ExportError("--overwrite replaces the models, --new-version adds one: choose one")
    src, out = Path(src), Path(out)
    start = time.perf_counter()
    ckpt = inspect_checkpoint(src, safety_checker=opts.safety_checker)
    _check_output(out, opts, overwrite)
    version = _next_version(out, opts) if opts.new_version else VERSION

    log.info("loading %s (%s)", src, ckpt.pipeline_class)
    modules = load_modules(ckpt)
    constants = pipeline_constants(ckpt.configs)
    sizes = C.fixed_sizes(ckpt.configs)
    trace_sizes = _trace_sizes(constants)
    names = [n for n in C.COMPONENTS if n != "safety_checker" or ckpt.has_safety_checker]
    configs, tensor_dtypes = {}, {}
    for n in names:
        configs[n], tensor_dtypes[n] = _component_config(n, opts, sizes, constants)
        if opts.new_version:
            _check_compatible(configs[n], out / configs[n].name)
    if opts.new_version and not opts.stream_model:
        stream = [
            out / opts.model_name(n) for n in PIPELINE_MODELS if n not in opts.pipeline_models()
        ]
        for folder in (f for f in stream if f.is_dir()):
            log.warning("%s keeps its old versions only (export without --no-stream-model)", folder)

    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".sd-triton-export-", dir=out))
    try:
        # float32 components first: a module shared by two components (the
        # VAE) is converted to float16 only after its float32 export.
        for n in sorted(names, key=lambda n: opts.component_dtype(n) == "float16"):
            t0 = time.perf_counter()
            folder = staging / opts.model_name(n)
            _write_component(n, modules, sizes, trace_sizes, opts, folder, version, configs[n])
            files = (f for f in (folder / version).rglob("*") if f.is_file())
            size_mb = sum(f.stat().st_size for f in files) / 1e6
            log.info(
                "%-22s %s %7.1f MB  %5.1f s",
                opts.model_name(n),
                opts.component_dtype(n),
                size_mb,
                time.perf_counter() - t0,
            )
        t0 = time.perf_counter()
        pipeline_json = {
            **constants,
            "unet_max_batch_size": opts.unet_max_batch_size,
            "dtype": "float16" if opts.fp16 else "float32",
            "component_dtypes": {n: opts.component_dtype(n) for n in names},
            "tensor_dtypes": {n: tensor_dtypes[n] for n in names},
            "safety_checker": ckpt.has_safety_checker,
            "host": opts.host,
            "source": opts.name or str(src.resolve()),
            "pipeline_class": ckpt.pipeline_class,
            # The models the pipeline calls: names and the versions exported with it.
            "model_prefix": opts.model_prefix,
            "version": int(version),
            "component_models": {n: opts.model_name(n) for n in names},
            "component_versions": {n: int(version) for n in names},
        }
        _write_pipeline_models(ckpt, pipeline_json, opts, staging, version)
        pipelines = [opts.model_name(n) for n in opts.pipeline_models()]
        log.info("%-22s assets %5.1f s", ", ".join(pipelines), time.perf_counter() - t0)
        if opts.new_version:
            for folder in staging.iterdir():
                _check_compatible(T.read_config(folder), out / folder.name)
        _make_readable(staging)
        _publish(staging, out, opts, replace=overwrite)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info("wrote %s (version %s) in %.1f s", out, version, time.perf_counter() - start)
    return out
