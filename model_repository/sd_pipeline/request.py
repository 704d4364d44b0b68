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
from .controlnet import check_controlnet
from .errors import InvalidRequest
from .lora_tags import adapted_prompt
from .schedulers import check_name

__all__ = [
    "GenerationRequest",
    "decimal_value",
    "default_controlnet_scale",
    "default_strength",
    "img2img_strength",
    "model_defaults",
    "make_request",
    "parse_request",
    "random_seed",
    "validate",
]

_DEFAULTS = {t.name: t.default for t in S.STABLE_DIFFUSION_STREAM.inputs}
# diffusers' default strength by (family is SDXL, inpainting): the img2img and
# inpainting pipelines' __call__ defaults; their ControlNet twins' differ for SDXL img2img.
DEFAULT_STRENGTH = {
    (False, False): 0.8,
    (False, True): 1.0,
    (True, False): 0.3,
    (True, True): 0.9999,
}
DEFAULT_CONTROLNET_STRENGTH = {**DEFAULT_STRENGTH, (True, False): 0.8}
# diffusers' default controlnet_conditioning_scale by (family is SDXL, mode): the
# ControlNet pipelines' __call__ defaults (txt2img, img2img, inpainting).
DEFAULT_CONTROLNET_SCALE = {
    (False, "txt2img"): 1.0,
    (False, "img2img"): 0.8,
    (False, "inpaint"): 0.5,
    (True, "txt2img"): 1.0,
    (True, "img2img"): 0.8,
    (True, "inpaint"): 1.0,
}
# diffusers' default guidance_scale of SDXL's pipelines by mode (their __call__ defaults:
# 5.0, but 7.5 for StableDiffusionXLInpaintPipeline; its ControlNet pipelines all 5.0).
# SD 1.x/2.x's are the contract's 7.5 in every mode. A model's own default (a Turbo or LCM
# preset, config parameter default_guidance_scale) comes first.
DEFAULT_XL_GUIDANCE_SCALE = {"txt2img": 5.0, "img2img": 5.0, "inpaint": 7.5}
DEFAULT_XL_CONTROLNET_GUIDANCE_SCALE = 5.0
# Inputs only some families take: SDXL's text and size conditioning, the
# refiner's aesthetic scores, the base's switch to its refiner.
_XL_INPUTS = (
    "original_size",
    "crops_coords_top_left",
    "target_size",
    "negative_original_size",
    "negative_crops_coords_top_left",
    "negative_target_size",
)
_AESTHETIC_INPUTS = ("aesthetic_score", "negative_aesthetic_score")
# How a prompt's text is read (input prompt_syntax; the model's default: config
# parameter prompt_syntax, else the first).
PROMPT_SYNTAXES = {
    "a1111": "the AUTOMATIC1111 web UI's weights, BREAK and 75-token chunks",
    "diffusers": "literal text, truncated to 77 tokens",
}
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
    # None: absent (SDXL base: zero embeddings; SD: the empty text), "" is encoded.
    negative_prompt: str | None = None
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
    guidance_rescale: float = _DEFAULTS["guidance_rescale"]
    clip_skip: int = _DEFAULTS["clip_skip"]
    prompt_syntax: str = next(iter(PROMPT_SYNTAXES))
    # SDXL (None: as diffusers, from the prompts and the output size)
    prompt_2: str | None = None
    negative_prompt_2: str | None = None
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    # SDXL refiner (None: diffusers' defaults, 6.0 and 2.5)
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None
    refiner_switch_at: float | None = None
    # The web UI's hires fix (.hires); None: the contract's default (2.0, "latent",
    # 0.7, 0: num_inference_steps). They need enable_hr.
    enable_hr: bool = _DEFAULTS["enable_hr"]
    hr_scale: float | None = None
    hr_upscaler: str | None = None
    hr_denoising_strength: float | None = None
    hr_second_pass_steps: int | None = None
    # ControlNet (.controlnet): K control images [K, H, W, 3], the K ControlNets' names,
    # per-ControlNet scales and guidance windows (None: absent, the contract's defaults).
    control_image: np.ndarray | None = None
    controlnet: tuple[str, ...] | None = None
    controlnet_conditioning_scale: np.ndarray | None = None
    control_guidance_start: np.ndarray | None = None
    control_guidance_end: np.ndarray | None = None
    guess_mode: bool = _DEFAULTS["guess_mode"]

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Guidance scale <= 1 turns classifier-free guidance off (and halves the UNet batch)."""
        return self.guidance_scale > 1.0


def img2img_strength(request: GenerationRequest, config: PipelineConfig | None) -> float:
    """``strength``, or when absent diffusers' default for the model's family (None: SD
    1.x/2.x) and the mode."""
    if request.strength is not None:
        return request.strength
    xl = config is not None and config.is_xl
    return default_strength(xl, request.mask_image is not None, request.controlnet is not None)


def default_strength(xl: bool, inpainting: bool, controlnet: bool) -> float:
    """diffusers' img2img / inpainting ``strength`` for the family (``xl``: SDXL), the mode
    and whether ControlNets steer (then their ControlNet pipelines'). The client reports it
    too."""
    return (DEFAULT_CONTROLNET_STRENGTH if controlnet else DEFAULT_STRENGTH)[(xl, inpainting)]


def default_controlnet_scale(xl: bool, image: object, mask_image: object) -> float:
    """diffusers' ``controlnet_conditioning_scale`` for the family (``xl``: SDXL) and the
    mode a request's ``image`` and ``mask_image`` (None: absent) make (the family's
    ControlNet txt2img, img2img or inpaint pipeline). The client reports it too."""
    return DEFAULT_CONTROLNET_SCALE[(xl, _mode(image, mask_image))]


def default_guidance_scale(xl: bool, image: object, mask_image: object, controlnet: bool) -> float:
    """diffusers' ``guidance_scale`` for the family (``xl``: SDXL) and the mode a request's
    ``image`` and ``mask_image`` (None: absent) and ControlNets make. The client reports it
    too."""
    if not xl:
        return _DEFAULTS["guidance_scale"]
    if controlnet:
        return DEFAULT_XL_CONTROLNET_GUIDANCE_SCALE
    return DEFAULT_XL_GUIDANCE_SCALE[_mode(image, mask_image)]


def _mode(image: object, mask_image: object) -> str:
    """The pipeline a request's ``image`` and ``mask_image`` (None: absent) pick."""
    if mask_image is not None:
        return "inpaint"
    return "txt2img" if image is None else "img2img"


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
    if "guidance_scale" not in options:
        options["guidance_scale"] = _default_guidance(config, options)
    request = GenerationRequest(
        prompt=prompt,
        height=native[0] if height is None else height,
        width=native[1] if width is None else width,
        seed=random_seed() if seed is None else seed,
        **options,
    )
    validate(request, config, limits)
    return request


def _default_guidance(config: PipelineConfig, values: Mapping[str, Any]) -> float:
    xl, controlnet = config.is_xl, values.get("controlnet") is not None
    return default_guidance_scale(xl, values.get("image"), values.get("mask_image"), controlnet)


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
        if tensor.dims != (1,):  # one string per entry (controlnet)
            return tuple(_text(tensor.name, a) for a in array.reshape(-1, 1))
        return _text(tensor.name, array)
    if tensor.dims == (2,):
        return tuple(int(v) for v in array)
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
    defaults: Mapping[str, Any] | None = None,
) -> GenerationRequest:
    """Turn ``model``'s input tensors (name -> numpy array, absent = missing) into a valid request.

    ``default_scheduler``: the alias used when the request names none (the
    deployment's choice, config parameter ``default_scheduler``); None keeps
    the model's own scheduler config. ``defaults``: the model's own defaults
    of other inputs (:func:`model_defaults`: a Turbo or LCM model's steps and
    guidance), over the contract's.
    """
    declared = {t.name: t for t in model.inputs}
    unknown = sorted(set(inputs) - set(declared))
    if unknown:
        raise InvalidRequest(
            f"unknown input {', '.join(unknown)}; {model.name} takes {', '.join(declared)}"
        )
    for name, array in inputs.items():
        _check_tensor(declared[name], np.asarray(array))
    for name in _TEXTS:
        if name in inputs:
            _check_text_size(name, np.asarray(inputs[name]), config, limits)
    if "prompt" not in inputs:
        raise InvalidRequest("prompt is required: one UTF-8 string, BYTES with shape [1]")
    values = {name: _value(declared[name], np.asarray(a)) for name, a in inputs.items()}
    values = {**(defaults or {}), **values}
    values.setdefault("guidance_scale", _default_guidance(config, values))
    # <lora:name:w> tags of the LoRAs fused at export go; multi-vector embeddings expand.
    for name in _TEXTS:
        if isinstance(values.get(name), str):
            values[name] = adapted_prompt(values[name], config.loras, config.embeddings, field=name)
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


# The model config parameters that set a model's own input defaults (the
# exporter's presets: SDXL-Turbo runs 1-4 steps without guidance, LCM 4 steps).
DEFAULT_PARAMETERS = {
    "default_num_inference_steps": ("num_inference_steps", int),
    "default_guidance_scale": ("guidance_scale", float),
}


def model_defaults(parameters: Mapping[str, str]) -> dict[str, Any]:
    """Input defaults from the model config's parameters (name -> string); ValueError if bad."""
    defaults = {}
    syntax = (parameters.get("prompt_syntax") or "").strip()
    if syntax:
        if syntax not in PROMPT_SYNTAXES:
            raise ValueError(
                f"model parameter prompt_syntax must be {' or '.join(PROMPT_SYNTAXES)}, "
                f"got {syntax!r}"
            )
        defaults["prompt_syntax"] = syntax
    for parameter, (name, kind) in DEFAULT_PARAMETERS.items():
        raw = (parameters.get(parameter) or "").strip()
        if not raw:
            continue
        try:
            value = kind(raw)
        except ValueError:
            raise ValueError(f"model parameter {parameter} must be a number, got {raw!r}") from None
        if not math.isfinite(value) or value < (1 if kind is int else 0):
            raise ValueError(f"model parameter {parameter} is out of range: {raw!r}")
        defaults[name] = value
    return defaults


# ---------------------------------------------------------------------------
# Validation


def _too_long(name: str, size: int, config: PipelineConfig, limits: Limits) -> InvalidRequest:
    return InvalidRequest(
        f"{name} is {size} bytes, over this model's limit of {limits.max_prompt_bytes} bytes "
        f"(at most {limits.max_prompt_chunks} chunks of 75 tokens are read)"
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


_TEXTS = ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2")


def _check_prompt(
    request: GenerationRequest, config: PipelineConfig, limits: Limits | None
) -> None:
    if not isinstance(request.prompt, str) or not request.prompt.strip():
        raise InvalidRequest("prompt is empty: send a non-empty UTF-8 string")
    for name in _TEXTS:
        text = getattr(request, name)
        if text is not None and not isinstance(text, str):
            raise InvalidRequest(f"{name} must be a string")
        if limits is not None and text is not None:
            size = len(text.encode("utf-8", "replace"))
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
    strength = img2img_strength(request, config)
    if not math.isfinite(strength) or not 0 < strength <= 1:
        raise InvalidRequest(f"strength must be in (0, 1], got {strength}")
    if int(request.num_inference_steps * strength) < 1:
        raise InvalidRequest(
            f"strength {strength} x num_inference_steps {request.num_inference_steps} leaves no "
            "denoising step: raise either"
        )


_FAMILY_NAMES = {"sd": "SD 1.x/2.x", "sdxl": "SDXL", "sdxl-refiner": "an SDXL refiner"}


def _refuse_inputs(request: GenerationRequest, names, why: str) -> None:
    given = [n for n in names if getattr(request, n) is not None]
    if given:
        raise InvalidRequest(f"{', '.join(given)}: {why}")


def _check_family(request: GenerationRequest, config: PipelineConfig) -> None:
    """Inputs the model's family does not have are refused, never ignored."""
    family = _FAMILY_NAMES[config.family]
    if not config.is_xl:
        _refuse_inputs(
            request,
            ("prompt_2", "negative_prompt_2", *_XL_INPUTS, "refiner_switch_at", *_AESTHETIC_INPUTS),
            f"SDXL inputs; this model is {family}",
        )
        if request.image is not None and request.guidance_rescale:
            raise InvalidRequest(
                "guidance_rescale applies to SD 1.x/2.x text-to-image only (diffusers' img2img "
                "and inpainting pipelines for SD 1.x/2.x have none); leave it out with an image"
            )
        return
    if config.family == "sdxl-refiner":
        if request.image is None:
            raise InvalidRequest(
                "this model is an SDXL refiner: it refines images; send an image (img2img), "
                "or an image and a mask_image"
            )
        _refuse_inputs(
            request,
            ("prompt_2", "negative_prompt_2"),
            "the refiner has one text encoder (text_encoder_2): use prompt and negative_prompt",
        )
        _refuse_inputs(request, ("refiner_switch_at",), "this model is the refiner itself")
    if config.requires_aesthetics_score:
        _refuse_inputs(
            request,
            ("target_size", "negative_target_size"),
            "the refiner's size conditioning takes aesthetic_score instead of a target size",
        )
    elif not config.refiner:
        _refuse_inputs(request, _AESTHETIC_INPUTS, "inputs of an SDXL refiner; this model has none")
    _check_refiner_switch(request, config)
    for name in _XL_INPUTS:
        pair = getattr(request, name)
        least = 0 if "crops" in name else 1
        if pair is not None and min(pair) < least:
            raise InvalidRequest(f"{name} must be two integers >= {least}, got {list(pair)}")


def _check_refiner_switch(request: GenerationRequest, config: PipelineConfig) -> None:
    switch = request.refiner_switch_at
    if switch is None:
        return
    if not config.refiner:
        raise InvalidRequest(
            "refiner_switch_at needs a refiner beside this model (export it with --refiner)"
        )
    if not math.isfinite(switch) or not 0 < switch < 1:
        raise InvalidRequest(f"refiner_switch_at must be in (0, 1), got {switch}")
    if request.controlnet is not None and request.image is not None and request.mask_image is None:
        raise InvalidRequest(
            "with ControlNet, refiner_switch_at applies to text-to-image and inpainting: leave "
            "out the image, or the refiner (diffusers' SDXL ControlNet img2img pipeline has no "
            "denoising_end)"
        )


def _check_guidance_options(request: GenerationRequest) -> None:
    rescale = request.guidance_rescale
    if not math.isfinite(rescale) or not 0 <= rescale <= 1:
        raise InvalidRequest(f"guidance_rescale must be in [0, 1], got {rescale}")
    if request.clip_skip < 0:
        raise InvalidRequest(f"clip_skip must be >= 0, got {request.clip_skip}")
    if request.prompt_syntax not in PROMPT_SYNTAXES:
        known = "; ".join(f"{name!r}: {what}" for name, what in PROMPT_SYNTAXES.items())
        raise InvalidRequest(f"unknown prompt_syntax {request.prompt_syntax!r}; choose {known}")


def _check_clip_skip(request: GenerationRequest, config: PipelineConfig) -> None:
    """clip_skip leaves every text encoder at least one layer (SDXL starts one layer from
    the end: diffusers' clip_skip N takes the layer N + 2 from the end, SD's N + 1)."""
    start = 1 if config.is_xl else 0
    layers = [config.text_encoder_layers.get(n) for n in config.text_encoders]
    if None in layers or not layers:
        return
    most = min(layers) - 1 - start
    if request.clip_skip > most:
        raise InvalidRequest(
            f"clip_skip {request.clip_skip} is over this model's limit of {most}: its text "
            f"encoder has {min(layers)} layers"
        )
    for name in _AESTHETIC_INPUTS:
        value = getattr(request, name)
        if value is not None and not math.isfinite(value):
            raise InvalidRequest(f"{name} must be a finite number, got {value}")


def validate(
    request: GenerationRequest, config: PipelineConfig, limits: Limits | None = None
) -> None:
    """Raise :class:`InvalidRequest` unless ``request`` can run on this model (within ``limits``)."""
    _check_family(request, config)
    _check_guidance_options(request)
    _check_clip_skip(request, config)
    _check_prompt(request, config, limits)
    _check_steps_and_guidance(request, limits)
    _check_size(request, config, limits)
    _check_images(request, limits)
    _check_work(request, limits)
    check_name(request.scheduler)
    _check_init_image(request, config)
    from .hires import check_hires  # hires builds on the loop, which imports this module

    check_hires(request, config, limits)
    check_controlnet(request, config)
