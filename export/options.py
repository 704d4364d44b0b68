"""What to export and how to host it: :class:`ExportOptions`, typed, in small groups.

- :class:`Contents`: what goes into the repository (precision, the safety
  checker, the streaming model, how the ONNX files are traced);
- :class:`Hosting`: how Triton runs it (host, GPU / TensorRT, instances,
  batching);
- :class:`Naming`: model names and versions (prefix, new version, versions
  kept);
- ``parameters``: the pipeline models' config parameters over the defaults
  (request limits: ``sd_pipeline.config.Limits``; admission:
  :data:`sd_triton.export.pipeline_models.ADMISSION_DEFAULTS`).

The command line maps its flags onto these (``sd-triton-export --help``).
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from sd_pipeline import spec as S

from .checkpoint import ExportError
from .components import COMPONENTS

__all__ = [
    "HOSTS",
    "PRECISIONS",
    "PRESETS",
    "REFINER_PREFIX",
    "Contents",
    "ExportOptions",
    "Host",
    "Hosting",
    "Naming",
    "Precision",
]

# fp32: float32 everywhere. fp16: float16 weights and tensors (the UNet
# timestep and the safety checker's pass-through images stay float32), the
# VAE too. fp16-vae-fp32: fp16, but the VAE (encoder and decoder) stays float32.
# fp16-vae-auto (``--fp16``): the VAE decides, as diffusers does: it stays
# float32 when the VAE's config says ``force_upcast`` (true, the default, for
# the SD 1.x and SDXL VAEs, which overflow in fp16; diffusers' SDXL pipelines
# then upcast the VAE to encode and to decode) and goes float16 when it says
# false (fp16-safe VAEs); the export resolves it to one of the other two
# (:meth:`ExportOptions.for_vae`).
Precision = Literal["fp32", "fp16", "fp16-vae-fp32", "fp16-vae-auto"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

# python: a Python-backend model runs each ONNX file with onnxruntime (any
# Triton, also the pip-installed one); onnxruntime: Triton's own backend
# (NVIDIA's container); torch: a Python-backend model runs the diffusers
# module itself (fp16 on CUDA, fp32 on CPU; no ONNX step).
Host = Literal["python", "onnxruntime", "torch"]
HOSTS: tuple[str, ...] = get_args(Host)

MODEL_PREFIX_CHARS = frozenset(string.ascii_letters + string.digits + "_-.")

# The components fp16-vae-fp32 keeps float32.
VAE_COMPONENTS = ("vae_encoder", "vae_decoder")

# An SDXL refiner exported beside its base: its models are named
# ``{model_prefix}refiner_{component}``, its assets are the pipeline's ``assets/refiner/``.
REFINER_PREFIX = "refiner_"

# Recommended request defaults of distilled models (``--preset``), as the pipeline
# models' config parameters (a ``--parameter`` overrides them):
# - turbo: SDXL-Turbo / SD-Turbo (diffusers' docs: 1-4 steps, guidance_scale 0.0
#   since the model was trained without it; the checkpoint's own Euler a scheduler
#   with trailing timestep spacing);
# - lcm: Latent Consistency Models (diffusers' docs: 4 steps, LCMScheduler). A
#   distilled UNet with time_cond_proj_dim takes the guidance scale as an embedding
#   (trained on [3, 13]; diffusers' examples use 8.0) with classifier-free guidance
#   off; a UNet without one (an LCM-LoRA fused in) gets 1.0, guidance off
#   (:func:`sd_triton.export.pipeline_models.preset_parameters`).
PRESETS: dict[str, dict[str, int | float | str]] = {
    "turbo": {
        "default_num_inference_steps": 1,
        "default_guidance_scale": 0.0,
        "default_scheduler": "euler_a",
    },
    "lcm": {
        "default_num_inference_steps": 4,
        "default_guidance_scale": 8.0,
        "default_scheduler": "lcm",
    },
}

# The public pipeline models (stable_diffusion and its decoupled streaming
# twin): same code and assets, own config.
PIPELINE_MODELS: dict[str, S.ModelSpec] = dict(S.PIPELINES)


@dataclass(frozen=True)
class Contents:
    """What the repository holds.

    ``safety_checker=False`` drops the checkpoint's safety checker; a
    checkpoint without one (``model_index.json``: null) exports without it
    either way. ``safety_checker_from``: a diffusers checkpoint whose safety
    checker and feature extractor are exported instead (SDXL ships none).
    ``refiner``: an SDXL refiner folder exported beside an SDXL base.
    ``preset``: a key of :data:`PRESETS` (recommended request defaults).
    ``name``: recorded as ``source`` in pipeline.json (default: the source path).
    ``watermark``: the invisible watermark of diffusers' SDXL pipelines
    (``sd_pipeline.watermark``); None: as diffusers does (SDXL when the
    invisible-watermark package is installed, SD 1.x/2.x never).
    """

    precision: Precision = "fp32"
    safety_checker: bool = True
    watermark: bool | None = None
    stream_model: bool = True
    opset: int = 17
    dynamo: bool = False
    name: str | None = None
    safety_checker_from: Path | None = None
    refiner: Path | None = None
    preset: str | None = None


@dataclass(frozen=True)
class Hosting:
    """How Triton runs it.

    ``gpu``: ``KIND_GPU`` instance groups (``component_instances`` per GPU
    for each component, ``pipeline_instances`` for the pipeline); without it
    ``KIND_CPU``, also on a GPU node.
    ``tensorrt`` (host onnxruntime, implies ``gpu``): the TensorRT execution
    provider, engines cached in ``trt_cache``, shape profiles up to the
    request limits (:mod:`.tensorrt`). ``unet_max_batch_size``: the UNet's
    ``max_batch_size`` (dynamic batching across requests); ``max_batch_size``:
    the other components'.
    ``unet_in_pipeline``: the pipeline models run the UNet model's host in their
    own process (one instance each, requests on threads, steps merged there).
    """

    host: Host = "python"
    gpu: bool = False
    tensorrt: bool = False
    trt_cache: str = "/trt_cache"
    component_instances: int = 1
    pipeline_instances: int = 4
    unet_in_pipeline: bool = False
    intra_op_threads: int | None = None
    unet_max_batch_size: int = 16
    max_batch_size: int = 8
    # 0: a lone request never waits; calls that queue while the UNet runs are still
    # merged (benchmarks/results/cpu.md, "Per-step overhead").
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()

    @property
    def on_gpu(self) -> bool:
        return self.gpu or self.tensorrt


@dataclass(frozen=True)
class Naming:
    """Model names and versions.

    ``model_prefix``: a namespace for every model name (several checkpoints
    in one repository). ``new_version``: add version N+1 next to the old ones
    (components keep their ``keep_versions`` latest versions loaded).
    """

    model_prefix: str = ""
    new_version: bool = False
    keep_versions: int = 2


@dataclass(frozen=True)
class ExportOptions:
    """Everything :func:`sd_triton.export.export_repository` can be told."""

    contents: Contents = field(default_factory=Contents)
    hosting: Hosting = field(default_factory=Hosting)
    naming: Naming = field(default_factory=Naming)
    parameters: Mapping[str, int | float | str] = field(default_factory=dict)

    def check(self) -> None:
        """Raise :class:`ExportError` for a value no export can use."""
        c, h, n = self.contents, self.hosting, self.naming
        if c.precision not in PRECISIONS:
            raise ExportError(f"unknown precision {c.precision!r}; choose one of {PRECISIONS}")
        if h.host not in HOSTS:
            raise ExportError(f"unknown host {h.host!r}; choose one of {', '.join(HOSTS)}")
        counts = {
            "unet_max_batch_size": h.unet_max_batch_size,
            "max_batch_size": h.max_batch_size,
            "pipeline_instances": h.pipeline_instances,
            "component_instances": h.component_instances,
            "keep_versions": n.keep_versions,
        }
        for label, value in counts.items():
            if value < 1:
                raise ExportError(f"{label} must be at least 1, got {value}")
        if h.tensorrt and h.host != "onnxruntime":
            raise ExportError("--tensorrt needs --host onnxruntime (Triton's onnxruntime backend)")
        if h.unet_in_pipeline and h.host == "onnxruntime":
            raise ExportError(
                "--unet-in-pipeline runs the UNet model's Python host in the pipeline's "
                "process: it needs --host python or --host torch, not onnxruntime"
            )
        if h.tensorrt and not h.trt_cache:
            raise ExportError("--tensorrt needs an engine cache folder (--trt-cache)")
        if c.preset is not None and c.preset not in PRESETS:
            raise ExportError(f"unknown preset {c.preset!r}; choose one of {', '.join(PRESETS)}")
        if c.safety_checker_from and not c.safety_checker:
            raise ExportError("--safety-checker attaches one, --no-safety-checker leaves it out")
        if not set(n.model_prefix) <= MODEL_PREFIX_CHARS:
            raise ExportError(
                f"model prefix {n.model_prefix!r} may hold only letters, digits, '_', '-', '.'"
            )

    def model_name(self, name: str) -> str:
        """The served name of component or pipeline model ``name``."""
        return f"{self.naming.model_prefix}{name}"

    def pipeline_models(self) -> dict[str, S.ModelSpec]:
        """The pipeline models this export writes (the streaming twin unless left out)."""
        return {
            n: m
            for n, m in PIPELINE_MODELS.items()
            if self.contents.stream_model or not m.extra.get("decoupled")
        }

    def model_names(self) -> list[str]:
        """Every model name this export may own (all components, a refiner's, both
        pipeline models)."""
        names = [*COMPONENTS, *(f"{REFINER_PREFIX}{n}" for n in COMPONENTS), *PIPELINE_MODELS]
        return [self.model_name(n) for n in names]

    def for_refiner(self) -> ExportOptions:
        """The options of the refiner exported beside this base: its components named
        ``refiner_*``, no safety checker of its own, recorded under its own path."""
        contents = replace(
            self.contents,
            refiner=None,
            safety_checker=False,
            safety_checker_from=None,
            name=None,
        )
        naming = replace(self.naming, model_prefix=self.model_name(REFINER_PREFIX))
        return replace(self, contents=contents, naming=naming)

    def for_vae(self, vae_config: Mapping[str, Any]) -> ExportOptions:
        """These options with ``fp16-vae-auto`` resolved by the VAE's config: encoder and
        decoder stay float32 when it says ``force_upcast`` (AutoencoderKL's default: true)."""
        if self.contents.precision != "fp16-vae-auto":
            return self
        upcast = bool(vae_config.get("force_upcast", True))
        precision: Precision = "fp16-vae-fp32" if upcast else "fp16"
        return replace(self, contents=replace(self.contents, precision=precision))

    def keeps_fp32(self, name: str) -> bool:
        """Whether component ``name`` stays float32 whatever the precision."""
        if self.contents.precision == "fp16-vae-auto":
            raise ValueError("precision fp16-vae-auto: resolve it with for_vae() first")
        return name in VAE_COMPONENTS and self.contents.precision != "fp16"

    def component_dtype(self, name: str) -> str:
        """Numpy dtype name of component ``name``'s float weights."""
        fp16 = self.contents.precision != "fp32"
        return "float16" if fp16 and not self.keeps_fp32(name) else "float32"
