"""What a call returns: the settings used, the result, and streamed progress events."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

__all__ = ["ControlNetUnit", "GenerationResult", "GenerationSettings", "ProgressEvent"]


@dataclass(frozen=True)
class ControlNetUnit:
    """One ControlNet of a generation, as the web UI's ControlNet extension reports a unit.

    ``model``: the ControlNet's request name, with the web UI's hash of the file it was
    exported from when the model publishes one (``canny [0123456789]``). ``weight``,
    ``guidance_start``, ``guidance_end``: its ``controlnet_conditioning_scale`` and
    guidance window. ``module``: the preprocessor that made its map (``canny`` when
    ``sd-triton generate --control NAME:canny:PHOTO`` ran it; else ``none``, a ready map).
    """

    model: str
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    module: str = "none"


@dataclass(frozen=True)
class GenerationSettings:
    """The settings a generation actually ran with: what was sent, and the server's defaults for the rest.

    Names are the contract's (and diffusers') names. ``seed`` is the seed the
    server reports; ``height``/``width`` are read from the returned images;
    ``scheduler`` is the alias sent, or the model's default (``"default"``
    when the model does not publish its name). ``model`` is the unary model
    that makes these images from these settings (a streamed result names the
    unary model too: both serve the same checkpoint). ``strength`` is only
    set for img2img / inpainting. ``model_hash`` and ``checkpoint``: the web UI's
    hash and name of the single file the model was exported from, when the
    model publishes them (config parameters ``model_hash``, ``model_name``).
    ``lora_hashes`` / ``ti_hashes``: the LoRAs and embeddings fused into the
    model at export, as the web UI's ``name: hash, ...`` lines (config
    parameters of the same names), when it has any.

    ``negative_prompt`` None: none was sent (SD 1.x/2.x then encode the empty
    text, an SDXL base uses zero embeddings; ``""`` is encoded). The SDXL
    inputs (``prompt_2`` ... ``refiner_switch_at``) are what was sent, None
    when not: the server then derives them as diffusers does (``prompt_2``
    from ``prompt``, sizes from the output size). Pairs are diffusers' order:
    ``(height, width)`` for sizes, ``(top, left)`` for crop coordinates.
    ``refiner`` names the refiner that finished the image (only with
    ``refiner_switch_at``): its checkpoint when the model publishes it
    (``refiner_model_name``, ``refiner_model_hash``), else ``"refiner"``.
    ``prompt_syntax``: the one sent, else the model's (config parameter
    ``prompt_syntax``), else None (the server's default, the web UI's). With the
    hires fix (``enable_hr``) the ``hr_*`` settings are what ran (sent, else the
    contract's defaults), and ``height``/``width`` are the first pass's size: the
    images are ``hr_scale`` times larger. ``controlnets``: the ControlNets that steered
    the images (:class:`ControlNetUnit`, in the request's order), with ``guess_mode``.
    """

    prompt: str
    negative_prompt: str | None
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    seed: int
    scheduler: str
    num_images_per_prompt: int
    model: str
    strength: float | None = None
    model_hash: str | None = None
    checkpoint: str | None = None
    lora_hashes: str | None = None
    ti_hashes: str | None = None
    guidance_rescale: float = 0.0
    clip_skip: int = 0
    prompt_2: str | None = None
    negative_prompt_2: str | None = None
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None
    refiner_switch_at: float | None = None
    refiner: str | None = None
    prompt_syntax: str | None = None
    enable_hr: bool = False
    hr_scale: float | None = None
    hr_upscaler: str | None = None
    hr_denoising_strength: float | None = None
    hr_second_pass_steps: int | None = None
    controlnets: tuple[ControlNetUnit, ...] = ()
    guess_mode: bool = False


@dataclass(frozen=True, eq=False)
class GenerationResult:
    """Images of one request, with the settings and the model (name, version) that made them."""

    images: list[Image.Image]
    nsfw_content_detected: list[bool]
    seeds: list[int]
    settings: GenerationSettings
    model_name: str
    model_version: str

    def infotext(self, index: int = 0) -> str:
        """Image ``index``'s settings as AUTOMATIC1111's ``parameters`` text."""
        from ._infotext import format_infotext

        return format_infotext(self.settings, index=index)

    def save(self, path: str | os.PathLike) -> list[Path]:
        """Write every image as PNG with its ``parameters`` text chunk; return the paths.

        The first image goes to ``path``, the others to ``<stem>-1<suffix>``,
        ``<stem>-2<suffix>``, ... beside it.
        """
        from ._infotext import output_paths, save_png

        paths = output_paths(path, len(self.images))
        for i, (image, target) in enumerate(zip(self.images, paths, strict=True)):
            save_png(image, target, self.infotext(i))
        return paths


@dataclass(frozen=True, eq=False)
class ProgressEvent:
    """One streamed progress report: ``step`` of ``total_steps`` UNet evaluations done.

    ``previews`` holds one small RGB image per requested image (latents
    mapped to colour, at latent resolution) when the stream was opened with
    ``preview=True``, else None.
    """

    step: int
    total_steps: int
    elapsed_s: float
    previews: list[Image.Image] | None = None

    @property
    def fraction(self) -> float:
        """Share of the denoising done, 0..1."""
        return self.step / self.total_steps if self.total_steps else 0.0
