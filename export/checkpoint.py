"""Reading a diffusers-format Stable Diffusion (1.x, 2.x, XL) folder, with clear errors.

:func:`inspect_checkpoint` checks the folder's layout without loading
weights (cheap: run before anything is written); :func:`load_modules` loads
the torch modules. Problems raise :class:`ExportError` with one sentence that
names the folder or the component at fault.

Weights are untrusted input. :func:`load_state_dict` reads a single weights
file (``.safetensors``, or a ``.ckpt``/``.pt``/``.pth``/``.bin`` pickle through
``torch.load(weights_only=True)``) and refuses a pickle that needs anything
beyond tensors and plain containers, so a checkpoint, LoRA or embedding can
never run code here. diffusers and transformers load component folders the
same way (safetensors first, pickles with ``weights_only=True``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Checkpoint",
    "ExportError",
    "attach_safety_checker",
    "family",
    "inspect_checkpoint",
    "load_modules",
    "load_state_dict",
]

MODEL_INDEX = "model_index.json"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# Folder -> the config file that must be in it.
CONFIG_FILES = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "text_encoder_2": "config.json",
    "tokenizer": None,  # checked by _check_tokenizer
    "tokenizer_2": None,
    "scheduler": "scheduler_config.json",
    "safety_checker": "config.json",
    "feature_extractor": "preprocessor_config.json",
}
REQUIRED = ("unet", "vae", "scheduler")
# Each text encoder with its tokenizer: SD has the first, the SDXL base both, the
# refiner the second (model_index.json names the ones a checkpoint has).
TEXT_ENCODERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
SAFETY = ("safety_checker", "feature_extractor")
# The pipeline classes exported (model_index.json's _class_name); the SD 1.x/2.x
# ones are every StableDiffusion*Pipeline but these.
XL_PIPELINES = frozenset(
    {
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
    }
)
_NOT_SD = ("XL", "StableDiffusion3", "Upscale", "Depth")


class ExportError(Exception):
    """An input or output problem the user can fix; its message is one sentence."""


@dataclass
class Checkpoint:
    """A checked SD folder: its path, pipeline class and component configs."""

    path: Path
    pipeline_class: str
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Tokenizer folder name (tokenizer, tokenizer_2) -> the files to ship.
    tokenizer_files: dict[str, list[Path]] = field(default_factory=dict)
    # model_index.json says safety_checker: null (every SD 2.x, most community models),
    # or names none (SDXL).
    ships_without_safety_checker: bool = False
    # model_index.json's pipeline settings (force_zeros_for_empty_prompt, ...).
    index: dict[str, Any] = field(default_factory=dict)
    # Checkpoint folder -> the checkpoint it is read from, where not ``path``
    # (a safety checker attached from another checkpoint).
    sources: dict[str, Path] = field(default_factory=dict)

    @property
    def has_safety_checker(self) -> bool:
        return "safety_checker" in self.configs

    @property
    def family(self) -> str:
        return family(self.configs)

    @property
    def text_encoders(self) -> list[str]:
        """The text encoders, in encoding order."""
        return [n for n in TEXT_ENCODERS if n in self.configs]

    def folder(self, name: str) -> Path:
        """Where checkpoint folder ``name`` (``unet``, ``safety_checker``, ...) is read from."""
        return self.sources.get(name, self.path) / name


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{what}: cannot read {path}: {e}") from None


def _check_tokenizer(folder: Path) -> list[Path]:
    """The tokenizer files to ship: vocab.json + merges.txt, or tokenizer.json."""
    has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    has_json = (folder / "tokenizer.json").is_file()
    if not (has_bpe or has_json):
        raise ExportError(
            f"missing component 'tokenizer': {folder} has neither vocab.json + merges.txt "
            "nor tokenizer.json"
        )
    names = ["vocab.json", "merges.txt", "tokenizer.json"]
    names += ["tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"]
    return [folder / n for n in names if (folder / n).is_file()]


def _is_null(entry: Any) -> bool:
    """A model_index.json entry that names no component: absent, null or [null, null]."""
    return not entry or (isinstance(entry, list) and entry[0] is None)


def family(configs: dict[str, dict[str, Any]]) -> str:
    """The model family, "sd", "sdxl" or "sdxl-refiner", from configs (folder -> config).

    A UNet with SDXL's added conditioning (``addition_embed_type: text_time``)
    is SDXL; without a ``text_encoder`` (only ``text_encoder_2``) it is the refiner.
    """
    if configs["unet"].get("addition_embed_type") != "text_time":
        if "text_encoder" not in configs:
            raise ExportError("a Stable Diffusion 1.x/2.x UNet needs a text_encoder")
        return "sd"
    if "text_encoder_2" not in configs:
        raise ExportError("an SDXL UNet (addition_embed_type 'text_time') needs a text_encoder_2")
    return "sdxl" if "text_encoder" in configs else "sdxl-refiner"


def _read_index(src: Path) -> dict[str, Any]:
    """model_index.json of a diffusers SD folder whose pipeline class is exported."""
    if not src.is_dir():
        raise ExportError(f"{src} is not a folder")
    index_path = src / MODEL_INDEX
    if not index_path.is_file():
        raise ExportError(
            f"{src} is not a Stable Diffusion checkpoint in diffusers format (no {MODEL_INDEX})"
        )
    index = _read_json(index_path, "model_index.json")
    pipeline_class = str(index.get("_class_name", ""))
    sd = pipeline_class.startswith("StableDiffusion") and not any(
        tag in pipeline_class for tag in _NOT_SD
    )
    if not (sd or pipeline_class in XL_PIPELINES):
        raise ExportError(
            f"{src} holds a {pipeline_class or 'unknown'} pipeline, "
            "not Stable Diffusion 1.x/2.x or SDXL"
        )
    return index


def _read_component(ckpt: Checkpoint, src: Path, name: str, index: dict[str, Any]) -> None:
    """Check component folder ``name`` of ``src`` and read its config into ``ckpt``."""
    folder = src / name
    if _is_null(index.get(name)) or not folder.is_dir():
        hint = " (export with --no-safety-checker to leave it out)" if name in SAFETY else ""
        raise ExportError(f"missing component '{name}' in {src}{hint}")
    config_file = CONFIG_FILES[name]
    if config_file is None:
        ckpt.tokenizer_files[name] = _check_tokenizer(folder)
        tok_config = folder / "tokenizer_config.json"
        ckpt.configs[name] = _read_json(tok_config, name) if tok_config.is_file() else {}
        return
    if not (folder / config_file).is_file():
        raise ExportError(f"missing component '{name}': {folder / config_file} not found")
    ckpt.configs[name] = _read_json(folder / config_file, name)


def inspect_checkpoint(src: str | Path, *, safety_checker: bool = True) -> Checkpoint:
    """Check that ``src`` is a diffusers SD or SDXL folder with every component; read its configs.

    The text encoders read are those model_index.json names (SD: ``text_encoder``;
    SDXL base: both; SDXL refiner: ``text_encoder_2``), each with its tokenizer; the
    family (:func:`family`) must agree with them. The safety checker (and its feature
    extractor) is read when the checkpoint has one and ``safety_checker`` is true;
    a checkpoint whose model_index.json says ``safety_checker: null``, or names
    none, has none (``ships_without_safety_checker``).
    """
    src = Path(src)
    index = _read_index(src)
    ckpt = Checkpoint(path=src, pipeline_class=str(index["_class_name"]), index=index)
    ckpt.ships_without_safety_checker = _is_null(index.get("safety_checker"))
    keep_safety = safety_checker and not ckpt.ships_without_safety_checker
    encoders = [n for n in TEXT_ENCODERS if not _is_null(index.get(n))]
    names = [*REQUIRED, *encoders, *(TEXT_ENCODERS[n] for n in encoders)]
    for name in names + list(SAFETY if keep_safety else ()):
        _read_component(ckpt, src, name, index)
    family(ckpt.configs)  # the UNet agrees with the text encoders
    return ckpt


def attach_safety_checker(ckpt: Checkpoint, donor: str | Path) -> None:
    """Give ``ckpt`` the safety checker and feature extractor of checkpoint ``donor``
    (any family: diffusers' checker works on any RGB image)."""
    donor = Path(donor)
    index = _read_index(donor)
    if _is_null(index.get("safety_checker")):
        raise ExportError(f"{donor} has no safety checker to attach")
    for name in SAFETY:
        _read_component(ckpt, donor, name, index)
        ckpt.sources[name] = donor


def _quiet_loading() -> None:
    """No progress bars while loading: the exporter logs one line per component."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def load_modules(ckpt: Checkpoint) -> dict[str, Any]:
    """Load the torch modules (float32, eval mode) and complete ``ckpt.configs`` from them."""
    from .wrappers import load_module

    _quiet_loading()
    names = ["unet", "vae", *ckpt.text_encoders]
    if ckpt.has_safety_checker:
        names.append("safety_checker")
    modules = {}
    for name in names:
        try:
            modules[name] = load_module(name, ckpt.folder(name)).float().eval()
        except Exception as e:  # diffusers/transformers raise many kinds
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(
                f"component '{name}' in {ckpt.folder(name).parent} cannot be loaded: {first}"
            ) from e
        # Configs as the loaded modules see them (defaults filled in).
        config = modules[name].config
        ckpt.configs[name] = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    for encoder in ckpt.text_encoders:
        _complete_tokenizer_config(ckpt, TEXT_ENCODERS[encoder], encoder)
    return modules


def _complete_tokenizer_config(ckpt: Checkpoint, name: str, encoder: str) -> None:
    """Load tokenizer ``name`` (a check) and record its ``model_max_length``."""
    from transformers import CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(ckpt.folder(name))
    except Exception as e:
        raise ExportError(f"component '{name}' in {ckpt.path} cannot be loaded: {e}") from e
    max_len = tokenizer.model_max_length
    positions = ckpt.configs[encoder]["max_position_embeddings"]
    if not isinstance(max_len, int) or max_len > positions:
        max_len = positions  # no model_max_length in tokenizer_config.json
    ckpt.configs[name] = {**ckpt.configs[name], "model_max_length": max_len}


def load_state_dict(path: str | Path) -> dict[str, Any]:
    """The tensors of one weights file, read without running any code it carries.

    ``.safetensors`` holds only tensors. ``.ckpt``/``.pt``/``.pth``/``.bin`` are
    pickles: loaded with ``torch.load(weights_only=True)``, which refuses any
    object other than tensors and plain containers; a refused file raises
    :class:`ExportError` saying so. A Lightning-style ``{"state_dict": ...}``
    wrapper is unwrapped; tensors in nested dicts are kept under dotted keys;
    entries that are not tensors are left out.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} is not a file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError) as e:
            raise ExportError(f"{path} is not a readable .safetensors file: {e}") from None
    if suffix not in PICKLE_SUFFIXES:
        raise ExportError(
            f"{path}: unknown weights format {suffix or '(no suffix)'}; "
            f"expected .safetensors or one of {', '.join(PICKLE_SUFFIXES)}"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, or whatever the refused object raised
        raise ExportError(_refused_pickle(path, e)) from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    tensors = _tensors(data) if isinstance(data, dict) else {}
    if not tensors:
        raise ExportError(f"{path} holds no tensors by name (a {type(data).__name__})")
    return tensors


def _tensors(data: dict, prefix: str = "") -> dict[str, Any]:
    """The tensors of a dict, those of nested dicts under ``outer.inner`` keys (the web
    UI's embeddings keep theirs in ``string_to_param``); other entries left out."""
    import torch

    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, torch.Tensor):
            out[f"{prefix}{key}"] = value
        elif isinstance(value, dict):
            out.update(_tensors(value, f"{prefix}{key}."))
    return out


def _refused_pickle(path: Path, error: Exception) -> str:
    found = re.search(r"GLOBAL (\S+)", str(error))
    what = f" (it names {found[1]})" if found else ""
    return (
        f"{path} was refused: it is a pickle that needs more than tensors to load{what}, "
        "and loading it could run code; convert it to .safetensors with a tool you trust, "
        "or use a .safetensors release of the model"
    )
