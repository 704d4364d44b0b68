"""Golden-set checks for rollouts: the same prompts and seeds, the same pixels?

A golden set is a JSON file of cases, each a prompt, a seed and any other
:meth:`Client.generate` options (``golden_set.json`` beside this module is
the default)::

    {"cases": [
        {"name": "astronaut", "prompt": "a photo of an astronaut riding a horse",
         "seed": 1, "num_inference_steps": 20, "scheduler": "euler_a"}
    ]}

:func:`render` makes every case's images with one client; :func:`compare`
holds two renders (two served models or versions, or a render and the
golden PNGs :func:`write_golden` stored earlier) side by side and reports
each image's largest difference in uint8 levels and its PSNR.
``sd-triton verify`` is the command line over these.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sd_pipeline import spec as S

from ._errors import InvalidRequestError
from ._infotext import output_paths
from ._request import IMAGE_INPUTS
from ._sync import Client
from ._types import GenerationResult

__all__ = [
    "GoldenCase",
    "ImageCheck",
    "compare",
    "image_difference",
    "load_cases",
    "read_golden",
    "render",
    "write_golden",
]

DEFAULT_CASES = "golden_set.json"
# What a case may set besides its name and prompt: generate()'s options, the
# contract's inputs but the images (pairs are JSON lists: [height, width]).
CASE_OPTIONS = frozenset(
    t.name for t in S.STABLE_DIFFUSION.inputs if t.dtype != "uint8" and t.name != "prompt"
) - set(IMAGE_INPUTS)
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class GoldenCase:
    """One prompt with its seed and options; ``name`` names its PNGs (``<name>.png``, ``<name>-1.png``)."""

    name: str
    prompt: str
    options: Mapping[str, Any]

    @property
    def num_images(self) -> int:
        return int(self.options.get("num_images_per_prompt", 1))


@dataclass(frozen=True)
class ImageCheck:
    """One image compared: its largest difference (uint8 levels), PSNR (dB) and verdict."""

    image: str
    max_diff: int
    psnr: float
    passed: bool
    note: str = ""


def _case(entry: Any, where: str) -> GoldenCase:
    if not isinstance(entry, dict):
        raise InvalidRequestError(f"{where}: a case is an object, got {entry!r}")
    name, prompt = entry.get("name"), entry.get("prompt")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequestError(f"{where}: 'name' must be letters, digits, '_', '.', '-'")
    if not isinstance(prompt, str) or not prompt:
        raise InvalidRequestError(f"{where} ({name}): 'prompt' must be a non-empty string")
    options = {k: v for k, v in entry.items() if k not in ("name", "prompt")}
    unknown = set(options) - CASE_OPTIONS
    if unknown:
        raise InvalidRequestError(
            f"{where} ({name}): unknown keys {sorted(unknown)}; a case takes {sorted(CASE_OPTIONS)}"
        )
    if not isinstance(options.get("seed"), int):
        raise InvalidRequestError(f"{where} ({name}): 'seed' (an integer) is required")
    return GoldenCase(name, prompt, options)


def load_cases(path: str | Path | None = None) -> list[GoldenCase]:
    """The cases of a golden-set file (default: the set shipped with this package)."""
    if path is None:
        text = resources.files(__package__).joinpath(DEFAULT_CASES).read_text()
        path = DEFAULT_CASES
    else:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise InvalidRequestError(f"cannot read golden set {path}: {e.strerror}") from None
    try:
        entries = json.loads(text)["cases"]
    except (ValueError, KeyError, TypeError):
        raise InvalidRequestError(f'{path}: expected JSON {{"cases": [...]}}') from None
    cases = [_case(entry, f"{path} case {i}") for i, entry in enumerate(entries)]
    names = [c.name for c in cases]
    if not cases or len(set(names)) != len(names):
        raise InvalidRequestError(f"{path}: cases must be a non-empty list with unique names")
    return cases


def render(
    client: Client, cases: list[GoldenCase], *, timeout_s: float | None = None
) -> dict[str, GenerationResult]:
    """Every case rendered by ``client``'s model: case name -> result."""
    return {c.name: client.generate(c.prompt, timeout_s=timeout_s, **c.options) for c in cases}


def _paths(directory: Path, case: GoldenCase) -> list[Path]:
    return output_paths(directory / f"{case.name}.png", case.num_images)


def write_golden(results: Mapping[str, GenerationResult], directory: str | Path) -> list[Path]:
    """Store renders as golden PNGs (with their settings as ``parameters`` text)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return [path for name, r in results.items() for path in r.save(directory / f"{name}.png")]


def read_golden(directory: str | Path, cases: list[GoldenCase]) -> dict[str, list[np.ndarray]]:
    """The golden PNGs of ``cases`` from ``directory``: case name -> images (a missing file: None)."""
    golden: dict[str, list[np.ndarray]] = {}
    for case in cases:
        golden[case.name] = []
        for path in _paths(Path(directory), case):
            if not path.is_file():
                golden[case.name].append(None)
                continue
            with Image.open(path) as image:
                golden[case.name].append(np.asarray(image.convert("RGB")))
    return golden


def pixels(result: GenerationResult) -> list[np.ndarray]:
    return [np.asarray(image.convert("RGB")) for image in result.images]


def image_difference(expected: np.ndarray, actual: np.ndarray) -> tuple[int, float]:
    """(largest absolute difference in uint8 levels, PSNR in dB; inf when identical)."""
    diff = np.abs(expected.astype(np.int16) - actual.astype(np.int16))
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    psnr = math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
    return int(diff.max(initial=0)), psnr


def compare(
    expected: Mapping[str, list[np.ndarray | None]],
    actual: Mapping[str, list[np.ndarray]],
    *,
    max_diff: int = 1,
    min_psnr: float = 0.0,
) -> list[ImageCheck]:
    """One check per image of ``actual``: passed when within ``max_diff`` levels and ``min_psnr`` dB."""
    checks = []
    for name, images in actual.items():
        reference = list(expected.get(name, []))
        reference += [None] * (len(images) - len(reference))
        for i, (want, got) in enumerate(zip(reference, images, strict=False)):
            label = name if i == 0 else f"{name}-{i}"
            if want is None:
                checks.append(ImageCheck(label, 255, 0.0, False, "no reference image"))
            elif want.shape != got.shape:
                note = (
                    f"size {got.shape[1]}x{got.shape[0]}, reference {want.shape[1]}x{want.shape[0]}"
                )
                checks.append(ImageCheck(label, 255, 0.0, False, note))
            else:
                diff, psnr = image_difference(want, got)
                checks.append(ImageCheck(label, diff, psnr, diff <= max_diff and psnr >= min_psnr))
    return checks
