"""The asyncio client: a transport over ``tritonclient.grpc.aio`` for :class:`~._core.ClientCore`.

Cancellation follows asyncio's rules: cancelling the task that awaits a call
cancels the gRPC call (the server stops at its next step) and raises
``asyncio.CancelledError`` as usual, so ``asyncio.timeout`` and task groups
keep working. A caller that wants this package's :class:`CancelledError`
instead cancels through a handle: :meth:`AsyncClient.submit` or the stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Generator, Sequence
from typing import Any

import grpc
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from sd_pipeline import spec as S

from ._core import ClientCore, Health, ModelStatus, pinned_config
from ._errors import CancelledError, SDTritonError, ServerError, translate
from ._request import GenerationRequest, StreamDecoder, decode_result
from ._types import GenerationResult, ProgressEvent

__all__ = ["AsyncClient", "AsyncGenerationStream", "AsyncPendingGeneration"]

# What a grpc.aio call raises that tritonclient.grpc.aio does not wrap (its streams).
_TRANSPORT_ERRORS = (InferenceServerException, grpc.RpcError)


class AsyncClient(
    ClientCore[Awaitable[GenerationResult], "AsyncPendingGeneration", "AsyncGenerationStream"]
):
    """An asyncio Stable Diffusion client for one server and model; an async context manager.

    The same options, methods and results as :class:`~._sync.Client`
    (:class:`~._core.ClientCore`), awaited; create it inside the event loop
    that uses it.
    """

    def _connect(self) -> aioclient.InferenceServerClient:
        return aioclient.InferenceServerClient(self.url, **self._tls)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._client.close()

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except _TRANSPORT_ERRORS as e:
            raise translate(e, context=self.url) from e

    async def _admin(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await self._call(fn, *args, headers=self._admin_headers(), **kwargs)
        except SDTritonError as e:
            raise self._admin_error(e) from e

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
        for probe_s, wait_s in self._ready_polls(timeout_s, poll_s):
            if await self.is_ready(timeout_s=probe_s):
                return
            await asyncio.sleep(wait_s)

    async def health(self, *, timeout_s: float | None = None) -> Health:
        """Liveness and readiness of the server and of ``model`` and ``stream_model``."""
        timeout, c = self._timeout(timeout_s), self._client
        live = await self._call(c.is_server_live, client_timeout=timeout)
        ready = await self._call(c.is_server_ready, client_timeout=timeout)
        models = {
            m: await self._call(c.is_model_ready, m, client_timeout=timeout)
            for m in (self.model, self.stream_model)
        }
        return Health(live=live, ready=ready, models=models)

    # ---------------------------------------------------------------- admin

    async def list_models(self, *, timeout_s: float | None = None) -> list[ModelStatus]:
        """The server's model repository index (an admin call)."""
        c = self._client
        index = await self._admin(
            c.get_model_repository_index, client_timeout=self._timeout(timeout_s)
        )
        return self._model_statuses(index)

    async def load_model(
        self,
        name: str,
        *,
        versions: Sequence[int] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """As :meth:`Client.load_model`: load model ``name``, ``versions`` pins its versions."""
        timeout, config = self._timeout(timeout_s), None
        if versions is not None:
            c = self._client
            served = await self._call(
                c.get_model_config, name, as_json=True, client_timeout=timeout
            )
            config = pinned_config(served["config"], versions)
        await self._admin(self._client.load_model, name, config=config, client_timeout=timeout)

    async def unload_model(self, name: str, *, timeout_s: float | None = None) -> None:
        """Unload model ``name`` (an admin call; explicit model control)."""
        c = self._client
        await self._admin(c.unload_model, name, client_timeout=self._timeout(timeout_s))

    async def _model_defaults(self, model: str, request: GenerationRequest) -> dict[str, Any]:
        defaults = self._cached_defaults(model)
        if defaults is None:
            try:
                response = await self._client.get_model_config(model, client_timeout=self.timeout_s)
            except _TRANSPORT_ERRORS:
                return {}  # the call that follows reports the problem
            defaults = self._remember_defaults(model, response.config)
        return defaults

    # ------------------------------------------------------------- generation

    async def run(
        self, request: GenerationRequest, *, timeout_s: float | None = None
    ) -> GenerationResult:
        """Send a prepared :class:`GenerationRequest` to the unary model (with retries)."""
        inputs = request.to_inputs(S.STABLE_DIFFUSION)
        defaults = await self._model_defaults(self.model, request)
        attempts = self._attempts(timeout_s)
        while True:
            try:
                result = await self._call(
                    self._client.infer, self.model, inputs, **self._infer_options(attempts)
                )
                break
            except SDTritonError as e:
                await asyncio.sleep(attempts.delay_after(e))
        return decode_result(result, request, defaults)

    def _submit(
        self, request: GenerationRequest, timeout_s: float | None
    ) -> AsyncPendingGeneration:
        request.to_inputs(S.STABLE_DIFFUSION)  # raise InvalidRequestError here, not when awaited
        return AsyncPendingGeneration(self.run(request, timeout_s=timeout_s))

    def _stream(self, request: GenerationRequest, timeout_s: float | None) -> AsyncGenerationStream:
        return AsyncGenerationStream(self, request, timeout_s)


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
