"""Waiting for a served condition with a deadline, and reading the server's Prometheus metrics.

Tests never sleep and then assert: they poll what they wait for (a metric, a
statistic, a log line) until it holds or the deadline passes, and then fail
saying what did not happen.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable
from typing import TypeVar

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


def scrape(metrics_url: str) -> str:
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of metric ``name``'s samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total
