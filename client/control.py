"""ControlNet control maps, made where people expect them: in the client.

- :func:`canny`: a photo -> an edge map with OpenCV's Canny, as the web UI's
  ControlNet extension's ``canny`` preprocessor (``cv2.Canny`` on the RGB image,
  thresholds 100 and 200, the one-channel result repeated to RGB). OpenCV is the
  ``controlnet`` extra (``pip install sd-triton[controlnet]``).
- Other detectors (pose, depth, scribbles) are not run here: send their ready map.
- :func:`add_control_options`: ``sd-triton generate --control NAME:MAP.png``
  (a ready map for the exported ControlNet NAME) or ``--control NAME:canny:PHOTO.png``
  (the photo through :func:`canny` first); repeatable, one per ControlNet, with
  ``--control-scale`` / ``--control-start`` / ``--control-end`` (one value each, in
  the same order) and ``--guess-mode``. They fill the request's ``controlnet``,
  ``control_image``, ``controlnet_conditioning_scale``, ``control_guidance_start``,
  ``control_guidance_end`` and ``guess_mode``; :func:`with_modules` then writes each
  map's preprocessor (``canny`` or ``none``) into the PNG's ControlNet infotext.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from ._types import GenerationResult

__all__ = ["PREPROCESSORS", "add_control_options", "canny", "parse_control", "with_modules"]


def canny(image: Image.Image | np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """The Canny edges of an RGB image (PIL or uint8 ``[H, W, 3]``): uint8 ``[H, W, 3]``,
    white edges on black, as the web UI's ControlNet ``canny`` preprocessor makes them."""
    try:
        import cv2
    except ImportError:  # pragma: no cover - depends on the install
        raise ImportError(
            "canny needs OpenCV: pip install 'sd-triton[controlnet]' (opencv-python)"
        ) from None
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"canny takes uint8 RGB [H, W, 3], got {rgb.dtype} {list(rgb.shape)}")
    edges = cv2.Canny(np.ascontiguousarray(rgb), low, high)
    return np.repeat(edges[:, :, None], 3, axis=2)


# Preprocessors --control may name: photo -> control map.
PREPROCESSORS = {"canny": canny}


def parse_control(text: str) -> tuple[str, np.ndarray, str]:
    """``NAME:PATH`` (a ready map) or ``NAME:PREPROCESSOR:PATH`` -> (NAME, uint8 RGB map,
    the preprocessor that made it: ``none`` for a ready map).

    Raises ``argparse.ArgumentTypeError`` with a sentence (argparse prints it).
    """
    name, sep, rest = text.partition(":")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(
            f"expected NAME:MAP.png or NAME:canny:PHOTO.png, got {text!r}"
        )
    step, sep, path = rest.partition(":")
    if not (sep and step in PREPROCESSORS):
        step, path = None, rest
    try:
        with Image.open(Path(path)) as image:
            rgb = np.asarray(image.convert("RGB"))
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read control image {path}: {e}") from None
    return name, PREPROCESSORS[step](rgb) if step else rgb, step or "none"


class _ControlAction(argparse.Action):
    """``--control``: appends the name to ``controlnet``, the map to ``control_image`` and
    its preprocessor to ``control_module``."""

    def __call__(self, parser, namespace, values, option_string=None):
        name, image, module = values
        namespace.controlnet = [*(namespace.controlnet or []), name]
        namespace.control_image = [*(getattr(namespace, "control_image", None) or []), image]
        namespace.control_module = [*(getattr(namespace, "control_module", None) or []), module]


def add_control_options(gen: argparse.ArgumentParser) -> None:
    """The ControlNet options of ``sd-triton generate`` (see the module's notes)."""
    group = gen.add_argument_group("ControlNet (models exported with --controlnet NAME=DIR)")
    group.add_argument(
        "--control",
        dest="controlnet",
        type=parse_control,
        action=_ControlAction,
        metavar="NAME:MAP",
        help="ControlNet NAME guided by the control map MAP (at the output size), or "
        "NAME:canny:PHOTO for PHOTO's Canny edges; repeatable",
    )
    group.set_defaults(control_image=None, control_module=None)
    for flag, dest, what in (
        ("--control-scale", "controlnet_conditioning_scale", "conditioning scale (default 1)"),
        ("--control-start", "control_guidance_start", "fraction of steps to start at (0)"),
        ("--control-end", "control_guidance_end", "fraction of steps to stop at (1)"),
    ):
        group.add_argument(
            flag, dest=dest, type=float, action="append", metavar="X", help=f"per --control: {what}"
        )
    group.add_argument(
        "--guess-mode",
        action="store_const",
        const=True,
        help="the ControlNets see the conditional half only (diffusers' guess_mode)",
    )


def with_modules(result: GenerationResult, modules: Sequence[str] | None) -> GenerationResult:
    """``result`` whose ControlNets name the preprocessor that made each map (``--control``'s
    order), for the infotext's ``Module``; ``result`` itself without ``--control``."""
    if not modules:
        return result
    units = result.settings.controlnets
    named = tuple(replace(u, module=m) for u, m in zip(units, modules, strict=True))
    return replace(result, settings=replace(result.settings, controlnets=named))
