"""img2img, inpainting and outpainting requests: images in, a :class:`GenerationRequest` out.

The server does img2img (``image``) and inpainting (``image`` + ``mask_image``,
255 = repaint) itself; outpainting is inpainting on a larger canvas, built
here: the image is placed inside the canvas, the margins are filled from its
edge pixels (so the model sees continuing colours, not a flat border), and
the mask marks the margins for repainting.

The output size is the image's (the canvas's, for outpainting). The server
refuses sizes that are not a multiple of the model's size step (64 px for
SD 1.x) rather than resizing: crop or resize the image, or choose margins
that make the canvas fit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from ._errors import InvalidRequestError
from ._request import GenerationRequest

__all__ = ["img2img_request", "inpaint_request", "outpaint_canvas", "outpaint_request"]

# outpaint_canvas's keyword arguments, in pixels.
MARGINS = ("left", "right", "top", "bottom", "overlap")


def _rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise InvalidRequestError(
            f"image must be uint8 [H, W, 3] (or a PIL image), got {array.dtype} {list(array.shape)}"
        )
    return array


def img2img_request(
    prompt: str, image: Image.Image | np.ndarray, **options: Any
) -> GenerationRequest:
    """A request that starts from ``image`` (``strength`` in (0, 1], server default 0.8)."""
    return GenerationRequest(prompt=prompt, image=image, **options)


def inpaint_request(
    prompt: str,
    image: Image.Image | np.ndarray,
    mask_image: Image.Image | np.ndarray,
    **options: Any,
) -> GenerationRequest:
    """A request that repaints ``image`` where ``mask_image`` is white (server default strength 1.0)."""
    return GenerationRequest(prompt=prompt, image=image, mask_image=mask_image, **options)


def outpaint_canvas(
    image: Image.Image | np.ndarray,
    *,
    left: int = 0,
    right: int = 0,
    top: int = 0,
    bottom: int = 0,
    overlap: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The canvas (uint8 ``[H, W, 3]``) and its mask (uint8 ``[H, W]``, 255 = repaint).

    The canvas is ``image`` extended by the margins (in pixels), which repeat
    the image's edge pixels; the mask is 255 over the margins and, with
    ``overlap``, that many pixels into the image along each extended side
    (so the seam is repainted too).
    """
    margins = dict(zip(MARGINS, (left, right, top, bottom, overlap), strict=True))
    for name, value in margins.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise InvalidRequestError(
                f"{name} must be a whole number of pixels >= 0, got {value!r}"
            )
    if not (left or right or top or bottom):
        raise InvalidRequestError("outpainting needs at least one margin > 0")
    rgb = _rgb(image)
    canvas = np.pad(rgb, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(canvas.shape[:2], 255, np.uint8)
    height, width = rgb.shape[:2]
    y0, x0 = top + (overlap if top else 0), left + (overlap if left else 0)
    y1 = top + height - (overlap if bottom else 0)
    x1 = left + width - (overlap if right else 0)
    mask[y0 : max(y0, y1), x0 : max(x0, x1)] = 0
    return canvas, mask


def outpaint_request(
    prompt: str, image: Image.Image | np.ndarray, **options: Any
) -> GenerationRequest:
    """An inpainting request on ``image`` extended by the margins (see :func:`outpaint_canvas`).

    ``options``: the margins (``left``, ``right``, ``top``, ``bottom``,
    ``overlap``; pixels, default 0) and any other request option.
    """
    margins = {k: options.pop(k) for k in MARGINS if k in options}
    canvas, mask = outpaint_canvas(image, **margins)
    return inpaint_request(prompt, canvas, mask, **options)
