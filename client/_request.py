"""Requests to tensors and tensors to results: the part shared by the sync and async clients.

The tensor names, types and defaults come from the contract in
``sd_pipeline.spec`` (standard library only), the same module the
server validates against, so the two cannot drift apart.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image

from sd_pipeline import request as server_request
from sd_pipeline import spec as S

from ._errors import InvalidRequestError, ServerError, translate
from ._types import ControlNetUnit, GenerationResult, GenerationSettings, ProgressEvent

__all__ = [
    "IMAGE_INPUTS",
    "PAIR_INPUTS",
    "GenerationRequest",
    "StreamDecoder",
    "decode_progress",
    "decode_result",
    "is_final",
    "model_defaults",
]

# What the server does with an omitted input (the contract's defaults). "scheduler"
# is the pipeline's name for the model's own scheduler config.
DEFAULTS: dict[str, Any] = {t.name: t.default for t in S.STABLE_DIFFUSION.inputs}
DEFAULT_SCHEDULER = "default"
# Model config parameter that may name the model's own scheduler (an alias).
SCHEDULER_PARAMETER = "default_scheduler"
# Model config parameters naming the checkpoint (sd_triton.export.single_file): the web
# UI's "Model hash" and "Model" of the images.
MODEL_FACT_PARAMETERS = ("model_hash", "model_name")
# ... and the LoRAs and embeddings fused into it (sd_triton.export.adapters): the web
# UI's "Lora hashes" and "TI hashes" lines, "name: hash, name2: hash".
ADAPTER_PARAMETERS = ("lora_hashes", "ti_hashes")
# ... and the files of the ControlNets exported beside it (sd_triton.export.controlnet):
# "name: hash, name2: hash", the web UI's "[hash]" after each ControlNet model.
CONTROLNET_PARAMETERS = ("controlnet_hashes",)
# ... and the refiner beside an SDXL base (the web UI's "Refiner"), and the model's
# family ("sd", "sdxl", "sdxl-refiner": its default strength).
REFINER_PARAMETERS = ("refiner_model_name", "refiner_model_hash", "family")
# The model's default prompt syntax (sd_pipeline.prompt_syntax), for the settings.
SYNTAX_PARAMETER = "prompt_syntax"
# The refiner's name in the settings when the model does not publish its checkpoint's.
DEFAULT_REFINER_NAME = "refiner"
# Inputs sent as two integers: diffusers' (height, width) sizes and (top, left) crops.
PAIR_INPUTS = tuple(t.name for t in S.STABLE_DIFFUSION.inputs if t.dims == (2,))
# Inputs of img2img and inpainting only (the image methods set them).
IMAGE_INPUTS = ("image", "mask_image", "strength")

_INT_RANGES = {"int32": np.iinfo(np.int32), "int64": np.iinfo(np.int64)}


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """One request in the contract's terms; None = not sent (the server applies its default).

    ``image``, ``mask_image`` and ``strength`` are for img2img / inpainting.
    ``prompt_2`` ... ``refiner_switch_at`` are SDXL's (an SD 1.x/2.x model
    refuses them); the pairs are diffusers' ``(height, width)`` and ``(top, left)``.
    ``control_image`` ... ``control_guidance_end`` take one value per ControlNet
    (``controlnet`` names them), or a single value for one.
    """

    prompt: str
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    seed: int | None = None
    scheduler: str | None = None
    num_images_per_prompt: int | None = None
    image: Image.Image | np.ndarray | None = None
    mask_image: Image.Image | np.ndarray | None = None
    strength: float | None = None
    guidance_rescale: float | None = None
    clip_skip: int | None = None
    prompt_syntax: str | None = None
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
    enable_hr: bool | None = None
    hr_scale: float | None = None
    hr_upscaler: str | None = None
    hr_denoising_strength: float | None = None
    hr_second_pass_steps: int | None = None
    control_image: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray] | None = None
    controlnet: str | Sequence[str] | None = None
    controlnet_conditioning_scale: float | Sequence[float] | None = None
    control_guidance_start: float | Sequence[float] | None = None
    control_guidance_end: float | Sequence[float] | None = None
    guess_mode: bool | None = None
    preview: bool | None = None  # streaming model only

    def sent(self) -> dict[str, Any]:
        """The inputs that will be sent: name -> value, omitted ones left out."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }

    def to_inputs(self, model: S.ModelSpec = S.STABLE_DIFFUSION) -> list[grpcclient.InferInput]:
        """The request as tritonclient inputs for ``model`` (usable by the grpc and grpc.aio clients)."""
        inputs = []
        for name, value in self.sent().items():
            try:
                tensor = model.input(name)
            except StopIteration:
                raise InvalidRequestError(f"{model.name} takes no input {name!r}") from None
            array = _to_array(tensor, value)
            infer_input = grpcclient.InferInput(name, list(array.shape), _triton_type(tensor.dtype))
            infer_input.set_data_from_numpy(array)
            inputs.append(infer_input)
        return inputs


def _triton_type(dtype: str) -> str:
    return "BYTES" if dtype == "bytes" else S.TRITON_DTYPES[dtype].removeprefix("TYPE_")


def _to_array(tensor: S.TensorSpec, value: Any) -> np.ndarray:
    """One input value as the array the contract declares; wrong Python types are InvalidRequestError.

    An input with one entry per ControlNet (dims ``("K", ...)``) takes a list, or
    one value for one ControlNet.
    """
    per_controlnet = tensor.dims[0] == "K"
    if tensor.dtype == "uint8":
        if per_controlnet:
            return _image_stack(tensor.name, value)
        channels = tensor.dims[-1] if len(tensor.dims) == 3 else None
        return _image_array(tensor.name, value, channels=channels)
    if tensor.dims == (2,):
        return _pair(tensor, value)
    values = [value]
    if per_controlnet and isinstance(value, list | tuple | np.ndarray):
        values = list(value)
        if not values:
            raise InvalidRequestError(f"{tensor.name} must hold one value per ControlNet, got none")
    dtype = np.object_ if tensor.dtype == "bytes" else tensor.dtype
    return np.array([_scalar(tensor, v) for v in values], dtype=dtype)


def _scalar(tensor: S.TensorSpec, value: Any) -> Any:
    """One value of ``tensor``'s type (a string as UTF-8 bytes)."""
    name, dtype = tensor.name, tensor.dtype
    if dtype == "bytes":
        if not isinstance(value, str):
            raise InvalidRequestError(f"{name} must be a string, got {type(value).__name__}")
        return value.encode("utf-8")
    if dtype in _INT_RANGES:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise InvalidRequestError(f"{name} must be an integer, got {value!r}")
        limits = _INT_RANGES[dtype]
        if not limits.min <= int(value) <= limits.max:
            raise InvalidRequestError(f"{name} must fit in {dtype}, got {value}")
        return int(value)
    if dtype == "float32":
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InvalidRequestError(f"{name} must be a number, got {value!r}")
        return float(value)
    if dtype == "bool":
        return bool(value)
    raise InvalidRequestError(f"{name}: unsupported input type {dtype}")  # pragma: no cover


def _image_stack(name: str, value: Any) -> np.ndarray:
    """One RGB image per ControlNet, all of one size, as uint8 [K, H, W, 3] (one image: K = 1)."""
    many = isinstance(value, list | tuple) or (isinstance(value, np.ndarray) and value.ndim == 4)
    arrays = [_image_array(name, image, channels=3) for image in (value if many else [value])]
    if not arrays:
        raise InvalidRequestError(f"{name} must hold one image per ControlNet, got none")
    if len({a.shape for a in arrays}) > 1:
        sizes = ", ".join(f"{a.shape[1]}x{a.shape[0]}" for a in arrays)
        raise InvalidRequestError(f"{name}: the images must have one size, got {sizes}")
    return np.ascontiguousarray(np.stack(arrays))


def _pair(tensor: S.TensorSpec, value: Any) -> np.ndarray:
    """A pair input as two integers: ``(height, width)``, or ``(top, left)`` for crops."""
    order = "top, left" if "crops" in tensor.name else "height, width"
    items = list(value) if isinstance(value, tuple | list | np.ndarray) else []
    integers = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items)
    if len(items) != 2 or not integers:
        raise InvalidRequestError(f"{tensor.name} must be two integers ({order}), got {value!r}")
    limits = _INT_RANGES[tensor.dtype]
    if not all(limits.min <= int(v) <= limits.max for v in items):
        raise InvalidRequestError(f"{tensor.name} must fit in {tensor.dtype}, got {value!r}")
    return np.array([int(v) for v in items], dtype=tensor.dtype)


def _image_array(name: str, value: Any, channels: int | None) -> np.ndarray:
    """An image input as uint8 [H, W, 3] (RGB) or [H, W] (mask)."""
    if isinstance(value, Image.Image):
        value = value.convert("RGB" if channels else "L")
    array = np.asarray(value)
    if array.dtype != np.uint8:
        raise InvalidRequestError(f"{name} must be uint8 (or a PIL image), got {array.dtype}")
    expected = 3 if channels else 2
    if array.ndim != expected or (channels and array.shape[-1] != channels):
        shape = "[H, W, 3]" if channels else "[H, W]"
        raise InvalidRequestError(f"{name} must have shape {shape}, got {list(array.shape)}")
    return np.ascontiguousarray(array)


# --------------------------------------------------------------------------- responses


def model_defaults(parameters: Mapping[str, str]) -> dict[str, Any]:
    """What a model publishes in its config ``parameters``: its scheduler's alias, the
    web UI's hash and name of the single-file checkpoint it was exported from, its fused
    adapters and refiner, and its own defaults of steps and guidance (a Turbo or LCM
    preset, read as the server reads them)."""
    published = {
        "scheduler": parameters.get(SCHEDULER_PARAMETER, ""),
        **{key: parameters.get(key, "") for key in MODEL_FACT_PARAMETERS},
        **{key: parameters.get(key, "") for key in ADAPTER_PARAMETERS},
        **{key: parameters.get(key, "") for key in CONTROLNET_PARAMETERS},
        **{key: parameters.get(key, "") for key in REFINER_PARAMETERS},
        "prompt_syntax": parameters.get(SYNTAX_PARAMETER, ""),
    }
    facts: dict[str, Any] = {k: v.strip() for k, v in published.items() if v.strip()}
    # A bad value: the server refuses to load such a model, and its requests say so.
    with contextlib.suppress(ValueError):
        facts |= server_request.model_defaults(parameters)
    return facts


def _response(result: Any) -> Any:
    return result.get_response()


def is_final(result: Any) -> bool:
    """Whether a streamed response carries Triton's FINAL flag."""
    params = _response(result).parameters
    return "triton_final_response" in params and params["triton_final_response"].bool_param


def output_names(result: Any) -> set[str]:
    return {o.name for o in _response(result).outputs}


def _settings(
    request: GenerationRequest,
    images: np.ndarray,
    seeds: np.ndarray,
    defaults: Mapping[str, Any],
    model: str,
) -> GenerationSettings:
    def value(name: str) -> Any:
        """What was sent, else the model's published default, else the contract's."""
        sent = getattr(request, name)
        return sent if sent is not None else defaults.get(name, DEFAULTS[name])

    scheduler = request.scheduler or defaults.get("scheduler") or DEFAULT_SCHEDULER
    hires = _hires(request, value)
    height, width = (
        sent if sent is not None else _first_pass_side(int(side), hires.get("hr_scale", 1.0))
        for sent, side in zip((request.height, request.width), images.shape[1:3], strict=True)
    )
    return GenerationSettings(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        num_inference_steps=int(value("num_inference_steps")),
        guidance_scale=_guidance_scale(request, defaults),
        height=int(height),
        width=int(width),
        seed=int(seeds[0]) if len(seeds) else int(request.seed or 0),
        scheduler=scheduler,
        num_images_per_prompt=int(images.shape[0]),
        model=model,
        strength=_strength(request, defaults),
        model_hash=defaults.get("model_hash"),
        checkpoint=defaults.get("model_name"),
        lora_hashes=defaults.get("lora_hashes"),
        ti_hashes=defaults.get("ti_hashes"),
        guidance_rescale=float(value("guidance_rescale")),
        clip_skip=int(value("clip_skip")),
        refiner=_refiner(request, defaults),
        prompt_syntax=request.prompt_syntax or defaults.get("prompt_syntax"),
        **{name: getattr(request, name) for name in _AS_SENT},
        **hires,
        controlnets=_controlnets(request, defaults),
        guess_mode=bool(request.guess_mode) and request.controlnet is not None,
    )


def _first_pass_side(side: int, scale: float) -> int:
    """The first pass's side that the hires fix enlarged to ``side``: the server makes
    ``int(first * scale)`` (the web UI's rule), so it is the one integer in
    ``[side / scale, (side + 1) / scale)``."""
    return math.ceil(side / scale - 1e-9)


_HIRES = {
    "hr_scale": float,
    "hr_upscaler": str,
    "hr_denoising_strength": float,
    "hr_second_pass_steps": int,
}


def _hires(request: GenerationRequest, value: Any) -> dict[str, Any]:
    """The hires fix's settings (what was sent, else the defaults) when it ran."""
    if not request.enable_hr:
        return {}
    return {"enable_hr": True, **{name: kind(value(name)) for name, kind in _HIRES.items()}}


# Settings reported as the request sent them (None: the server derived them).
_AS_SENT = (
    "prompt_2",
    "negative_prompt_2",
    *PAIR_INPUTS,
    "aesthetic_score",
    "negative_aesthetic_score",
    "refiner_switch_at",
)


def _per_controlnet(value: Any, count: int, default: Any) -> list[Any]:
    """A per-ControlNet request value as ``count`` values (one value for one ControlNet)."""
    if value is None:
        return [default] * count
    if isinstance(value, str) or not isinstance(value, Sequence | np.ndarray):
        return [value]
    return list(value)


# A ControlNet unit's request inputs, as ControlNetUnit's weight, guidance_start, guidance_end.
_UNIT_INPUTS = ("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end")


def _controlnets(
    request: GenerationRequest, defaults: Mapping[str, Any]
) -> tuple[ControlNetUnit, ...]:
    """The request's ControlNets as the web UI's extension reports them: model (with the
    hash of its file when the model publishes it), weight (the server's default: diffusers'
    for the family and mode) and guidance window."""
    names = _per_controlnet(request.controlnet, 0, None)
    published = defaults.get("controlnet_hashes", "")
    hashes = dict(entry.split(": ", 1) for entry in published.split(", ") if ": " in entry)
    scale = server_request.default_controlnet_scale(
        _is_xl(defaults), request.image, request.mask_image
    )
    unit_defaults = {**DEFAULTS, "controlnet_conditioning_scale": scale}
    columns = [
        _per_controlnet(getattr(request, name), len(names), unit_defaults[name])
        for name in _UNIT_INPUTS
    ]
    return tuple(
        ControlNetUnit(f"{n} [{hashes[n]}]" if n in hashes else n, float(w), float(s), float(e))
        for n, w, s, e in zip(names, *columns, strict=True)
    )


def _guidance_scale(request: GenerationRequest, defaults: Mapping[str, Any]) -> float:
    """The guidance sent, else the model's preset, else the server's default for the
    family and mode (diffusers': 7.5; SDXL 5.0, SDXL inpainting without ControlNet 7.5)."""
    if request.guidance_scale is not None:
        return float(request.guidance_scale)
    if "guidance_scale" in defaults:
        return float(defaults["guidance_scale"])
    controlnet = request.controlnet is not None
    return server_request.default_guidance_scale(
        _is_xl(defaults), request.image, request.mask_image, controlnet
    )


def _is_xl(defaults: Mapping[str, Any]) -> bool:
    """Whether the model is SDXL's (base or refiner), from the family it publishes."""
    return defaults.get("family", "sd") != "sd"


def _strength(request: GenerationRequest, defaults: Mapping[str, Any]) -> float | None:
    """img2img / inpainting: the strength sent, else the server's default for the model's
    family and mode (diffusers': SD 0.8, inpainting 1.0; SDXL 0.3, inpainting 0.9999;
    SDXL img2img with ControlNet 0.8)."""
    if request.image is None:
        return None
    if request.strength is not None:
        return float(request.strength)
    controlnet = request.controlnet is not None
    inpainting = request.mask_image is not None
    return server_request.default_strength(_is_xl(defaults), inpainting, controlnet)


def _refiner(request: GenerationRequest, defaults: Mapping[str, Any]) -> str | None:
    """The refiner as the web UI names it (``name [hash]``), when one finished the image."""
    if request.refiner_switch_at is None:
        return None
    name = defaults.get("refiner_model_name") or DEFAULT_REFINER_NAME
    digest = defaults.get("refiner_model_hash")
    return f"{name} [{digest}]" if digest else name


def decode_result(
    result: Any,
    request: GenerationRequest,
    defaults: Mapping[str, Any] | None = None,
    *,
    model: str | None = None,
) -> GenerationResult:
    """A GenerationResult from the response of ``request`` (a tritonclient InferResult).

    ``model`` is the unary model's name for the settings (default: the model that answered).
    """
    images = result.as_numpy("images")
    nsfw = result.as_numpy("nsfw_content_detected")
    seeds = result.as_numpy("seeds")
    if images is None or nsfw is None or seeds is None:
        raise ServerError(
            f"the server's response lacks images, nsfw_content_detected or seeds "
            f"(got {sorted(output_names(result))})"
        )
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ServerError(f"the server sent images of shape {images.shape} and type {images.dtype}")
    response = _response(result)
    return GenerationResult(
        images=[Image.fromarray(image) for image in images],
        nsfw_content_detected=[bool(x) for x in nsfw],
        seeds=[int(x) for x in seeds],
        settings=_settings(request, images, seeds, defaults or {}, model or response.model_name),
        model_name=response.model_name,
        model_version=response.model_version,
    )


class StreamDecoder:
    """Turns one request's stream of (result, error) pairs into events, then its result.

    A streamed per-request error has no status (the gRPC stream response only
    carries a message). The streaming model validates a request before it
    starts the loop, and words failures inside the model "internal error:
    ...", so an error before the first progress response that is not such a
    failure is a rejected request (InvalidRequestError); any later one is a
    ServerError.
    """

    def __init__(
        self, request: GenerationRequest, defaults: Mapping[str, Any], *, model: str
    ) -> None:
        self.request = request
        self.defaults = defaults
        self.model = model
        self.started = False
        self.result: GenerationResult | None = None

    def feed(
        self, result: Any, error: BaseException | None
    ) -> ProgressEvent | GenerationResult | None:
        """The event in one response (None for an empty final response); raise its error."""
        if error is not None:
            raise translate(error, in_band=ServerError if self.started else InvalidRequestError)
        names = output_names(result)
        if "images" in names:
            self.result = decode_result(result, self.request, self.defaults, model=self.model)
            return self.result
        if "step" in names:
            self.started = True
            return decode_progress(result)
        if is_final(result):
            raise ServerError("the server ended the stream without sending images")
        return None


def decode_progress(result: Any) -> ProgressEvent:
    """A ProgressEvent from a streamed progress response."""
    step = result.as_numpy("step")
    total = result.as_numpy("total_steps")
    elapsed = result.as_numpy("elapsed_s")
    previews = result.as_numpy("preview_images")
    return ProgressEvent(
        step=int(step.reshape(-1)[0]),
        total_steps=int(total.reshape(-1)[0]) if total is not None else 0,
        elapsed_s=float(elapsed.reshape(-1)[0]) if elapsed is not None else math.nan,
        previews=None if previews is None else [Image.fromarray(p) for p in previews],
    )
