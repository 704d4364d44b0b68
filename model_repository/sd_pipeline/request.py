"""One generation request: parsed from the model's input tensors and validated.

Every check that can fail on client input lives here and raises
:class:`~.errors.InvalidRequest` with a sentence that says what is wrong, so
the glue answers INVALID_ARG for that request alone. Triton itself already
rejects some bad inputs (wrong dtype or a fixed dim of the wrong size, for
declared inputs); the checks are repeated because the in-process path has
no Triton in front of it.

img2img: with an ``image`` the request's size is the image's (a size that
is not a multiple of the model's size step is refused, never resized), and
``strength`` (default 0.8) picks how much of the schedule runs, as in
``StableDiffusionImg2ImgPipeline``. Inpainting: ``image`` plus a
``mask_image`` of the same size (255 = repaint), ``strength`` default 1.0,
as in ``StableDiffusionInpaintPipeline``. A model with a 9-channel
(inpainting) UNet only inpaints.

Seeds: a request has one seed (random when absent). As in diffusers, one
CPU ``torch.Generator`` seeded with it draws the initial latents of all
``num_images_per_prompt`` images at once (and the ancestral schedulers' noise
afterwards), so a request is reproduced by sending it again with the same
seed and the same num_images_per_prompt; every image reports the request's
seed.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import spec as S
from .config import Limits, PipelineConfig
from .errors import InvalidRequest
from .schedulers import check_name

__all__ = [
    "GenerationRequest",
    "decimal_value",
    "make_request",
    "parse_request",
    "random_seed",
    "validate",
]

_DEFAULTS = {t.name: t.default for t in S.STABLE_DIFFUSION_STREAM.inputs}
# diffusers' StableDiffusionInpaintPipeline defaults to strength 1 (img2img: 0.8).
INPAINT_DEFAULT_STRENGTH = 1.0
_INT64 = np.iinfo(np.int64)


def random_seed() -> int:
    """A fresh non-negative int64 seed from the OS's entropy."""
    return secrets.randbelow(int(_INT64.max) + 1)


@dataclass(frozen=True, kw_only=True, eq=False)
class GenerationRequest:
    """A validated request. ``scheduler`` None means the model's own scheduler config."""

    prompt: str
    height: int
    width: int
    seed: int
    negative_prompt: str = _DEFAULTS["negative_prompt"]
    num_inference_steps: int = _DEFAULTS["num_inference_steps"]
    guidance_scale: float = _DEFAULTS["guidance_scale"]
    scheduler: str | None = None
    num_images_per_prompt: int = _DEFAULTS["num_images_per_prompt"]
    image: np.ndarray | None = None
    mask_image: np.ndarray | None = None
    # img2img / inpainting: how far to noise the image; None = the contract's default.
    strength: float | None = None
    # Streaming model only: add a latent preview to each progress response.
    preview: bool = _DEFAULTS["preview"]

    @property
    def img2img_strength(self) -> float:
        """``strength``, or when absent the default: 1.0 to inpaint, else the contract's (0.8)."""
        if self.strength is not None:
            return self.strength
        return INPAINT_DEFAULT_STRENGTH if self.mask_image is not None else _DEFAULTS["strength"]

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Guidance scale <= 1 turns classifier-free guidance off (and halves the UNet batch)."""
        return self.guidance_scale > 1.0


def make_request(
    config: PipelineConfig,
    prompt: str,
    *,
    height: int | None = None,
    width: int | None = None,
    seed: int | None = None,
    limits: Limits | None = None,
    **options: Any,
) -> GenerationRequest:
    """Build and validate a request in-process; sizes default to the image's or the model's native size."""
    image = options.get("image")
    native = image.shape[:2] if image is not None else (config.native_height, config.native_width)
    request = GenerationRequest(
        prompt=prompt,
        height=native[0] if height is None else height,
        width=native[1] if width is None else width,
        seed=random_seed() if seed is None else seed,
        **options,
    )
    validate(request, config, limits)
    return request


# ---------------------------------------------------------------------------
# Tensors -> request


def _check_tensor(tensor: S.TensorSpec, array: np.ndarray) -> None:
    """Dtype and shape of one input against its spec."""
    if tensor.dtype == "bytes":
        ok = array.dtype == np.object_ or array.dtype.kind == "S"
    else:
        ok = array.dtype == np.dtype(tensor.dtype)
    if not ok:
        raise InvalidRequest(f"input {tensor.name} must be {tensor.datatype}, got {array.dtype}")
    shape = tuple(array.shape)
    fits = len(shape) == len(tensor.dims) and all(
        size == dim if isinstance(dim, int) else size >= 1
        for size, dim in zip(shape, tensor.dims, strict=False)
    )
    if fits:
        return
    if len(shape) == len(tensor.dims) and 0 in shape and tensor.dims != (1,):
        raise InvalidRequest(f"input {tensor.name} is empty (shape {list(shape)})")
    if tensor.name == "prompt" and array.size > 1:
        raise InvalidRequest(
            f"prompt must hold exactly one string, got shape {list(shape)}: one request is one "
            "prompt (send one request per prompt; num_images_per_prompt makes several images)"
        )
    raise InvalidRequest(
        f"input {tensor.name} must have shape {list(tensor.dims)}, got {list(shape)}"
    )


def _text(name: str, array: np.ndarray) -> str:
    raw = array.reshape(-1)[0]
    if isinstance(raw, str):
        return raw
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"{name} is not valid UTF-8 ({e.reason} at byte {e.start})") from None


def decimal_value(value: np.floating) -> float:
    """The decimal a client meant by a float32: the shortest one that round-trips it.

    A client writes 0.7; FP32 carries 0.69999999, and ``int(10 * 0.69999999)``
    is 6 where diffusers (a Python float) runs 7 steps. Every float input
    means its decimal, so every decision made from it (steps from strength,
    guidance on or off) is the one diffusers makes from the number written.
    """
    return float(np.format_float_scientific(value, unique=True))


def _value(tensor: S.TensorSpec, array: np.ndarray) -> Any:
    """The Python value of a checked input; arrays are copied (Triton frees request memory)."""
    if tensor.dtype == "bytes":
        return _text(tensor.name, array)
    if tensor.dims != (1,):
        return np.array(array, copy=True)
    scalar = array.reshape(-1)[0]
    if isinstance(scalar, np.floating):
        return decimal_value(scalar)
    return scalar.item()


def parse_request(
    inputs: Mapping[str, np.ndarray],
    config: PipelineConfig,
    limits: Limits | None = None,
    model: S.ModelSpec = S.STABLE_DIFFUSION,
    *,
    default_scheduler: str | None = None,
) -> GenerationRequest:
    """Turn ``model``'s input tensors (name -> numpy array, absent = missing) into a valid request.

    ``default_scheduler``: the alias used when the request names none (the
    deployment's choice, config parameter ``default_scheduler``); None keeps
    the model's own scheduler config.
    """
    declared = {t.name: t for t in model.inputs}
    unknown = sorted(set(inputs) - set(declared))
    if unknown:
        raise InvalidRequest(
            f"unknown input {', '.join(unknown)}; {model.name} takes {', '.join(declared)}"
        )
    for name, array in inputs.items():
        _check_tensor(declared[name], np.asarray(array))
    for name in ("prompt", "negative_prompt"):
        if name in inputs:
            _check_text_size(name, np.asarray(inputs[name]), config, limits)
    if "prompt" not in inputs:
        raise InvalidRequest("prompt is required: one UTF-8 string, BYTES with shape [1]")
    values = {name: _value(declared[name], np.asarray(a)) for name, a in inputs.items()}
    if "seed" not in values:
        values["seed"] = random_seed()
    image = values.get("image")
    if image is not None and image.ndim >= 2:
        # img2img: the image sets the size
        values.setdefault("height", image.shape[0])
        values.setdefault("width", image.shape[1])
    values.setdefault("height", config.native_height)
    values.setdefault("width", config.native_width)
    if values.get("scheduler", "") == "":
        values["scheduler"] = default_scheduler
    request = GenerationRequest(**values)
    validate(request, config, limits)
    return request


# ---------------------------------------------------------------------------
# Validation


def _too_long(name: str, size: int, config: PipelineConfig, limits: Limits) -> InvalidRequest:
    return InvalidRequest(
        f"{name} is {size} bytes, over this model's limit of {limits.max_prompt_bytes} bytes "
        f"(the text encoder reads at most the first {config.tokenizer_max_length} tokens anyway)"
    )


def _check_text_size(
    name: str, array: np.ndarray, config: PipelineConfig, limits: Limits | None
) -> None:
    """Refuse an oversized text before it is decoded or tokenized."""
    if limits is None or array.size == 0:
        return
    raw = array.reshape(-1)[0]
    if isinstance(raw, str):
        size = len(raw.encode("utf-8", "replace"))
    elif isinstance(raw, bytes | bytearray):
        size = len(raw)
    else:
        return  # not text: _text reports it
    if size > limits.max_prompt_bytes:
        raise _too_long(name, size, config, limits)


def _check_prompt(
    request: GenerationRequest, config: PipelineConfig, limits: Limits | None
) -> None:
    if not isinstance(request.prompt, str) or not request.prompt.strip():
        raise InvalidRequest("prompt is empty: send a non-empty UTF-8 string")
    if not isinstance(request.negative_prompt, str):
        raise InvalidRequest("negative_prompt must be a string")
    if limits is not None:
        for name in ("prompt", "negative_prompt"):
            size = len(getattr(request, name).encode("utf-8", "replace"))
            if size > limits.max_prompt_bytes:
                raise _too_long(name, size, config, limits)


def _check_count(name: str, value: int, limit: int | None) -> None:
    """A count such as num_inference_steps: at least 1 and, when there is a limit, within it."""
    if value < 1:
        raise InvalidRequest(f"{name} must be at least 1, got {value}")
    if limit is not None and value > limit:
        raise InvalidRequest(f"{name} {value} is over this model's limit of {limit}")


def _check_steps_and_guidance(request: GenerationRequest, limits: Limits | None) -> None:
    max_steps = None if limits is None else limits.max_steps
    _check_count("num_inference_steps", request.num_inference_steps, max_steps)
    g = request.guidance_scale
    if not math.isfinite(g) or g < 0:
        raise InvalidRequest(
            f"guidance_scale must be a finite number >= 0 (<= 1 turns guidance off), got {g}"
        )


def _check_size(request: GenerationRequest, config: PipelineConfig, limits: Limits | None) -> None:
    step = config.size_step
    for name in ("height", "width"):
        value = getattr(request, name)
        if value < step or value % step:
            whose = "the image's " if request.image is not None else ""
            raise InvalidRequest(
                f"{whose}{name} must be a positive multiple of {step} pixels for this model, "
                f"got {value}" + (": crop or resize the image" if whose else "")
            )
    for name in ("height", "width"):
        value = getattr(request, name)
        if limits is not None and value > limits.max_side:
            raise InvalidRequest(
                f"{name} {value} is over this model's limit of {limits.max_side} pixels a side "
                "(max_side)"
            )
    pixels = request.height * request.width
    if limits is not None and pixels > limits.max_pixels:
        raise InvalidRequest(
            f"height x width = {request.height} x {request.width} = {pixels} pixels is over "
            f"this model's limit of {limits.max_pixels} pixels"
        )


def _check_images(request: GenerationRequest, limits: Limits | None) -> None:
    max_images = None if limits is None else limits.max_images
    _check_count("num_images_per_prompt", request.num_images_per_prompt, max_images)
    if not _INT64.min <= request.seed <= _INT64.max:
        raise InvalidRequest(f"seed must fit in int64, got {request.seed}")


def _check_work(request: GenerationRequest, limits: Limits | None) -> None:
    """The work budget: pixels x images x steps, so the single limits cannot all be maxed at once."""
    if limits is None:
        return
    work = request.height * request.width * request.num_images_per_prompt
    work *= request.num_inference_steps
    if work > limits.max_work:
        raise InvalidRequest(
            f"height x width x num_images_per_prompt x num_inference_steps = {request.height} x "
            f"{request.width} x {request.num_images_per_prompt} x {request.num_inference_steps} = "
            f"{work} is over this model's work budget of {limits.max_work}: "
            "ask for fewer images, fewer steps or a smaller size"
        )


def _check_init_image(request: GenerationRequest, config: PipelineConfig) -> None:
    """img2img / inpainting: an RGB uint8 image of the request's size, a mask of the same
    size, a strength that leaves steps to run."""
    if request.mask_image is not None and request.image is None:
        raise InvalidRequest("mask_image was sent without an image: inpainting needs both")
    if config.unet_in_channels != config.latent_channels and request.mask_image is None:
        raise InvalidRequest(
            f"this model's UNet is an inpainting UNet ({config.unet_in_channels} input channels): "
            "send an image and a mask_image"
        )
    if request.image is None:
        if request.strength is not None:
            raise InvalidRequest("strength applies to img2img only: send an image with it")
        return
    image = request.image
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InvalidRequest(
            f"image must be uint8 [height, width, 3] (RGB), got {image.dtype} {list(image.shape)}"
        )
    if image.shape[:2] != (request.height, request.width):
        raise InvalidRequest(
            f"image is {image.shape[0]} x {image.shape[1]} pixels but height x width is "
            f"{request.height} x {request.width}: leave height and width out with an image"
        )
    mask = request.mask_image
    if mask is not None:
        if mask.dtype != np.uint8 or mask.ndim != 2:
            raise InvalidRequest(
                f"mask_image must be uint8 [height, width] (255 = repaint), got {mask.dtype} "
                f"{list(mask.shape)}"
            )
        if mask.shape != image.shape[:2]:
            raise InvalidRequest(
                f"mask_image is {mask.shape[0]} x {mask.shape[1]} pixels but the image is "
                f"{image.shape[0]} x {image.shape[1]}: they must be the same size"
            )
    strength = request.img2img_strength
    if not math.isfinite(strength) or not 0 < strength <= 1:
        raise InvalidRequest(f"strength must be in (0, 1], got {strength}")
    if int(request.num_inference_steps * strength) < 1:
        raise InvalidRequest(
            f"strength {strength} x num_inference_steps {request.num_inference_steps} leaves no "
            "denoising step: raise either"
        )


def validate(
    request: GenerationRequest, config: PipelineConfig, limits: Limits | None = None
) -> None:
    """Raise :class:`InvalidRequest` unless ``request`` can run on this model (within ``limits``)."""
    _check_prompt(request, config, limits)
    _check_steps_and_guidance(request, limits)
    _check_size(request, config, limits)
    _check_images(request, limits)
    _check_work(request, limits)
    check_name(request.scheduler)
    _check_init_image(request, config)
