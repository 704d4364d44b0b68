"""The Stable Diffusion 1.x CLIP tokenizer, rebuilt offline.

SD 1.x uses OpenAI's CLIP BPE tokenizer (the ``tokenizer/`` folder of every
SD 1.x checkpoint). No hub can be reached at run time, but the
``open-clip-torch`` wheel ships OpenAI's BPE file ``bpe_simple_vocab_16e6.txt.gz``;
from it ``vocab.json`` and ``merges.txt`` are rebuilt byte for byte (their
SHA-256s are :data:`VOCAB_SHA256` and :data:`MERGES_SHA256`).

Install the file's wheel without its dependencies (``import open_clip`` needs
torchvision, so it is never imported: the file is located through the
distribution's metadata)::

    pip install --no-deps open-clip-torch
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
from pathlib import Path

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "MAX_LENGTH",
    "MERGES_SHA256",
    "VOCAB_SHA256",
    "VOCAB_SIZE",
    "build_vocab_and_merges",
    "find_bpe_file",
    "write_clip_tokenizer",
]

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77
VOCAB_SIZE = 49408
# 49408 = 2 * 256 byte-level symbols + merges + 2 special tokens.
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2

VOCAB_SHA256 = "e089ad92ba36837a0d31433e555c8f45fe601ab5c221d4f607ded32d9f7a4349"
MERGES_SHA256 = "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a"


def find_bpe_file() -> Path:
    """Locate OpenAI's CLIP BPE file inside the installed open-clip-torch wheel."""
    try:
        files = importlib.metadata.files("open_clip_torch") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == BPE_FILENAME:
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    # Fallback: the package folder, found without executing the package.
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / BPE_FILENAME
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{BPE_FILENAME} not found: install it with `pip install --no-deps open-clip-torch`"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def build_vocab_and_merges(bpe_path: Path | None = None) -> tuple[dict[str, int], list[str]]:
    """Return CLIP's vocabulary (token -> id) and merge list (``"a b"`` lines)."""
    bpe_path = bpe_path or find_bpe_file()
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    byte_symbols = list(_bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    tokens += ["".join(m.split(" ")) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{bpe_path}: built {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def _special(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def write_clip_tokenizer(out_dir: str | Path, bpe_path: Path | None = None) -> Path:
    """Write SD 1.x's ``tokenizer/`` folder (vocab.json, merges.txt, configs) to ``out_dir``.

    Checks the SHA-256s of the two data files; raises ``ValueError`` if they differ.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges(bpe_path)
    vocab_bytes = (json.dumps(vocab, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode(
        "utf-8"
    )
    merges_bytes = ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8")
    for name, data, expected in (
        ("vocab.json", vocab_bytes, VOCAB_SHA256),
        ("merges.txt", merges_bytes, MERGES_SHA256),
    ):
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected:
            raise ValueError(f"rebuilt {name} has SHA-256 {digest}, expected {expected}")
        (out / name).write_bytes(data)
    special_tokens = {
        "bos_token": _special(BOS_TOKEN),
        "eos_token": _special(EOS_TOKEN),
        "pad_token": EOS_TOKEN,
        "unk_token": _special(EOS_TOKEN),
    }
    tokenizer_config = {
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": MAX_LENGTH,
        "tokenizer_class": "CLIPTokenizer",
        **special_tokens,
    }
    for name, data in (
        ("special_tokens_map.json", special_tokens),
        ("tokenizer_config.json", tokenizer_config),
    ):
        (out / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return out
