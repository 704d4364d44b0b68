"""Prompt text that depends on the adapters fused into the model at export.

LoRAs and textual-inversion embeddings are fused at export
(``sd-triton-export --lora FILE:WEIGHT --embedding FILE[:TOKEN]``) and
recorded in ``pipeline.json`` (``loras``, ``embeddings``). Two things follow
for a prompt, done before it is tokenized:

- AUTOMATIC1111's ``<lora:name:weight>`` tag (its "extra network" syntax) is
  not text. A tag naming a LoRA the model was exported with, at that weight,
  is removed (as the web UI removes the tags it applies); any other is
  refused with :class:`InvalidRequest`: the model cannot apply a LoRA at
  request time. ``<lora:name>`` means weight 1, as in the web UI, and
  ``<lora:name:te:unet>`` is accepted when both weights are the exported one.
  Weights match to within 0.005 (the web UI writes them with two decimals).
  ``<hypernet:...>`` is refused too: diffusers has no hypernetworks.
- An embedding of N > 1 vectors was added as the tokens ``tok``, ``tok_1``
  ... ``tok_{N-1}``; a prompt's ``tok`` is expanded to all of them, as
  diffusers' ``TextualInversionLoaderMixin.maybe_convert_prompt`` does (in
  any case, as the tokenizer matches it).

:func:`adapted_prompt` does both with ``pipeline.json``'s records.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import InvalidRequest

__all__ = [
    "WEIGHT_TOLERANCE",
    "adapted_prompt",
    "expand_embeddings",
    "exported_loras",
    "strip_lora_tags",
]

# The web UI's extra-network tag: <kind:params>.
_TAG = re.compile(r"<(\w+):([^>]+)>")
WEIGHT_TOLERANCE = 0.005


def exported_loras(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Name (and alias) -> weight of ``pipeline.json``'s ``loras`` records."""
    out: dict[str, float] = {}
    for r in records:
        for key in (r.get("name"), r.get("alias")):
            if key:
                out[str(key)] = float(r["weight"])
    return out


def _listing(exported: Mapping[str, float]) -> str:
    if not exported:
        return "no LoRA"
    return "LoRAs " + ", ".join(f"{n}:{w:g}" for n, w in exported.items())


def _weights(name: str, params: list[str], field: str) -> list[float]:
    if not params:
        return [1.0]
    try:
        return [float(p) for p in params]
    except ValueError:
        raise InvalidRequest(
            f"{field}: <lora:{name}:{':'.join(params)}>: a fused LoRA's tag takes its weight "
            "as a number (<lora:name:0.8>)"
        ) from None


def strip_lora_tags(text: str, exported: Mapping[str, float], *, field: str = "prompt") -> str:
    """``text`` without its ``<lora:name:weight>`` tags, each checked against ``exported``
    (name -> weight fused at export); raises :class:`InvalidRequest` for any other."""

    def check(match: re.Match[str]) -> str:
        kind, params = match[1], match[2].split(":")
        if kind == "hypernet":
            raise InvalidRequest(
                f"{field}: {match[0]}: hypernetworks are not supported (diffusers has none)"
            )
        if kind != "lora":
            return match[0]  # not an extra-network tag we know: text
        name = params[0].strip()
        weights = _weights(name, [p.strip() for p in params[1:]], field)
        want = exported.get(name)
        if (
            want is None
            or len(weights) > 2
            or not all(math.isclose(w, want, abs_tol=WEIGHT_TOLERANCE + 1e-9) for w in weights)
        ):
            raise InvalidRequest(
                f"{field} asks for {match[0]}, but this model was exported with "
                f"{_listing(exported)}: LoRAs are fused into the model at export "
                "(sd-triton-export --lora FILE:WEIGHT), so a prompt may only name one of "
                "those, at its weight (or leave the tag out)"
            )
        return ""

    return _TAG.sub(check, text)


def expand_embeddings(text: str, vectors: Mapping[str, int]) -> str:
    """``text`` with every multi-vector embedding token ``tok`` (token -> vector count)
    written as ``tok tok_1 ... tok_{N-1}``, as diffusers' ``maybe_convert_prompt``.

    The CLIP tokenizer matches added tokens whatever their case, and so does this;
    diffusers' ``maybe_convert_prompt`` misses a token written with capitals (it
    looks the lowercased token up), so ``EasyNegative`` would get one of its
    vectors there: here it gets all, as in the web UI.
    """
    for token, count in vectors.items():
        if count > 1:
            expanded = " ".join([token, *(f"{token}_{i}" for i in range(1, count))])
            pattern = re.compile(re.escape(token) + r"(?!_\d)", re.IGNORECASE)
            text = pattern.sub(lambda _, e=expanded: e, text)
    return text


def adapted_prompt(
    text: str,
    loras: Sequence[Mapping[str, Any]],
    embeddings: Sequence[Mapping[str, Any]],
    *,
    field: str = "prompt",
) -> str:
    """The text the tokenizer gets for prompt ``field``: LoRA tags checked and removed,
    embedding tokens expanded (``loras``, ``embeddings``: ``pipeline.json``'s records)."""
    text = strip_lora_tags(text, exported_loras(loras), field=field)
    return expand_embeddings(text, {str(e["token"]): int(e["vectors"]) for e in embeddings})
