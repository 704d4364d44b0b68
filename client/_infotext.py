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
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from ._types import GenerationSettings

__all__ = [
    "A1111_SAMPLERS",
    "A1111_SCHEDULE_TYPES",
    "format_infotext",
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
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _unquote(text: str) -> str:
    return json.loads(text) if text.startswith('"') else text


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
    fields["Lora hashes"] = settings.lora_hashes
    fields["TI hashes"] = _used_embeddings(settings)
    lines = [settings.prompt]
    if settings.negative_prompt:
        lines.append(f"Negative prompt: {settings.negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


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
    values stay strings, as in the text.
    """
    *head, last = text.split("\n")
    if not _FIELD.match(last) or "Steps:" not in last:  # no settings line: all prompt
        head, last = [*head, last], ""
    prompt_lines, negative_lines, into_negative = [], [], False
    for line in head:
        if line.startswith("Negative prompt:"):
            into_negative = True
            line = line.removeprefix("Negative prompt:").lstrip(" ")
        (negative_lines if into_negative else prompt_lines).append(line)
    out = {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative_lines)}
    for key, value in _FIELD.findall(last):
        out[key.strip()] = _unquote(value.strip())
    return out


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
