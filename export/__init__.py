"""Export: a diffusers Stable Diffusion folder -> a complete Triton model repository.

Public API::

    export_repository(src, out, ExportOptions(...), *, overwrite=False)
    ExportOptions(contents=Contents(precision="fp16"), hosting=Hosting(host="torch"), ...)
    build_pipeline(TINY | SD15, seed=0)   # random-weight SD 1.x pipelines (tiny / full size)
    save_pipeline(pipe, folder)           # diffusers folder with SD 1.x's tokenizer files
    write_clip_tokenizer(folder)          # SD 1.x's CLIP tokenizer, rebuilt offline

Errors the user can fix raise :class:`ExportError` (the CLI prints its
message on one line and exits with code 2).
"""

from __future__ import annotations

from typing import Any

from .checkpoint import ExportError
from .options import Contents, ExportOptions, Hosting, Naming, Precision
from .repository import export_repository

__all__ = [
    "SD15",
    "TINY",
    "Contents",
    "ExportError",
    "ExportOptions",
    "Hosting",
    "Naming",
    "Precision",
    "build_pipeline",
    "export_repository",
    "save_pipeline",
    "write_clip_tokenizer",
]

# Imported on first use, so that `python -m sd_triton.export.tiny` does not
# find its own module already imported by the package.
_LAZY = {
    "SD15": "tiny",
    "TINY": "tiny",
    "build_pipeline": "tiny",
    "save_pipeline": "tiny",
    "write_clip_tokenizer": "tokenizer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
