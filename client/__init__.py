"""A small typed client for the ``stable_diffusion`` Triton models, sync and asyncio.

::

    from sd_triton.client import Client

    with Client("localhost:8001") as client:
        client.wait_until_ready(timeout_s=60)
        result = client.generate("a photo of a cat", num_inference_steps=20, seed=123)
        result.save("cat.png")              # PNG with AUTOMATIC1111 "parameters" text
        again = client.generate(**infotext_options(parse_infotext(read_infotext("cat.png"))))
        for event in client.stream("a photo of a dog", seed=1):
            print(event)                    # ProgressEvent(step=1, total_steps=50, ...) ..., GenerationResult

``Client(url, retries=3)`` retries a unary call that the server answered
UNAVAILABLE (server down, restarting or busy) with exponential backoff and
jitter, all within the call's ``timeout_s``; nothing else is retried (see
docs/client.md). ``AsyncClient`` has the same options and methods, awaited;
both are thin transports over one core (``_core.py``).

Options are keyword-only and named as in the server contract (and diffusers);
an omitted option is not sent and the server applies its default. The result
reports the settings actually used. Only numpy, Pillow and tritonclient are
imported (never torch).

Exceptions (every error is one of these; the server's message is kept intact)::

    SDTritonError                 base; .message, .status (gRPC status string or None)
    ├── InvalidRequestError       the request was rejected (INVALID_ARGUMENT); also a ValueError
    ├── UnavailableError          no server, model not loaded / not ready, overloaded
    │                             (UNAVAILABLE, NOT_FOUND, RESOURCE_EXHAUSTED)
    ├── PermissionDeniedError     an admin call without the right admin key; also a PermissionError
    ├── DeadlineExceededError     the call's timeout_s expired (DEADLINE_EXCEEDED); also a TimeoutError
    ├── CancelledError            cancelled through a stream or a submit() handle (CANCELLED)
    └── ServerError               anything else (INTERNAL, a failure inside the model, ...)
"""

from ._async import AsyncClient, AsyncGenerationStream, AsyncPendingGeneration
from ._core import Health, ModelStatus
from ._edit import outpaint_canvas
from ._errors import (
    CancelledError,
    DeadlineExceededError,
    InvalidRequestError,
    PermissionDeniedError,
    SDTritonError,
    ServerError,
    UnavailableError,
)
from ._infotext import (
    A1111_SAMPLERS,
    A1111_UPSCALERS,
    format_infotext,
    infotext_options,
    parse_infotext,
    read_infotext,
    sampler_name,
    save_png,
    schedule_type,
    scheduler_alias,
)
from ._request import GenerationRequest
from ._sync import Client, GenerationStream, PendingGeneration
from ._types import ControlNetUnit, GenerationResult, GenerationSettings, ProgressEvent

__all__ = [
    "A1111_SAMPLERS",
    "A1111_UPSCALERS",
    "AsyncClient",
    "AsyncGenerationStream",
    "AsyncPendingGeneration",
    "CancelledError",
    "Client",
    "ControlNetUnit",
    "DeadlineExceededError",
    "GenerationRequest",
    "GenerationResult",
    "GenerationSettings",
    "GenerationStream",
    "Health",
    "InvalidRequestError",
    "ModelStatus",
    "PendingGeneration",
    "PermissionDeniedError",
    "ProgressEvent",
    "SDTritonError",
    "ServerError",
    "UnavailableError",
    "format_infotext",
    "infotext_options",
    "outpaint_canvas",
    "parse_infotext",
    "read_infotext",
    "sampler_name",
    "save_png",
    "schedule_type",
    "scheduler_alias",
]
