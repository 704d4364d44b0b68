"""Generation settings as AUTOMATIC1111's ``parameters`` text, in PNG text chunks.

The Stable Diffusion web UI (AUTOMATIC1111, and Forge, ComfyUI's readers,
Civitai, ...) stores how an image was made in a PNG text chunk named
``parameters``::

    a photo of a cat
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 123, Size: 512x512, Model: stable_diffusion

Writing the same format lets people's tools read our images. The sampler is
named the web UI's way (:data:`A1111_SAMPLERS`); an alias with a sigma schedule
(``dpmpp_2m_karras``) also writes ``Schedule type: Karras`` after it, as web UI
1.9 and later do (``Sampler: DPM++ 2M, Schedule type: Karras``; older versions
wrote ``Sampler: DPM++ 2M Karras``, which :func:`scheduler_alias` reads too); a value containing ``,``,
``:`` or a newline is JSON-quoted, as the web UI does. Several images from one
request share its seed (one generator draws them all), so their position is
written as ``Batch size`` / ``Batch pos``, the web UI's keys for that.

The newer inputs are written under the web UI's keys where it has one
(:data:`EXTRA_FIELDS`): ``Clip skip`` (the web UI's N is diffusers' ``clip_skip``
+ 1), ``Refiner`` / ``Refiner switch at``, the hires fix's ``Hires upscale``,
``Hires upscaler``, ``Hires steps`` and ``Denoising strength``, and ``CFG Rescale``
(the CFG Rescale extension's key for diffusers' ``guidance_rescale``; its older
``CFG Rescale φ``, Neutral Prompt's ``CFG Rescale phi`` and Forge's ``Rescale CFG``
are read too). SDXL's other inputs have no web UI key; they are written under
their diffusers names (``Prompt 2``, ``Original size``, ...). ControlNets are written
as the web UI's ControlNet extension writes its units, one ``ControlNet N`` key each
(:func:`controlnet_unit_text`). :func:`infotext_options` turns parsed fields back into
the options that reproduce the image.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from ._types import ControlNetUnit, GenerationSettings

__all__ = [
    "A1111_SAMPLERS",
    "A1111_SCHEDULE_TYPES",
    "A1111_UPSCALERS",
    "CONTROL_MODES",
    "EXTRA_FIELDS",
    "controlnet_unit_text",
    "format_infotext",
    "infotext_options",
    "output_paths",
    "parse_infotext",
    "read_infotext",
    "sampler_name",
    "save_png",
    "schedule_type",
    "scheduler_alias",
]

PARAMETERS_KEY = "parameters"

# The web UI's sampler names of our solvers (aliases of the pipeline's scheduler table).
_SOLVERS: dict[str, str] = {
    "ddim": "DDIM",
    "pndm": "PLMS",
    "lms": "LMS",
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "dpm2": "DPM2",
    "dpm2_a": "DPM2 a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_sde": "DPM++ SDE",
    "unipc": "UniPC",
    "deis": "DEIS",
    "ddpm": "DDPM",
    "lcm": "LCM",
    "tcd": "TCD",
}
# Alias suffix -> the web UI's "Schedule type", for the solvers that have one.
A1111_SCHEDULE_TYPES: dict[str, str] = {
    "karras": "Karras",
    "exponential": "Exponential",
    "beta": "Beta",
}
_SCHEDULED = (
    "lms",
    "euler",
    "heun",
    "dpm2",
    "dpm2_a",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_sde",
    "unipc",
    "deis",
)

# Every scheduler alias -> the web UI's sampler name (``dpmpp_2m_karras`` -> ``DPM++ 2M``).
A1111_SAMPLERS: dict[str, str] = {
    **_SOLVERS,
    **{f"{s}_{k}": _SOLVERS[s] for s in _SCHEDULED for k in A1111_SCHEDULE_TYPES},
}


def sampler_name(scheduler: str) -> str:
    """The web UI's name for ``scheduler``; unknown names (e.g. ``"default"``) pass through."""
    return A1111_SAMPLERS.get(scheduler, scheduler)


def schedule_type(scheduler: str) -> str | None:
    """The web UI's "Schedule type" of ``scheduler`` (``Karras`` for ``*_karras``), or None."""
    solver, _, suffix = scheduler.rpartition("_")
    if solver in _SCHEDULED and suffix in A1111_SCHEDULE_TYPES:
        return A1111_SCHEDULE_TYPES[suffix]
    return None


def scheduler_alias(fields: dict[str, str]) -> str | None:
    """Our alias for parsed infotext ``fields`` (``Sampler`` and ``Schedule type``), or None.

    Reads both the web UI's current form (``Sampler: DPM++ 2M, Schedule type:
    Karras``) and its older one (``Sampler: DPM++ 2M Karras``).
    """
    sampler, schedule = fields.get("Sampler", ""), fields.get("Schedule type")
    if schedule is None:
        for label in A1111_SCHEDULE_TYPES.values():
            if sampler.endswith(f" {label}"):
                sampler, schedule = sampler.removesuffix(f" {label}"), label
    for alias, name in A1111_SAMPLERS.items():
        if name == sampler and schedule_type(alias) == schedule:
            return alias
    return None


def _quote(value: object) -> str:
    """As the web UI quotes, and also a value that starts with a quote or has spaces
    at its ends (which the reader would take for quoting or strip)."""
    text = str(value)
    plain = not any(c in text for c in ",:\n") and text == text.strip()
    if plain and not text.startswith('"'):
        return text
    return json.dumps(text, ensure_ascii=False)


def _unquote(text: str) -> str:
    """As the web UI unquotes: a JSON string, else the text as it is."""
    if len(text) < 2 or not (text.startswith('"') and text.endswith('"')):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


# The hires fix's upscalers (the contract's hr_upscaler) -> the web UI's names.
A1111_UPSCALERS: dict[str, str] = {
    "latent": "Latent",
    "latent_antialiased": "Latent (antialiased)",
    "latent_bicubic": "Latent (bicubic)",
    "latent_bicubic_antialiased": "Latent (bicubic antialiased)",
    "latent_nearest": "Latent (nearest)",
    "latent_nearest_exact": "Latent (nearest-exact)",
    "lanczos": "Lanczos",
    "nearest": "Nearest",
}


def _size_text(pair: tuple[int, int]) -> str:
    """(height, width) as the web UI writes a size: ``WIDTHxHEIGHT``."""
    return f"{pair[1]}x{pair[0]}"


def _size_pair(text: str) -> tuple[int, int]:
    width, height = (int(part) for part in text.lower().split("x"))
    return height, width


def _pair_text(pair: tuple[int, int]) -> str:
    return f"{pair[0]},{pair[1]}"


def _pair(text: str) -> tuple[int, int]:
    first, second = (int(part) for part in text.split(","))
    return first, second


def _upscaler(text: str) -> str:
    return next((k for k, v in A1111_UPSCALERS.items() if v == text), text)


@dataclass(frozen=True)
class ExtraField:
    """One infotext key of a setting beyond the web UI's basic line.

    ``write``: the setting's value -> the text value (None: the key is left out);
    ``read``: the text value -> the request option ``name`` (None: not an option).
    """

    key: str
    name: str
    write: Callable[[Any], object | None]
    read: Callable[[str], Any] | None
    aliases: tuple[str, ...] = ()


def _given(value: Any) -> Any:
    return value


def _nonzero(value: Any) -> Any:
    return value or None


def _sized(write: Callable[[Any], object]) -> Callable[[Any], object | None]:
    return lambda value: None if value is None else write(value)


EXTRA_FIELDS: tuple[ExtraField, ...] = (
    ExtraField("Clip skip", "clip_skip", lambda v: v + 1 if v else None, lambda t: int(t) - 1),
    ExtraField(
        "CFG Rescale",
        "guidance_rescale",
        lambda v: float(v) if v else None,
        float,
        aliases=("CFG Rescale φ", "CFG Rescale phi", "Rescale CFG"),
    ),
    ExtraField(
        "Prompt syntax", "prompt_syntax", lambda v: v if v not in (None, "a1111") else None, str
    ),
    ExtraField("Prompt 2", "prompt_2", _given, str),
    ExtraField("Negative prompt 2", "negative_prompt_2", _given, str),
    *(
        ExtraField(
            name.replace("_", " ").capitalize(),
            name,
            _sized(_pair_text if "crops" in name else _size_text),
            _pair if "crops" in name else _size_pair,
        )
        for name in (
            "original_size",
            "crops_coords_top_left",
            "target_size",
            "negative_original_size",
            "negative_crops_coords_top_left",
            "negative_target_size",
        )
    ),
    ExtraField("Aesthetic score", "aesthetic_score", _given, float),
    ExtraField("Negative aesthetic score", "negative_aesthetic_score", _given, float),
    ExtraField("Refiner", "refiner", _given, None),
    ExtraField("Refiner switch at", "refiner_switch_at", _given, float),
    ExtraField("Hires upscale", "hr_scale", _given, float),
    ExtraField("Hires steps", "hr_second_pass_steps", _nonzero, int),
    ExtraField(
        "Hires upscaler", "hr_upscaler", _sized(lambda v: A1111_UPSCALERS.get(v, v)), _upscaler
    ),
)


def format_infotext(settings: GenerationSettings, *, index: int = 0) -> str:
    """The ``parameters`` text of image ``index`` of a request made with ``settings``."""
    fields: dict[str, object] = {
        "Steps": settings.num_inference_steps,
        "Sampler": sampler_name(settings.scheduler),
        "Schedule type": schedule_type(settings.scheduler),
        "CFG scale": float(settings.guidance_scale),
        "Seed": settings.seed,
        "Size": f"{settings.width}x{settings.height}",
        "Model hash": settings.model_hash,
        "Model": settings.checkpoint or settings.model,
    }
    if settings.strength is not None:
        fields["Denoising strength"] = float(settings.strength)
    if settings.num_images_per_prompt > 1:
        fields["Batch size"] = settings.num_images_per_prompt
        fields["Batch pos"] = index
    for extra in EXTRA_FIELDS:
        fields[extra.key] = extra.write(getattr(settings, extra.name))
    if settings.enable_hr:  # txt2img: the web UI writes the second pass's strength
        fields["Denoising strength"] = settings.hr_denoising_strength
    fields["Lora hashes"] = settings.lora_hashes
    fields["TI hashes"] = _used_embeddings(settings)
    for i, unit in enumerate(settings.controlnets):
        fields[f"ControlNet {i}"] = controlnet_unit_text(unit, settings.guess_mode)
    lines = [settings.prompt]
    if settings.negative_prompt is not None:  # "" was sent, and differs from none for SDXL
        lines.append(f"Negative prompt: {settings.negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


# The ControlNet extension's "Control Mode" for diffusers' guess_mode (its name for
# lllyasviel's guess mode: the ControlNets on the conditional half only) and without it.
CONTROL_MODES = {False: "Balanced", True: "ControlNet is more important"}
_UNIT = re.compile(r"ControlNet (\d+)")
_UNIT_HASH = re.compile(r" \[[0-9a-f]+\]$")


def controlnet_unit_text(unit: ControlNetUnit, guess_mode: bool) -> str:
    """One ``ControlNet N`` value as the extension's ``serialize_unit`` writes it, with the
    fields sd-triton has: ``Module: canny, Model: canny [0123456789], Weight: 1.0,
    Guidance Start: 0.0, Guidance End: 1.0, Control Mode: Balanced``."""
    fields = {
        "Module": unit.module,
        "Model": unit.model,
        "Weight": float(unit.weight),
        "Guidance Start": float(unit.guidance_start),
        "Guidance End": float(unit.guidance_end),
        "Control Mode": CONTROL_MODES[bool(guess_mode)],
    }
    return ", ".join(f"{k}: {v}" for k, v in fields.items())


def _controlnet_options(fields: dict[str, str]) -> dict[str, Any]:
    """The ControlNet options of the parsed ``ControlNet N`` fields (none: {})."""
    keys = sorted((int(m[1]), k) for k in fields if (m := _UNIT.fullmatch(k)))
    units = [dict(i.split(": ", 1) for i in fields[k].split(", ") if ": " in i) for _, k in keys]
    if not units:
        return {}
    options: dict[str, Any] = {
        "controlnet": [_UNIT_HASH.sub("", u.get("Model", "")) for u in units],
        "controlnet_conditioning_scale": [float(u.get("Weight", 1.0)) for u in units],
        "control_guidance_start": [float(u.get("Guidance Start", 0.0)) for u in units],
        "control_guidance_end": [float(u.get("Guidance End", 1.0)) for u in units],
    }
    if any(u.get("Control Mode") == CONTROL_MODES[True] for u in units):
        options["guess_mode"] = True
    return options


def _used_embeddings(settings: GenerationSettings) -> str | None:
    """The model's ``TI hashes`` entries whose trigger word the prompts use (the web UI
    lists the embeddings a generation used; fused LoRAs are always in use)."""
    if not settings.ti_hashes:
        return None
    # In any case, as the tokenizer matches trigger words.
    texts = f"{settings.prompt}\n{settings.negative_prompt or ''}".lower()
    used = [e for e in settings.ti_hashes.split(", ") if e.rpartition(": ")[0].lower() in texts]
    return ", ".join(used) or None


# "Key: value" pairs of the last line; a value is JSON-quoted or runs to the next comma.
_FIELD = re.compile(r'\s*([\w \-/+]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, str]:
    """Split a ``parameters`` text into ``{"Prompt", "Negative prompt", key: value, ...}`` strings.

    Reads what :func:`format_infotext` writes (and the web UI's simple cases);
    values stay strings, as in the text. ``"Negative prompt"`` is there only when
    the text has a negative prompt line (none: the request sent no negative prompt).
    """
    *head, last = text.split("\n")
    if not _FIELD.match(last) or "Steps:" not in last:  # no settings line: all prompt
        head, last = [*head, last], ""
    prompt_lines, negative_lines, into_negative = [], [], False
    for line in head:
        if line.startswith(_NEGATIVE) and not into_negative:
            into_negative = True
            line = line.removeprefix(_NEGATIVE)
            line = line.removeprefix(" ")
        (negative_lines if into_negative else prompt_lines).append(line)
    out = {"Prompt": "\n".join(prompt_lines)}
    if into_negative:
        out["Negative prompt"] = "\n".join(negative_lines)
    for key, value in _FIELD.findall(last):
        out[key.strip()] = _unquote(value.strip())
    return out


_NEGATIVE = "Negative prompt:"


def infotext_options(fields: dict[str, str]) -> dict[str, Any]:
    """The options that reproduce the image whose parsed infotext is ``fields``.

    ``Client.generate(**infotext_options(fields))`` for a text-to-image PNG; an
    img2img or inpainting one also gives ``strength`` (for ``img2img`` /
    ``inpaint``, with the source image), and one made with ControlNets ``controlnet``,
    its per-ControlNet options and ``guess_mode`` (send ``control_image`` with them: the
    maps are not in the text). Keys the text lacks are left out (the server's defaults),
    and so are the model's facts (``Model``, hashes, ``Refiner``).
    """
    options: dict[str, Any] = {"prompt": fields["Prompt"]}
    if "Negative prompt" in fields:
        options["negative_prompt"] = fields["Negative prompt"]
    basic = {
        "Steps": ("num_inference_steps", int),
        "CFG scale": ("guidance_scale", float),
        "Seed": ("seed", int),
        "Batch size": ("num_images_per_prompt", int),
    }
    for key, (name, kind) in basic.items():
        if key in fields:
            options[name] = kind(fields[key])
    if "Size" in fields:
        options["height"], options["width"] = _size_pair(fields["Size"])
    scheduler = scheduler_alias(fields)
    if scheduler is not None:
        options["scheduler"] = scheduler
    for extra in EXTRA_FIELDS:
        text = next((fields[k] for k in (extra.key, *extra.aliases) if k in fields), None)
        if text is not None and extra.read is not None:
            options[extra.name] = extra.read(text)
    hires = "hr_scale" in options  # the web UI writes Hires upscale when it ran
    if hires:
        options["enable_hr"] = True
    if "Denoising strength" in fields:
        strength = float(fields["Denoising strength"])
        options["hr_denoising_strength" if hires else "strength"] = strength
    return options | _controlnet_options(fields)


def output_paths(path: str | os.PathLike, count: int) -> list[Path]:
    """``out.png`` for one image; ``out.png, out-1.png, out-2.png, ...`` for several."""
    first = Path(path)
    return [first] + [first.with_name(f"{first.stem}-{i}{first.suffix}") for i in range(1, count)]


def save_png(image: Image.Image, path: str | os.PathLike, infotext: str) -> Path:
    """Write ``image`` as PNG with ``infotext`` in a ``parameters`` text chunk.

    Pillow writes a ``tEXt`` chunk when the text is Latin-1 and an ``iTXt``
    (UTF-8) chunk otherwise, as the web UI does; readers accept both.
    """
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, infotext)
    path = Path(path)
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_infotext(path: str | os.PathLike) -> str | None:
    """The ``parameters`` text of a PNG, or None when it has none."""
    with Image.open(path) as image:
        image.load()
        return getattr(image, "text", {}).get(PARAMETERS_KEY)
