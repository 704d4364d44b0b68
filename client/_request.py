"""Requests to tensors and tensors to results: the part shared by the sync and async clients.

The tensor names, types and defaults come from the contract in
``sd_pipeline.spec`` (standard library only), the same module the
server validates against, so the two cannot drift apart.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image

from sd_pipeline import spec as S

from ._errors import InvalidRequestError, ServerError, translate
from ._types import GenerationResult, GenerationSettings, ProgressEvent

__all__ = [
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
# The server's strength when an inpainting request sends none (diffusers' default).
INPAINT_DEFAULT_STRENGTH = 1.0
# Model config parameter that may name the model's own scheduler (an alias).
SCHEDULER_PARAMETER = "default_scheduler"
# Model config parameters naming the checkpoint (sd_triton.export.single_file): the web
# UI's "Model hash" and "Model" of the images.
MODEL_FACT_PARAMETERS = ("model_hash", "model_name")
# ... and the LoRAs and embeddings fused into it (sd_triton.export.adapters): the web
# UI's "Lora hashes" and "TI hashes" lines, "name: hash, name2: hash".
ADAPTER_PARAMETERS = ("lora_hashes", "ti_hashes")

_INT_RANGES = {"int32": np.iinfo(np.int32), "int64": np.iinfo(np.int64)}


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """One request in the contract's terms; None = not sent (the server applies its default).

    ``image``, ``mask_image`` and ``strength`` are for img2img / inpainting.
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
    """One input value as the array the contract declares; wrong Python types are InvalidRequestError."""
    name, dtype = tensor.name, tensor.dtype
    if dtype == "bytes":
        if not isinstance(value, str):
            raise InvalidRequestError(f"{name} must be a string, got {type(value).__name__}")
        return np.array([value.encode("utf-8")], dtype=np.object_)
    if dtype in _INT_RANGES:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise InvalidRequestError(f"{name} must be an integer, got {value!r}")
        limits = _INT_RANGES[dtype]
        if not limits.min <= int(value) <= limits.max:
            raise InvalidRequestError(f"{name} must fit in {dtype}, got {value}")
        return np.array([int(value)], dtype=dtype)
    if dtype == "float32":
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InvalidRequestError(f"{name} must be a number, got {value!r}")
        return np.array([float(value)], dtype=np.float32)
    if dtype == "bool":
        return np.array([bool(value)], dtype=np.bool_)
    if dtype == "uint8":
        return _image_array(
            name, value, channels=tensor.dims[-1] if len(tensor.dims) == 3 else None
        )
    raise InvalidRequestError(f"{name}: unsupported input type {dtype}")  # pragma: no cover


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
    """What a model publishes in its config ``parameters``: its scheduler's alias, and the
    web UI's hash and name of the single-file checkpoint it was exported from."""
    published = {
        "scheduler": parameters.get(SCHEDULER_PARAMETER, ""),
        **{key: parameters.get(key, "") for key in MODEL_FACT_PARAMETERS},
        **{key: parameters.get(key, "") for key in ADAPTER_PARAMETERS},
    }
    return {k: v.strip() for k, v in published.items() if v.strip()}


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
        sent = getattr(request, name)
        return sent if sent is not None else DEFAULTS[name]

    scheduler = request.scheduler or defaults.get("scheduler") or DEFAULT_SCHEDULER
    strength = None
    if request.image is not None:
        # The server's default is diffusers': 1.0 to inpaint, 0.8 for img2img.
        inpaint = request.mask_image is not None and request.strength is None
        strength = INPAINT_DEFAULT_STRENGTH if inpaint else float(value("strength"))
    return GenerationSettings(
        prompt=request.prompt,
        negative_prompt=value("negative_prompt"),
        num_inference_steps=int(value("num_inference_steps")),
        guidance_scale=float(value("guidance_scale")),
        height=int(images.shape[1]),
        width=int(images.shape[2]),
        seed=int(seeds[0]) if len(seeds) else int(request.seed or 0),
        scheduler=scheduler,
        num_images_per_prompt=int(images.shape[0]),
        model=model,
        strength=strength,
        model_hash=defaults.get("model_hash"),
        checkpoint=defaults.get("model_name"),
        lora_hashes=defaults.get("lora_hashes"),
        ti_hashes=defaults.get("ti_hashes"),
    )


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
