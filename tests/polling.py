"""Waiting for a served condition with a deadline, and reading the server's Prometheus metrics.

Tests never sleep and then assert: they poll what they wait for (a metric, a
statistic, a log line) until it holds or the deadline passes, and then fail
saying what did not happen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from sd_triton.benchmarks.stats import metric, scrape

__all__ = ["metric", "scrape", "wait_until"]

T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str, timeout_s: float = 60.0) -> T:
    """``condition()``'s first truthy value; fails naming ``what`` when ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout_s:g} s: {what}")
        time.sleep(0.05)
