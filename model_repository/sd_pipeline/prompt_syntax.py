"""AUTOMATIC1111's prompt syntax: attention weights, ``BREAK`` and 75-token chunks.

The web UI (``modules/prompt_parser.py``, ``sd_hijack_clip.py``,
``sd_emphasis.py``) reads a prompt in three steps, rebuilt here from its
behaviour as pure functions over a transformers CLIP tokenizer and a text
encoder callable:

1. :func:`parse_attention` splits the text into ``(fragment, weight)`` pairs:
   ``(x)`` multiplies by 1.1, ``[x]`` divides by 1.1, ``(x:1.3)`` multiplies
   by 1.3, nesting multiplies, ``\\( \\) \\[ \\] \\\\`` are literal
   characters; an unclosed bracket applies to the rest of the prompt, a stray
   closer is literal text; the word ``BREAK`` is a chunk break.
2. :func:`chunk` tokenizes every fragment alone and packs the tokens into
   chunks of 75 (each framed as ``bos + 75 + eos``, 77 ids): ``BREAK``
   starts a new chunk, and a chunk that would end within 20 tokens of a comma
   ends after the comma instead (the web UI's "Prompt word wrap length limit",
   ``comma_padding_backtrack``).
3. :func:`encode` runs every chunk of every text through the text encoder in
   one call, multiplies each token's hidden state by its weight, rescales the
   chunk so its mean is what it was (the web UI's default "Original"
   emphasis), concatenates a text's chunks along the sequence axis and pads
   shorter texts with the encoding of an empty chunk (the web UI's "Pad
   prompt/negative prompt"). SDXL's pooled output
   comes from each text's first chunk.

A prompt with none of this syntax and at most 75 tokens is not this module's
business: :func:`uses_syntax` says so, and the caller keeps diffusers' own
encoding, bit for bit. The web UI's sampler-time features (prompt editing
``[from:to:when]``, alternation ``[a|b]``, composable diffusion ``AND``)
change the conditioning between steps; the loop encodes a prompt once, so
they are refused (:class:`~.errors.InvalidRequest`) rather than silently
read as text.

Tokenizers are not safe to share between threads: pass the lock that guards
``tokenizer`` as ``lock`` (it is held for tokenization only, never across
``encode_ids``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .errors import InvalidRequest

__all__ = [
    "BREAK",
    "CHUNK_LENGTH",
    "Chunks",
    "EncodeIds",
    "check_supported",
    "chunk",
    "emphasize",
    "encode",
    "parse_attention",
    "uses_syntax",
]

# Tokens of prompt per chunk; with bos and eos a chunk is CLIP's 77 positions.
CHUNK_LENGTH = 75
# What parse_attention returns for the word BREAK (the web UI's own marker).
BREAK = ("BREAK", -1.0)
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
COMMA_TOKEN = ",</w>"

# One lexeme of the attention syntax per match; every character is matched.
_LEXEME = re.compile(
    r"""
      (?P<escape>\\[()\[\]\\]?)              # \( \) \[ \] \\ ; a lone \ is dropped
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)       # the end of (text:1.3)
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|:)
    """,
    re.VERBOSE,
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)
_AND_WORD = re.compile(r"\bAND\b")
# The end of a [from:to:when] group: ":" then a (signed) number.
_SCHEDULE_END = re.compile(r":\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")

# encode_ids(ids [K, 77], text_index [K]) -> (hidden [K, 77, D], pooled [K, P] or None)
EncodeIds = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, "torch.Tensor | None"]]
# Whatever guards the tokenizer (a threading.Lock): held while tokenizing only.
Lock = contextlib.AbstractContextManager


def parse_attention(text: str) -> list[tuple[str, float]]:
    """``text`` as ``(fragment, weight)`` pairs, the web UI's ``parse_prompt_attention``.

    Neighbouring fragments of equal weight are merged; a ``BREAK`` is the
    pair :data:`BREAK`. Inside brackets the web UI multiplies the marker's
    weight too, after which it is the word "BREAK" with a negative weight;
    that is kept, so such prompts encode as they do there.
    """
    pieces: list[list] = []
    round_opens: list[int] = []
    square_opens: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in _LEXEME.finditer(text):
        lexeme = m.group(0)
        if m.group("escape"):
            pieces.append([lexeme[1:], 1.0])
        elif m.group("open"):
            (round_opens if lexeme == "(" else square_opens).append(len(pieces))
        elif m.group("weight") is not None and round_opens:
            scale_from(round_opens.pop(), _weight(m.group("weight"), text))
        elif lexeme == ")" and round_opens:
            scale_from(round_opens.pop(), ROUND_MULTIPLIER)
        elif lexeme == "]" and square_opens:
            scale_from(square_opens.pop(), SQUARE_MULTIPLIER)
        else:  # plain text, or a closer nothing opened: literal
            for i, part in enumerate(_BREAK_WORD.split(lexeme)):
                if i:
                    pieces.append(list(BREAK))
                pieces.append([part, 1.0])
    for start in round_opens:  # unclosed: up to the end of the prompt
        scale_from(start, ROUND_MULTIPLIER)
    for start in square_opens:
        scale_from(start, SQUARE_MULTIPLIER)
    return _merge_equal_weights(pieces or [["", 1.0]])


def _weight(number: str, text: str) -> float:
    try:
        return float(number)
    except ValueError:
        raise InvalidRequest(
            f"prompt weight {number!r} is not a number (write it as in (word:1.2)) in {text!r}"
        ) from None


def _merge_equal_weights(pieces: list[list]) -> list[tuple[str, float]]:
    merged: list[tuple[str, float]] = []
    for fragment, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + fragment, weight)
        else:
            merged.append((fragment, weight))
    return merged


def check_supported(text: str) -> None:
    """Refuse the web UI's sampler-time syntax, which changes the prompt between steps.

    Prompt editing ``[from:to:when]`` / ``[to:when]``, alternation ``[a|b]``
    and composable diffusion ``a AND b`` need a conditioning per step; the
    loop encodes the prompt once.
    """
    if _AND_WORD.search(text):
        raise InvalidRequest(
            f"{text!r}: 'AND' (composable diffusion) is not supported: the prompt is "
            "encoded once, before sampling; write 'and' for the word"
        )
    group = _sampler_time_group(text)
    if group is not None:
        raise InvalidRequest(
            f"{text!r}: {group!r} is prompt editing or alternation, which is not "
            "supported: the prompt is encoded once, before sampling; write \\[ and \\] "
            "for literal brackets"
        )


def _sampler_time_group(text: str) -> str | None:
    """The first ``[...]`` whose own level holds ``|`` or ends in ``:number``, else None.

    Nested groups count as one opaque character of their parent; escaped
    characters are plain; stray closers are plain.
    """
    stack: list[tuple[str, int, list[str]]] = []  # opener, its index, own-level text
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            c, i = "_", i + 1  # an escaped character is plain text
        if c in "([":
            stack.append((c, i, []))
        elif stack and (c, stack[-1][0]) in ((")", "("), ("]", "[")):
            opener, start, chars = stack.pop()
            body = "".join(chars)
            if opener == "[" and ("|" in body or _SCHEDULE_END.search(body)):
                return text[start : i + 1]
            if stack:
                stack[-1][2].append("_")
        elif stack:
            stack[-1][2].append(c)
        i += 1
    return None


def uses_syntax(text: str, tokenizer, *, lock: Lock | None = None) -> bool:
    """Whether ``text`` needs this module: web UI syntax, ``BREAK``, or over 75 tokens.

    False means diffusers' encoding (padding to 77, truncation) gives what the
    web UI gives, and the caller should keep it. Text the web UI would read
    differently from diffusers (brackets, escapes, ``AND``) is True; a weight
    that is not a number raises :class:`~.errors.InvalidRequest`.
    """
    if _AND_WORD.search(text) or parse_attention(text) != [(text, 1.0)]:
        return True
    return len(_token_ids(tokenizer, [text], lock)[0]) > CHUNK_LENGTH


@dataclass(frozen=True)
class Chunks:
    """One text as ``C`` chunks of 77 token ids and their weights."""

    ids: torch.Tensor  # [C, 77] int64: bos, up to 75 tokens, eos, pad
    weights: torch.Tensor  # [C, 77] float32: 1.0 at bos, eos and padding


def chunk(
    text: str, tokenizer, *, comma_padding_backtrack: int = 20, lock: Lock | None = None
) -> Chunks:
    """``text`` as the web UI's 75-token chunks, each framed to 77 ids.

    Every fragment of :func:`parse_attention` is tokenized alone. A ``BREAK``
    closes the chunk. When a chunk is full and the next token is not a comma,
    the tokens after the chunk's last comma move to the next chunk if there
    are at most ``comma_padding_backtrack`` of them (0: never). The empty
    text is one chunk.
    """
    check_supported(text)
    pieces = parse_attention(text)
    token_lists = _token_ids(tokenizer, [fragment for fragment, _ in pieces], lock)
    packer = _Packer(tokenizer.convert_tokens_to_ids(COMMA_TOKEN), comma_padding_backtrack)
    for piece, tokens in zip(pieces, token_lists, strict=True):
        if piece == BREAK:
            packer.close()
            continue
        for token in tokens:
            packer.add(token, piece[1])
    rows = [_frame(row, tokenizer) for row in packer.finish()]
    ids = torch.tensor([r[0] for r in rows], dtype=torch.int64)
    weights = torch.tensor([r[1] for r in rows], dtype=torch.float32)
    return Chunks(ids, weights)


class _Packer:
    """Packs ``(token, weight)`` pairs into chunks of :data:`CHUNK_LENGTH`."""

    def __init__(self, comma: int, backtrack: int) -> None:
        self.comma = comma
        self.backtrack = backtrack
        self.chunks: list[list[tuple[int, float]]] = []
        self.current: list[tuple[int, float]] = []
        self.last_comma = -1  # index in current of its last comma

    def add(self, token: int, weight: float) -> None:
        full = len(self.current) == CHUNK_LENGTH
        if token == self.comma:
            self.last_comma = len(self.current)
        elif (
            full
            and self.backtrack
            and self.last_comma >= 0
            and CHUNK_LENGTH - self.last_comma <= self.backtrack
        ):
            moved = self.current[self.last_comma + 1 :]
            del self.current[self.last_comma + 1 :]
            self.close()
            self.current = moved
        if len(self.current) == CHUNK_LENGTH:
            self.close()
        self.current.append((token, weight))

    def close(self) -> None:
        self.chunks.append(self.current)
        self.current = []
        self.last_comma = -1

    def finish(self) -> list[list[tuple[int, float]]]:
        if self.current or not self.chunks:
            self.close()
        return self.chunks


def _frame(row: list[tuple[int, float]], tokenizer) -> tuple[list[int], list[float]]:
    """bos + tokens + eos, then padding, as 77 ids and weights.

    As the web UI does, everything after the first eos is padding (SDXL's
    second tokenizer pads with "!", not with eos).
    """
    eos = tokenizer.eos_token_id
    ids = [tokenizer.bos_token_id] + [t for t, _ in row] + [eos]
    first_eos = ids.index(eos)
    ids = ids[: first_eos + 1] + [tokenizer.pad_token_id] * (CHUNK_LENGTH + 1 - first_eos)
    weights = [1.0] + [w for _, w in row] + [1.0] * (CHUNK_LENGTH + 1 - len(row))
    return ids, weights


def _token_ids(tokenizer, texts: Sequence[str], lock: Lock | None) -> list[list[int]]:
    with lock if lock is not None else contextlib.nullcontext():
        encoded = tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)
    return encoded["input_ids"]


def encode(
    texts: Sequence[str],
    tokenizer,
    encode_ids: EncodeIds,
    *,
    comma_padding_backtrack: int = 20,
    min_chunks: int = 1,
    lock: Lock | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weighted embeddings ``[len(texts), 77 * C, D]`` and pooled ``[len(texts), P]`` or None.

    ``encode_ids(ids [K, 77] int64, text_index [K] int64) -> (hidden [K, 77,
    D], pooled [K, P] or None)`` is called once, with every chunk of every
    text; ``text_index`` says whose each row is (for per-text settings such
    as ``clip_skip``). A text with fewer chunks than the longest also sends
    one empty chunk, whose encoding pads it (the web UI's "Pad
    prompt/negative prompt"). Each chunk's hidden states are multiplied by
    their token weights, then scaled back to the chunk's original mean.
    Pooled is each text's first chunk's. ``min_chunks`` pads every text to
    at least that many chunks (SDXL: both encoders' embeddings must have the
    same length when ``prompt_2`` differs from ``prompt``).
    """
    if not texts:
        raise ValueError("encode() needs at least one text")
    per_text = [
        chunk(t, tokenizer, comma_padding_backtrack=comma_padding_backtrack, lock=lock)
        for t in texts
    ]
    counts = [c.ids.shape[0] for c in per_text]
    most = max(*counts, min_chunks)
    empty = chunk("", tokenizer, lock=lock) if min(counts) < most else None
    rows = [c if n == most else _stack(c, empty) for c, n in zip(per_text, counts, strict=True)]
    sizes = [c.ids.shape[0] for c in rows]
    owner = torch.repeat_interleave(torch.arange(len(texts)), torch.tensor(sizes))
    hidden, pooled = encode_ids(torch.cat([c.ids for c in rows]), owner)
    weighted = emphasize(hidden, torch.cat([c.weights for c in rows]))
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    embeddings = []
    for start, n in zip(starts, counts, strict=True):
        pad = [weighted[start + n : start + n + 1]] * (most - n)  # the text's empty chunk
        embeddings.append(torch.cat([weighted[start : start + n], *pad]).flatten(0, 1))
    first_pooled = None if pooled is None else pooled[starts]
    return torch.stack(embeddings), first_pooled


def _stack(a: Chunks, b: Chunks) -> Chunks:
    return Chunks(torch.cat([a.ids, b.ids]), torch.cat([a.weights, b.weights]))


def emphasize(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The web UI's "Original" emphasis, per chunk: scale by weight, restore the mean.

    ``hidden`` ``[K, 77, D]``, ``weights`` ``[K, 77]``; computed in float32,
    returned in ``hidden``'s dtype. A chunk whose weights are all 1.0 comes
    back as it went in, bit for bit.

    The mean is over the chunk's 77 x D values. A text encoder whose output
    is layer-normed with no shift (an untrained one) has a mean of rounding
    noise, and then so is the rescaling: trained CLIPs are far from that.
    """
    z = hidden.float()
    original_mean = z.mean(dim=(1, 2), keepdim=True)
    z = z * weights.to(z.device, torch.float32).unsqueeze(-1)
    z = z * (original_mean / z.mean(dim=(1, 2), keepdim=True))
    unweighted = (weights == 1.0).all(dim=1).to(hidden.device)
    return torch.where(unweighted[:, None, None], hidden, z.to(hidden.dtype))
