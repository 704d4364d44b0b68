"""The Stable Diffusion sampler loop, its tensor contract, schedulers and request validation.

Ships inside the model repository (``stable_diffusion/1/sd_pipeline``, imported
there as ``sd_pipeline``) and is installed as ``sd_pipeline``. Only the
standard library, numpy, torch, diffusers and transformers; relative imports
only. Modules:

- ``spec``: the tensor contract of every model (standard library only);
- ``config``: model constants (``pipeline.json``), request limits, assets;
- ``request``: ``GenerationRequest``, parsing and validation;
- ``prompt_syntax``: AUTOMATIC1111's prompt weights, ``BREAK`` and 75-token chunks;
- ``schedulers``: the scheduler alias table;
- ``components``: the components interface, onnxruntime and diffusers hosts;
- ``triton_components``: the same interface as BLS calls (inside Triton);
- ``loop``: ``generate()``, the sampler loop;
- ``hires``: the web UI's hires fix, a second img2img pass after the loop's first;
- ``images``: image and mask pre- and post-processing (diffusers' ``VaeImageProcessor``);
- ``preview``: cheap latent -> RGB previews for streaming;
- ``telemetry``: the audit line and the ``sd_*`` metrics;
- ``errors``: the exception tree.

Names below are imported lazily, so ``import sd_pipeline.spec`` stays
free of torch (the client and the exporter's config writer import it).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Assets": "config",
    "Cancelled": "errors",
    "ComponentError": "errors",
    "Components": "components",
    "DiffusersComponents": "components",
    "GenerationRequest": "request",
    "GenerationResult": "loop",
    "InvalidRequest": "errors",
    "Limits": "config",
    "OnnxComponents": "components",
    "PipelineConfig": "config",
    "PipelineError": "errors",
    "SCHEDULERS": "schedulers",
    "generate": "loop",
    "make_request": "request",
    "make_scheduler": "schedulers",
    "parse_request": "request",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
