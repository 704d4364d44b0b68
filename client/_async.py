"""The asyncio client, over ``tritonclient.grpc.aio``; it mirrors :class:`~._sync.Client`.

Cancellation follows asyncio's rules: cancelling the task that awaits a call
cancels the gRPC call (the server stops at its next step) and raises
``asyncio.CancelledError`` as usual, so ``asyncio.timeout`` and task groups
keep working. A caller that wants this package's :class:`CancelledError`
instead cancels through a handle: :meth:`AsyncClient.submit` or the stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Generator
from typing import Any

import grpc
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from sd_pipeline import spec as S

from ._errors import CancelledError, SDTritonError, ServerError, UnavailableError, translate
from ._request import GenerationRequest, StreamDecoder, decode_result, model_defaults
from ._sync import DEFAULT_URL, Health, ModelStatus, backoff_delay, default_stream_model
from ._types import GenerationResult, ProgressEvent

__all__ = ["AsyncClient", "AsyncGenerationStream", "AsyncPendingGeneration"]

# What a grpc.aio call raises that tritonclient.grpc.aio does not wrap (its streams).
_TRANSPORT_ERRORS = (InferenceServerException, grpc.RpcError)


class AsyncClient:
    """An asyncio Stable Diffusion client for one server and model; an async context manager.

    Same options and results as :class:`Client`; create it inside the event
    loop that uses it.
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
        # As Client: retry generate/run after UnavailableError only, with jittered backoff.
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._client = aioclient.InferenceServerClient(url)
        self._defaults: dict[str, dict[str, Any]] = {}

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._client.close()

    def _timeout(self, timeout_s: float | None) -> float | None:
        return self.timeout_s if timeout_s is None else timeout_s

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except _TRANSPORT_ERRORS as e:
            raise translate(e, context=self.url) from e

    # ---------------------------------------------------------------- health

    async def is_ready(self, *, timeout_s: float | None = None) -> bool:
        """Whether the server is up and the model is ready; never raises for a down server."""
        timeout = self._timeout(timeout_s)
        try:
            return bool(
                await self._client.is_server_ready(client_timeout=timeout)
                and await self._client.is_model_ready(self.model, client_timeout=timeout)
            )
        except _TRANSPORT_ERRORS:
            return False

    async def wait_until_ready(self, timeout_s: float = 60.0, *, poll_s: float = 0.25) -> None:
        """Wait until the server and the model are ready; UnavailableError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if await self.is_ready(timeout_s=max(0.05, min(remaining, 2.0))):
                return
            if remaining <= 0:
                raise UnavailableError(
                    f"{self.url}: server or model {self.model!r} not ready after {timeout_s:g} s"
                )
            await asyncio.sleep(min(poll_s, max(remaining, 0.0)))

    async def health(self, *, timeout_s: float | None = None) -> Health:
        """Liveness and readiness of the server and of ``model`` and ``stream_model``."""
        timeout = self._timeout(timeout_s)
        c = self._client
        live = await self._call(c.is_server_live, client_timeout=timeout)
        ready = await self._call(c.is_server_ready, client_timeout=timeout)
        models = {
            m: await self._call(c.is_model_ready, m, client_timeout=timeout)
            for m in (self.model, self.stream_model)
        }
        return Health(live=live, ready=ready, models=models)

    async def list_models(self, *, timeout_s: float | None = None) -> list[ModelStatus]:
        """The server's model repository index."""
        index = await self._call(
            self._client.get_model_repository_index, client_timeout=self._timeout(timeout_s)
        )
        return [ModelStatus(m.name, m.version, m.state, m.reason) for m in index.models]

    async def _model_defaults(self, model: str, request: GenerationRequest) -> dict[str, Any]:
        if request.scheduler is not None:
            return {}
        if model not in self._defaults:
            try:
                response = await self._client.get_model_config(model, client_timeout=self.timeout_s)
            except _TRANSPORT_ERRORS:
                return {}  # the call that follows reports the problem
            params = {k: v.string_value for k, v in response.config.parameters.items()}
            self._defaults[model] = model_defaults(params)
        return self._defaults[model]

    # ------------------------------------------------------------- generation

    async def generate(
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
        return await self.run(request, timeout_s=timeout_s)

    async def run(
        self, request: GenerationRequest, *, timeout_s: float | None = None
    ) -> GenerationResult:
        """Send a prepared :class:`GenerationRequest` to the unary model."""
        inputs = request.to_inputs(S.STABLE_DIFFUSION)
        defaults = await self._model_defaults(self.model, request)
        for attempt in range(self.retries + 1):
            try:
                result = await self._call(
                    self._client.infer, self.model, inputs, client_timeout=self._timeout(timeout_s)
                )
                break
            except UnavailableError:
                if attempt >= self.retries:
                    raise
                await asyncio.sleep(backoff_delay(attempt, self.backoff_s, self.max_backoff_s))
        return decode_result(result, request, defaults)

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
    ) -> AsyncPendingGeneration:
        """Start :meth:`generate` as a task; await the handle for the result, or cancel it."""
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
        request.to_inputs(S.STABLE_DIFFUSION)  # raise InvalidRequestError here, not when awaited
        return AsyncPendingGeneration(self.run(request, timeout_s=timeout_s))

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
    ) -> AsyncGenerationStream:
        """Generate through the streaming model: ``async for`` ProgressEvents, then the GenerationResult."""
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
        return AsyncGenerationStream(self, request, self._timeout(timeout_s))


class AsyncPendingGeneration:
    """A unary request running as a task (from :meth:`AsyncClient.submit`); await it for the result."""

    def __init__(self, coro: Any) -> None:
        self._task: asyncio.Task[GenerationResult] = asyncio.ensure_future(coro)

    def cancel(self) -> None:
        """Cancel the request: the server stops at its next step; awaiting raises CancelledError."""
        self._task.cancel()

    def done(self) -> bool:
        return self._task.done()

    async def result(self) -> GenerationResult:
        # asyncio.wait raises when the awaiting task is cancelled, not when ours was.
        try:
            await asyncio.wait({self._task})
        except asyncio.CancelledError:
            self._task.cancel()
            raise
        if self._task.cancelled():
            raise CancelledError("cancelled by the caller")
        return self._task.result()

    def __await__(self) -> Generator[Any, None, GenerationResult]:
        return self.result().__await__()


class AsyncGenerationStream(AsyncIterator["ProgressEvent | GenerationResult"]):
    """A streamed generation in flight: ``async for`` ProgressEvents, then one GenerationResult.

    :meth:`cancel` stops the server's loop at its next step and makes the
    iteration raise CancelledError; leaving ``async with`` before the result
    cancels the request.
    """

    def __init__(self, client: AsyncClient, request: GenerationRequest, timeout_s: float | None):
        self._client = client
        self._request = request
        self._inputs = request.to_inputs(S.STABLE_DIFFUSION_STREAM)
        self._timeout_s = timeout_s
        self._decoder: StreamDecoder | None = None
        self._responses: Any = None
        self._cancelled = self._done = False

    @property
    def result(self) -> GenerationResult | None:
        """The final result, once the iteration has reached it."""
        return self._decoder.result if self._decoder else None

    async def _start(self) -> None:
        client = self._client
        defaults = await client._model_defaults(client.stream_model, self._request)
        self._decoder = StreamDecoder(self._request, defaults, model=client.model)

        async def one_request() -> AsyncIterator[dict[str, Any]]:
            # The request stream ends after one request: the server ends the
            # response stream after the request's final response.
            yield {"model_name": client.stream_model, "inputs": self._inputs}

        try:
            self._responses = client._client.stream_infer(
                one_request(), stream_timeout=self._timeout_s
            )
        except _TRANSPORT_ERRORS as e:
            raise translate(e, context=client.url) from e

    def __aiter__(self) -> AsyncGenerationStream:
        return self

    async def __anext__(self) -> ProgressEvent | GenerationResult:
        if self._done:
            raise StopAsyncIteration
        if self._cancelled:  # before the request was sent
            self._done = True
            raise CancelledError("cancelled by the caller")
        if self._responses is None:
            await self._start()
        assert self._decoder is not None
        while True:
            try:
                result, error = await self._responses.__anext__()
                event = self._decoder.feed(result, error)
            except StopAsyncIteration:
                self._done = True
                if self._decoder.result is None:
                    raise ServerError(
                        "the server ended the stream without sending images"
                    ) from None
                raise
            except asyncio.CancelledError:
                self._done = True
                if self._cancelled:  # our cancel(), not the task's
                    raise CancelledError("cancelled by the caller") from None
                self._cancel_call()
                raise
            except _TRANSPORT_ERRORS as e:
                self._done = True
                raise translate(e, context=self._client.url) from e
            except SDTritonError:
                self._done = True
                self._cancel_call()
                raise
            if event is None:
                continue
            if self._decoder.result is not None:
                self._done = True
            return event

    def _cancel_call(self) -> None:
        if self._responses is not None:
            self._responses.cancel()

    def cancel(self) -> None:
        """Cancel the request in flight; no effect once its result has arrived."""
        if not self._done:
            self._cancelled = True
            self._cancel_call()

    async def aclose(self) -> None:
        """Cancel the request if it is still running."""
        self.cancel()

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
