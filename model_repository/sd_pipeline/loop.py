"""The sampler loop, written once for every host.

:func:`generate` follows diffusers' ``StableDiffusionPipeline.__call__`` (with
an ``image``, ``StableDiffusionImg2ImgPipeline.__call__``; with a
``mask_image`` too, ``StableDiffusionInpaintPipeline.__call__``) step for
step, so that the same weights, seed and settings give the same image (to
within one uint8 level: the components may run in onnxruntime or batched
with other requests' UNet calls):

1. make this request's scheduler and seeded CPU generator
2. encode the prompt and the negative prompt (and the family's added UNet
   inputs: :mod:`.conditioning`)
3. set the timesteps (img2img, inpainting: the last ``strength`` of them;
   SDXL with a refiner: the base runs them down to ``refiner_switch_at``)
4. draw the initial latents (img2img: encode the image, noise it;
   inpainting: also the mask at latent size and the masked image's latents)
5. denoise, with classifier-free guidance (inpainting: a 9-channel UNet
   also sees the mask and the masked image's latents; with a 4-channel
   UNet the unmasked region is put back, noised to the next timestep,
   after every step)
   (a refiner takes over the latents for the rest of its own schedule, with
   its own conditioning and the same generator, as diffusers'
   ensemble-of-experts recipe; after inpainting it puts the base's latents
   back in the unmasked region, noised with noise of its own)
6. decode the latents (and watermark them, where the model does: SDXL)
7. run the safety checker, black out flagged images
8. convert to uint8

The components are anything that implements
:class:`~.components.Components`: BLS calls inside Triton, onnxruntime
sessions or diffusers modules in-process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import numpy as np
import torch

from .components import Components
from .conditioning import Conditioning, condition, guided
from .config import Assets, PipelineConfig
from .controlnet import Control
from .errors import Cancelled, InvalidRequest
from .images import decoded_to_numpy, image_to_pixels, mask_to_tensor, to_pil, to_uint8
from .request import GenerationRequest, img2img_strength, validate
from .schedulers import make_scheduler, step_kwargs
from .watermark import apply_watermark

__all__ = ["GenerationResult", "Inpainting", "Stage", "StepCallback", "generate"]

# callback(step_index, total_steps, latents): called after each denoising
# step; step_index counts from 0, total_steps is the number of UNet
# evaluations (len(scheduler.timesteps)), latents are the scheduler's.
StepCallback = Callable[[int, int, torch.Tensor], None]


@dataclass(frozen=True)
class GenerationResult:
    """What one request returns (diffusers' ``StableDiffusionPipelineOutput``, as numpy).

    ``images``: uint8 ``[N, H, W, 3]``; ``nsfw_content_detected``: bool ``[N]``
    (flagged images are black); ``seeds``: int64 ``[N]``, the request's seed
    for every image (one generator draws all N images' latents at once).
    ``steps``: the denoising steps run (all stages), ``denoise_s``: the seconds
    they took (the server's per-step metric, ``sd_denoise_seconds_total``).
    """

    images: np.ndarray
    nsfw_content_detected: np.ndarray
    seeds: np.ndarray
    steps: int = 0
    denoise_s: float = 0.0


def polled_at_most_every(poll: Callable[[], bool], interval_s: float) -> Callable[[], bool]:
    """``poll`` asked at most once every ``interval_s``; in between, "not yet".

    Inside Triton, asking whether a request was cancelled is a round trip to the
    server process: at every step it would cost as much as the scheduler step.
    Throttled, a cancellation is seen within one step plus ``interval_s``.
    """
    last = -float("inf")

    def should_stop() -> bool:
        nonlocal last
        now = time.monotonic()
        if now - last < interval_s:
            return False
        last = now
        return poll()

    return should_stop


@dataclass
class Stage:
    """One model's share of a request: its components, scheduler, conditioning, timesteps.

    A request has one stage, or two with a refiner: the base denoises up to
    ``refiner_switch_at``, the refiner from there (diffusers' ``denoising_end`` /
    ``denoising_start``). Both draw from the request's one generator.
    """

    request: GenerationRequest
    components: Components
    assets: Assets
    scheduler: object
    timesteps: torch.Tensor
    conditioning: Conditioning
    # The request's ControlNets over these timesteps (.controlnet); None without.
    control: Control | None = None

    @classmethod
    def make(
        cls,
        request: GenerationRequest,
        components: Components,
        assets: Assets,
        device: torch.device,
        *,
        end: float | None = None,
        start: float | None = None,
        strength: float | None = None,
    ) -> Stage:
        """The stage of ``request`` on these components: all of its schedule, the share
        up to ``end`` / from ``start`` (base / refiner), or, with ``strength``, img2img from
        latents that :meth:`denoise` is given (the hires pass): the last ``strength`` of the
        schedule, conditioned as img2img (SDXL's time ids), with no image in the request."""
        scheduler = make_scheduler(request.scheduler, assets.scheduler_config, request.seed)
        img2img = strength is not None
        conditioning = condition(request, components, assets, img2img=img2img).to(device)
        timesteps = set_timesteps(
            scheduler, request, device, assets.config, start=start, strength=strength
        )
        # diffusers' ControlNet pipelines lay the guidance windows over these timesteps
        # (all, or img2img's share), before denoising_end cuts them (a base: up to
        # refiner_switch_at).
        window = len(timesteps)
        if end is not None:
            timesteps = denoising_end(scheduler, timesteps, end)
        if len(timesteps) == 0:
            raise InvalidRequest(_no_step(request, "refiner" if start else "base", window))
        control = None
        if start is None:  # a refiner after a ControlNet base runs without it, as diffusers
            cfg = guided(request, assets.config)
            control = Control.make(request, components, assets.config, window, cfg, device)
        return cls(request, components, assets, scheduler, timesteps, conditioning, control)

    def denoise(
        self,
        latents: torch.Tensor,
        generator: torch.Generator,
        inpainting: Inpainting | None,
        progress: Callable[[int, torch.Tensor], None],
        stop: Callable[[], bool],
    ) -> torch.Tensor:
        """Run this stage's timesteps on ``latents``; ``progress(i, latents)`` after each."""
        extra = step_kwargs(self.scheduler, generator)
        config = self.assets.config
        for i, t in enumerate(self.timesteps):
            if stop():
                raise Cancelled(f"cancelled at step {i} of {len(self.timesteps)}")
            control = None if self.control is None else partial(self.control.residuals, i)
            latents = denoise_step(
                self.request, self.components, config, self.scheduler, latents, t,
                self.conditioning, extra, inpainting, control,
            )  # fmt: skip
            if inpainting is not None and inpainting.image_latents is not None:
                next_t = self.timesteps[i + 1 : i + 2] if i + 1 < len(self.timesteps) else None
                latents = inpainting.keep_unmasked(self.scheduler, latents, next_t)
            progress(i, latents)
        return latents


def import_lazy_modules() -> None:
    """Import now what requests import on first use (diffusers' scheduler classes, image
    processor, pipeline helpers).

    diffusers resolves its names lazily (``_LazyModule``); two worker threads of a
    threaded pipeline model resolving the same name at once can see
    ``module 'diffusers' has no attribute 'EulerDiscreteScheduler'`` (seen on a fresh
    instance's first concurrent requests). The pipeline model calls this once at load.
    """
    import diffusers
    import diffusers.image_processor
    import diffusers.models.autoencoders.vae
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion
    import diffusers.utils.torch_utils  # noqa: F401

    from .schedulers import SCHEDULERS

    for choice in SCHEDULERS.values():
        getattr(diffusers, choice.class_name)
    diffusers.StableDiffusionPipeline  # noqa: B018  (conditioning's guidance embedding)


def generate(
    request: GenerationRequest,
    components: Components,
    assets: Assets,
    *,
    refiner: Components | None = None,
    callback: StepCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Run ``request`` to images. Raises ``InvalidRequest``, ``Cancelled`` or ``ComponentError``.

    ``refiner``: the components of the refiner exported beside an SDXL base
    (``assets.refiner``), for requests with ``refiner_switch_at``.
    ``should_stop`` is polled before every UNet step and before decoding;
    when it returns true the run ends with :class:`~.errors.Cancelled`.
    """
    config = assets.config
    validate(request, config)
    stop = should_stop or (lambda: False)
    # Where the loop keeps its tensors: the GPU when the components run there
    # (Triton BLS with DLPack GPU tensors), so latents make no host round
    # trip per step. Random draws stay on the CPU generator, as in diffusers.
    device = getattr(components, "device", None) or torch.device("cpu")
    # 1.-3. per-request state: the seeded generator; per stage a fresh scheduler,
    # the conditioning and the timesteps
    generator = torch.Generator(device="cpu").manual_seed(request.seed)
    stages = _stages(request, components, assets, refiner, device)
    base = stages[0]
    # 4. initial latents (and, for inpainting, the mask and the image's latents)
    if request.mask_image is None:
        latents = prepare_latents(
            request, components, config, base.scheduler, generator, base.timesteps
        )
        inpainting = None
    else:
        latents, inpainting = prepare_inpainting(
            request, components, config, base.scheduler, generator, base.timesteps
        )
        inpainting = inpainting.to(device)
    latents = latents.to(device)
    # 5. denoising, stage after stage
    total, done = sum(len(s.timesteps) for s in stages), 0
    denoise_start = time.perf_counter()
    for stage in stages:

        def progress(i: int, latents: torch.Tensor, offset: int = done) -> None:
            if callback is not None:
                callback(offset + i, total, latents)

        if done and inpainting is not None:  # the refiner after an inpainting base
            inpainting = inpainting.handed_over(latents, generator)
        latents = stage.denoise(latents, generator, inpainting, progress, stop)
        done += len(stage.timesteps)
    denoise_s = time.perf_counter() - denoise_start
    if stop():
        raise Cancelled("cancelled before decoding")
    # 6. decode, with the last stage's VAE
    last = stages[-1]
    decoded = decode_latents(latents, last.components, last.assets.config)
    if config.watermark:
        decoded = apply_watermark(decoded)
    # 7.-8. safety checker, uint8
    images, flags = run_safety_checker(decoded, components, assets)
    seeds = np.full(len(images), request.seed, dtype=np.int64)
    return GenerationResult(images, flags, seeds, steps=total, denoise_s=denoise_s)


def _stages(
    request: GenerationRequest,
    components: Components,
    assets: Assets,
    refiner: Components | None,
    device: torch.device,
) -> list[Stage]:
    switch = request.refiner_switch_at
    if request.enable_hr:  # the web UI's hires fix: a second, enlarged img2img pass
        from .hires import SecondPass  # hires builds on this module

        base = Stage.make(request, components, assets, device)
        return [base, SecondPass.after(request, components, assets, device)]
    if switch is None:
        return [Stage.make(request, components, assets, device)]
    if refiner is None or assets.refiner is None:
        raise InvalidRequest("refiner_switch_at needs a refiner beside this model")
    return [
        Stage.make(request, components, assets, device, end=switch),
        Stage.make(request, refiner, assets.refiner, device, start=switch),
    ]


def set_timesteps(
    scheduler,
    request: GenerationRequest,
    device: torch.device | str = "cpu",
    config: PipelineConfig | None = None,
    *,
    start: float | None = None,
    strength: float | None = None,
) -> torch.Tensor:
    """The timesteps to run: all of them, the last ``strength`` of them (img2img,
    inpainting), or a refiner's share from ``start`` of the schedule.

    img2img follows diffusers' ``get_timesteps``: skip the first
    ``steps - int(steps * strength)`` steps (times the scheduler's order) and
    tell the scheduler where it starts. Its strength is ``strength`` when given (a
    stage that starts from given latents: the hires pass), else the request's when it
    has an image. ``start`` follows SDXL's ``denoising_start``, which ignores strength; a
    base's ``denoising_end`` cuts these timesteps afterwards (:func:`denoising_end`).
    """
    steps = request.num_inference_steps
    try:
        scheduler.set_timesteps(steps, device=device)
    except ValueError as e:
        raise InvalidRequest(f"num_inference_steps {steps}: {e}") from None
    timesteps = scheduler.timesteps
    if start is not None:
        count = int((timesteps < _cutoff(scheduler, start)).sum())
        if scheduler.order == 2 and count % 2 == 0:
            count += 1  # start on a first-order step, as diffusers
        t_start = len(timesteps) - count
    elif strength is None and request.image is None:
        return timesteps
    else:
        if strength is None:
            strength = img2img_strength(request, config)
        init_timestep = min(int(steps * strength), steps)
        t_start = max(steps - init_timestep, 0) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start)
    return timesteps[t_start:]


def denoising_end(scheduler, timesteps: torch.Tensor, end: float) -> torch.Tensor:
    """A base's share of ``timesteps`` up to ``end`` (SDXL's ``denoising_end``): those at or
    above the cutoff, cut after img2img's strength as diffusers does."""
    return timesteps[: int((timesteps >= _cutoff(scheduler, end)).sum())]


def _cutoff(scheduler, fraction: float) -> int:
    """diffusers' ``discrete_timestep_cutoff`` of ``denoising_start`` / ``denoising_end``."""
    train_steps = scheduler.config.num_train_timesteps
    return int(round(train_steps - fraction * train_steps))


def _no_step(request: GenerationRequest, stage: str, before: int) -> str:
    """Why refiner_switch_at leaves ``stage`` no step (``before``: the base's before the cut)."""
    switch, steps = request.refiner_switch_at, request.num_inference_steps
    if stage == "base" and request.image is not None:
        return (
            f"refiner_switch_at {switch} leaves the base no step of the {before} that strength "
            f"leaves of {steps} (the base runs the timesteps above the switch): lower "
            "refiner_switch_at, or raise strength"
        )
    return (
        f"refiner_switch_at {switch} leaves the {stage} no step of {steps}: move it, or raise "
        "num_inference_steps"
    )


def prepare_latents(
    request: GenerationRequest,
    components: Components,
    config: PipelineConfig,
    scheduler,
    generator: torch.Generator,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """Initial latents for all N images from ``generator``, as diffusers' ``prepare_latents``.

    Text-to-image: one draw of noise ``[N, latent_channels, H / f, W / f]``
    scaled by the scheduler's ``init_noise_sigma``. img2img: the image's
    latents (sampled once, repeated N times), noised to the first timestep
    with one draw of noise for all N.
    """
    from diffusers.utils.torch_utils import randn_tensor

    n = request.num_images_per_prompt
    f = config.vae_scale_factor
    shape = (n, config.latent_channels, request.height // f, request.width // f)
    cpu = torch.device("cpu")
    if request.image is None:
        noise = randn_tensor(shape, generator=generator, device=cpu, dtype=torch.float32)
        return noise * scheduler.init_noise_sigma
    init_latents = encode_image(request.image, components, config, generator).repeat(n, 1, 1, 1)
    noise = randn_tensor(shape, generator=generator, device=cpu, dtype=torch.float32)
    return scheduler.add_noise(init_latents, noise, timesteps[:1].repeat(n))


class Inpainting(NamedTuple):
    """What inpainting adds to the loop, for all N images.

    ``mask``: ``[N, 1, h, w]``, 1 = repaint, at latent size. A 9-channel
    UNet gets ``masked_image_latents`` ``[N, C, h, w]`` (the image with the
    masked region grey, encoded) beside the latents; with a 4-channel UNet
    ``image_latents`` and ``noise`` restore the unmasked region after every
    step (:meth:`keep_unmasked`). The other pair is None.
    """

    mask: torch.Tensor
    masked_image_latents: torch.Tensor | None
    image_latents: torch.Tensor | None
    noise: torch.Tensor | None

    def to(self, device: torch.device) -> Inpainting:
        return Inpainting(*(None if x is None else x.to(device) for x in self))

    def unet_input(self, model_input: torch.Tensor) -> torch.Tensor:
        """A 9-channel UNet's input: latents, mask and masked image latents on channels."""
        if self.masked_image_latents is None:
            return model_input
        k = model_input.shape[0] // self.mask.shape[0]  # 2 with guidance
        extra = [self.mask.repeat(k, 1, 1, 1), self.masked_image_latents.repeat(k, 1, 1, 1)]
        return torch.cat([model_input, *extra], dim=1)

    def handed_over(self, latents: torch.Tensor, generator: torch.Generator) -> Inpainting:
        """The refiner's inpainting after the base's ``latents``, as diffusers'
        ``StableDiffusionXLInpaintPipeline(image=latents, mask_image=..., denoising_start=...)``:
        the same mask; the base's latents are the image latents that the unmasked region
        gets back after every step, noised with noise drawn now; no masked image."""
        from diffusers.utils.torch_utils import randn_tensor

        cpu = torch.device("cpu")
        noise = randn_tensor(latents.shape, generator=generator, device=cpu, dtype=torch.float32)
        return Inpainting(self.mask, None, latents, noise.to(latents.device))

    def keep_unmasked(
        self, scheduler, latents: torch.Tensor, next_timestep: torch.Tensor | None
    ) -> torch.Tensor:
        """4-channel UNet: the image's latents (noised to the next timestep) where the mask is 0."""
        proper = self.image_latents
        if next_timestep is not None:
            proper = scheduler.add_noise(proper, self.noise, next_timestep)
        return (1 - self.mask) * proper + self.mask * latents


def prepare_inpainting(
    request: GenerationRequest,
    components: Components,
    config: PipelineConfig,
    scheduler,
    generator: torch.Generator,
    timesteps: torch.Tensor,
) -> tuple[torch.Tensor, Inpainting]:
    """Initial latents and :class:`Inpainting`, drawing from ``generator`` in diffusers' order.

    As ``StableDiffusionInpaintPipeline``: the image's latents (sampled;
    skipped for a 9-channel UNet at strength 1), one draw of noise for all
    N images (strength 1: pure noise times ``init_noise_sigma``, else the
    image's latents noised to the first timestep), then the masked image's
    latents (sampled). diffusers encodes the masked image for a 4-channel
    UNet too and never uses it; here the generator draws the same noise
    instead, which keeps it in step (ancestral schedulers draw from it
    later) without the VAE call.
    """
    from diffusers.utils.torch_utils import randn_tensor

    n = request.num_images_per_prompt
    f = config.vae_scale_factor
    h, w = request.height // f, request.width // f
    cpu = torch.device("cpu")
    nine_channels = config.unet_in_channels != config.latent_channels
    strength_max = img2img_strength(request, config) == 1.0
    pixels = image_to_pixels(request.image, config)
    image_latents = None
    if not (nine_channels and strength_max):
        image_latents = encode_pixels(pixels, components, config, generator).repeat(n, 1, 1, 1)
    shape = (n, config.latent_channels, h, w)
    noise = randn_tensor(shape, generator=generator, device=cpu, dtype=torch.float32)
    if strength_max:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(n))
    mask = mask_to_tensor(request.mask_image, config)
    masked_pixels = pixels * (mask < 0.5)
    if nine_channels:
        masked = encode_pixels(masked_pixels, components, config, generator).repeat(n, 1, 1, 1)
        inpainting = Inpainting(_latent_mask(mask, h, w, n), masked, None, None)
    else:
        randn_tensor((1, config.latent_channels, h, w), generator=generator, device=cpu)
        inpainting = Inpainting(_latent_mask(mask, h, w, n), None, image_latents, noise)
    return latents, inpainting


def _latent_mask(mask: torch.Tensor, h: int, w: int, n: int) -> torch.Tensor:
    """``[1, 1, H, W]`` -> ``[n, 1, h, w]`` by nearest neighbour, as diffusers."""
    return torch.nn.functional.interpolate(mask, size=(h, w)).repeat(n, 1, 1, 1)


def encode_image(
    image: np.ndarray, components: Components, config: PipelineConfig, generator: torch.Generator
) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> scaled latents ``[1, C, h, w]``, sampled from the VAE's distribution."""
    return encode_pixels(image_to_pixels(image, config), components, config, generator)


def encode_pixels(
    pixels: torch.Tensor, components: Components, config: PipelineConfig, generator: torch.Generator
) -> torch.Tensor:
    """Pixels ``[1, 3, H, W]`` in [-1, 1] -> scaled latents ``[1, C, h, w]``.

    As diffusers: encode, sample with the request's generator, multiply by
    the VAE's scaling factor.
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    parameters = components.vae_encode(pixels)
    latents = DiagonalGaussianDistribution(parameters).sample(generator)
    if config.vae_shift_factor is not None:
        latents = latents - config.vae_shift_factor
    return config.vae_scaling_factor * latents


def predict_noise(
    components: Components,
    config: PipelineConfig,
    sample: torch.Tensor,
    t: torch.Tensor,
    conditioning: Conditioning,
    residuals: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The UNet on ``sample``, in chunks of at most ``unet_max_batch_size``; timestep per sample.
    With ControlNet ``residuals``, the controlled UNet."""
    timestep = torch.full((sample.shape[0],), float(t), dtype=torch.float32, device=sample.device)
    size = config.unet_max_batch_size
    embeddings, added = conditioning.embeddings, conditioning.added
    if sample.shape[0] <= size:  # one call (every step of a request within the batch limit)
        control = {} if residuals is None else {"residuals": residuals}
        return components.unet(sample, timestep, embeddings, added, **control)
    chunks = [
        components.unet(
            sample[i : i + size],
            timestep[i : i + size],
            embeddings[i : i + size],
            {k: v[i : i + size] for k, v in added.items()},
            **({} if residuals is None else {"residuals": [r[i : i + size] for r in residuals]}),
        )
        for i in range(0, sample.shape[0], size)
    ]
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def denoise_step(
    request: GenerationRequest,
    components: Components,
    config: PipelineConfig,
    scheduler,
    latents: torch.Tensor,
    t: torch.Tensor,
    conditioning: Conditioning,
    extra: dict,
    inpainting: Inpainting | None = None,
    control: Callable[[torch.Tensor, torch.Tensor, Conditioning], list | None] | None = None,
) -> torch.Tensor:
    """One step: duplicate for guidance, scale, (ControlNets), (9-channel UNet: add mask),
    UNet, combine, (rescale), step. ``control(model_input, t, conditioning)``: the step's
    ControlNet residuals (:meth:`.controlnet.Control.residuals`)."""
    cfg = guided(request, config)
    model_input = torch.cat([latents] * 2) if cfg else latents
    model_input = scheduler.scale_model_input(model_input, t)
    # The ControlNets see the latents without the inpainting channels, as diffusers'.
    residuals = None if control is None else control(model_input, t, conditioning)
    if inpainting is not None:
        model_input = inpainting.unet_input(model_input)
    noise_pred = predict_noise(components, config, model_input, t, conditioning, residuals)
    if cfg:
        noise_uncond, noise_text = noise_pred.chunk(2)
        noise_pred = noise_uncond + request.guidance_scale * (noise_text - noise_uncond)
        if request.guidance_rescale > 0:
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
                rescale_noise_cfg,
            )

            noise_pred = rescale_noise_cfg(
                noise_pred, noise_text, guidance_rescale=request.guidance_rescale
            )
    return scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]


def decode_latents(
    latents: torch.Tensor, components: Components, config: PipelineConfig
) -> torch.Tensor:
    """Latents -> images ``[N, 3, H, W]`` in about [-1, 1] (unscaled with the VAE's factors)."""
    latents = latents / config.vae_scaling_factor
    if config.vae_shift_factor is not None:
        latents = latents + config.vae_shift_factor
    return components.vae_decode(latents)


def run_safety_checker(
    decoded: torch.Tensor, components: Components, assets: Assets
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``[N, H, W, 3]`` and NSFW flags ``[N]``; flagged images are black.

    As diffusers: denormalize to [0, 1], make PIL images for the CLIP
    preprocessor, run the checker, and return black where it flagged.
    """
    images = decoded_to_numpy(decoded, assets.config)
    if not assets.config.safety_checker:
        return to_uint8(images), np.zeros(len(images), dtype=bool)
    clip_input = assets.feature_extractor(to_pil(images), return_tensors="pt").pixel_values
    checked, flagged = components.safety_check(clip_input, torch.from_numpy(images))
    flags = np.asarray(flagged, dtype=bool).reshape(-1)
    return to_uint8(np.asarray(checked, dtype=np.float32)), flags
