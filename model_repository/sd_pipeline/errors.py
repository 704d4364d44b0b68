"""The pipeline's exceptions, in one tree.

::

    PipelineError            base; anything the glue should turn into an error response
    ├── InvalidRequest       bad input from the client -> INVALID_ARG; the message is for the user
    ├── Cancelled            the client cancelled or went away -> CANCELLED
    └── ComponentError       a component model failed (a BLS call, an onnxruntime run) -> INTERNAL

``InvalidRequest`` is also a ``ValueError`` so that in-process callers can
catch it the ordinary way.
"""

from __future__ import annotations

__all__ = ["Cancelled", "ComponentError", "InvalidRequest", "PipelineError"]


class PipelineError(Exception):
    """Base of every error the pipeline raises on purpose."""


class InvalidRequest(PipelineError, ValueError):
    """The request is malformed or outside the model's limits."""


class Cancelled(PipelineError):
    """``should_stop()`` said stop: the request was cancelled."""


class ComponentError(PipelineError):
    """A component model returned an error; the message names the component."""

    def __init__(self, component: str, message: str) -> None:
        super().__init__(f"{component}: {message}")
        self.component = component
