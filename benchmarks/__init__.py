"""Benchmarks: the served pipeline against diffusers in-process, and perf_analyzer.

Two entry points (see ``benchmarks/README.md``)::

    python -m sd_triton.benchmarks.harness --repository build/model_repository   # make bench
    python -m sd_triton.benchmarks.perf_analyzer setup | inputs REPO | run REPO

Modules: :mod:`.harness` (the run and its command line), :mod:`.load` (served
and in-process request loops), :mod:`.stats` (the server's inference
statistics), :mod:`.system` (machine, versions, process-tree memory and CPU),
:mod:`.flops` (work per image), :mod:`.random_models` (full-size architectures
with random weights, built and exported once), :mod:`.report` (markdown and plot),
:mod:`.perf_analyzer` (Triton's load generator, extracted and run).

Names below are imported lazily, so that ``python -m`` on a module of this
package does not import it twice.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Options": "harness",
    "Setting": "harness",
    "full_size_build": "random_models",
    "xl_build": "random_models",
    "run": "harness",
    "Request": "load",
    "markdown": "report",
    "write": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
