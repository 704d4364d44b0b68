"""What the UNet is conditioned on, per model family: the one place the families differ.

The loop (:mod:`.loop`) is the same for SD 1.x/2.x, SDXL base and SDXL
refiner; :func:`condition` gives it, for every UNet sample ([negative x N;
positive x N] with guidance, else [positive x N]):

- the text embeddings ``[S, L, D]``;
- the UNet's added inputs by name: SDXL's ``text_embeds`` (the pooled
  embedding of ``text_encoder_2``) and ``time_ids`` (size, crop and, for the
  refiner, aesthetic conditioning), and LCM's ``timestep_cond`` (the
  guidance scale's embedding, for a UNet distilled with guidance).

Each piece follows the diffusers pipeline of the family and mode
(``StableDiffusionPipeline.encode_prompt``,
``StableDiffusionXLPipeline.encode_prompt`` / ``_get_add_time_ids``, and
their img2img and inpainting twins), including what diffusers does that one
might not expect: the negative prompt is encoded without ``clip_skip``; an
absent SDXL negative prompt is zeros when the model says
``force_zeros_for_empty_prompt``; the refiner encodes ``prompt`` with its one
text encoder; txt2img orders the time ids [negative, positive] per image,
img2img [negative x N, positive x N].

Prompt syntax (request input ``prompt_syntax``): with ``a1111`` (the
default) a request any of whose texts uses the web UI's weights, ``BREAK``
or more than 75 tokens is encoded by :func:`.prompt_syntax.encode` (chunks
of 75 tokens, weights with the mean-restoring rule; every text of the
request padded to the same number of chunks, SDXL's pooled embedding from
the first chunk); any other request, and every request with ``diffusers``,
is encoded exactly as diffusers encodes it (77 tokens, truncated). Text
encoder calls are sliced to the text encoder's ``max_batch_size``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import prompt_syntax
from .components import Components, TextEncoding
from .config import Assets, PipelineConfig
from .errors import InvalidRequest
from .request import GenerationRequest

__all__ = ["Conditioning", "check_prompt_chunks", "condition", "guided"]

# The request's texts, in the order check_prompt_chunks names them.
_TEXTS = ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2")


@dataclass(frozen=True)
class Conditioning:
    """Text embeddings and the UNet's added inputs, one row per UNet sample."""

    embeddings: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device) -> Conditioning:
        added = {k: v.to(device) for k, v in self.added.items()}
        return Conditioning(self.embeddings.to(device), added)


def guided(request: GenerationRequest, config: PipelineConfig) -> bool:
    """Classifier-free guidance: a scale over 1, and a UNet not distilled with guidance."""
    return request.do_classifier_free_guidance and config.time_cond_proj_dim is None


def condition(
    request: GenerationRequest, components: Components, assets: Assets, *, img2img: bool = False
) -> Conditioning:
    """The conditioning of every UNet sample of ``request`` on this model; ``img2img``:
    as img2img though the request has no image (a stage that starts from given latents,
    the hires pass)."""
    config = assets.config
    if config.is_xl:
        embeddings, pooled = _encode_xl(request, components, assets)
        img2img = img2img or request.image is not None
        added = {"text_embeds": pooled, "time_ids": _time_ids(request, config, img2img)}
    else:
        embeddings, added = _encode_sd(request, components, assets), {}
    if config.time_cond_proj_dim is not None:
        added["timestep_cond"] = _guidance_embedding(request, config)
    return Conditioning(embeddings, added)


def check_prompt_chunks(request: GenerationRequest, assets: Assets, most: int) -> None:
    """Refuse a text of ``request`` that the web UI's syntax reads as over ``most`` chunks
    of 75 tokens (the limit ``max_prompt_chunks``), and the web UI's sampler-time syntax."""
    if request.prompt_syntax != "a1111":
        return  # diffusers' syntax truncates
    for name in _TEXTS:
        text = getattr(request, name)
        if text is None:
            continue
        count = _chunk_count(text, assets, assets.config.text_encoders[0])
        if count > most:
            raise InvalidRequest(
                f"{name} is {count} chunks of 75 tokens, over this model's limit of {most} "
                f"({most * prompt_syntax.CHUNK_LENGTH} tokens)"
            )


def _chunk_count(text: str, assets: Assets, encoder: str) -> int:
    tokenizer = assets.tokenizers[encoder]
    return len(prompt_syntax.chunk(text, tokenizer, lock=assets._tokenizer_lock).ids)


def _skips(guided: bool, negative: int, positive: int, n: int = 1) -> torch.Tensor:
    """``skip_layers`` for a text encoder call on [negative, positive] (or [positive])."""
    values = ([negative] * n if guided else []) + [positive] * n
    return torch.tensor(values, dtype=torch.int32)


def _encode(
    components: Components,
    config: PipelineConfig,
    ids: torch.Tensor,
    skips: torch.Tensor,
    encoder: str,
) -> TextEncoding:
    """Text encoder ``encoder`` on every row, in slices of at most its max batch size."""
    size = config.text_encoder_max_batch_size
    parts = [
        components.encode_text(ids[i : i + size], skips[i : i + size], encoder=encoder)
        for i in range(0, len(ids), size)
    ]
    if len(parts) == 1:
        return parts[0]
    return TextEncoding(*(torch.cat(tensors) for tensors in zip(*parts, strict=True)))


def _web_ui_syntax(request: GenerationRequest, assets: Assets, texts: dict[str, list[str]]) -> bool:
    """Whether the request is read in the web UI's syntax: asked for, and needed by one of
    ``texts`` (text encoder -> its texts)."""
    if request.prompt_syntax != "a1111":
        return False
    lock = assets._tokenizer_lock
    return any(
        prompt_syntax.uses_syntax(text, assets.tokenizers[encoder], lock=lock)
        for encoder, encoder_texts in texts.items()
        for text in encoder_texts
    )


def _encode_texts(
    components: Components,
    assets: Assets,
    encoder: str,
    texts: list[str],
    skips: torch.Tensor,
    *,
    web_ui: bool,
    chunks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``texts`` through ``encoder`` (row i skipping ``skips[i]`` layers): (the chosen layer's
    hidden states, normed for SD and as they are for SDXL; the pooled embeddings).

    ``web_ui``: in the web UI's syntax, at least ``chunks`` chunks each; else as diffusers.
    """
    config = assets.config

    def encode_ids(ids: torch.Tensor, owner: torch.Tensor):
        out = _encode(components, config, ids.to(torch.int32), skips[owner], encoder)
        return (out.hidden_state if config.is_xl else out.normed_hidden_state), out.text_embeds

    if web_ui:
        tokenizer = assets.tokenizers[encoder]
        lock = assets._tokenizer_lock
        return prompt_syntax.encode(texts, tokenizer, encode_ids, min_chunks=chunks, lock=lock)
    return encode_ids(assets.tokenize(texts, encoder), torch.arange(len(texts)))


def _encode_sd(request: GenerationRequest, components: Components, assets: Assets) -> torch.Tensor:
    """SD 1.x/2.x: the normed hidden state of ``clip_skip`` layers from the end (the negative
    prompt's: the last layer), repeated ``num_images_per_prompt`` times.

    Both texts go through the text encoder in one call (as many as its batch size takes).
    """
    cfg = guided(request, assets.config)
    encoder = assets.config.text_encoders[0]
    texts = ([request.negative_prompt or ""] if cfg else []) + [request.prompt]
    web_ui = _web_ui_syntax(request, assets, {encoder: texts})
    skips = _skips(cfg, 0, request.clip_skip)
    hidden, _ = _encode_texts(components, assets, encoder, texts, skips, web_ui=web_ui)
    # [negative, positive] -> [negative x N, positive x N]
    return hidden.repeat_interleave(request.num_images_per_prompt, dim=0)


def _texts_xl(request: GenerationRequest, config: PipelineConfig) -> list[tuple[str, str | None]]:
    """(prompt, negative prompt) per text encoder, as diffusers pairs them.

    The base's two encoders get ``prompt`` / ``prompt_2`` (default: ``prompt``); the
    refiner's one encoder gets ``prompt``. Negative: ``negative_prompt or ""`` and
    ``negative_prompt_2`` (default: the first), or None to use zeros.
    """
    negative = request.negative_prompt
    zeros = negative is None and config.force_zeros_for_empty_prompt
    first = None if zeros else negative or ""
    second = None if zeros else request.negative_prompt_2 or first
    pairs = [(request.prompt, first), (request.prompt_2 or request.prompt, second)]
    return pairs[: len(config.text_encoders)]


def _encode_xl(
    request: GenerationRequest, components: Components, assets: Assets
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL: every encoder's penultimate (``clip_skip`` + 1 from the end) hidden state,
    concatenated, and the last encoder's pooled embedding; negatives likewise (without
    ``clip_skip``) or zeros. In the web UI's syntax every text of both encoders has the
    same number of chunks (the most any of them needs)."""
    config = assets.config
    cfg = guided(request, config)
    n = request.num_images_per_prompt
    pairs = dict(zip(config.text_encoders, _texts_xl(request, config), strict=True))
    texts = {
        encoder: ([negative] if cfg and negative is not None else []) + [text]
        for encoder, (text, negative) in pairs.items()
    }
    web_ui = _web_ui_syntax(request, assets, texts)
    chunks = 1
    if web_ui:
        chunks = max(_chunk_count(t, assets, e) for e, ts in texts.items() for t in ts)
    hidden, pooled = [], None
    for encoder, (_, negative) in pairs.items():
        encode_negative = cfg and negative is not None
        skips = _skips(encode_negative, 1, request.clip_skip + 1)
        states, pooled = _encode_texts(
            components, assets, encoder, texts[encoder], skips, web_ui=web_ui, chunks=chunks
        )
        if cfg and not encode_negative:  # zeros for the absent negative prompt
            states = torch.cat([torch.zeros_like(states), states])
            pooled = torch.cat([torch.zeros_like(pooled), pooled])
        hidden.append(states)
    embeddings = torch.cat(hidden, dim=-1)
    return embeddings.repeat_interleave(n, dim=0), pooled.repeat_interleave(n, dim=0)


def _time_ids(request: GenerationRequest, config: PipelineConfig, img2img: bool) -> torch.Tensor:
    """SDXL's ``add_time_ids`` for every UNet sample, as the family's pipeline (txt2img, or
    ``img2img``: the img2img and inpainting pipelines) builds them."""
    size = (request.height, request.width)
    original = request.original_size or size
    crops = request.crops_coords_top_left or (0, 0)
    target = request.target_size or size
    negative_crops = request.negative_crops_coords_top_left or (0, 0)
    n = request.num_images_per_prompt
    if not img2img and not config.requires_aesthetics_score:
        # StableDiffusionXLPipeline: the negative ids only when both negative sizes are
        # given; [negative, positive] repeated per image.
        positive = [*original, *crops, *target]
        negative = positive
        if request.negative_original_size and request.negative_target_size:
            negative = [
                *request.negative_original_size,
                *negative_crops,
                *request.negative_target_size,
            ]
        rows = [negative, positive] if guided(request, config) else [positive]
        return torch.tensor(rows, dtype=torch.float32).repeat(n, 1)
    # The img2img and inpainting pipelines (and the refiner): each negative size defaults
    # to its positive twin; [negative x N, positive x N].
    negative_original = request.negative_original_size or original
    if config.requires_aesthetics_score:
        aesthetic = 6.0 if request.aesthetic_score is None else request.aesthetic_score
        negative_aesthetic = request.negative_aesthetic_score
        negative_aesthetic = 2.5 if negative_aesthetic is None else negative_aesthetic
        positive = [*original, *crops, aesthetic]
        negative = [*negative_original, *negative_crops, negative_aesthetic]
    else:  # diffusers' img2img pipelines crop the negative ids as the positive ones
        positive = [*original, *crops, *target]
        negative = [*negative_original, *crops, *(request.negative_target_size or target)]
    rows = [negative] * n + [positive] * n if guided(request, config) else [positive] * n
    return torch.tensor(rows, dtype=torch.float32)


def _guidance_embedding(request: GenerationRequest, config: PipelineConfig) -> torch.Tensor:
    """LCM's ``timestep_cond``: the embedding of ``guidance_scale - 1``, one row per image."""
    from diffusers import StableDiffusionPipeline

    n = request.num_images_per_prompt
    w = torch.tensor(request.guidance_scale - 1).repeat(n)
    # A method that uses nothing of its pipeline.
    embed = StableDiffusionPipeline.get_guidance_scale_embedding
    return embed(None, w, embedding_dim=config.time_cond_proj_dim, dtype=torch.float32)
