"""The blocking client, over ``tritonclient.grpc``."""

from __future__ import annotations

import concurrent.futures
import contextlib
import queue
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from sd_pipeline import spec as S

from ._edit import img2img_request, inpaint_request, outpaint_request
from ._errors import CancelledError, SDTritonError, UnavailableError, translate
from ._request import GenerationRequest, StreamDecoder, decode_result, model_defaults
from ._types import GenerationResult, ProgressEvent

__all__ = ["Client", "GenerationStream", "Health", "ModelStatus", "PendingGeneration"]

DEFAULT_URL = "localhost:8001"


@dataclass(frozen=True)
class ModelStatus:
    """One entry of the server's model repository index."""

    name: str
    version: str
    state: str
    reason: str = ""


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


class Client:
    """A blocking Stable Diffusion client for one server and model; a context manager.

    ``timeout_s`` is the default end-to-end limit of every call (None: no
    limit); each call can set its own. ``stream_model`` is the decoupled
    variant used by :meth:`stream` (default ``<model>_stream``). Thread-safe,
    except :meth:`close`.

    ``retries``: how many times :meth:`generate` / :meth:`run` send a request
    again after an :class:`UnavailableError` (server down or restarting,
    model not loaded, queue full, queue timeout); never after any other
    error, which would fail the same way again. Waits between attempts grow
    exponentially from ``backoff_s`` up to ``max_backoff_s``, each with full
    jitter (a random share of 50-100 %) so that refused clients do not come
    back in step. Default 0: fail at once. Streams and :meth:`submit` are not
    retried (a stream may already have delivered events).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        model: str = S.STABLE_DIFFUSION.name,
        stream_model: str | None = None,
        timeout_s: float | None = None,
        retries: int = 0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
    ) -> None:
        if retries < 0 or backoff_s < 0 or max_backoff_s < 0:
            raise ValueError("retries, backoff_s and max_backoff_s must be >= 0")
        self.url = url
        self.model = model
        self.stream_model = stream_model or default_stream_model(model)
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._client = grpcclient.InferenceServerClient(url)
        self._defaults: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def _timeout(self, timeout_s: float | None) -> float | None:
        return self.timeout_s if timeout_s is None else timeout_s

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InferenceServerException as e:
            raise translate(e, context=self.url) from e

    # ---------------------------------------------------------------- health

    def is_ready(self, *, timeout_s: float | None = None) -> bool:
        """Whether the server is up and the model is ready; never raises for a down server."""
        try:
            timeout = self._timeout(timeout_s)
            return bool(
                self._client.is_server_ready(client_timeout=timeout)
                and self._client.is_model_ready(self.model, client_timeout=timeout)
            )
        except InferenceServerException:
            return False

    def wait_until_ready(self, timeout_s: float = 60.0, *, poll_s: float = 0.25) -> None:
        """Block until the server and the model are ready; UnavailableError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if self.is_ready(timeout_s=max(0.05, min(remaining, 2.0))):
                return
            if remaining <= 0:
                raise UnavailableError(
                    f"{self.url}: server or model {self.model!r} not ready after {timeout_s:g} s"
                )
            time.sleep(min(poll_s, max(remaining, 0.0)))

    def health(self, *, timeout_s: float | None = None) -> Health:
        """Liveness and readiness of the server and of ``model`` and ``stream_model``."""
        timeout = self._timeout(timeout_s)
        try:
            live = self._client.is_server_live(client_timeout=timeout)
            ready = self._client.is_server_ready(client_timeout=timeout)
            models = {
                m: self._client.is_model_ready(m, client_timeout=timeout)
                for m in (self.model, self.stream_model)
            }
        except InferenceServerException as e:
            raise translate(e, context=self.url) from e
        return Health(live=live, ready=ready, models=models)

    def list_models(self, *, timeout_s: float | None = None) -> list[ModelStatus]:
        """The server's model repository index."""
        index = self._call(
            self._client.get_model_repository_index, client_timeout=self._timeout(timeout_s)
        )
        return [ModelStatus(m.name, m.version, m.state, m.reason) for m in index.models]

    def _model_defaults(self, model: str, request: GenerationRequest) -> dict[str, Any]:
        """Defaults the model publishes (read once); only needed when the scheduler is omitted."""
        if request.scheduler is not None:
            return {}
        if model not in self._defaults:
            try:
                config = self._client.get_model_config(model, client_timeout=self.timeout_s).config
            except InferenceServerException:
                return {}  # the call that follows reports the problem
            params = {k: v.string_value for k, v in config.parameters.items()}
            self._defaults[model] = model_defaults(params)
        return self._defaults[model]

    # ------------------------------------------------------------- generation

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
        timeout_s: float | None = None,
    ) -> GenerationResult:
        """Generate images for ``prompt``; omitted options take the server's defaults."""
        request = GenerationRequest(
            prompt=prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            seed=seed,
            scheduler=scheduler,
            num_images_per_prompt=num_images_per_prompt,
        )
        return self.run(request, timeout_s=timeout_s)

    def run(
        self, request: GenerationRequest, *, timeout_s: float | None = None
    ) -> GenerationResult:
        """Send a prepared :class:`GenerationRequest` to the unary model."""
        inputs = request.to_inputs(S.STABLE_DIFFUSION)
        defaults = self._model_defaults(self.model, request)
        for attempt in range(self.retries + 1):
            try:
                result = self._call(
                    self._client.infer, self.model, inputs, client_timeout=self._timeout(timeout_s)
                )
                break
            except UnavailableError:
                if attempt >= self.retries:
                    raise
                time.sleep(self.backoff_delay(attempt))
        return decode_result(result, request, defaults)

    def backoff_delay(self, attempt: int) -> float:
        """Seconds to wait before retry ``attempt + 1``: exponential, capped, jittered."""
        return backoff_delay(attempt, self.backoff_s, self.max_backoff_s)

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
        timeout_s: float | None = None,
    ) -> PendingGeneration:
        """Start :meth:`generate` in the background; the handle can be cancelled."""
        request = GenerationRequest(
            prompt=prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            seed=seed,
            scheduler=scheduler,
            num_images_per_prompt=num_images_per_prompt,
        )
        return PendingGeneration(self, request, self._timeout(timeout_s))

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
        preview: bool = False,
        timeout_s: float | None = None,
    ) -> GenerationStream:
        """Generate through the streaming model: iterate for ProgressEvents, then the GenerationResult.

        ``preview=True`` adds small previews of the latents to each event.
        """
        request = GenerationRequest(
            prompt=prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            seed=seed,
            scheduler=scheduler,
            num_images_per_prompt=num_images_per_prompt,
            preview=preview or None,
        )
        return GenerationStream(self, request, self._timeout(timeout_s))

    # ---------------------------------------------- img2img, inpainting, outpainting

    def img2img(
        self,
        prompt: str,
        image: Image.Image | np.ndarray,
        *,
        strength: float | None = None,
        timeout_s: float | None = None,
        **options: Any,
    ) -> GenerationResult:
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
    ) -> GenerationResult:
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
        left: int = 0,
        right: int = 0,
        top: int = 0,
        bottom: int = 0,
        overlap: int = 0,
        strength: float | None = None,
        timeout_s: float | None = None,
        **options: Any,
    ) -> GenerationResult:
        """Extend ``image`` by the margins (pixels) and paint them in (see ``outpaint_canvas``)."""
        request = outpaint_request(
            prompt,
            image,
            left=left,
            right=right,
            top=top,
            bottom=bottom,
            overlap=overlap,
            strength=strength,
            **options,
        )
        return self.run(request, timeout_s=timeout_s)


class PendingGeneration:
    """A unary request in flight (from :meth:`Client.submit`)."""

    def __init__(self, client: Client, request: GenerationRequest, timeout_s: float | None) -> None:
        self._future: concurrent.futures.Future[GenerationResult] = concurrent.futures.Future()
        self._cancelled = False
        inputs = request.to_inputs(S.STABLE_DIFFUSION)
        defaults = client._model_defaults(client.model, request)

        def on_done(result: Any, error: Any) -> None:
            try:
                if error is not None:
                    raise translate(error, context=client.url)
                self._future.set_result(decode_result(result, request, defaults))
            except CancelledError as e:
                if self._cancelled:
                    e = CancelledError("cancelled by the caller", status=e.status)
                self._future.set_exception(e)
            except SDTritonError as e:
                self._future.set_exception(e)

        self._context = client._call(
            client._client.async_infer,
            client.model,
            inputs,
            callback=on_done,
            client_timeout=timeout_s,
        )

    def cancel(self) -> None:
        """Cancel the request: the server stops at its next step and :meth:`result` raises CancelledError."""
        if not self._future.done():
            self._cancelled = True
            self._context.cancel()

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout_s: float | None = None) -> GenerationResult:
        """Wait for the result, or raise the request's error.

        ``timeout_s`` bounds this wait only: the builtin TimeoutError it raises
        leaves the request running (use the call's ``timeout_s`` to bound the request).
        """
        return self._future.result(timeout_s)


class GenerationStream(Iterator["ProgressEvent | GenerationResult"]):
    """A streamed generation in flight: iterate for ProgressEvents, then one GenerationResult.

    The iteration stops after the result, which :attr:`result` then holds.
    :meth:`cancel` (from any thread) stops the server's loop at its next step
    and makes the iteration raise CancelledError. As a context manager,
    leaving the block before the result cancels the request.
    """

    def __init__(self, client: Client, request: GenerationRequest, timeout_s: float | None) -> None:
        defaults = client._model_defaults(client.stream_model, request)
        self._decoder = StreamDecoder(request, defaults, model=client.model)
        self._queue: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self._lock = threading.Lock()
        self._cancelled = self._done = self._closed = False
        inputs = request.to_inputs(S.STABLE_DIFFUSION_STREAM)
        # One gRPC stream per request: tritonclient allows one stream per client object.
        self._client = grpcclient.InferenceServerClient(client.url)
        try:
            self._client.start_stream(
                callback=lambda result, error: self._queue.put((result, error)),
                stream_timeout=timeout_s,
            )
            self._client.async_stream_infer(
                client.stream_model, inputs, enable_empty_final_response=True
            )
        except InferenceServerException as e:
            # A stream that failed at once (no server) reports why through the callback.
            try:
                _, error = self._queue.get(timeout=1.0)
            except queue.Empty:
                error = None
            self._release(cancel=True)
            raise translate(error or e, context=client.url) from e

    @property
    def result(self) -> GenerationResult | None:
        """The final result, once the iteration has reached it."""
        return self._decoder.result

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> ProgressEvent | GenerationResult:
        if self._done:
            raise StopIteration
        while True:
            result, error = self._queue.get()
            try:
                event = self._decoder.feed(result, error)
            except SDTritonError as e:
                self._done = True
                self._release(cancel=True)
                if self._cancelled:
                    raise CancelledError("cancelled by the caller", status=e.status) from e
                raise
            if event is None:
                continue
            if self._decoder.result is not None:
                self._done = True
                self._release(cancel=False)
            return event

    def cancel(self) -> None:
        """Cancel the request in flight; no effect once its result has arrived."""
        with self._lock:
            if self._closed:
                return
            self._cancelled = True
        self._release(cancel=True)

    def _release(self, *, cancel: bool) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._client.stop_stream(cancel_requests=cancel)
            finally:
                self._client.close()

    def close(self) -> None:
        """Cancel the request if it is still running; release the connection."""
        self._release(cancel=self._decoder.result is None)

    def __del__(self) -> None:
        # An abandoned stream must not keep the server busy (nor block in tritonclient's own __del__).
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
