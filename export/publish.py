"""Where an export lands: the output folder's checks, versions, and the final move.

An export is staged in a hidden folder inside the output and moved into place
at the end, so a failed export leaves the output as it was. Several
checkpoints share one repository under ``--model-prefix`` namespaces;
``--new-version`` writes version N+1 of every model of the namespace beside
the old ones (pipeline version N calls component version N, so any loaded
pipeline version serves exactly the weights it was exported with).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from . import triton_config as T
from .checkpoint import ExportError
from .options import ExportOptions

__all__ = ["check_compatible", "check_output", "make_readable", "next_version", "publish"]

FIRST_VERSION = "1"
# What every version of a model shares from its one config.pbtxt and must agree on.
_SHARED_FIELDS = ("backend", "max_batch_size", "input", "output", "model_transaction_policy")


def check_output(out: Path, opts: ExportOptions, overwrite: bool) -> None:
    """``out`` may be new, empty, or a repository: with models of this export only
    when replacing them (``overwrite``) or adding a version (``new_version``)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"output {out} exists and is not a folder")
    entries = [p for p in out.iterdir() if not p.name.startswith(".")]
    if not entries:
        return
    if any(p.name in set(opts.model_names()) for p in entries):
        if overwrite or opts.naming.new_version:
            return
        raise ExportError(
            f"output folder {out} already holds a model repository "
            "(use --overwrite to replace it, or --new-version to add a version)"
        )
    if any(p.is_dir() and (p / T.CONFIG_NAME).is_file() for p in entries):
        return  # other models (another --model-prefix): ours go beside them
    if not overwrite:
        raise ExportError(f"output folder {out} is not empty (use --overwrite to replace it)")
    raise ExportError(f"output folder {out} is not empty and holds no model repository")


def _versions(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def next_version(out: Path, opts: ExportOptions) -> str:
    """The version this export writes: 1, or with ``new_version`` one more than the
    highest version of any model of its namespace."""
    if not opts.naming.new_version:
        return FIRST_VERSION
    found = [v for name in opts.model_names() for v in _versions(out / name)]
    return str(max(found, default=0) + 1)


def check_compatible(config: Any, existing: Path) -> None:
    """A new version must keep the contract the existing versions are served with."""
    if not (existing / T.CONFIG_NAME).is_file():
        return
    old = T.read_config(existing)
    for name in _SHARED_FIELDS:
        if getattr(old, name) != getattr(config, name):
            raise ExportError(
                f"a new version of {config.name} would change its {name} (one config.pbtxt "
                "serves every version); export with --overwrite, or under another --model-prefix"
            )


def make_readable(out: Path) -> None:
    """Folders 755, files 644: the server may run as another user."""
    for root, dirs, files in os.walk(out):
        for d in dirs:
            os.chmod(Path(root) / d, 0o755)
        for f in files:
            os.chmod(Path(root) / f, 0o644)


def publish(staging: Path, out: Path, opts: ExportOptions, replace: bool) -> None:
    """Move the staged models into ``out``.

    ``replace``: drop every model of this namespace first (also stale ones).
    Otherwise a staged model new to ``out`` moves in whole, and one that
    exists gets the staged version folder and config.pbtxt (the config last).
    """
    if replace:
        for name in opts.model_names():
            if (out / name).exists():
                shutil.rmtree(out / name)
    for folder in staging.iterdir():
        dest = out / folder.name
        if not dest.exists():
            folder.rename(dest)
            continue
        for child in sorted(folder.iterdir(), key=lambda p: p.name == T.CONFIG_NAME):
            os.replace(child, dest / child.name)
        folder.rmdir()
    staging.rmdir()
