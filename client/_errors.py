"""The client's exception tree and the one function that maps transport errors onto it.

Every error a caller sees is an :class:`SDTritonError`; tritonclient's
``InferenceServerException`` and raw ``grpc.RpcError`` never leak. The
server's message is kept verbatim in ``str(error)`` and ``error.message``;
the transport's status string (``"StatusCode.INVALID_ARGUMENT"``) is kept in
``error.status``.
"""

from __future__ import annotations

__all__ = [
    "CancelledError",
    "DeadlineExceededError",
    "InvalidRequestError",
    "PermissionDeniedError",
    "SDTritonError",
    "ServerError",
    "UnavailableError",
    "translate",
]


class SDTritonError(Exception):
    """Base of every error raised by ``sd_triton.client``."""

    def __init__(self, message: str, *, status: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message


class InvalidRequestError(SDTritonError, ValueError):
    """The server (or the client, before sending) rejected the request's inputs."""


class UnavailableError(SDTritonError):
    """No server at the address, the model is not loaded or not ready, or it is overloaded."""


class PermissionDeniedError(SDTritonError, PermissionError):
    """The server refused an admin call: the admin key was missing or wrong."""


class DeadlineExceededError(SDTritonError, TimeoutError):
    """The call's timeout expired before the server answered."""


class CancelledError(SDTritonError):
    """The request was cancelled (by the caller, or by the server) before it finished."""


class ServerError(SDTritonError):
    """Anything else the server reported: a failure inside the model, an internal error."""


# gRPC status (as tritonclient's InferenceServerException.status() spells it) -> error class.
# Measured on tritonserver 2.51: a Python-backend TritonError INVALID_ARG arrives as
# INVALID_ARGUMENT, an unknown model as NOT_FOUND, a refused connection as UNAVAILABLE,
# client_timeout as DEADLINE_EXCEEDED, a local cancel as CANCELLED, an exception
# inside the model as INTERNAL.
_BY_STATUS: dict[str, type[SDTritonError]] = {
    "StatusCode.INVALID_ARGUMENT": InvalidRequestError,
    "StatusCode.OUT_OF_RANGE": InvalidRequestError,
    "StatusCode.NOT_FOUND": UnavailableError,
    "StatusCode.UNAVAILABLE": UnavailableError,
    "StatusCode.RESOURCE_EXHAUSTED": UnavailableError,
    "StatusCode.DEADLINE_EXCEEDED": DeadlineExceededError,
    "StatusCode.CANCELLED": CancelledError,
}

# On a gRPC stream, Triton sends a per-request error as a bare message (the
# stream response has no status field). Triton's own messages for a model it
# cannot run are recognised here; the rest is classified by the caller.
_UNAVAILABLE_MESSAGES = (
    "Request for unknown model",
    "is not ready",
    "has no available versions",
    "Exceeds maximum queue size",
    "Request timeout expired",
    "server busy:",
    "is unavailable:",
)
# Triton's answer (status UNAVAILABLE) to a restricted gRPC protocol called without the
# right key header, measured on tritonserver 2.51: the same for a missing and a wrong key.
_RESTRICTED_MESSAGES = ("This protocol is restricted",)
# Triton's own words for a full queue (queue policy max_queue_size), said plainly.
_QUEUE_FULL = "Exceeds maximum queue size"
# Failures inside the model, as the pipeline's glue (model.py: "internal error: ...")
# and the Python backend (an uncaught exception) word them.
_SERVER_MESSAGES = ("internal error:", "Failed to process the request(s)")


def _status_and_message(exc: BaseException) -> tuple[str | None, str]:
    """(status, message) of an InferenceServerException, a grpc.RpcError or anything else."""
    status_fn = getattr(exc, "status", None)
    message_fn = getattr(exc, "message", None)
    if callable(status_fn) and callable(message_fn):  # InferenceServerException
        return status_fn(), message_fn() or ""
    code_fn = getattr(exc, "code", None)
    details_fn = getattr(exc, "details", None)
    if callable(code_fn) and callable(details_fn):  # grpc.RpcError / grpc.aio.AioRpcError
        return str(code_fn()), details_fn() or ""
    return None, str(exc)


def translate(
    exc: BaseException,
    *,
    in_band: type[SDTritonError] = ServerError,
    context: str | None = None,
) -> SDTritonError:
    """The :class:`SDTritonError` for a transport error ``exc``.

    ``in_band`` is the class for an error that carries no status (a streamed
    per-request error) and whose message is neither one of Triton's "cannot
    run this model" messages nor a failure inside the model. ``context`` (e.g. the server address) is appended to
    connection errors, whose gRPC text does not say what was being reached.
    """
    if isinstance(exc, SDTritonError):
        return exc
    status, message = _status_and_message(exc)
    if message.startswith(_RESTRICTED_MESSAGES):
        cls = PermissionDeniedError
    elif status is not None:
        cls = _BY_STATUS.get(status, ServerError)
    elif any(m in message for m in _UNAVAILABLE_MESSAGES):
        cls = UnavailableError
    elif message.startswith(_SERVER_MESSAGES):
        cls = ServerError
    else:
        cls = in_band
    if not message:
        message = status or type(exc).__name__
    if _QUEUE_FULL in message:
        message = f"server busy: the model's request queue is full ({message}); retry later"
    if context and cls is UnavailableError and status == "StatusCode.UNAVAILABLE":
        message = f"{context}: {message}"
    return cls(message, status=status)
