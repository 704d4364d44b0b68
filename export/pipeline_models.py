"""The public pipeline models: ``stable_diffusion`` (and its streaming twin).

Each is the same code (``model.py`` and the ``sd_pipeline`` package) and the
same ``assets/`` (tokenizer, scheduler and CLIP preprocessor configs,
``pipeline.json``), with its own ``config.pbtxt``. Every constant the
pipeline needs (latent channels, VAE scaling, native size, size step, text
width, dtypes) is read from the checkpoint's configs into ``pipeline.json``.

Config parameters: the request limits (``sd_pipeline.config.Limits``, the
one table of their defaults) and admission (:data:`ADMISSION_DEFAULTS`),
overridden by ``ExportOptions.parameters``.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from sd_pipeline import spec as S
from sd_pipeline.config import UNET_FOLDER, Limits, PipelineConfig

from . import component_models as CM
from . import triton_config as T
from .checkpoint import Checkpoint, ExportError, family
from .options import PRESETS, ExportOptions

__all__ = [
    "ADMISSION_DEFAULTS",
    "PIPELINE_MODEL_TEMPLATE",
    "pipeline_constants",
    "pipeline_parameters",
    "pipeline_settings",
    "preset_parameters",
    "request_limits",
    "write_pipeline_models",
]

PIPELINE_MODEL_TEMPLATE = Path(
    str(importlib.resources.files("sd_triton.model_repository") / "stable_diffusion" / "model.py")
)

# Admission (docs/reliability.md): ``max_queue_size`` requests may wait (the
# unary model: Triton's queue policy; the streaming model: its own counter),
# for at most ``queue_timeout_s`` seconds (0: no limit).
ADMISSION_DEFAULTS: Mapping[str, int] = {"max_queue_size": 32, "queue_timeout_s": 120}


def _native_side(sample_size: Any) -> tuple[int, int]:
    if isinstance(sample_size, list | tuple):
        return int(sample_size[0]), int(sample_size[1])
    return int(sample_size), int(sample_size)


def pipeline_constants(configs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The model constants of ``pipeline.json``, read from a checkpoint's configs."""
    unet, vae = configs["unet"], configs["vae"]
    encoders = [n for n in ("text_encoder", "text_encoder_2") if n in configs]
    tokenizer = configs["tokenizer" if "text_encoder" in configs else "tokenizer_2"]
    vae_scale_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    unet_downsamplings = len(unet["down_block_types"]) - 1
    height, width = _native_side(unet["sample_size"])
    constants = {
        "family": family(configs),
        "latent_channels": int(vae["latent_channels"]),
        "unet_in_channels": int(unet["in_channels"]),
        "vae_scaling_factor": float(vae["scaling_factor"]),
        "vae_shift_factor": vae.get("shift_factor"),
        "vae_scale_factor": vae_scale_factor,
        "native_height": height * vae_scale_factor,
        "native_width": width * vae_scale_factor,
        "size_step": vae_scale_factor * 2**unet_downsamplings,
        # The first text encoder's width (SD: the UNet's cross_attention_dim).
        "text_width": int(configs[encoders[0]]["hidden_size"]),
        "tokenizer_max_length": int(tokenizer["model_max_length"]),
        "prediction_type": configs["scheduler"].get("prediction_type", "epsilon"),
        # The text encoders in encoding order; their hidden states are concatenated.
        "text_encoders": encoders,
        "text_encoder_layers": {n: int(configs[n]["num_hidden_layers"]) for n in encoders},
        "cross_attention_dim": int(unet["cross_attention_dim"]),
        "unet_text_time": unet.get("addition_embed_type") == "text_time",
        "time_cond_proj_dim": unet.get("time_cond_proj_dim"),
    }
    if "safety_checker" in configs:
        side = int(configs["safety_checker"]["vision_config"]["image_size"])
        constants["clip_image_size"] = side
    return constants


def pipeline_settings(index: Mapping[str, Any], family_name: str) -> dict[str, bool]:
    """The pipeline's settings from model_index.json, with diffusers' defaults: SDXL
    pipelines use zero embeddings for an absent negative prompt unless told otherwise;
    only a refiner that says so conditions on aesthetic scores."""
    xl = family_name != "sd"
    return {
        "force_zeros_for_empty_prompt": xl
        and bool(index.get("force_zeros_for_empty_prompt", True)),
        "requires_aesthetics_score": xl and bool(index.get("requires_aesthetics_score", False)),
    }


def request_limits(opts: ExportOptions, constants: Mapping[str, Any]) -> Limits:
    """The request limits the exported pipeline enforces: the defaults, then ``opts.parameters``."""
    names = {f.name for f in fields(Limits)}
    given = {k: str(v) for k, v in opts.parameters.items() if k in names}
    try:
        config = PipelineConfig.from_dict({**constants, "unet_max_batch_size": 1})
        return Limits.from_parameters(given, config)
    except ValueError as e:
        raise ExportError(str(e)) from None


def preset_parameters(preset: str | None, constants: Mapping[str, Any]) -> dict[str, Any]:
    """The request defaults of ``preset`` (``options.PRESETS``) for a model with ``constants``.

    ``lcm``: guidance 8.0 for a UNet with a guidance embedding (``time_cond_proj_dim``),
    1.0 (classifier-free guidance off) for one without (an LCM-LoRA fused in).
    """
    values = dict(PRESETS.get(preset or "", {}))
    if preset == "lcm" and constants.get("time_cond_proj_dim") is None:
        values["default_guidance_scale"] = 1.0
    return values


def pipeline_parameters(
    opts: ExportOptions, limits: Limits, constants: Mapping[str, Any]
) -> dict[str, Any]:
    """The pipeline models' config parameters: admission, the preset's request defaults,
    what the model is (its family, the refiner beside it: clients report them), anything
    else given, then the limits."""
    preset = preset_parameters(opts.contents.preset, constants)
    identity = {"family": constants["family"]}
    if opts.contents.refiner:
        identity["refiner_model_name"] = Path(opts.contents.refiner).name
    if constants.get("controlnet_hashes"):  # single-file ControlNets: "name: hash, ..."
        hashes = constants["controlnet_hashes"].items()
        identity["controlnet_hashes"] = ", ".join(f"{n}: {h}" for n, h in hashes)
    hosting = {"unet_in_pipeline": "1"} if opts.hosting.unet_in_pipeline else {}
    return {
        **ADMISSION_DEFAULTS,
        **hosting,
        **preset,
        **identity,
        **opts.parameters,
        **limits.parameters(),
    }


def write_assets(ckpt: Checkpoint, assets: Path, pipeline_json: Mapping[str, Any]) -> None:
    """A pipeline's ``assets/``: its tokenizers, scheduler and CLIP preprocessor configs,
    and ``pipeline.json``."""
    assets.mkdir(parents=True, exist_ok=True)
    for name, files in ckpt.tokenizer_files.items():
        (assets / name).mkdir()
        for f in files:
            shutil.copyfile(f, assets / name / f.name)
    for folder, name in (
        ("scheduler", "scheduler_config.json"),
        ("feature_extractor", "preprocessor_config.json"),
    ):
        src = ckpt.folder(folder) / name
        if src.is_file() and (folder != "feature_extractor" or ckpt.has_safety_checker):
            (assets / folder).mkdir(parents=True)
            shutil.copyfile(src, assets / folder / name)
    (assets / "pipeline.json").write_text(json.dumps(pipeline_json, indent=2) + "\n")


def _copy_pipeline_code(version_dir: Path) -> None:
    """The pipeline model: its ``model.py``, the installed ``sd_pipeline`` package and
    ``component_host.py`` (the device rule it shares with the component hosts)."""
    package = Path(S.__file__).resolve().parent
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(package, version_dir / "sd_pipeline", ignore=ignore)
    host = CM.COMPONENT_HOST_SOURCE
    CM.copy_code({"model.py": PIPELINE_MODEL_TEMPLATE, host.name: host}, version_dir)


def write_pipeline_models(
    ckpt: Checkpoint,
    pipeline_json: Mapping[str, Any],
    parameters: Mapping[str, Any],
    opts: ExportOptions,
    staging: Path,
    version: str,
    extra_assets: Mapping[str, tuple[Checkpoint, Mapping[str, Any]]] | None = None,
) -> None:
    """Write every pipeline model of ``opts`` to ``staging``: code, assets, config.

    ``extra_assets``: sub-folder of ``assets/`` -> (checkpoint, pipeline.json) of a
    model the pipeline calls too (``refiner``: an SDXL refiner).
    """
    extra_assets = extra_assets or {}
    for base_name, model_spec in opts.pipeline_models().items():
        model_name = opts.model_name(base_name)
        version_dir = staging / model_name / version
        version_dir.mkdir(parents=True)
        _copy_pipeline_code(version_dir)
        write_assets(ckpt, version_dir / "assets", pipeline_json)
        for sub, (sub_ckpt, sub_json) in extra_assets.items():
            write_assets(sub_ckpt, version_dir / "assets" / sub, sub_json)
        # A decoupled model runs requests on its own threads: one instance; so does
        # the unary one with the UNet in its process (its steps merge there).
        decoupled = bool(model_spec.extra.get("decoupled"))
        one = decoupled or opts.hosting.unet_in_pipeline
        instances = 1 if one else opts.hosting.pipeline_instances
        config = T.pipeline_config(
            model_spec,
            parameters=parameters,
            instance_count=instances,
            max_queue_size=int(parameters.get("max_queue_size") or 0),
            queue_timeout_s=float(parameters.get("queue_timeout_s") or 0),
        )
        config.name = model_name
        T.set_instance_group(config, gpu=opts.hosting.on_gpu, count=instances)
        # The served pipeline version picks the component versions (pipeline.json).
        T.set_version_policy(config, 1)
        T.write_config(config, staging / model_name)
        if opts.hosting.unet_in_pipeline:
            _nest_unet(staging / opts.model_name("unet") / version, version_dir / UNET_FOLDER)
    if opts.hosting.unet_in_pipeline:
        # No UNet model of its own: nothing calls it, and Triton would load its weights again.
        shutil.rmtree(staging / opts.model_name("unet"))


def _nest_unet(src: Path, dest: Path) -> None:
    """The UNet model's version folder (host code, weights) inside a pipeline's version folder,
    where the pipeline loads it and where a copy of the repository (object storage, a
    mounted volume) carries it with the pipeline. Hard links where the file system allows:
    the unary and streaming pipelines share one copy of the weights on disk."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dest, copy_function=link)
