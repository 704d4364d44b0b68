"""Single-file checkpoints (``.safetensors`` / ``.ckpt``) -> a Triton model repository.

The community shares Stable Diffusion checkpoints as one file in the layout of
the original training code (CompVis' LDM for SD 1.x/2.x, Stability's SGM for
SDXL). :func:`export_single_file` reads one, tells its family from the state
dict (:func:`detect_family`), converts it with diffusers' single-file loaders
against a weightless config folder shipped in ``export/configs/<family>/``
(nothing is downloaded, ever), saves a diffusers folder to a temporary
directory and hands that to :func:`~.repository.export_repository`.

- ``.ckpt`` and other pickles are read by :func:`.checkpoint.load_state_dict`
  (``weights_only``: a pickle that needs more than tensors is refused and
  nothing in it runs).
- SD 2.x checkpoints do not say whether they predict noise (512 px "base"
  models) or velocity (768 px "v" models): the caller says so
  (``prediction_type``, ``--prediction-type``). For other families the option
  overrides the shipped scheduler config's ``prediction_type`` (v-prediction
  fine-tunes of SD 1.x / SDXL).
- A checkpoint holding both EMA and trained weights (``model_ema.*``) exports
  the trained ones unless ``ema`` is set, as the web UI and diffusers do.
- The web UI's model hash (:func:`model_hash`: SHA-256 of the whole file,
  first 10 hex digits) and the file's stem are published as the pipeline
  models' config parameters ``model_hash`` and ``model_name`` (and recorded in
  ``pipeline.json``), so clients write ``Model hash: ..., Model: ...`` in PNG
  infotext as the web UI does.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.resources
import json
import logging
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import publish as P
from .adapters import sha256_file
from .checkpoint import PICKLE_SUFFIXES, ExportError, _quiet_loading, load_state_dict
from .options import ExportOptions
from .repository import export_repository
from .tokenizer import write_clip_tokenizer

__all__ = [
    "FAMILIES",
    "PREDICTION_TYPES",
    "SINGLE_FILE_SUFFIXES",
    "SingleFileOptions",
    "add_arguments",
    "config_folder",
    "Converted",
    "convert",
    "detect_family",
    "diffusers_folder",
    "export_single_file",
    "is_single_file",
    "model_hash",
    "options_from_args",
    "refiner_folder",
]

log = logging.getLogger("sd_triton.export")

SINGLE_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
PREDICTION_TYPES = ("epsilon", "v_prediction")
MODEL_HASH_DIGITS = 10

# Family -> what it is, as the shipped config folder's name says.
FAMILIES: dict[str, str] = {
    "sd1": "SD 1.x (stable-diffusion-v1-5's configs)",
    "sd1-inpainting": "SD 1.x inpainting, 9-channel UNet (stable-diffusion-inpainting's)",
    "sd2-v": "SD 2.x, 768 px, v-prediction (stable-diffusion-2-1's)",
    "sd2-base": "SD 2.x, 512 px, epsilon (stable-diffusion-2-1-base's)",
    "sd2-inpainting": "SD 2.x inpainting, 9-channel UNet (stable-diffusion-2-inpainting's)",
    "sdxl-base": "SDXL base (stable-diffusion-xl-base-1.0's)",
    "sdxl-refiner": "SDXL refiner (stable-diffusion-xl-refiner-1.0's)",
}

# Key prefixes of the original layouts.
UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."  # SD 1.x: transformers' CLIPTextModel
OPEN_CLIP = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H
XL_FIRST, XL_SECOND = "conditioner.embedders.0.", "conditioner.embedders.1."
CONV_IN = UNET + "input_blocks.0.0.weight"
EMA_PREFIX = "model_ema."

# The components a single file holds; the rest (scheduler, tokenizers) come from the configs.
MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")
# Single files carry no safety checker (export with --no-safety-checker is implied).
NOT_IN_FILE = ("safety_checker", "feature_extractor")

# diffusers' names (infer_diffusers_model_type) of the layouts we convert; it
# names others too (SDXL inpainting, Playground, upscaler, ControlNet, SD3,
# Flux, ...), which share some of these prefixes but not our configs.
DIFFUSERS_TYPES = {"v1", "v2", "inpainting", "inpainting_v2", "xl_base", "xl_refiner"}


@dataclass(frozen=True)
class SingleFileOptions:
    """How to read a single-file checkpoint.

    ``prediction_type``: ``epsilon`` or ``v_prediction`` (required for SD 2.x;
    elsewhere it overrides the family's). ``ema``: export the EMA weights of a
    checkpoint that holds both. ``config``: a diffusers-format folder whose
    configs describe the checkpoint (default: the family's shipped folder).
    """

    prediction_type: str | None = None
    ema: bool = False
    config: Path | None = None


def is_single_file(path: str | Path) -> bool:
    """Whether ``path`` names a weights file (not a diffusers folder)."""
    path = Path(path)
    return path.is_file() or (not path.exists() and path.suffix.lower() in SINGLE_FILE_SUFFIXES)


def model_hash(path: str | Path) -> str:
    """The web UI's ``Model hash``: the first 10 hex digits of the file's SHA-256.

    (The web UI's legacy hash, 8 digits of the SHA-256 of 64 KiB at offset
    1 MiB, is no longer written: since early 2023 it writes this one, as
    Forge does and Civitai searches by.)
    """
    return sha256_file(path)[:MODEL_HASH_DIGITS]


def _prefixes(keys: list[str], count: int = 5) -> str:
    tally = Counter(".".join(k.split(".")[:2]) + "." for k in keys)
    return ", ".join(p for p, _ in tally.most_common(count)) or "no tensors"


def _has(keys: list[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _diffusers_type(state_dict: Mapping[str, Any]) -> str | None:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    try:
        return infer_diffusers_model_type(state_dict)
    except Exception:  # it indexes marker keys without checking them all
        return None


def _layout(state_dict: Mapping[str, Any]) -> str:
    """``sd1``, ``sd2`` (with ``-inpainting`` for a 9-channel UNet), ``sdxl-base`` or
    ``sdxl-refiner``, from key prefixes and the UNet's input channels."""
    keys = list(state_dict)
    if not (_has(keys, UNET) and _has(keys, VAE) and CONV_IN in state_dict):
        raise ExportError(
            "not a Stable Diffusion checkpoint in the original layout (no "
            f"{UNET}* UNet with {VAE}* VAE); found {_prefixes(keys)}"
        )
    inpainting = int(state_dict[CONV_IN].shape[1]) == 9
    if _has(keys, XL_FIRST + "model.") and not _has(keys, XL_SECOND):
        layout = "sdxl-refiner"
    elif _has(keys, XL_SECOND + "model.") and _has(keys, XL_FIRST + "transformer."):
        layout = "sdxl-base"
    elif _has(keys, CLIP):
        layout = "sd1"
    elif _has(keys, OPEN_CLIP):
        layout = "sd2"
    else:
        raise ExportError(
            f"a UNet and VAE without a text encoder this exporter knows; found {_prefixes(keys)}"
        )
    if inpainting and layout.startswith("sdxl"):
        raise ExportError("SDXL inpainting checkpoints (9-channel UNet) are not supported")
    return f"{layout}-inpainting" if inpainting else layout


def detect_family(state_dict: Mapping[str, Any], prediction_type: str | None = None) -> str:
    """The family (a key of :data:`FAMILIES`) of an original-layout state dict.

    Structural: key prefixes (which text encoders) and the UNet's input
    channels, so it holds for any size of model. diffusers'
    ``infer_diffusers_model_type`` (marker keys of the full-size models)
    refuses layouts that share these prefixes but not our configs.
    """
    layout = _layout(state_dict)
    known = _diffusers_type(state_dict)
    if known is not None and known not in DIFFUSERS_TYPES:
        raise ExportError(
            f"diffusers reads this checkpoint as '{known}', which is not exported here"
        )
    if layout != "sd2":
        return layout
    if prediction_type is None:
        raise ExportError(
            "an SD 2.x checkpoint does not say what its UNet predicts: give --prediction-type "
            "v_prediction (768 px models such as 2.0/2.1) or epsilon (512 px base models)"
        )
    return "sd2-v" if prediction_type == "v_prediction" else "sd2-base"


def config_folder(family: str) -> Path:
    """The shipped weightless diffusers-format config folder of ``family``."""
    root = importlib.resources.files("sd_triton.export") / "configs" / family
    return Path(str(root))


def _class(entry: list[str]) -> type:
    return getattr(importlib.import_module(entry[0]), entry[1])


def _load_component(name: str, entry: list[str], state_dict, config: Path, ema: bool):
    """Component ``name`` (a diffusers or transformers model) from the original-layout dict,
    in the checkpoint's own float dtype (the exporter reads it as float32 either way)."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    cls = _class(entry)
    common = {"config": str(config), "subfolder": name, "local_files_only": True}
    common["torch_dtype"] = state_dict[CONV_IN].dtype
    if entry[0] == "transformers":
        return create_diffusers_clip_model_from_ldm(cls, checkpoint=state_dict, **common)
    extra = {"extract_ema": True} if name == "unet" and ema else {}
    return cls.from_single_file(state_dict, **common, **extra)


def _check_loaded(name: str, module) -> None:
    """Every parameter was in the checkpoint (diffusers leaves missing ones on the meta device)."""
    missing = [n for n, p in module.state_dict().items() if p.device.type == "meta"]
    if missing:
        raise ExportError(
            f"the checkpoint has no weights for {len(missing)} tensors of '{name}' "
            f"(e.g. {missing[0]}): its architecture differs from the config's"
        )


def _copy_configs(config: Path, out: Path, prediction_type: str | None) -> dict[str, Any]:
    """The config folder's non-model parts into ``out``: model_index, scheduler, tokenizers."""
    ignore = shutil.ignore_patterns("*.safetensors", "*.bin", *NOT_IN_FILE)
    shutil.copytree(config, out, ignore=ignore)
    for name in ("tokenizer", "tokenizer_2"):
        folder = out / name
        if folder.is_dir() and not (folder / "vocab.json").is_file():
            _write_vocab(folder)
    scheduler = out / "scheduler" / "scheduler_config.json"
    if prediction_type is not None:
        data = json.loads(scheduler.read_text())
        data["prediction_type"] = prediction_type
        scheduler.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    index = json.loads((out / "model_index.json").read_text())
    if any(index.get(n, [None])[0] is not None for n in NOT_IN_FILE):
        index |= {n: [None, None] for n in NOT_IN_FILE} | {"requires_safety_checker": False}
        (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


def _write_vocab(folder: Path) -> None:
    """CLIP's vocab.json and merges.txt (rebuilt offline), keeping the folder's own configs."""
    configs = {
        n: (folder / n).read_bytes() for n in ("special_tokens_map.json", "tokenizer_config.json")
    }
    write_clip_tokenizer(folder)
    for name, data in configs.items():
        (folder / name).write_bytes(data)


def convert(src: str | Path, out: str | Path, options: SingleFileOptions | None = None) -> str:
    """Convert the single-file checkpoint ``src`` to a diffusers folder ``out``; return its family."""
    opts = options or SingleFileOptions()
    if opts.prediction_type not in (None, *PREDICTION_TYPES):
        raise ExportError(
            f"unknown prediction type {opts.prediction_type!r}; choose one of {PREDICTION_TYPES}"
        )
    src, out = Path(src), Path(out)
    state_dict = load_state_dict(src)
    try:
        family = detect_family(state_dict, opts.prediction_type)
    except ExportError as e:
        raise ExportError(f"{src}: {e}") from None
    if opts.ema and not _has(list(state_dict), EMA_PREFIX):
        raise ExportError(f"{src} holds no EMA weights ({EMA_PREFIX}*): export it without --ema")
    config = opts.config or config_folder(family)
    log.info("%s: %s, configs from %s", src, FAMILIES[family], config)
    _quiet_loading()
    index = _copy_configs(config, out, opts.prediction_type)
    for name in (n for n in MODELS if index.get(n, [None])[0] is not None):
        entry = index[name]
        try:
            module = _load_component(name, entry, state_dict, config, opts.ema)
        except ExportError:
            raise
        except Exception as e:  # diffusers / transformers raise many kinds
            first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
            hint = "" if opts.config else f" (with the shipped {family} configs; --config DIR?)"
            raise ExportError(
                f"{src}: component '{name}' cannot be converted{hint}: {first}"
            ) from e
        _check_loaded(name, module)
        module.save_pretrained(out / name)
    return family


@dataclass(frozen=True)
class Converted:
    """A diffusers folder to export (``path``) and the model facts of the file it came from."""

    path: Path
    facts: dict[str, str]  # model_hash, model_name; empty for a diffusers folder

    def options(self, opts: ExportOptions, src: str | Path) -> ExportOptions:
        """``opts`` for exporting :attr:`path` in place of ``src``: ``src`` recorded as the
        source, the model hash and name as config parameters (unless ``opts`` names them)."""
        if not self.facts:
            return opts
        contents = replace(opts.contents, name=opts.contents.name or str(Path(src).resolve()))
        return replace(opts, contents=contents, parameters={**self.facts, **opts.parameters})


@contextlib.contextmanager
def diffusers_folder(
    src: str | Path, options: SingleFileOptions | None = None, *, workdir: str | Path | None = None
) -> Iterator[Converted]:
    """``src`` as a diffusers folder: a single file converted into a temporary folder
    (under ``workdir``) that lives as long as the context; a folder as it is."""
    src = Path(src)
    if not is_single_file(src):
        if options not in (None, SingleFileOptions()):
            raise ExportError(
                f"{src} is a folder: --prediction-type, --ema and --config are for single files"
            )
        yield Converted(src, {})
        return
    if not src.is_file():
        raise ExportError(f"{src} is not a file")
    t0 = time.perf_counter()
    facts = {"model_hash": model_hash(src), "model_name": src.stem}
    log.info("%s: model hash %s (%.1f s)", src, facts["model_hash"], time.perf_counter() - t0)
    with tempfile.TemporaryDirectory(prefix="sd-triton-single-file-", dir=workdir) as tmp:
        folder = Path(tmp) / src.stem
        t0 = time.perf_counter()
        convert(src, folder, options)
        log.info("converted %s to diffusers format in %.1f s", src, time.perf_counter() - t0)
        yield Converted(folder, facts)


@contextlib.contextmanager
def refiner_folder(opts: ExportOptions) -> Iterator[ExportOptions]:
    """``opts`` with a single-file ``--refiner`` (``opts.contents.refiner``) converted to a
    temporary diffusers folder (the shipped configs of its detected family) for the
    context's lifetime; ``opts`` as they are when the refiner is a folder or absent."""
    refiner = opts.contents.refiner
    if refiner is None or not is_single_file(refiner):
        yield opts
        return
    with diffusers_folder(refiner) as converted:
        # The refiner's name and hash, as the web UI reports them (Refiner: name [hash]).
        facts = {f"refiner_{k}": v for k, v in converted.facts.items()}
        parameters = {**facts, **opts.parameters}
        contents = replace(opts.contents, refiner=converted.path)
        yield replace(opts, contents=contents, parameters=parameters)


def export_single_file(
    src: str | Path,
    out: str | Path,
    options: ExportOptions | None = None,
    *,
    single_file: SingleFileOptions | None = None,
    overwrite: bool = False,
) -> Path:
    """Export the single-file checkpoint ``src`` to the Triton model repository ``out``.

    ``options`` as for :func:`export_repository` (see :meth:`Converted.options`).
    The output folder is checked before the (slow) conversion.
    """
    opts = options or ExportOptions()
    opts.check()
    P.check_output(Path(out), opts, overwrite)
    if not Path(src).is_file():
        raise ExportError(f"{src} is not a file")
    with diffusers_folder(src, single_file) as converted:
        return export_repository(
            converted.path, out, converted.options(opts, src), overwrite=overwrite
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``sd-triton-export``'s options for single-file checkpoints."""
    group = parser.add_argument_group("single-file checkpoints (.safetensors, .ckpt)")
    group.add_argument(
        "--prediction-type",
        choices=PREDICTION_TYPES,
        default=None,
        help="what the UNet predicts: required for SD 2.x (v_prediction: 768 px models such as "
        "2.1; epsilon: 512 px base models); for other families it overrides the default",
    )
    group.add_argument(
        "--ema",
        action="store_true",
        help="export the EMA weights of a checkpoint that holds both (default: the trained ones)",
    )
    group.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="DIR",
        help="a diffusers-format folder whose configs describe the checkpoint (default: the "
        "detected family's, shipped with sd-triton)",
    )


def options_from_args(args: argparse.Namespace) -> SingleFileOptions:
    return SingleFileOptions(prediction_type=args.prediction_type, ema=args.ema, config=args.config)
