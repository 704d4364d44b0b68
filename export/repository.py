"""Export a diffusers Stable Diffusion folder to a complete Triton model repository.

Layout written (see docs/TEAM_NOTES.md)::

    OUT/
      text_encoder/ unet/ vae_encoder/ vae_decoder/ safety_checker/
          config.pbtxt, 1/model.onnx (+ 1/model.py with host "python")
      stable_diffusion/
          config.pbtxt, 1/model.py, 1/sd_pipeline/, 1/assets/...

Every constant the pipeline needs (latent channels, VAE scaling, native
size, size step, text width, dtypes) is read from the checkpoint's configs
and written to ``stable_diffusion/1/assets/pipeline.json``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd_triton.pipeline import spec as S

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

HOSTS = ("python", "onnxruntime")
VERSION = "1"
ONNX_NAME = "model.onnx"
# The public pipeline models (stable_diffusion and, where the contract has
# it, its decoupled streaming twin): same code and assets, own config.
PIPELINE_MODELS: dict[str, S.ModelSpec] = dict(
    getattr(S, "PIPELINES", {S.STABLE_DIFFUSION.name: S.STABLE_DIFFUSION})
)

# The stable_diffusion model's config parameters (request limits), in one
# place. ``max_pixels`` defaults to 4x the model's native area (1024x1024
# for SD 1.x at 512x512). Override or add with ``pipeline_parameters``.
DEFAULT_PIPELINE_PARAMETERS: dict[str, Any] = {
    "max_steps": 150,
    "max_images": 8,
    "max_pixels": None,
}
MAX_PIXELS_FACTOR = 4

# Hand-written parts of the repository, found beside the installed packages.
_REPO_ROOT = Path(__file__).resolve().parents[1]
ONNX_HOST_TEMPLATE = _REPO_ROOT / "model_repository" / "onnx_host" / "model.py"


def _pipeline_source() -> Path:
    """``model_repository/stable_diffusion/1/``: the folder holding ``sd_pipeline/``."""
    return Path(S.__file__).resolve().parents[1]


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


def _check_output(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"output {out} exists and is not a folder")
    entries = [p for p in out.iterdir() if not p.name.startswith(".")]
    if not entries:
        return
    ours = {*C.COMPONENTS, *PIPELINE_MODELS}
    holds_repo = any(
        p.is_dir() and ((p / T.CONFIG_NAME).is_file() or p.name in ours) for p in entries
    )
    if not overwrite:
        what = "already holds a model repository" if holds_repo else "is not empty"
        raise ExportError(f"output folder {out} {what} (use --overwrite to replace it)")
    if not holds_repo:
        raise ExportError(f"output folder {out} is not empty and holds no model repository")


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
    import torch
    from diffusers.utils import logging as diffusers_logging

    for name in component.modules:
        if next(modules[name].parameters()).dtype != getattr(torch, dtype):
            # diffusers warns on .to(dtype) when a model has fp32-only modules;
            # SD 1.x models have none.
            level = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()
            try:
                modules[name].to(getattr(torch, dtype))
            finally:
                diffusers_logging.set_verbosity(level)
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
    source = _pipeline_source()
    if not (source / "sd_pipeline").is_dir():
        raise ExportError(f"pipeline code not found: {source / 'sd_pipeline'}")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "assets")
    shutil.copytree(source / "sd_pipeline", version_dir / "sd_pipeline", ignore=ignore)
    if (source / "model.py").is_file():
        shutil.copyfile(source / "model.py", version_dir / "model.py")
    else:
        log.warning("%s not found: the stable_diffusion model has no model.py", source / "model.py")


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
    onnxruntime: any Triton, also the pip-installed one) or ``"onnxruntime"``
    (Triton's own backend, in NVIDIA's container). ``fp16``: float16
    weights, except the UNet timestep and, unless ``fp16_vae_decoder``, the
    VAE decoder (SD 1.x's overflows in fp16). ``unet_max_batch_size``: the
    UNet's ``max_batch_size`` (dynamic batching across requests);
    ``max_batch_size``: the other components'. ``pipeline_parameters``:
    config parameters of the pipeline models, over
    :data:`DEFAULT_PIPELINE_PARAMETERS`. ``name``: the checkpoint name
    recorded as ``source`` in pipeline.json (default: the source path).
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

    def check(self) -> None:
        if self.host not in HOSTS:
            raise ExportError(f"unknown host {self.host!r}; choose one of {', '.join(HOSTS)}")
        for label in ("unet_max_batch_size", "max_batch_size", "pipeline_instances"):
            if getattr(self, label) < 1:
                raise ExportError(f"{label} must be at least 1, got {getattr(self, label)}")
        if self.host == "python" and not ONNX_HOST_TEMPLATE.is_file():
            raise ExportError(f"Python-backend host template not found: {ONNX_HOST_TEMPLATE}")

    def component_dtype(self, name: str) -> str:
        fp32_only = () if self.fp16_vae_decoder else ("vae_decoder",)
        return "float16" if self.fp16 and name not in fp32_only else "float32"


def _write_component(
    name: str,
    modules: dict[str, Any],
    sizes: dict[str, int],
    trace_sizes: dict[str, int],
    opts: ExportOptions,
    folder: Path,
) -> dict[str, str]:
    """Export one component to ``folder`` (ONNX, config, host); return its tensor dtypes."""
    component = C.COMPONENTS[name]
    dtype = opts.component_dtype(name)
    version_dir = folder / VERSION
    _export_component(
        component, modules, sizes, trace_sizes, dtype, version_dir, opts.opset, opts.dynamo
    )
    tensors = component.spec.inputs + component.spec.outputs
    tensor_dtypes = {t.name: C.tensor_dtype(name, t, dtype) for t in tensors}
    parameters: dict[str, Any] = {}
    if opts.host == "python":
        shutil.copyfile(ONNX_HOST_TEMPLATE, version_dir / "model.py")
        parameters["intra_op_num_threads"] = opts.intra_op_threads or 0
    elif opts.intra_op_threads:
        parameters["intra_op_thread_count"] = opts.intra_op_threads
    is_unet = name == S.UNET.name
    config = T.component_config(
        component.spec,
        sizes=sizes,
        dtypes=tensor_dtypes,
        backend=opts.host,
        max_batch_size=opts.unet_max_batch_size if is_unet else opts.max_batch_size,
        dynamic_batching=is_unet,
        max_queue_delay_us=opts.max_queue_delay_us,
        preferred_batch_sizes=opts.preferred_batch_sizes,
        parameters=parameters,
    )
    T.write_config(config, folder)
    return tensor_dtypes


def _write_pipeline_models(
    ckpt: Checkpoint, pipeline_json: dict[str, Any], opts: ExportOptions, staging: Path
) -> None:
    params = {**DEFAULT_PIPELINE_PARAMETERS, **opts.pipeline_parameters}
    if params.get("max_pixels") is None:
        native_area = pipeline_json["native_height"] * pipeline_json["native_width"]
        params["max_pixels"] = MAX_PIXELS_FACTOR * native_area
    for model_name, model_spec in PIPELINE_MODELS.items():
        version_dir = staging / model_name / VERSION
        version_dir.mkdir(parents=True)
        _copy_pipeline_code(version_dir)
        _write_assets(ckpt, version_dir / "assets", pipeline_json)
        # A decoupled model runs requests on its own threads: one instance.
        decoupled = bool(model_spec.extra.get("decoupled"))
        instances = 1 if decoupled else opts.pipeline_instances
        config = T.pipeline_config(model_spec, parameters=params, instance_count=instances)
        T.write_config(config, staging / model_name)


def _publish(staging: Path, out: Path) -> None:
    """Move the staged models into ``out``, replacing (and dropping stale) models of ours."""
    for n in [*C.COMPONENTS, *PIPELINE_MODELS]:
        if (out / n).exists():
            shutil.rmtree(out / n)
    for folder in staging.iterdir():
        folder.rename(out / folder.name)
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
    src, out = Path(src), Path(out)
    start = time.perf_counter()
    ckpt = inspect_checkpoint(src, safety_checker=opts.safety_checker)
    _check_output(out, overwrite)

    log.info("loading %s (%s)", src, ckpt.pipeline_class)
    modules = load_modules(ckpt)
    constants = pipeline_constants(ckpt.configs)
    sizes = C.fixed_sizes(ckpt.configs)
    trace_sizes = _trace_sizes(constants)
    names = [n for n in C.COMPONENTS if n != "safety_checker" or ckpt.has_safety_checker]

    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".sd-triton-export-", dir=out))
    try:
        # float32 components first: a module shared by two components (the
        # VAE) is converted to float16 only after its float32 export.
        tensor_dtypes: dict[str, dict[str, str]] = {}
        for n in sorted(names, key=lambda n: opts.component_dtype(n) == "float16"):
            t0 = time.perf_counter()
            tensor_dtypes[n] = _write_component(n, modules, sizes, trace_sizes, opts, staging / n)
            size_mb = sum(f.stat().st_size for f in (staging / n / VERSION).iterdir()) / 1e6
            log.info(
                "%-15s %s %7.1f MB  %5.1f s",
                n,
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
        }
        _write_pipeline_models(ckpt, pipeline_json, opts, staging)
        log.info("%-15s assets %5.1f s", ", ".join(PIPELINE_MODELS), time.perf_counter() - t0)
        _make_readable(staging)
        _publish(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info("wrote %s in %.1f s", out, time.perf_counter() - start)
    return out
