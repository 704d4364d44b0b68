"""Export a diffusers Stable Diffusion folder to a complete Triton model repository.

Layout written (see docs/development.md)::

    OUT/
      text_encoder/ [text_encoder_2/] unet/ vae_encoder/ vae_decoder/ [safety_checker/]
          config.pbtxt, 1/ weights and host code      (component_models)
      [refiner_text_encoder_2/ refiner_unet/ refiner_vae_encoder/ refiner_vae_decoder/]
      stable_diffusion/ stable_diffusion_stream/
          config.pbtxt, 1/model.py, 1/sd_pipeline/, 1/assets/...   (pipeline_models)

The components depend on the checkpoint's family (``components.FAMILY_COMPONENTS``).
An SDXL base may take a refiner (``Contents.refiner``): its components are exported
beside the base's under ``refiner_`` (after the model prefix), and its tokenizer,
scheduler and own ``pipeline.json`` go to the pipeline models' ``assets/refiner/``.

The steps: check the options, the checkpoint(s) and the output folder
(:mod:`.publish`); load the modules; plan every config before writing
anything; write components and pipeline models to a staging folder; move
them into place.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from sd_pipeline import spec as S
from sd_pipeline.config import Limits
from sd_pipeline.watermark import diffusers_default as diffusers_watermarks

from . import components as C
from . import publish as P
from . import triton_config as T
from .adapters import pipeline_record
from .checkpoint import (
    Checkpoint,
    ExportError,
    attach_safety_checker,
    family,
    inspect_checkpoint,
    load_modules,
)
from .component_models import check_host_code, component_config, write_component
from .controlnet import ControlNetSource, add_controlnets
from .controlnet import check_fit as check_controlnet_fit
from .controlnet import check_request as check_controlnets
from .options import PIPELINE_MODELS, REFINER_PREFIX, ExportOptions
from .pipeline_models import (
    pipeline_constants,
    pipeline_parameters,
    pipeline_settings,
    request_limits,
    write_pipeline_models,
)

__all__ = ["export_repository"]

log = logging.getLogger("sd_triton.export")


@dataclass(frozen=True)
class _Plan:
    """Everything decided before a file is written."""

    components: dict[str, C.Component]  # the components exported, by name
    constants: dict[str, Any]  # pipeline.json's model constants
    sizes: dict[str, int]  # fixed symbolic dims
    trace_sizes: dict[str, int]  # dynamic dims to trace with
    limits: Limits
    configs: dict[str, Any]  # component -> ModelConfig
    tensor_dtypes: dict[str, dict[str, str]]

    @property
    def names(self) -> list[str]:
        return list(self.components)


def _trace_sizes(constants: Mapping[str, Any]) -> dict[str, int]:
    """Dynamic-dim sizes to trace with: small, non-square, valid for the UNet; a text
    sequence of two prompt chunks."""
    latent_step = constants["size_step"] // constants["vae_scale_factor"]
    lh, lw = 3 * latent_step, 5 * latent_step
    f = constants["vae_scale_factor"]
    return {
        S.BATCH: 2,
        "latent_height": lh,
        "latent_width": lw,
        "height": lh * f,
        "width": lw * f,
        "text_sequence": 2 * constants["tokenizer_max_length"],
    }


def _plan(ckpt: Checkpoint, opts: ExportOptions, out: Path) -> _Plan:
    constants = pipeline_constants(ckpt.configs)
    sizes = C.fixed_sizes(ckpt.configs)
    limits = request_limits(opts, constants)
    components = C.checkpoint_components(ckpt.configs, safety_checker=ckpt.has_safety_checker)
    configs, tensor_dtypes = {}, {}
    for n, component in components.items():
        configs[n], tensor_dtypes[n] = component_config(component, opts, sizes, constants, limits)
        if opts.naming.new_version:
            P.check_compatible(configs[n], out / configs[n].name)
    trace = _trace_sizes(constants)
    return _Plan(components, constants, sizes, trace, limits, configs, tensor_dtypes)


def _pipeline_json(
    ckpt: Checkpoint, plan: _Plan, opts: ExportOptions, src: Path, version: str
) -> dict[str, Any]:
    names = plan.names
    return {
        **plan.constants,
        **pipeline_settings(ckpt.index, plan.constants["family"]),
        "refiner": bool(opts.contents.refiner),
        "unet_max_batch_size": opts.hosting.unet_max_batch_size,
        "text_encoder_max_batch_size": opts.hosting.max_batch_size,
        "dtype": opts.component_dtype("unet"),
        "component_dtypes": {n: opts.component_dtype(n) for n in names},
        "tensor_dtypes": {n: plan.tensor_dtypes[n] for n in names},
        "safety_checker": ckpt.has_safety_checker,
        "watermark": (
            diffusers_watermarks(family(ckpt.configs))
            if opts.contents.watermark is None
            else opts.contents.watermark
        ),
        "host": opts.hosting.host,
        "source": opts.contents.name or str(src.resolve()),
        # A single-file checkpoint's web UI hash and stem (sd_triton.export.single_file).
        "model_hash": opts.parameters.get("model_hash"),
        "model_name": opts.parameters.get("model_name"),
        "pipeline_class": ckpt.pipeline_class,
        # LoRAs and embeddings fused at export (--lora, --embedding): names, weights, hashes.
        **pipeline_record(src),
        # The models the pipeline calls: names and the versions exported with it.
        "model_prefix": opts.naming.model_prefix,
        "version": int(version),
        "component_models": {n: opts.model_name(n) for n in names},
        "component_versions": {n: int(version) for n in names},
        # For a pipeline that runs the UNet's host itself (--unet-in-pipeline); keys sorted:
        # protobuf maps (the config's parameters) iterate in no fixed order.
        "unet_config": json.loads(
            json_format.MessageToJson(
                plan.configs["unet"], preserving_proto_field_name=True, sort_keys=True
            )
        ),
    }


def _write_components(
    plan: _Plan, modules: dict[str, Any], opts: ExportOptions, staging: Path, version: str
) -> None:
    # float32 components first: a module shared by two components (the VAE)
    # is converted to float16 only after its float32 export.
    for n in sorted(plan.names, key=lambda n: opts.component_dtype(n) == "float16"):
        t0 = time.perf_counter()
        folder = staging / opts.model_name(n)
        write_component(
            plan.components[n],
            modules,
            plan.sizes,
            plan.trace_sizes,
            opts,
            folder,
            version,
            plan.configs[n],
        )
        files = (f for f in (folder / version).rglob("*") if f.is_file())
        size_mb = sum(f.stat().st_size for f in files) / 1e6
        log.info(
            "%-22s %s %7.1f MB  %5.1f s",
            opts.model_name(n),
            opts.component_dtype(n),
            size_mb,
            time.perf_counter() - t0,
        )


def _log_checkpoint(ckpt: Checkpoint) -> None:
    log.info("loading %s (%s, family %s)", ckpt.path, ckpt.pipeline_class, ckpt.family)
    donor = ckpt.sources.get("safety_checker")
    if donor is not None:
        log.info("attaching the safety checker of %s", donor)
    elif ckpt.ships_without_safety_checker:
        log.info("%s has no safety checker (model_index.json): exporting without one", ckpt.path)
    elif not ckpt.has_safety_checker:
        log.info("leaving out the safety checker of %s (--no-safety-checker)", ckpt.path)


def _inspect(src: Path, opts: ExportOptions) -> Checkpoint:
    """The checkpoint to export, with the safety checker it is given (``--safety-checker``)."""
    donor = opts.contents.safety_checker_from
    ckpt = inspect_checkpoint(src, safety_checker=opts.contents.safety_checker and not donor)
    if donor:
        attach_safety_checker(ckpt, donor)
    return ckpt


def _inspect_refiner(base: Checkpoint, opts: ExportOptions) -> Checkpoint | None:
    """The refiner to export beside ``base`` (``--refiner``), checked to fit it."""
    if not opts.contents.refiner:
        return None
    refiner = inspect_checkpoint(opts.contents.refiner, safety_checker=False)
    if base.family != "sdxl":
        raise ExportError(f"a refiner goes with an SDXL base; {base.path} is {base.family}")
    if refiner.family != "sdxl-refiner":
        raise ExportError(f"{refiner.path} is not an SDXL refiner (its family is {refiner.family})")
    channels = [c["vae"].get("latent_channels", 4) for c in (base.configs, refiner.configs)]
    if channels[0] != channels[1]:
        raise ExportError(
            f"the refiner {refiner.path} has {channels[1]} latent channels, the base {channels[0]}: "
            "it cannot continue the base's latents"
        )
    return refiner


def _resolve_precision(opts: ExportOptions, ckpt: Checkpoint) -> ExportOptions:
    """``fp16-vae-auto`` (``--fp16``) made concrete by the VAE's ``force_upcast``."""
    resolved = opts.for_vae(ckpt.configs["vae"])
    if resolved is not opts:
        upcast = resolved.keeps_fp32("vae_decoder")
        log.info(
            "VAE config: force_upcast %s, so the VAE encoder and decoder are %s",
            str(upcast).lower(),
            resolved.component_dtype("vae_decoder"),
        )
    return resolved


def _export_components(
    ckpt: Checkpoint, opts: ExportOptions, out: Path, staging: Path, version: str
) -> tuple[ExportOptions, _Plan]:
    """Load ``ckpt``, plan its components and write them to ``staging``; the options with
    the precision resolved, and the plan."""
    _log_checkpoint(ckpt)
    modules = load_modules(ckpt)
    opts = _resolve_precision(opts, ckpt)
    plan = _plan(ckpt, opts, out)
    _write_components(plan, modules, opts, staging, version)
    return opts, plan


def _warn_stale_stream_model(out: Path, opts: ExportOptions) -> None:
    if opts.naming.new_version and not opts.contents.stream_model:
        for n in PIPELINE_MODELS:
            folder = out / opts.model_name(n)
            if n not in opts.pipeline_models() and folder.is_dir():
                log.warning("%s keeps its old versions only (export with the stream model)", folder)


def export_repository(
    src: str | Path,
    out: str | Path,
    options: ExportOptions | None = None,
    *,
    overwrite: bool = False,
    controlnets: Mapping[str, Path | ControlNetSource] | None = None,
) -> Path:
    """Export the diffusers SD folder ``src`` to the Triton model repository ``out``.

    ``options``: :class:`ExportOptions` (default: fp32, the Python-backend
    ONNX host, on the CPU). The models are written to a hidden staging folder
    inside ``out`` and moved into place at the end, so a failed export leaves
    ``out`` as it was. Raises :class:`ExportError` for a bad checkpoint,
    output folder or option. ``controlnets``: NAME -> diffusers ControlNet folder or single
    file (:class:`~.controlnet.ControlNetSource`), each exported beside the UNet with a
    controlled UNet (:mod:`.controlnet`).
    """
    opts = options or ExportOptions()
    opts.check()
    check_host_code(opts.hosting.host)
    check_controlnets(controlnets or {}, opts)
    if overwrite and opts.naming.new_version:
        raise ExportError("--overwrite replaces the models, --new-version adds one: choose one")
    src, out = Path(src), Path(out)
    start = time.perf_counter()
    ckpt = _inspect(src, opts)
    refiner = _inspect_refiner(ckpt, opts)
    scale = pipeline_constants(ckpt.configs)["vae_scale_factor"]
    check_controlnet_fit(controlnets or {}, ckpt.configs["unet"], scale)
    P.check_output(out, opts, overwrite)
    version = P.next_version(out, opts)
    _warn_stale_stream_model(out, opts)

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".sd-triton-export-", dir=out))
    try:
        # The refiner's precision follows its own VAE: it starts from the options given.
        base_opts, plan = _export_components(ckpt, opts, out, staging, version)
        add_controlnets(plan, ckpt, controlnets or {}, base_opts, staging, version)
        extra_assets = {}
        if refiner is not None:
            r_opts, r_plan = _export_components(refiner, opts.for_refiner(), out, staging, version)
            r_json = _pipeline_json(refiner, r_plan, r_opts, refiner.path, version)
            extra_assets[REFINER_PREFIX.rstrip("_")] = (refiner, r_json)
        opts = base_opts
        t0 = time.perf_counter()
        parameters = pipeline_parameters(opts, plan.limits, plan.constants)
        pipeline_json = _pipeline_json(ckpt, plan, opts, src, version)
        write_pipeline_models(ckpt, pipeline_json, parameters, opts, staging, version, extra_assets)
        pipelines = ", ".join(opts.model_name(n) for n in opts.pipeline_models())
        log.info("%-22s assets %5.1f s", pipelines, time.perf_counter() - t0)
        if opts.naming.new_version:
            for folder in staging.iterdir():
                P.check_compatible(T.read_config(folder), out / folder.name)
        P.make_readable(staging)
        P.publish(staging, out, opts, replace=overwrite)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
        if created and not any(out.iterdir()):
            out.rmdir()  # a failed export leaves no trace
    log.info("wrote %s (version %s) in %.1f s", out, version, time.perf_counter() - start)
    return out
