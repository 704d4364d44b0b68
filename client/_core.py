"""What the blocking and the asyncio clients share: options, requests, retries, admin calls.

:class:`ClientCore` holds a client's options and every method whose work
does not depend on the transport: it builds the :class:`GenerationRequest`
from the typed keyword options (declared once, here), plans retries against
the call's deadline, adds the admin key to admin calls and explains a refusal.
:class:`~._sync.Client` and :class:`~._async.AsyncClient` are thin transports
over it: each only sends (``tritonclient.grpc`` or ``tritonclient.grpc.aio``)
and waits (``time.sleep`` or ``asyncio.sleep``). Requests become tensors and
responses become results in :mod:`._request`.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Generic, TypeVar

import numpy as np
from PIL import Image

from sd_pipeline import spec as S
from sd_pipeline.controlnet import CONTROLLED_UNET

from ._edit import img2img_request, inpaint_request, outpaint_request
from ._errors import PermissionDeniedError, SDTritonError, UnavailableError
from ._request import GenerationRequest, model_defaults

__all__ = [
    "DEFAULT_URL",
    "GRPC_ADMIN_KEY_HEADER",
    "Attempts",
    "ClientCore",
    "Health",
    "ModelStatus",
    "backoff_delay",
    "default_stream_model",
    "pinned_config",
]

DEFAULT_URL = "localhost:8001"
GRPC_ADMIN_KEY_HEADER = S.ADMIN_KEY_GRPC_HEADER
# The only status worth sending the same request again for: the server (or the
# model's queue) is not taking requests right now. NOT_FOUND (a misspelled model),
# RESOURCE_EXHAUSTED, a refused admin key, ... would fail the same way again.
RETRYABLE_STATUS = "StatusCode.UNAVAILABLE"

ResultT = TypeVar("ResultT")
PendingT = TypeVar("PendingT")
StreamT = TypeVar("StreamT")


@dataclass(frozen=True)
class ModelStatus:
    """One entry of the server's model repository index."""

    name: str
    version: str
    state: str
    reason: str = ""


# Triton's answer to a load or unload when the server runs with model control none (or
# poll): its words, which name polling either way.
_NO_MODEL_CONTROL = "explicit model load / unload is not allowed"

# The models one export writes, after its --model-prefix: the pipelines, the components,
# a refiner's components (refiner_*), the ControlNets (controlnet_NAME) and the UNet they steer.
PIPELINE_MODELS = (S.STABLE_DIFFUSION.name, S.STABLE_DIFFUSION_STREAM.name)


def _component_of_export(rest: str) -> bool:
    base = rest.removeprefix("refiner_")
    return base in S.COMPONENTS or rest == CONTROLLED_UNET or rest.startswith("controlnet_")


def load_waves(names: Iterable[str], prefix: str = "") -> tuple[list[str], list[str]]:
    """The models of ``names`` that the export with ``--model-prefix`` ``prefix`` wrote, in
    the order a rollout loads them: (components, pipelines). A pipeline version calls its
    components' same version, so the components load first and the pipelines last. Other
    exports' models (``xl_unet`` beside an unprefixed export) are not in either."""
    own = {n[len(prefix) :] for n in names if n.startswith(prefix)}
    pipelines = sorted(prefix + n for n in own if n in PIPELINE_MODELS)
    return sorted(prefix + n for n in own if _component_of_export(n)), pipelines


@dataclass(frozen=True)
class Health:
    """Server liveness and readiness, and readiness of the client's two models."""

    live: bool
    ready: bool
    models: dict[str, bool]


def backoff_delay(attempt: int, backoff_s: float, max_backoff_s: float) -> float:
    """Exponential backoff from ``backoff_s``, capped at ``max_backoff_s``, times a random 50-100 %."""
    ceiling = min(max_backoff_s, backoff_s * 2**attempt)
    return ceiling * random.uniform(0.5, 1.0)


def default_stream_model(model: str) -> str:
    return S.STABLE_DIFFUSION_STREAM.name if model == S.STABLE_DIFFUSION.name else f"{model}_stream"


def is_retryable(error: SDTritonError) -> bool:
    return isinstance(error, UnavailableError) and error.status == RETRYABLE_STATUS


class Attempts:
    """One unary call's attempts under one end-to-end deadline.

    :meth:`timeout` is what the next attempt may take: the time left until
    the deadline. :meth:`delay_after` is the wait before the next attempt, or
    raises the error when there is none: it was not retryable, the retries
    are spent, or the wait would reach the deadline.
    """

    def __init__(self, client: ClientCore[Any, Any, Any], timeout_s: float | None) -> None:
        self._client = client
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.attempt = 0

    def timeout(self) -> float | None:
        if self._deadline is None:
            return None
        return max(self._deadline - time.monotonic(), 0.001)

    def delay_after(self, error: SDTritonError) -> float:
        if not is_retryable(error) or self.attempt >= self._client.retries:
            raise error
        delay = self._client.backoff_delay(self.attempt)
        self.attempt += 1
        if self._deadline is not None and time.monotonic() + delay >= self._deadline:
            raise error
        return delay


def pinned_config(config: Mapping[str, Any], versions: Sequence[int]) -> str:
    """``config`` (JSON form) serving exactly ``versions``, as a ``load_model`` config override."""
    if not versions or any(isinstance(v, bool) or not isinstance(v, int) for v in versions):
        raise ValueError(f"versions must be a non-empty list of integers, got {versions!r}")
    pinned = dict(config)
    pinned["version_policy"] = {"specific": {"versions": [int(v) for v in versions]}}
    return json.dumps(pinned)


def _request(arguments: Mapping[str, Any]) -> GenerationRequest:
    """The request that a generation method's arguments (its ``locals()``) describe.

    The generation methods' keyword-only options are GenerationRequest fields
    by name (a test holds them to the contract), so the arguments that are
    fields make the request; ``self`` and ``timeout_s`` are not fields.
    """
    names = {f.name for f in fields(GenerationRequest)}
    return GenerationRequest(**{k: v for k, v in arguments.items() if k in names})


PathLike = str | os.PathLike
# A pair input: diffusers' (height, width), or (top, left) for crop coordinates.
Pair = tuple[int, int]


class ClientCore(Generic[ResultT, PendingT, StreamT]):
    """A Stable Diffusion client for one server and model; the transports subclass it.

    ``timeout_s`` is the default end-to-end limit of every call (None: no
    limit); each call can set its own. ``stream_model`` is the decoupled
    variant used by :meth:`stream` (default ``<model>_stream``);
    ``model_version`` pins the unary model's version ("": the server's choice,
    its latest).

    ``retries``: how many times :meth:`generate`, :meth:`run` and the image
    methods send a request again after the server answered UNAVAILABLE
    (server down or restarting, queue full); never after any other error,
    which would fail the same way again (NOT_FOUND for a misspelled model
    included). Waits between attempts grow exponentially from ``backoff_s``
    up to ``max_backoff_s``, each with full jitter (a random share of
    50-100 %) so that refused clients do not come back in step. The call's
    ``timeout_s`` covers all attempts and the waits between them: each
    attempt gets the time left, and no retry starts when its wait would reach
    the deadline. Default 0: fail at once. Streams and :meth:`submit` are not
    retried (a stream may already have delivered events).

    ``admin_key`` is sent with the admin calls (:meth:`list_models`,
    :meth:`load_model`, :meth:`unload_model`) to a server that restricts
    them; a refusal is a :class:`PermissionDeniedError`. ``ssl=True`` speaks
    TLS to the gRPC port; ``root_certificates`` (the CA's PEM file, default:
    the system's), ``private_key`` and ``certificate_chain`` (PEM files, for
    servers that require client certificates) as in ``tritonclient.grpc``.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        model: str = S.STABLE_DIFFUSION.name,
        model_version: str = "",
        stream_model: str | None = None,
        timeout_s: float | None = None,
        retries: int = 0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        admin_key: str | None = None,
        ssl: bool = False,
        root_certificates: PathLike | None = None,
        private_key: PathLike | None = None,
        certificate_chain: PathLike | None = None,
    ) -> None:
        if retries < 0 or backoff_s < 0 or max_backoff_s < 0:
            raise ValueError("retries, backoff_s and max_backoff_s must be >= 0")
        if not ssl and (root_certificates or private_key or certificate_chain):
            raise ValueError("root_certificates, private_key and certificate_chain need ssl=True")
        self.url = url
        self.model = model
        self.model_version = str(model_version)
        self.stream_model = stream_model or default_stream_model(model)
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.admin_key = admin_key
        pem = {"root_certificates": root_certificates, "private_key": private_key}
        pem["certificate_chain"] = certificate_chain
        self._tls = {"ssl": ssl} | {k: os.fspath(v) for k, v in pem.items() if v is not None}
        self._defaults: dict[str, dict[str, Any]] = {}
        self._client = self._connect()

    def _connect(self) -> Any:
        """A new tritonclient client for ``url`` with the TLS options."""
        raise NotImplementedError

    def _timeout(self, timeout_s: float | None) -> float | None:
        return self.timeout_s if timeout_s is None else timeout_s

    def _attempts(self, timeout_s: float | None) -> Attempts:
        return Attempts(self, self._timeout(timeout_s))

    def backoff_delay(self, attempt: int) -> float:
        """Seconds to wait before retry ``attempt + 1``: exponential, capped, jittered."""
        return backoff_delay(attempt, self.backoff_s, self.max_backoff_s)

    def _infer_options(self, attempts: Attempts) -> dict[str, Any]:
        """tritonclient ``infer`` keywords of the next attempt: the version and the time left."""
        return {"model_version": self.model_version, "client_timeout": attempts.timeout()}

    def _ready_polls(self, timeout_s: float, poll_s: float) -> Iterator[tuple[float, float]]:
        """(probe timeout, wait after a failed probe) until ``timeout_s``; then UnavailableError."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            yield max(0.05, min(remaining, 2.0)), min(poll_s, max(remaining, 0.0))
            if remaining <= 0:
                raise UnavailableError(
                    f"{self.url}: server or model {self.model!r} not ready after {timeout_s:g} s"
                )

    # ------------------------------------------------------------------ admin calls

    def _admin_headers(self) -> dict[str, str] | None:
        return {GRPC_ADMIN_KEY_HEADER: self.admin_key} if self.admin_key else None

    def _admin_error(self, error: SDTritonError) -> SDTritonError:
        """A refused admin call, said plainly: was the key missing, or wrong? Or does the
        server load its models only at start?"""
        if _NO_MODEL_CONTROL in error.message:
            return type(error)(
                f"{error.message} (this server loads its models once, at start: start it with "
                "explicit model control, sd-triton-server --model-control explicit and an "
                "admin key, to load and unload models while it runs)",
                status=error.status,
            )
        if not isinstance(error, PermissionDeniedError):
            return error
        why = (
            "the admin key given was not accepted"
            if self.admin_key
            else "no admin key was given (Client(admin_key=...); sd-triton reads "
            f"${S.ADMIN_KEY_ENV}, ${S.ADMIN_KEY_FILE_ENV} or --admin-key-file)"
        )
        return PermissionDeniedError(
            f"{self.url}: admin call refused: {why}; the server restricts it to requests "
            f"with header {S.ADMIN_KEY_HEADER!r}",
            status=error.status,
        )

    @staticmethod
    def _model_statuses(index: Any) -> list[ModelStatus]:
        return [ModelStatus(m.name, m.version, m.state, m.reason) for m in index.models]

    # ------------------------------------------------------------- model defaults

    def _cached_defaults(self, model: str) -> dict[str, Any] | None:
        """Defaults and checkpoint facts the model publishes, known so far; None: read the
        model's config first (once per model: infotext needs the model hash too)."""
        return self._defaults.get(model)

    def _remember_defaults(self, model: str, config: Any) -> dict[str, Any]:
        params = {k: v.string_value for k, v in config.parameters.items()}
        self._defaults[model] = model_defaults(params)
        return self._defaults[model]

    # ---------------------------------------------------------- what a transport does

    def run(self, request: GenerationRequest, *, timeout_s: float | None = None) -> ResultT:
        """Send a prepared :class:`GenerationRequest` to the unary model (with retries)."""
        raise NotImplementedError

    def _submit(self, request: GenerationRequest, timeout_s: float | None) -> PendingT:
        raise NotImplementedError

    def _stream(self, request: GenerationRequest, timeout_s: float | None) -> StreamT:
        raise NotImplementedError

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        scheduler: str | None = None,
        num_images_per_prompt: int | None = None,
        guidance_rescale: float | None = None,
        clip_skip: int | None = None,
        prompt_syntax: str | None = None,
        prompt_2: str | None = None,
        negative_prompt_2: str | None = None,
        original_size: Pair | None = None,
        crops_coords_top_left: Pair | None = None,
        target_size: Pair | None = None,
        negative_original_size: Pair | None = None,
        negative_crops_coords_top_left: Pair | None = None,
        negative_target_size: Pair | None = None,
        aesthetic_score: float | None = None,
        negative_aesthetic_score: float | None = None,
        refiner_switch_at: float | None = None,
        enable_hr: bool | None = None,
        hr_scale: float | None = None,
        hr_upscaler: str | None = None,
        hr_denoising_strength: float | None = None,
        hr_second_pass_steps: int | None = None,
        control_image: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray] | None = None,
        controlnet: str | Sequence[str] | None = None,
        controlnet_conditioning_scale: float | Sequence[float] | None = None,
        control_guidance_start: float | Sequence[float] | None = None,
        control_guidance_end: float | Sequence[float] | None = None,
        guess_mode: bool | None = None,
        timeout_s: float | None = None,
    ) -> ResultT:
        """Generate images for ``prompt``; omitted options take the server's defaults.

        The options are the contract's inputs (diffusers' names): ``guidance_rescale``,
        ``clip_skip``, ``prompt_syntax`` (``"a1111"`` or ``"diffusers"``) and the hires
        fix (``enable_hr`` and ``hr_*``) for every family; ``prompt_2`` ...
        ``negative_target_size`` for SDXL (pairs: ``(height, width)``, crops
        ``(top, left)``), ``aesthetic_score`` and ``negative_aesthetic_score`` for an
        SDXL refiner, and ``refiner_switch_at`` for an SDXL base with a refiner beside it.
        ``control_image``, ``controlnet`` (names), ``controlnet_conditioning_scale``,
        ``control_guidance_start`` and ``control_guidance_end`` take one value per
        ControlNet (a single value for one), as diffusers' ControlNet pipelines.
        """
        return self.run(_request(locals()), timeout_s=timeout_s)

    def submit(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        scheduler: str | None = None,
        num_images_per_prompt: int | None = None,
        guidance_rescale: float | None = None,
        clip_skip: int | None = None,
        prompt_syntax: str | None = None,
        prompt_2: str | None = None,
        negative_prompt_2: str | None = None,
        original_size: Pair | None = None,
        crops_coords_top_left: Pair | None = None,
        target_size: Pair | None = None,
        negative_original_size: Pair | None = None,
        negative_crops_coords_top_left: Pair | None = None,
        negative_target_size: Pair | None = None,
        aesthetic_score: float | None = None,
        negative_aesthetic_score: float | None = None,
        refiner_switch_at: float | None = None,
        enable_hr: bool | None = None,
        hr_scale: float | None = None,
        hr_upscaler: str | None = None,
        hr_denoising_strength: float | None = None,
        hr_second_pass_steps: int | None = None,
        control_image: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray] | None = None,
        controlnet: str | Sequence[str] | None = None,
        controlnet_conditioning_scale: float | Sequence[float] | None = None,
        control_guidance_start: float | Sequence[float] | None = None,
        control_guidance_end: float | Sequence[float] | None = None,
        guess_mode: bool | None = None,
        timeout_s: float | None = None,
    ) -> PendingT:
        """Start :meth:`generate` in the background (not retried); the handle can be cancelled."""
        return self._submit(_request(locals()), self._timeout(timeout_s))

    def stream(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        scheduler: str | None = None,
        num_images_per_prompt: int | None = None,
        guidance_rescale: float | None = None,
        clip_skip: int | None = None,
        prompt_syntax: str | None = None,
        prompt_2: str | None = None,
        negative_prompt_2: str | None = None,
        original_size: Pair | None = None,
        crops_coords_top_left: Pair | None = None,
        target_size: Pair | None = None,
        negative_original_size: Pair | None = None,
        negative_crops_coords_top_left: Pair | None = None,
        negative_target_size: Pair | None = None,
        aesthetic_score: float | None = None,
        negative_aesthetic_score: float | None = None,
        refiner_switch_at: float | None = None,
        enable_hr: bool | None = None,
        hr_scale: float | None = None,
        hr_upscaler: str | None = None,
        hr_denoising_strength: float | None = None,
        hr_second_pass_steps: int | None = None,
        control_image: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray] | None = None,
        controlnet: str | Sequence[str] | None = None,
        controlnet_conditioning_scale: float | Sequence[float] | None = None,
        control_guidance_start: float | Sequence[float] | None = None,
        control_guidance_end: float | Sequence[float] | None = None,
        guess_mode: bool | None = None,
        preview: bool = False,
        timeout_s: float | None = None,
    ) -> StreamT:
        """Generate through the streaming model: iterate for ProgressEvents, then the GenerationResult.

        ``preview=True`` adds small previews of the latents to each event.
        """
        request = _request(locals() | {"preview": preview or None})
        return self._stream(request, self._timeout(timeout_s))

    # ---------------------------------------------- img2img, inpainting, outpainting

    def img2img(
        self,
        prompt: str,
        image: Image.Image | np.ndarray,
        *,
        strength: float | None = None,
        timeout_s: float | None = None,
        **options: Any,
    ) -> ResultT:
        """Generate from ``image`` (RGB), keeping its size; ``strength`` in (0, 1], default 0.8.

        ``options`` are :meth:`generate`'s (``negative_prompt``, ``seed``, ...).
        """
        request = img2img_request(prompt, image, strength=strength, **options)
        return self.run(request, timeout_s=timeout_s)

    def inpaint(
        self,
        prompt: str,
        image: Image.Image | np.ndarray,
        mask_image: Image.Image | np.ndarray,
        *,
        strength: float | None = None,
        timeout_s: float | None = None,
        **options: Any,
    ) -> ResultT:
        """Repaint ``image`` where ``mask_image`` (same size, grey levels) is white (>= 128).

        ``strength`` in (0, 1], default 1.0 (diffusers' inpainting default).
        """
        request = inpaint_request(prompt, image, mask_image, strength=strength, **options)
        return self.run(request, timeout_s=timeout_s)

    def outpaint(
        self,
        prompt: str,
        image: Image.Image | np.ndarray,
        *,
        strength: float | None = None,
        timeout_s: float | None = None,
        **options: Any,
    ) -> ResultT:
        """Extend ``image`` by the margins (pixels) and paint them in.

        ``options``: the margins ``left``, ``right``, ``top``, ``bottom`` and
        ``overlap`` (see ``outpaint_canvas``) and :meth:`generate`'s options.
        """
        request = outpaint_request(prompt, image, strength=strength, **options)
        return self.run(request, timeout_s=timeout_s)
