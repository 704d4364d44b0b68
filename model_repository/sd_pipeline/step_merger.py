"""Step-level batching inside one process: concurrent UNet calls merged into one run.

With the UNet in the pipeline's process (``unet_in_pipeline``, see
:mod:`.triton_components`), Triton's dynamic batcher no longer sees the steps
of concurrent requests, so this does its job where they meet: each request's
worker thread calls :meth:`StepMerger.__call__` with its step's inputs; a
thread that finds no run in progress runs at once, with every call queued at
that moment whose shapes match (Triton's dynamic batcher at
``max_queue_delay_microseconds: 0`` does the same); calls that arrive while
a run is in progress wait, and the first of them to wake runs the next
merged batch. A lone request never waits (no queue delay, no hand-off to
another thread); under load, the steps that queued behind a run go together.

No thread of its own: the caller that runs a batch is one of the waiting
ones, so a request's step costs one lock and, when merged, one wake-up.
``run`` must be safe to call from any thread (onnxruntime sessions and torch
modules are; both release the GIL while they compute).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["StepMerger"]

Batch = dict[str, Any]
# run_batched's signature (component_host.run_batched): requests' inputs in, each
# request's outputs (or its exception) out, merging those whose shapes match.
RunBatched = Callable[[Sequence[Batch]], list[Batch | Exception]]


@dataclass(eq=False)
class _Call:
    inputs: Batch
    rows: int
    result: Batch | Exception | None = None
    done: bool = field(default=False)


class StepMerger:
    """Merges the calls of concurrent threads into runs of at most ``max_batch`` rows.

    ``run_batched`` gets the calls taken for one run (each one request's inputs,
    batch first) and returns each call's outputs or its exception, as
    ``component_host.run_batched`` does (it groups calls by shape itself).
    ``observe(calls, rows)`` is told the size of every run (metrics).
    """

    def __init__(
        self,
        run_batched: RunBatched,
        max_batch: int,
        observe: Callable[[int, int], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._run_batched = run_batched
        self._max_batch = max_batch
        self._observe = observe
        self._cond = threading.Condition()
        self._queue: list[_Call] = []
        self._running = False

    def __call__(self, inputs: Batch) -> Batch:
        call = _Call(inputs, len(next(iter(inputs.values()))))
        with self._cond:
            self._queue.append(call)
            while not call.done:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                batch = self._take()
                self._cond.release()
                try:
                    self._run(batch)
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
        if isinstance(call.result, Exception):
            raise call.result
        return call.result

    def _take(self) -> list[_Call]:
        """The queue's head and every queued call after it that fits in ``max_batch`` rows."""
        batch, rows, rest = [], 0, []
        for call in self._queue:
            if not batch or rows + call.rows <= self._max_batch:
                batch.append(call)
                rows += call.rows
            else:
                rest.append(call)
        self._queue = rest
        return batch

    def _run(self, batch: list[_Call]) -> None:
        """Run ``batch``; every call in it ends done, with its outputs or an exception."""
        try:
            results = self._run_batched([c.inputs for c in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for {len(batch)} calls")
        except Exception as e:  # noqa: BLE001  (every waiting call gets it)
            results = [e] * len(batch)
        for call, result in zip(batch, results, strict=True):
            call.result = result
            call.done = True
        if self._observe is not None:
            with contextlib.suppress(Exception):  # metrics never fail a step
                self._observe(len(batch), sum(c.rows for c in batch))
