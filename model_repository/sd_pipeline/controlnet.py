"""ControlNet in the loop: the contract of the ControlNet models, request checks, residuals.

As diffusers' ``StableDiffusionControlNetPipeline`` (with several ControlNets,
its ``MultiControlNetModel``):

- each control image is read as ``VaeImageProcessor(do_convert_rgb=True,
  do_normalize=False)`` reads it at the output size (RGB in [0, 1]; the
  request's image must already be at that size), repeated for the N images
  and, with classifier-free guidance and without guess mode, for both halves;
- at step ``i`` of ``T`` a ControlNet is kept unless ``i / T < start`` or
  ``(i + 1) / T > end`` (``controlnet_keep``); its scale is
  ``controlnet_conditioning_scale * keep``;
- the ControlNets see the UNet's (scaled) input and text embeddings, their
  residuals are summed and go to the controlled UNet;
- guess mode with guidance: the ControlNets see only the conditional half and
  the unconditional half gets zero residuals; the ControlNet model scales its
  residuals from 0.1 to 1 (``torch.logspace(-1, 0, ...)``, in the exported model).

A ControlNet whose scale at a step is 0 is not called (its residuals would be
0); a step with no ControlNet kept runs the plain UNet (``x + 0 == x``).

With an SDXL refiner (``refiner_switch_at``) the ControlNets steer the base's share only,
their windows laid over the whole schedule as diffusers' ``denoising_end`` leaves them
(:meth:`.loop.Stage.make`); the refiner runs without them, as
``StableDiffusionXLImg2ImgPipeline(denoising_start=...)`` after the ControlNet pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import spec as S
from .errors import InvalidRequest

if TYPE_CHECKING:
    import torch

    from .components import Components
    from .conditioning import Conditioning
    from .config import PipelineConfig
    from .request import GenerationRequest

__all__ = [
    "CONTROLLED_UNET",
    "CONTROLNET_INPUTS",
    "REQUEST_INPUTS",
    "Control",
    "check_controlnet",
    "controlled_unet_spec",
    "controlnet_spec",
    "residual_names",
]

# The controlled UNet's component name (beside the plain "unet").
CONTROLLED_UNET = "unet_controlled"
# The ControlNet's own inputs, after the UNet's sample, timestep and text states
# (SDXL's text_embeds and time_ids follow them).
CONTROLNET_INPUTS = (
    # The control image, RGB in [0, 1] at the output image's size.
    S.TensorSpec(
        "controlnet_cond", "float32", (S.BATCH, "conditioning_channels", "height", "width")
    ),
    S.TensorSpec("conditioning_scale", "float32", (S.BATCH, 1), reshape=()),
    # diffusers' guess_mode: residuals scaled from 0.1 (first) to 1 (mid block).
    S.TensorSpec("guess_mode", "bool", (S.BATCH, 1), reshape=()),
)
# The request inputs of this feature (spec.STABLE_DIFFUSION), in the contract's order.
REQUEST_INPUTS = (
    "control_image",
    "controlnet",
    "controlnet_conditioning_scale",
    "control_guidance_start",
    "control_guidance_end",
    "guess_mode",
)


def residual_names(count: int) -> list[tuple[str, str]]:
    """(ControlNet output, controlled UNet input) of each of ``count`` residuals: the down
    blocks' in order, then the mid block's."""
    names = [
        (f"down_block_res_{i}", f"down_block_additional_residual_{i}") for i in range(count - 1)
    ]
    return [*names, ("mid_block_res", "mid_block_additional_residual")]


def _residual(name: str) -> S.TensorSpec:
    return S.TensorSpec(name, "float32", (S.BATCH, "channels", "height", "width"))


def controlnet_spec(name: str, residuals: int, *, text_time: bool = False) -> S.ModelSpec:
    """The contract of ControlNet model ``name`` as the pipeline calls it (channels and
    sizes left symbolic: the exporter's :func:`sd_triton.export.controlnet.controlnet_component`
    has them)."""
    sample, timestep, text, *added = S.unet_spec(text_time=text_time).inputs
    return S.ModelSpec(
        name=name,
        inputs=(sample, timestep, text, *CONTROLNET_INPUTS, *added),
        outputs=tuple(_residual(out) for out, _ in residual_names(residuals)),
    )


def controlled_unet_spec(residuals: int, **unet: bool) -> S.ModelSpec:
    """The UNet contract (``spec.unet_spec(**unet)``) plus the residual inputs."""
    spec = S.unet_spec(**unet)
    extra = tuple(_residual(unet_input) for _, unet_input in residual_names(residuals))
    return S.ModelSpec(CONTROLLED_UNET, spec.inputs + extra, spec.outputs, spec.description)


# ---------------------------------------------------------------------------
# Request checks


def _count(request: GenerationRequest, name: str) -> int | None:
    value = getattr(request, name)
    return None if value is None else len(value)


def check_controlnet(request: GenerationRequest, config: PipelineConfig) -> None:
    """Raise :class:`InvalidRequest` unless the request's ControlNet inputs fit this model."""
    given = [n for n in REQUEST_INPUTS if n != "guess_mode" and getattr(request, n) is not None]
    if request.guess_mode:
        given.append("guess_mode")
    if not given:
        return
    if request.controlnet is None or request.control_image is None:
        raise InvalidRequest(
            f"{', '.join(given)} given without "
            f"{'controlnet' if request.controlnet is None else 'control_image'}: a ControlNet "
            "request names its ControlNets (controlnet) and sends one control_image each"
        )
    _check_names(request.controlnet, config)
    _check_counts(request)
    _check_image_size(request)
    _check_ranges(request, config)


def _check_names(names: tuple[str, ...], config: PipelineConfig) -> None:
    if not config.controlnets:
        raise InvalidRequest(
            "this model has no ControlNet (export it with sd-triton-export --controlnet NAME=PATH)"
        )
    unknown = [n for n in names if n not in config.controlnets]
    if unknown:
        raise InvalidRequest(
            f"no ControlNet {', '.join(map(repr, unknown))} in this repository; it has "
            f"{', '.join(sorted(config.controlnets))}"
        )


def _check_counts(request: GenerationRequest) -> None:
    k = len(request.controlnet)
    counts = {n: _count(request, n) for n in REQUEST_INPUTS[:5]}
    wrong = {n: c for n, c in counts.items() if c is not None and c != k}
    if wrong:
        listed = ", ".join(f"{n} has {c}" for n, c in wrong.items())
        raise InvalidRequest(
            f"controlnet names {k} ControlNet(s) but {listed}: every ControlNet input has "
            "one entry per ControlNet"
        )


def _check_image_size(request: GenerationRequest) -> None:
    _, h, w, _ = request.control_image.shape
    if (h, w) != (request.height, request.width):
        raise InvalidRequest(
            f"control_image is {h}x{w} (height x width), the output {request.height}x"
            f"{request.width}: send the control images at the output size"
        )


def _check_ranges(request: GenerationRequest, config: PipelineConfig) -> None:
    scales, starts, ends = _settings(request, config)
    if not all(np.isfinite(scales)):
        raise InvalidRequest(f"controlnet_conditioning_scale must be finite, got {list(scales)}")
    for s, e in zip(starts, ends, strict=True):
        if not (0.0 <= s < e <= 1.0):
            raise InvalidRequest(
                f"control_guidance_start {s} and control_guidance_end {e}: need "
                "0 <= start < end <= 1 (fractions of the schedule)"
            )


def _settings(
    request: GenerationRequest, config: PipelineConfig
) -> tuple[list[float], list[float], list[float]]:
    """Per ControlNet: scale (default: diffusers' for the family and mode,
    :func:`.request.default_controlnet_scale`), guidance start (0) and end (1), as decimals."""
    from .request import decimal_value, default_controlnet_scale

    k = len(request.controlnet)
    default_scale = default_controlnet_scale(config.is_xl, request.image, request.mask_image)

    def values(name: str, default: float) -> list[float]:
        array = getattr(request, name)
        if array is None:
            return [default] * k
        return [decimal_value(np.float32(v)) for v in np.asarray(array).reshape(-1)]

    return (
        values("controlnet_conditioning_scale", default_scale),
        values("control_guidance_start", 0.0),
        values("control_guidance_end", 1.0),
    )


# ---------------------------------------------------------------------------
# The loop's share


@dataclass
class Control:
    """A request's ControlNets over one stage's timesteps (see the module's notes)."""

    components: Components
    config: PipelineConfig
    names: tuple[str, ...]  # component names of the ControlNet models
    images: list[torch.Tensor]  # per ControlNet: [B, 3, H, W] in [0, 1], B the ControlNet batch
    scales: list[float]
    keep: list[list[float]]  # per step, per ControlNet: 1.0 or 0.0
    guess_mode: bool
    halves: bool  # guess mode with guidance: the conditional half only

    @classmethod
    def make(
        cls,
        request: GenerationRequest,
        components: Components,
        config: PipelineConfig,
        steps: int,
        guided: bool,
        device: torch.device,
    ) -> Control | None:
        """The control of ``request`` over ``steps`` timesteps; None without ControlNet."""
        import torch

        if request.controlnet is None:
            return None
        scales, starts, ends = _settings(request, config)
        halves = request.guess_mode and guided
        copies = 2 if guided and not halves else 1
        n = request.num_images_per_prompt
        images = []
        for image in request.control_image:
            x = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
            images.append(torch.cat([x.repeat_interleave(n, dim=0)] * copies).to(device))
        keep = [
            [
                1.0 - float(i / steps < s or (i + 1) / steps > e)
                for s, e in zip(starts, ends, strict=True)
            ]
            for i in range(steps)
        ]
        names = tuple(config.controlnets[name] for name in request.controlnet)
        return cls(components, config, names, images, scales, keep, request.guess_mode, halves)

    def residuals(
        self, step: int, model_input: torch.Tensor, t: torch.Tensor, conditioning: Conditioning
    ) -> list[torch.Tensor] | None:
        """The summed residuals for the UNet's ``model_input`` at step ``step``; None when
        no ControlNet is kept at it."""
        import torch

        sample, embeddings, added = model_input, conditioning.embeddings, conditioning.added
        if self.halves:
            sample, embeddings = sample.chunk(2)[1], embeddings.chunk(2)[1]
            added = {k: v.chunk(2)[1] for k, v in added.items()}
        total = None
        for k, name in enumerate(self.names):
            scale = self.scales[k] * self.keep[step][k]
            if scale == 0:
                continue
            out = self._call(name, sample, t, embeddings, added, self.images[k], scale)
            total = out if total is None else [a + b for a, b in zip(total, out, strict=True)]
        if total is not None and self.halves:
            total = [torch.cat([torch.zeros_like(r), r]) for r in total]
        return total

    def _call(self, name, sample, t, embeddings, added, image, scale) -> list[torch.Tensor]:
        """One ControlNet on the batch, in chunks of at most ``unet_max_batch_size``."""
        import torch

        b, size = sample.shape[0], self.config.unet_max_batch_size
        timestep = torch.full((b,), float(t), dtype=torch.float32, device=sample.device)
        scales = torch.full((b,), scale, dtype=torch.float32, device=sample.device)
        guess = torch.full((b,), self.guess_mode, dtype=torch.bool, device=sample.device)
        chunks = [
            self.components.controlnet(
                name,
                sample[i : i + size],
                timestep[i : i + size],
                embeddings[i : i + size],
                image[i : i + size],
                scales[i : i + size],
                guess[i : i + size],
                {k: v[i : i + size] for k, v in added.items()},
            )
            for i in range(0, b, size)
        ]
        if len(chunks) == 1:
            return chunks[0]
        return [torch.cat(parts) for parts in zip(*chunks, strict=True)]


def controlnet_record(names: Mapping[str, str], residuals: int) -> dict[str, Any]:
    """pipeline.json's ControlNet entries: request name -> component name, residual count."""
    return {"controlnets": dict(names), "controlnet_residuals": residuals}
