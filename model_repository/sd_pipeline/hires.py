"""The web UI's hires fix in one request: txt2img, enlarge, img2img.

A text-to-image request with ``enable_hr`` runs in two passes, as
AUTOMATIC1111's ``enable_hr`` (``StableDiffusionProcessingTxt2Img``):

1. the first pass is the request as sent: its size, steps, scheduler and seed;
2. its latents are enlarged to ``int(height * hr_scale)`` x ``int(width * hr_scale)``
   pixels (the web UI's rule: truncated, in double precision; the result must be on
   the model's size step, or the request is refused with the scales that are):
   ``latent*`` upscalers interpolate the latents (the web UI's "Latent" modes:
   ``latent`` is bilinear without antialiasing); ``lanczos`` and ``nearest``
   decode the images, resize them with PIL and encode them again;
3. the second pass is img2img from the enlarged latents, ``hr_denoising_strength``
   of ``hr_second_pass_steps`` steps (0: ``num_inference_steps``), with a fresh
   generator seeded with the request's seed (noise, the VAE's sample, ancestral
   steps), a fresh scheduler, the same prompts and options; SDXL's size
   conditioning defaults to the second pass's own size; ControlNets steer both
   passes, with the same settings, their maps resized to the second pass's size as
   diffusers' ControlNet pipelines resize a control image (PIL's Lanczos).

That is the composition of diffusers' pipelines ``StableDiffusion(XL)Pipeline``
with ``output_type="latent"``, the upscale, and ``StableDiffusion(XL)Img2ImgPipeline``
with the enlarged latents (or the resized images) as ``image`` (with ControlNet: the
ControlNet pipelines, the maps as sent as ``control_image`` of both). The safety
checker and the watermark see the second pass's images only. The second pass is
a :class:`~.loop.Stage` after the first (streaming progress counts both); the
limits count its size, and the work budget both passes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from .components import Components
from .config import Assets, Limits, PipelineConfig
from .errors import InvalidRequest
from .images import decoded_to_numpy, image_processor, to_pil
from .loop import Inpainting, Stage, decode_latents, encode_pixels

if TYPE_CHECKING:
    from .request import GenerationRequest

__all__ = ["IMAGE_UPSCALERS", "LATENT_UPSCALERS", "SecondPass", "Hires", "check_hires", "hires"]

# hr_upscaler -> torch.nn.functional.interpolate's (mode, antialias): the web UI's
# shared.latent_upscale_modes ("Latent", "Latent (antialiased)", ...).
LATENT_UPSCALERS = {
    "latent": ("bilinear", False),
    "latent_antialiased": ("bilinear", True),
    "latent_bicubic": ("bicubic", False),
    "latent_bicubic_antialiased": ("bicubic", True),
    "latent_nearest": ("nearest", False),
    "latent_nearest_exact": ("nearest-exact", False),
}
# hr_upscaler -> PIL's resampling filter (the web UI's built-in "Lanczos" and "Nearest").
IMAGE_UPSCALERS = {"lanczos": "LANCZOS", "nearest": "NEAREST"}
# The hires inputs (spec.STABLE_DIFFUSION) besides enable_hr; None = the contract's default.
HR_INPUTS = ("hr_scale", "hr_upscaler", "hr_denoising_strength", "hr_second_pass_steps")


class Hires(NamedTuple):
    """A request's hires settings, defaults applied; ``height`` x ``width``: the second pass's."""

    scale: float
    upscaler: str
    strength: float
    steps: int
    height: int
    width: int


def upscaler_name(name: str) -> str:
    """``hr_upscaler`` as a table key: the web UI's names work too ("Latent (bicubic)")."""
    return re.sub(r"[^a-z]+", "_", name.lower()).strip("_")


def hires(request: GenerationRequest) -> Hires:
    """The hires settings of ``request``: the contract's defaults for absent inputs, and the
    second pass's size as the web UI computes it."""
    scale = 2.0 if request.hr_scale is None else request.hr_scale
    strength = request.hr_denoising_strength
    steps = request.hr_second_pass_steps or request.num_inference_steps
    finite = math.isfinite(scale)
    return Hires(
        scale=scale,
        upscaler=upscaler_name(request.hr_upscaler or "latent"),
        strength=0.7 if strength is None else strength,
        steps=steps,
        height=int(request.height * scale) if finite else 0,
        width=int(request.width * scale) if finite else 0,
    )


# ---------------------------------------------------------------------------
# Validation (called by request.validate)


def check_hires(
    request: GenerationRequest, config: PipelineConfig, limits: Limits | None = None
) -> None:
    """Raise :class:`InvalidRequest` unless the request's hires inputs can run on this model."""
    given = [name for name in HR_INPUTS if getattr(request, name) is not None]
    if not request.enable_hr:
        if given:
            raise InvalidRequest(f"{', '.join(given)}: hires fix inputs; they need enable_hr true")
        return
    if request.image is not None:
        raise InvalidRequest(
            "enable_hr is the hires fix of text-to-image: leave out the image (and mask_image)"
        )
    if request.refiner_switch_at is not None:
        raise InvalidRequest(
            "enable_hr with refiner_switch_at is not supported: send one or the other"
        )
    if request.guidance_rescale and not config.is_xl:
        raise InvalidRequest(
            "guidance_rescale applies to SD 1.x/2.x text-to-image only and the hires pass is "
            "img2img (diffusers' SD img2img pipeline has none); leave it out with enable_hr"
        )
    hr = hires(request)
    if hr.upscaler not in LATENT_UPSCALERS and hr.upscaler not in IMAGE_UPSCALERS:
        known = ", ".join([*LATENT_UPSCALERS, *IMAGE_UPSCALERS])
        raise InvalidRequest(f"unknown hr_upscaler {request.hr_upscaler!r}; known: {known}")
    if not math.isfinite(hr.strength) or not 0 < hr.strength <= 1:
        raise InvalidRequest(f"hr_denoising_strength must be in (0, 1], got {hr.strength}")
    _check_steps(request, hr, limits)
    _check_size(request, hr, config, limits)
    _check_work(request, hr, limits)


def _check_steps(request: GenerationRequest, hr: Hires, limits: Limits | None) -> None:
    given = request.hr_second_pass_steps
    if given is not None and given < 0:
        raise InvalidRequest(
            f"hr_second_pass_steps must be >= 0 (0: num_inference_steps), got {given}"
        )
    if limits is not None and hr.steps > limits.max_steps:
        raise InvalidRequest(
            f"hr_second_pass_steps {hr.steps} is over this model's limit of {limits.max_steps}"
        )
    if int(hr.steps * hr.strength) < 1:
        raise InvalidRequest(
            f"hr_denoising_strength {hr.strength} x {hr.steps} second-pass steps leaves no "
            "denoising step: raise either"
        )


def _check_size(
    request: GenerationRequest, hr: Hires, config: PipelineConfig, limits: Limits | None
) -> None:
    """The second pass's size: on the model's size step, within max_side and max_pixels."""
    if not math.isfinite(hr.scale) or hr.scale < 1:
        raise InvalidRequest(f"hr_scale must be a number >= 1 (it enlarges), got {hr.scale}")
    size = (
        f"int({request.height} x {hr.scale:g}) x int({request.width} x {hr.scale:g}) = "
        f"{hr.height} x {hr.width} pixels"
    )
    step = config.size_step
    if hr.height % step or hr.width % step:
        raise InvalidRequest(
            f"hr_scale {hr.scale:g} makes the second pass {size} (truncated, as the web UI), "
            f"not multiples of {step} pixels for this model: {_scales_on_step(request, hr, step)}"
        )
    if limits is None:
        return
    if max(hr.height, hr.width) > limits.max_side:
        raise InvalidRequest(
            f"hr_scale {hr.scale:g} makes the second pass {size}, over this model's limit of "
            f"{limits.max_side} pixels a side (max_side): lower hr_scale or the size"
        )
    if hr.height * hr.width > limits.max_pixels:
        raise InvalidRequest(
            f"hr_scale {hr.scale:g} makes the second pass {size} = {hr.height * hr.width} "
            f"pixels, over this model's limit of {limits.max_pixels} pixels (max_pixels): "
            "lower hr_scale or the size"
        )


def _scales_on_step(request: GenerationRequest, hr: Hires, step: int) -> str:
    """A sentence naming the nearest scales whose sizes are on the step."""
    # Both sides land on the step exactly at multiples of step / gcd(height, width).
    grid = step / math.gcd(request.height, request.width)
    below = math.floor(hr.scale / grid) * grid
    candidates = [round(s, 4) for s in (below, below + grid) if s >= 1]
    fits = [s for s in candidates if _on_step(request, s, step)]
    if not fits:
        return f"use an hr_scale that is a multiple of {grid:g}"
    return f"use a multiple of {grid:g}, such as {' or '.join(f'{s:g}' for s in fits)}"


def _on_step(request: GenerationRequest, scale: float, step: int) -> bool:
    return int(request.height * scale) % step == 0 and int(request.width * scale) % step == 0


def _check_work(request: GenerationRequest, hr: Hires, limits: Limits | None) -> None:
    """The work budget counts both passes: the second at its size, for the steps it runs."""
    if limits is None:
        return
    n = request.num_images_per_prompt
    first = request.height * request.width * n * request.num_inference_steps
    runs = min(int(hr.steps * hr.strength), hr.steps)
    second = hr.height * hr.width * n * runs
    if first + second > limits.max_work:
        raise InvalidRequest(
            f"with the hires pass, height x width x num_images_per_prompt x num_inference_steps "
            f"+ the second pass's {hr.height} x {hr.width} x {n} x {runs} steps = {first} + "
            f"{second} = {first + second} is over this model's work budget of "
            f"{limits.max_work}: lower hr_scale, the steps, the images or the size"
        )


# ---------------------------------------------------------------------------
# The second pass


def second_pass_request(request: GenerationRequest) -> GenerationRequest:
    """The request of the img2img pass: the enlarged size and its steps.

    It has no image: the latents come from the first pass (:meth:`SecondPass.enlarge`),
    and the stage is made img2img-like by its strength (:meth:`~.loop.Stage.make`). Its
    control maps (ControlNet) are the request's at its size.
    """
    hr = hires(request)
    control = request.control_image
    if control is not None:
        control = resize_control_images(control, hr.height, hr.width)
    return replace(
        request,
        height=hr.height,
        width=hr.width,
        num_inference_steps=hr.steps,
        enable_hr=False,
        control_image=control,
        **dict.fromkeys(HR_INPUTS),
    )


def resize_control_images(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 control maps ``[K, h, w, 3]`` at ``height`` x ``width``, resized as diffusers'
    ControlNet pipelines resize a control image of another size (``VaeImageProcessor``:
    PIL's Lanczos)."""
    import PIL.Image

    lanczos = PIL.Image.Resampling.LANCZOS
    return np.stack(
        [np.asarray(PIL.Image.fromarray(m).resize((width, height), lanczos)) for m in images]
    )


@dataclass
class SecondPass(Stage):
    """The hires pass: enlarges the first pass's latents, noises them, then runs img2img."""

    upscaler: str = "latent"

    @classmethod
    def after(
        cls,
        request: GenerationRequest,
        components: Components,
        assets: Assets,
        device: torch.device,
    ) -> SecondPass:
        """The second pass of ``request`` (its own scheduler, conditioning and timesteps):
        img2img with ``hr_denoising_strength`` from the enlarged latents."""
        hr = hires(request)
        second = second_pass_request(request)
        stage = cls.make(second, components, assets, device, strength=hr.strength)
        return replace(stage, upscaler=hr.upscaler)

    def denoise(self, latents, generator, inpainting: Inpainting | None, progress, stop):
        """As :meth:`Stage.denoise`, from the enlarged latents, with a fresh generator."""
        generator = torch.Generator(device="cpu").manual_seed(self.request.seed)
        latents = self.enlarge(latents, generator)
        return super().denoise(latents, generator, inpainting, progress, stop)

    def enlarge(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The first pass's latents at the second pass's size, noised to its first timestep
        (diffusers' img2img ``prepare_latents``: image latents, then one draw of noise)."""
        from diffusers.utils.torch_utils import randn_tensor

        device, cpu = latents.device, torch.device("cpu")
        f = self.assets.config.vae_scale_factor
        size = (self.request.height // f, self.request.width // f)
        if self.upscaler in LATENT_UPSCALERS:
            mode, antialias = LATENT_UPSCALERS[self.upscaler]
            init = torch.nn.functional.interpolate(
                latents.to(cpu), size=size, mode=mode, antialias=antialias
            )
        else:
            init = self.resample(latents, generator)
        noise = randn_tensor(init.shape, generator=generator, device=cpu, dtype=torch.float32)
        noised = self.scheduler.add_noise(init, noise, self.timesteps[:1].repeat(len(init)))
        return noised.to(device)

    def resample(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Image-space upscaling: decode, round to uint8 PIL images (as diffusers' ``pil``
        output), resize with PIL, encode (sampled with ``generator``)."""
        import PIL.Image

        config = self.assets.config
        height, width = self.request.height, self.request.width
        images = to_pil(decoded_to_numpy(decode_latents(latents, self.components, config), config))
        resample = getattr(PIL.Image.Resampling, IMAGE_UPSCALERS[self.upscaler])
        resized = [image.resize((width, height), resample=resample) for image in images]
        processor = image_processor(config.vae_scale_factor, config.latent_channels)
        pixels = processor.preprocess(resized, height=height, width=width)
        return encode_pixels(pixels, self.components, config, generator)
