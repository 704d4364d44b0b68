"""Published architectures with random weights, built and exported once for the harness.

Random weights change the pixels, not the work: the cost per step is the real
model's. Two architectures:

- ``sd15-random``: SD 1.5's (``sd_triton.export.tiny.SD15``);
- ``sdxl-random``: SDXL base 1.0's, read from the weightless configs shipped in
  ``export/configs/sdxl-base`` (:func:`xl_architecture`). ``width_scale`` below 1
  scales every width of the UNet and of both text encoders (channels, hidden and
  MLP sizes, projections, cross-attention, the time-id embedding) and keeps every
  depth and layout (blocks, layers, transformer depths 1/2/10, head counts, both
  encoders' 12 and 32 layers, the VAE, the scheduler, the tokenizers): at 0.5 it is
  ``sdxl-w0.5-random``, a quarter of the weights (UNet 642 M parameters instead of
  2.57 B), for machines that cannot hold full-size SDXL twice (~14 GB in fp32).

Both are cached under ``build/bench/<name>/``, keyed on what they are made from,
not on whether a file exists: the checkpoint on the architecture's configs, the
seed and the library versions that build it; the repository on the checkpoint,
the export options and the code of ``export/`` and ``model_repository/`` (what
the server runs). A different dtype or host replaces the previous repository.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from . import system

log = logging.getLogger(__name__)

FULL_SIZE_ARCH = "sd15-random"
XL_ARCH = "sdxl-random"
XL_CONFIGS = "sdxl-base"
# What a config file may carry besides the model's arguments.
_METADATA = ("architectures", "model_type", "torch_dtype", "transformers_version")


def _digest(*paths: Path) -> str:
    """Digest of the ``.py`` files under ``paths`` (names and contents)."""
    h = hashlib.sha256()
    for root in paths:
        files = [root] if root.is_file() else sorted(root.rglob("*.py"))
        for path in files:
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _cached(folder: Path, options: dict, build) -> Path:
    """``folder``, rebuilt with ``build(folder)`` unless its ``options.json`` equals ``options``.

    ``options.json`` is written last, so an interrupted build is redone.
    """
    stamp = folder / "options.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == options:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    build(folder)
    stamp.write_text(json.dumps(options, indent=2, sort_keys=True) + "\n")
    return folder


def _config(folder: Path, name: str) -> dict[str, Any]:
    """A component's config file as constructor arguments (no ``_class_name``, no metadata)."""
    path = folder / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
    config = json.loads(path.read_text())
    keep_class = name == "scheduler"  # the scheduler's class is read from it
    return {
        k: v
        for k, v in config.items()
        if (keep_class and k == "_class_name") or not (k.startswith("_") or k in _METADATA)
    }


def xl_name(width_scale: float) -> str:
    """The setting's name: ``sdxl-random``, or ``sdxl-w<scale>-random`` when scaled."""
    return XL_ARCH if width_scale == 1 else f"sdxl-w{width_scale:g}-random"


def xl_architecture(width_scale: float = 1.0):
    """SDXL base's architecture from ``export/configs/sdxl-base``, widths times ``width_scale``.

    The UNet's cross-attention width is both encoders' widths together and its
    added-conditioning input the pooled projection plus six time-id embeddings,
    as in the real configs (checked at scale 1 by the tests).
    """
    from sd_triton.export.single_file import config_folder
    from sd_triton.export.tiny import XLArchitecture

    folder = config_folder(XL_CONFIGS)
    unet, text, text_2 = (_config(folder, n) for n in ("unet", "text_encoder", "text_encoder_2"))

    def scaled(n: int) -> int:
        value = n * width_scale
        if value != int(value):
            raise ValueError(f"width scale {width_scale}: width {n} becomes {value}")
        return int(value)

    for encoder in (text, text_2):
        for key in ("hidden_size", "intermediate_size", "projection_dim"):
            encoder[key] = scaled(encoder[key])
    unet["block_out_channels"] = [scaled(c) for c in unet["block_out_channels"]]
    unet["addition_time_embed_dim"] = scaled(unet["addition_time_embed_dim"])
    unet["cross_attention_dim"] = text["hidden_size"] + text_2["hidden_size"]
    unet["projection_class_embeddings_input_dim"] = (
        text_2["projection_dim"] + 6 * unet["addition_time_embed_dim"]
    )
    _check_widths(unet, (text, text_2), width_scale)
    return XLArchitecture(
        name=xl_name(width_scale),
        unet=unet,
        vae=_config(folder, "vae"),
        text_encoder=text,
        text_encoder_2=text_2,
        scheduler=_config(folder, "scheduler"),
    )


def _check_widths(unet: dict, encoders: tuple[dict, ...], width_scale: float) -> None:
    """Every scaled width still splits into the same groups and heads."""
    heads = unet["attention_head_dim"]
    for channels, n_heads in zip(unet["block_out_channels"], heads, strict=True):
        if channels % unet["norm_num_groups"] or channels % n_heads:
            raise ValueError(
                f"width scale {width_scale}: {channels} UNet channels do not split into "
                f"{unet['norm_num_groups']} groups and {n_heads} heads"
            )
    for encoder in encoders:
        if encoder["hidden_size"] % encoder["num_attention_heads"]:
            raise ValueError(
                f"width scale {width_scale}: text width {encoder['hidden_size']} does not "
                f"split into {encoder['num_attention_heads']} heads"
            )


def build(
    arch, build_dir: Path, *, dtype: str = "float32", host: str = "python", seed: int = 0
) -> tuple[Path, Path]:
    """``arch`` (a ``tiny`` architecture) with random weights: checkpoint and repository, cached.

    Returns the diffusers folder and the exported repository under
    ``build_dir/bench/<arch.name>/``.
    """
    import sd_triton.export as export_pkg
    from sd_triton.export import Contents, ExportOptions, Hosting, export_repository
    from sd_triton.export.tiny import (
        XLArchitecture,
        build_pipeline,
        build_xl_pipeline,
        save_pipeline,
    )

    export_dir = Path(export_pkg.__file__).resolve().parent
    templates = export_dir.parent / "model_repository"
    base = build_dir / "bench" / arch.name
    libraries = ("torch", "diffusers", "transformers")
    ckpt_options = {
        "architecture": json.loads(json.dumps(asdict(arch), default=list)),
        "seed": seed,
        "versions": {k: v for k, v in system.versions().items() if k in libraries},
    }
    builder = build_xl_pipeline if isinstance(arch, XLArchitecture) else build_pipeline

    def build_checkpoint(folder: Path) -> None:
        log.info(
            "building %s with random weights (see benchmarks/README.md for the cost)", arch.name
        )
        save_pipeline(builder(arch, seed=seed), folder / "diffusers")

    def export(folder: Path) -> None:
        log.info("exporting %s (%s, host %s)", arch.name, dtype, host)
        precision = "fp16-vae-fp32" if dtype == "float16" else "fp32"
        options = ExportOptions(contents=Contents(precision=precision), hosting=Hosting(host=host))
        export_repository(checkpoint, folder / "repository", options, overwrite=True)

    checkpoint = _cached(base / "checkpoint", ckpt_options, build_checkpoint) / "diffusers"
    repo_options = {
        "checkpoint": ckpt_options,
        "dtype": dtype,
        "host": host,
        "code": _digest(export_dir, templates),
    }
    repository = _cached(base / "export", repo_options, export) / "repository"
    return checkpoint, repository


def full_size_build(build_dir: Path, **options) -> tuple[Path, Path]:
    """SD 1.5's architecture with random weights (:func:`build`'s options)."""
    from sd_triton.export.tiny import SD15

    return build(replace(SD15, name=FULL_SIZE_ARCH), build_dir, **options)


def xl_build(build_dir: Path, width_scale: float = 1.0, **options) -> tuple[Path, Path]:
    """SDXL base's architecture (widths times ``width_scale``) with random weights."""
    return build(xl_architecture(width_scale), build_dir, **options)
