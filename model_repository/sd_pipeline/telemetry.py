"""Audit records and metrics of served requests: one JSON log line and a few counters per request.

The record says who asked for what and how it ended: request id, model name
and version, seed, steps, size, images, scheduler, guidance, img2img, NSFW
flags, duration, outcome (``success``, ``invalid``, ``cancelled``,
``unavailable``, ``error``) and, for a failure, the error message.

The prompt text is never logged, only its length in UTF-8 bytes. Prompts are
user content: they can hold personal data, and server logs are kept longer
and read by more people than the service's own request store. Knowing the
length is enough to size limits and to spot abuse. A caller that needs to
reproduce an image keeps the prompt itself (the client writes it into the
PNG's ``parameters`` text), and seed plus settings from this record do the
rest.

Metrics go through the Python backend's custom metrics
(``pb_utils.MetricFamily``, Triton >= 23.05) and appear on the server's
metrics port (``/metrics``) beside Triton's own per-model counters:

- ``sd_requests_total{model, version, outcome}``: requests by outcome;
- ``sd_request_duration_seconds_total{model, version, outcome}``: their summed duration;
- ``sd_images_total{model, version}``: images returned;
- ``sd_denoise_steps_total{model, version}`` and ``sd_denoise_seconds_total{model, version}``:
  the denoising steps (UNet evaluations) of successful requests and the seconds they took, so that
  ``rate(sd_denoise_seconds_total[5m]) / rate(sd_denoise_steps_total[5m])`` is the
  time per step (the UNet's compute plus what serving adds to every step: the
  BLS round trip, the batcher, the scheduler, guidance), free of the per-request
  costs (text encoder, VAE, safety checker, gRPC) that a request's duration mixes in.

Nothing here imports ``triton_python_backend_utils``; the glue passes it in.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import Cancelled, ComponentError, InvalidRequest
from .request import GenerationRequest

__all__ = ["Metrics", "outcome_of", "record", "text_bytes"]

OUTCOMES = ("success", "invalid", "cancelled", "unavailable", "error")
_MAX_ERROR_CHARS = 300


class Unavailable(Exception):
    """The request was refused or dropped before it ran (overload, queue timeout, component gone)."""


def outcome_of(exc: BaseException | None) -> str:
    if exc is None:
        return "success"
    if isinstance(exc, InvalidRequest):
        return "invalid"
    if isinstance(exc, Cancelled):
        return "cancelled"
    if isinstance(exc, Unavailable) or (
        isinstance(exc, ComponentError) and component_unavailable(exc)
    ):
        return "unavailable"
    return "error"


# What Triton says when a BLS call names a model that is not loaded, whose
# Python-backend stub process died ("Stub process 'unet_0' is not healthy.": the
# OOM killer, a crash; the node's watchdog restarts it, see server/watchdog.py),
# or while the server shuts down ("Server not ready": after SIGTERM Triton
# refuses new calls, BLS calls of requests in flight too) (measured on 2.51).
_UNAVAILABLE_COMPONENT = (
    "unknown model",
    "is not ready",
    "is not found",
    "has no available",
    "is not healthy",
    "Server not ready",
)


def component_unavailable(exc: ComponentError) -> bool:
    """Whether a component failed because it is not loaded or its process died (a retry elsewhere can succeed)."""
    text = str(exc)
    return any(m in text for m in _UNAVAILABLE_COMPONENT)


def text_bytes(inputs: Mapping[str, np.ndarray], name: str) -> int | None:
    """UTF-8 length of a text input as sent (None when absent or not text)."""
    array = inputs.get(name)
    if array is None or array.size == 0:
        return None
    raw = array.reshape(-1)[0]
    if isinstance(raw, bytes | bytearray):
        return len(raw)
    if isinstance(raw, str):
        return len(raw.encode("utf-8", "replace"))
    return None


def record(
    *,
    request_id: str,
    model: str,
    version: str,
    inputs: Mapping[str, np.ndarray],
    parsed: GenerationRequest | None,
    duration_s: float,
    error: BaseException | None,
    nsfw: np.ndarray | None = None,
    denoise_s: float | None = None,
) -> dict[str, Any]:
    """The audit record of one request (never the prompt's text, never an image)."""
    entry: dict[str, Any] = {
        "event": "sd_request",
        "request_id": request_id,
        "model": model,
        "version": version,
        "outcome": outcome_of(error),
        "duration_s": round(duration_s, 4),
        "prompt_bytes": text_bytes(inputs, "prompt"),
        "negative_prompt_bytes": text_bytes(inputs, "negative_prompt"),
    }
    if parsed is not None:
        entry.update(
            seed=parsed.seed,
            steps=parsed.num_inference_steps,
            height=parsed.height,
            width=parsed.width,
            images=parsed.num_images_per_prompt,
            scheduler=parsed.scheduler or "default",
            guidance_scale=parsed.guidance_scale,
            img2img=parsed.image is not None,
        )
    if denoise_s is not None:
        entry["denoise_s"] = round(denoise_s, 4)
    if nsfw is not None:
        entry["nsfw"] = [bool(x) for x in np.asarray(nsfw).reshape(-1)]
    if error is not None:
        entry["error"] = str(error)[:_MAX_ERROR_CHARS]
    return entry


def log_line(entry: Mapping[str, Any]) -> str:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"))


class Metrics:
    """Per-request counters in Triton's metrics; a no-op where the backend has no custom metrics."""

    def __init__(self, pb_utils: Any, model: str, version: str) -> None:
        self._labels = {"model": model, "version": version}
        # Every metric call holds it: the Python backend's metric calls are not thread-safe
        # (concurrent increments from a threaded model's workers crashed tritonserver 2.51
        # with SIGSEGV in libtriton_python.so); reentrant, as _metric takes it too.
        self._lock = threading.RLock()
        self._metrics: dict[tuple[str, str], Any] = {}
        family = getattr(pb_utils, "MetricFamily", None)
        self._families = {}
        if family is None:
            return
        for name, description in (
            ("sd_requests_total", "Stable Diffusion requests by outcome"),
            ("sd_request_duration_seconds_total", "Summed duration of requests by outcome"),
            ("sd_images_total", "Images returned"),
            ("sd_denoise_steps_total", "Denoising steps of successful requests"),
            ("sd_denoise_seconds_total", "Seconds those denoising steps took"),
            # The UNet in the pipeline's process (unet_in_pipeline): its runs and the
            # samples they held; samples / executions > a request's rows = merged steps.
            ("sd_unet_executions_total", "Runs of the UNet in the pipeline's process"),
            ("sd_unet_requests_total", "Step calls those runs merged"),
            ("sd_unet_samples_total", "Samples (batch rows) those runs held"),
        ):
            self._families[name] = family(name=name, description=description, kind=family.COUNTER)

    def _metric(self, family: str, outcome: str | None):
        key = (family, outcome or "")
        with self._lock:
            if key not in self._metrics:
                labels = dict(self._labels)
                if outcome is not None:
                    labels["outcome"] = outcome
                self._metrics[key] = self._families[family].Metric(labels=labels)
            return self._metrics[key]

    def observe(
        self,
        outcome: str,
        duration_s: float,
        images: int = 0,
        *,
        steps: int = 0,
        denoise_s: float = 0.0,
    ) -> None:
        if not self._families:
            return
        with self._lock:
            self._metric("sd_requests_total", outcome).increment(1)
            self._metric("sd_request_duration_seconds_total", outcome).increment(duration_s)
            if images:
                self._metric("sd_images_total", None).increment(images)
            if steps:
                self._metric("sd_denoise_steps_total", None).increment(steps)
                self._metric("sd_denoise_seconds_total", None).increment(denoise_s)

    def observe_unet(self, calls: int, samples: int) -> None:
        """One run of the in-process UNet that merged ``calls`` step calls, ``samples`` rows."""
        if not self._families:
            return
        with self._lock:
            self._metric("sd_unet_executions_total", None).increment(1)
            self._metric("sd_unet_requests_total", None).increment(calls)
            self._metric("sd_unet_samples_total", None).increment(samples)
