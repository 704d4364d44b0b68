"""The blocking client: a transport over ``tritonclient.grpc`` for :class:`~._core.ClientCore`."""

from __future__ import annotations

import concurrent.futures
import contextlib
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from sd_pipeline import spec as S

from ._core import DEFAULT_URL, ClientCore, Health, ModelStatus, pinned_config
from ._errors import CancelledError, SDTritonError, translate
from ._request import GenerationRequest, StreamDecoder, decode_result
from ._types import GenerationResult, ProgressEvent

__all__ = [
    "DEFAULT_URL",
    "Client",
    "GenerationStream",
    "Health",
    "ModelStatus",
    "PendingGeneration",
]


class Client(ClientCore[GenerationResult, "PendingGeneration", "GenerationStream"]):
    """A blocking Stable Diffusion client for one server and model; a context manager.

    Thread-safe, except :meth:`close`. The options (timeouts, retries, admin
    key, TLS) are :class:`~._core.ClientCore`'s.
    """

    def _connect(self) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(self.url, **self._tls)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InferenceServerException as e:
            raise translate(e, context=self.url) from e

    def _admin(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._call(fn, *args, headers=self._admin_headers(), **kwargs)
        except SDTritonError as e:
            raise self._admin_error(e) from e

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
        for probe_s, wait_s in self._ready_polls(timeout_s, poll_s):
            if self.is_ready(timeout_s=probe_s):
                return
            time.sleep(wait_s)

    def health(self, *, timeout_s: float | None = None) -> Health:
        """Liveness and readiness of the server and of ``model`` and ``stream_model``."""
        timeout, c = self._timeout(timeout_s), self._client
        live = self._call(c.is_server_live, client_timeout=timeout)
        ready = self._call(c.is_server_ready, client_timeout=timeout)
        models = {
            m: self._call(c.is_model_ready, m, client_timeout=timeout)
            for m in (self.model, self.stream_model)
        }
        return Health(live=live, ready=ready, models=models)

    # ---------------------------------------------------------------- admin

    def list_models(self, *, timeout_s: float | None = None) -> list[ModelStatus]:
        """The server's model repository index (an admin call)."""
        c = self._client
        index = self._admin(c.get_model_repository_index, client_timeout=self._timeout(timeout_s))
        return self._model_statuses(index)

    def load_model(
        self,
        name: str,
        *,
        versions: Sequence[int] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """Load (or reload) model ``name`` (an admin call; explicit model control).

        ``versions``: serve exactly these versions (a rollback), overriding the
        config's version policy until the next plain load.
        """
        timeout, config = self._timeout(timeout_s), None
        if versions is not None:
            c = self._client
            served = self._call(c.get_model_config, name, as_json=True, client_timeout=timeout)
            config = pinned_config(served["config"], versions)
        self._admin(self._client.load_model, name, config=config, client_timeout=timeout)

    def unload_model(self, name: str, *, timeout_s: float | None = None) -> None:
        """Unload model ``name`` (an admin call; explicit model control)."""
        self._admin(self._client.unload_model, name, client_timeout=self._timeout(timeout_s))

    def _model_defaults(self, model: str, request: GenerationRequest) -> dict[str, Any]:
        defaults = self._cached_defaults(model)
        if defaults is None:
            try:
                config = self._client.get_model_config(model, client_timeout=self.timeout_s).config
            except InferenceServerException:
                return {}  # the call that follows reports the problem
            defaults = self._remember_defaults(model, config)
        return defaults

    # ------------------------------------------------------------- generation

    def run(
        self, request: GenerationRequest, *, timeout_s: float | None = None
    ) -> GenerationResult:
        """Send a prepared :class:`GenerationRequest` to the unary model (with retries)."""
        inputs = request.to_inputs(S.STABLE_DIFFUSION)
        defaults = self._model_defaults(self.model, request)
        attempts = self._attempts(timeout_s)
        while True:
            try:
                result = self._call(
                    self._client.infer, self.model, inputs, **self._infer_options(attempts)
                )
                break
            except SDTritonError as e:
                time.sleep(attempts.delay_after(e))
        return decode_result(result, request, defaults)

    def _submit(self, request: GenerationRequest, timeout_s: float | None) -> PendingGeneration:
        return PendingGeneration(self, request, timeout_s)

    def _stream(self, request: GenerationRequest, timeout_s: float | None) -> GenerationStream:
        return GenerationStream(self, request, timeout_s)


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
            model_version=client.model_version,
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
        self._client = client._connect()
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
