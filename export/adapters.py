"""LoRAs and textual-inversion embeddings, fused into a checkpoint before export.

``sd-triton-export SRC OUT --lora style.safetensors:0.8 --embedding easyneg.pt``
exports a model whose weights already hold the LoRAs and whose tokenizer and
text encoder(s) already know the embeddings' trigger words: the served
pipeline needs nothing at request time, and a UNet with a LoRA costs what
one without does.

:func:`fused_checkpoint` does it with diffusers' own loaders, so it accepts
what they accept:

- LoRA: kohya / AUTOMATIC1111 (``lora_unet_*``, ``lora_te_*``, ``lora_te1_*``
  / ``lora_te2_*`` with ``alpha``) and diffusers / peft (``unet.*``,
  ``text_encoder.*``) files, UNet and text-encoder parts;
  ``load_lora_weights`` each under its own adapter name, ``set_adapters``
  with the weights, ``fuse_lora``, ``unload_lora_weights``.
- Embeddings: AUTOMATIC1111 ``.pt`` (``string_to_param``) and
  ``.safetensors`` (``emb_params``), diffusers ``learned_embeds`` (one
  ``{token: vectors}`` entry), and SDXL's ``clip_l`` / ``clip_g`` pair (into
  ``text_encoder``/``tokenizer`` and ``text_encoder_2``/``tokenizer_2``);
  ``load_textual_inversion``. An embedding of N vectors adds the tokens
  ``tok``, ``tok_1`` ... ``tok_{N-1}``, and a prompt's ``tok`` is expanded to
  all of them (diffusers' ``maybe_convert_prompt``; the served pipeline does
  the same with :func:`sd_pipeline.lora_tags.expand_embeddings`).

Every file is untrusted: it is read with
:func:`sd_triton.export.checkpoint.load_state_dict` (safetensors, or a
weights-only pickle) and only its tensors reach diffusers.

What was fused is recorded (:data:`RECORD_FILE` in the prepared folder, read
into ``pipeline.json`` as ``loras`` and ``embeddings`` by
:func:`pipeline_record`): each LoRA's name (the file's stem, as the web UI
names it in ``<lora:name:weight>``), alias (the kohya metadata's
``ss_output_name``), weight, SHA-256 and the web UI's short hash; each
embedding's token, vector count, SHA-256 and short hash. The pipeline models'
config parameters ``lora_hashes`` / ``ti_hashes`` carry the web UI's
``Lora hashes`` / ``TI hashes`` text, which clients write into PNG infotext.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .checkpoint import ExportError, load_state_dict

__all__ = [
    "RECORD_FILE",
    "add_arguments",
    "EmbeddingFile",
    "Fused",
    "LoraFile",
    "fused_checkpoint",
    "lora_short_hash",
    "parse_embedding",
    "parse_lora",
    "pipeline_record",
    "sha256_file",
]

log = logging.getLogger("sd_triton.export")

RECORD_FILE = "sd_triton_adapters.json"
SHORT_HASH = 12  # hex digits of the web UI's LoRA and embedding short hashes
# The folders a LoRA or an embedding changes; the others are linked to the source's.
CHANGED = ("unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
# An SDXL embedding file: text encoder 1's vectors and text encoder 2's.
SDXL_PAIR = {"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2")}


@dataclass(frozen=True)
class LoraFile:
    """``--lora FILE[:WEIGHT]``: a LoRA file and its weight (default 1)."""

    path: Path
    weight: float = 1.0

    @property
    def name(self) -> str:
        return self.path.stem


@dataclass(frozen=True)
class EmbeddingFile:
    """``--embedding FILE[:TOKEN]``: an embedding file and its trigger word.

    Without a token: the file's stem (the web UI's trigger word), or for a
    diffusers ``learned_embeds`` file the token stored in it.
    """

    path: Path
    token: str | None = None


def _split(text: str) -> tuple[str, str | None]:
    """``FILE[:SUFFIX]``: a path that exists as given keeps any ``:`` it holds."""
    if Path(text).exists() or ":" not in text:
        return text, None
    path, _, suffix = text.rpartition(":")
    return path, suffix


def parse_lora(text: str) -> LoraFile:
    """``FILE[:WEIGHT]`` -> :class:`LoraFile` (an argparse ``type``)."""
    path, weight = _split(text)
    if weight is None:
        return LoraFile(Path(path))
    try:
        return LoraFile(Path(path), float(weight))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--lora {text!r}: the weight after ':' is not a number"
        ) from None


def parse_embedding(text: str) -> EmbeddingFile:
    """``FILE[:TOKEN]`` -> :class:`EmbeddingFile` (an argparse ``type``)."""
    path, token = _split(text)
    if token is not None and (not token or any(c.isspace() for c in token)):
        raise argparse.ArgumentTypeError(f"--embedding {text!r}: the token must be one word")
    return EmbeddingFile(Path(path), token)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--lora`` and ``--embedding`` on ``sd-triton-export``."""
    group = parser.add_argument_group("LoRAs and embeddings (fused into the exported model)")
    group.add_argument(
        "--lora",
        type=parse_lora,
        action="append",
        default=[],
        metavar="FILE[:WEIGHT]",
        help="fuse a LoRA (kohya/AUTOMATIC1111 or diffusers .safetensors, UNet and text "
        "encoder parts) at WEIGHT (default 1); repeatable. Prompts may carry "
        "<lora:STEM:WEIGHT> for it (removed), and no other <lora:...> tag",
    )
    group.add_argument(
        "--embedding",
        type=parse_embedding,
        action="append",
        default=[],
        metavar="FILE[:TOKEN]",
        help="add a textual-inversion embedding (AUTOMATIC1111 .pt/.safetensors, diffusers "
        "learned_embeds, SDXL clip_l/clip_g) as trigger word TOKEN (default: the file's "
        "stem); repeatable",
    )


# ----------------------------------------------------------------------------- hashes


def sha256_file(path: str | Path, *, offset: int = 0) -> str:
    """SHA-256 (hex) of a file's bytes from ``offset`` on."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lora_short_hash(path: str | Path) -> str:
    """The web UI's LoRA hash (``Lora hashes`` in infotext): 12 hex digits.

    For ``.safetensors`` it is kohya's "addnet" hash, the SHA-256 of the
    tensor data after the JSON header (so editing metadata keeps it); for
    other files the SHA-256 of the whole file.
    """
    path = Path(path)
    offset = 0
    if path.suffix.lower() == ".safetensors":
        with open(path, "rb") as f:
            offset = 8 + int.from_bytes(f.read(8), "little")
    return sha256_file(path, offset=offset)[:SHORT_HASH]


def _lora_alias(path: Path) -> str | None:
    """kohya's ``ss_output_name`` metadata: the web UI's alias of a LoRA."""
    if path.suffix.lower() != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        alias = (f.metadata() or {}).get("ss_output_name")
    return alias if alias and alias != path.stem else None


# ----------------------------------------------------------------------------- embeddings


def _embedding_vectors(path: Path, token: str | None) -> tuple[str, dict[str, Any]]:
    """(token, {"clip_l"|"clip_g"|"": vectors [N, D]}) of an embedding file, in any format."""
    tensors = load_state_dict(path)
    stored = None
    if set(SDXL_PAIR) <= set(tensors):
        vectors = {k: tensors[k] for k in SDXL_PAIR}
    elif "emb_params" in tensors:  # the web UI's .safetensors
        vectors = {"": tensors["emb_params"]}
    else:
        params = [k for k in tensors if k.startswith("string_to_param.")]  # the web UI's .pt
        keys = params or list(tensors)
        if len(keys) != 1:
            found = ", ".join(sorted(tensors)[:6])
            raise ExportError(
                f"{path} is not a textual-inversion embedding this exporter knows (it holds "
                f"{found}); expected string_to_param, emb_params, clip_l + clip_g, or one "
                "{token: vectors} entry"
            )
        vectors = {"": tensors[keys[0]]}
        stored = None if params else keys[0]  # diffusers' learned_embeds: its token
    vectors = {k: v.reshape(-1, v.shape[-1]) for k, v in vectors.items()}
    return token or stored or path.stem, vectors


def _add_embedding(pipe: Any, spec: EmbeddingFile) -> dict[str, Any]:
    token, vectors = _embedding_vectors(spec.path, spec.token)
    if len({v.shape[0] for v in vectors.values()}) != 1:
        raise ExportError(f"{spec.path}: clip_l and clip_g hold different numbers of vectors")
    if "" in vectors and getattr(pipe, "text_encoder_2", None) is not None:
        raise ExportError(
            f"{spec.path} holds one set of vectors, but an SDXL model has two text encoders: "
            "it needs an SDXL embedding (clip_l and clip_g)"
        )
    pairs = {SDXL_PAIR.get(k, ("text_encoder", "tokenizer")): v for k, v in vectors.items()}
    # The SDXL refiner has text_encoder_2 only: clip_g goes there, clip_l nowhere.
    pairs = {p: v for p, v in pairs.items() if getattr(pipe, p[0], None) is not None}
    if not pairs:
        raise ExportError(f"{spec.path}: this model has no text encoder for its vectors")
    for (encoder_name, tokenizer_name), tensor in pairs.items():
        encoder = getattr(pipe, encoder_name)
        width = encoder.get_input_embeddings().weight.shape[1]
        if tensor.shape[1] != width:
            raise ExportError(
                f"{spec.path}: embedding width {tensor.shape[1]} does not fit {encoder_name} "
                f"(width {width}): it was made for another model family"
            )
        try:
            pipe.load_textual_inversion(
                {token: tensor.float()},
                token=token,
                text_encoder=encoder,
                tokenizer=getattr(pipe, tokenizer_name),
            )
        except ValueError as e:  # e.g. the token is already a word of the vocabulary
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ExportError(
                f"{spec.path} cannot be added as {token!r}: {first} "
                "(--embedding FILE:TOKEN picks another trigger word)"
            ) from None
    count = next(iter(vectors.values())).shape[0]
    log.info("embedding %s: token %r, %d vector(s)", spec.path.name, token, count)
    digest = sha256_file(spec.path)
    return {
        "token": token,
        "vectors": int(count),
        "file": spec.path.name,
        "sha256": digest,
        "short_hash": digest[:SHORT_HASH],
        "text_encoders": [encoder for encoder, _ in pairs],
    }


# ----------------------------------------------------------------------------- LoRAs


def _fuse_loras(pipe: Any, loras: Sequence[LoraFile]) -> list[dict[str, Any]]:
    adapters = [f"lora{i}" for i in range(len(loras))]
    records = []
    for adapter, spec in zip(adapters, loras, strict=True):
        tensors = load_state_dict(spec.path)
        try:
            pipe.load_lora_weights(tensors, adapter_name=adapter)
        except Exception as e:  # diffusers and peft raise many kinds for a foreign file
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ExportError(
                f"{spec.path} cannot be loaded as a LoRA of this model: {first}"
            ) from None
        loaded = sorted(m for m, names in pipe.get_list_adapters().items() if adapter in names)
        if not loaded:
            raise ExportError(
                f"{spec.path}: no layer of this model matches the LoRA's keys "
                "(a LoRA for another model family?)"
            )
        log.info("LoRA %s: weight %g, into %s", spec.path.name, spec.weight, ", ".join(loaded))
        records.append(
            {
                "name": spec.name,
                "alias": _lora_alias(spec.path),
                "weight": spec.weight,
                "file": spec.path.name,
                "sha256": sha256_file(spec.path),
                "short_hash": lora_short_hash(spec.path),
                "components": loaded,
            }
        )
    pipe.set_adapters(adapters, adapter_weights=[s.weight for s in loras])
    pipe.fuse_lora(adapter_names=adapters, lora_scale=1.0)
    pipe.unload_lora_weights()
    return records


# ----------------------------------------------------------------------------- the folder


@dataclass(frozen=True)
class Fused:
    """A diffusers folder with the adapters fused in (``path``), and what was fused."""

    path: Path
    loras: list[dict[str, Any]]
    embeddings: list[dict[str, Any]]

    def options(self, opts: Any, src: str | Path) -> Any:
        """``opts`` (:class:`ExportOptions`) for exporting :attr:`path` in place of ``src``:
        ``src`` recorded as the source, the web UI's hash lines as config parameters."""
        contents = replace(opts.contents, name=opts.contents.name or str(Path(src).resolve()))
        parameters = dict(opts.parameters)
        lora_hashes = ", ".join(f"{_web_ui_name(r['name'])}: {r['short_hash']}" for r in self.loras)
        ti_hashes = ", ".join(f"{r['token']}: {r['short_hash']}" for r in self.embeddings)
        for key, value in (("lora_hashes", lora_hashes), ("ti_hashes", ti_hashes)):
            if value:
                parameters.setdefault(key, value)
        return replace(opts, contents=contents, parameters=parameters)


def _web_ui_name(name: str) -> str:
    """A LoRA's name as the web UI writes it in ``Lora hashes`` (without ``:`` and ``,``)."""
    return name.replace(":", "").replace(",", "")


def _check_unique(loras: Sequence[LoraFile], embeddings: Sequence[EmbeddingFile]) -> None:
    for spec in (*loras, *embeddings):
        if not spec.path.is_file():
            raise ExportError(f"{spec.path} is not a file")
    names = [s.name for s in loras]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ExportError(
            f"two LoRA files are named {twice[0]!r}: a prompt's <lora:name:weight> names "
            "them by file name, so give each a different one"
        )


def _link_unchanged(src: Path, out: Path) -> None:
    """Every file and folder of ``src`` that the adapters leave alone, linked into ``out``."""
    for entry in src.iterdir():
        if entry.name not in CHANGED and entry.name != RECORD_FILE:
            os.symlink(entry.resolve(), out / entry.name)


def _save_changed(pipe: Any, out: Path) -> None:
    for name in CHANGED:
        module = getattr(pipe, name, None)
        if module is not None:
            module.save_pretrained(out / name)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """diffusers' and transformers' per-layer chatter off while LoRAs load (peft's
    injection makes transformers report every base weight as "missing")."""
    import diffusers.utils.logging as dl
    import transformers.utils.logging as tl

    levels = dl.get_verbosity(), tl.get_verbosity()
    dl.set_verbosity_error()
    tl.set_verbosity_error()
    dl.disable_progress_bar()
    tl.disable_progress_bar()
    try:
        yield
    finally:
        dl.set_verbosity(levels[0])
        tl.set_verbosity(levels[1])


def _load_pipeline(src: Path) -> Any:
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(src, local_files_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"{src} cannot be loaded as a diffusers pipeline: {first}") from e


@contextlib.contextmanager
def fused_checkpoint(
    src: str | Path,
    loras: Sequence[LoraFile] = (),
    embeddings: Sequence[EmbeddingFile] = (),
    *,
    workdir: str | Path | None = None,
) -> Iterator[Fused]:
    """The diffusers folder ``src`` with ``loras`` fused and ``embeddings`` added, in a
    temporary folder (under ``workdir``) that lives as long as the context.

    Without adapters it yields ``src`` itself. Raises :class:`ExportError` for a
    file that is not a LoRA or an embedding of this model.
    """
    src = Path(src)
    if not loras and not embeddings:
        yield Fused(src, [], [])
        return
    _check_unique(loras, embeddings)
    out = Path(tempfile.mkdtemp(prefix="sd-triton-adapters-", dir=workdir))
    try:
        with _quiet():
            pipe = _load_pipeline(src)
            lora_records = _fuse_loras(pipe, loras) if loras else []
            embedding_records = [_add_embedding(pipe, spec) for spec in embeddings]
            _link_unchanged(src, out)
            _save_changed(pipe, out)
        del pipe
        record = {"loras": lora_records, "embeddings": embedding_records}
        (out / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        yield Fused(out, lora_records, embedding_records)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def pipeline_record(src: str | Path) -> dict[str, list[dict[str, Any]]]:
    """``pipeline.json``'s ``loras`` and ``embeddings``: what :func:`fused_checkpoint`
    fused into the folder ``src`` (empty lists for a folder it did not make)."""
    path = Path(src) / RECORD_FILE
    record: Mapping[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    return {
        "loras": list(record.get("loras", [])),
        "embeddings": list(record.get("embeddings", [])),
    }
