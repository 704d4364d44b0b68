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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .components import Components
from .config import Assets, PipelineConfig
from .request import GenerationRequest

__all__ = ["Conditioning", "condition", "guided"]


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


def condition(request: GenerationRequest, components: Components, assets: Assets) -> Conditioning:
    """The conditioning of every UNet sample of ``request`` on this model."""
    config = assets.config
    if config.is_xl:
        embeddings, pooled = _encode_xl(request, components, assets)
        added = {"text_embeds": pooled, "time_ids": _time_ids(request, config)}
    else:
        embeddings, added = _encode_sd(request, components, assets), {}
    if config.time_cond_proj_dim is not None:
        added["timestep_cond"] = _guidance_embedding(request, config)
    return Conditioning(embeddings, added)


def _skips(guided: bool, negative: int, positive: int, n: int = 1) -> torch.Tensor:
    """``skip_layers`` for a text encoder call on [negative, positive] (or [positive])."""
    values = ([negative] * n if guided else []) + [positive] * n
    return torch.tensor(values, dtype=torch.int32)


def _encode_sd(request: GenerationRequest, components: Components, assets: Assets) -> torch.Tensor:
    """SD 1.x/2.x: the normed hidden state of ``clip_skip`` layers from the end (the negative
    prompt's: the last layer), repeated ``num_images_per_prompt`` times.

    Both texts go through the text encoder in one call.
    """
    cfg = guided(request, assets.config)
    texts = ([request.negative_prompt or ""] if cfg else []) + [request.prompt]
    ids = assets.tokenize(texts).to(torch.int32)
    out = components.encode_text(ids, _skips(cfg, 0, request.clip_skip))
    # [negative, positive] -> [negative x N, positive x N]
    return out.normed_hidden_state.repeat_interleave(request.num_images_per_prompt, dim=0)


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
    ``clip_skip``) or zeros."""
    config = assets.config
    cfg = guided(request, config)
    n = request.num_images_per_prompt
    hidden, pooled = [], None
    for encoder, (text, negative) in zip(
        config.text_encoders, _texts_xl(request, config), strict=True
    ):
        encode_negative = cfg and negative is not None
        texts = ([negative] if encode_negative else []) + [text]
        ids = assets.tokenize(texts, encoder).to(torch.int32)
        out = components.encode_text(
            ids, _skips(encode_negative, 1, request.clip_skip + 1), encoder=encoder
        )
        states, pooled = out.hidden_state, out.text_embeds
        if cfg and not encode_negative:  # zeros for the absent negative prompt
            states = torch.cat([torch.zeros_like(states), states])
            pooled = torch.cat([torch.zeros_like(pooled), pooled])
        hidden.append(states)
    embeddings = torch.cat(hidden, dim=-1)
    return embeddings.repeat_interleave(n, dim=0), pooled.repeat_interleave(n, dim=0)


def _time_ids(request: GenerationRequest, config: PipelineConfig) -> torch.Tensor:
    """SDXL's ``add_time_ids`` for every UNet sample, as the family's pipeline builds them."""
    size = (request.height, request.width)
    original = request.original_size or size
    crops = request.crops_coords_top_left or (0, 0)
    target = request.target_size or size
    negative_crops = request.negative_crops_coords_top_left or (0, 0)
    n = request.num_images_per_prompt
    if request.image is None and not config.requires_aesthetics_score:
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
