"""TensorRT on Triton's onnxruntime backend (``--tensorrt``): precision and shape profiles.

The profiles end where the request limits end (``sd_pipeline.config.Limits``:
``max_side`` a side, so also ``max_pixels``, which is at most
``max_side``\\ ² for the default limits), at the batch the model config
allows. So every request the pipeline accepts fits an engine, and one that
would not fit is refused by the pipeline with a sentence naming the limit,
instead of failing inside TensorRT.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sd_pipeline import spec as S
from sd_pipeline.config import Limits

from . import components as C
from .checkpoint import ExportError

__all__ = ["TRT_COMPONENTS", "TRT_WORKSPACE_BYTES", "tensorrt_parameters"]

# The components TensorRT builds engines for (the safety checker runs once
# per request and stays on CUDA), and the workspace it may use while building.
TRT_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder")
# The UNet's text sequence (77 tokens per 75-token prompt chunk) is dynamic: its
# profiles go from one chunk (min, opt) to this many (max), so a prompt of up to
# 225 tokens fits the engine.
TRT_MAX_PROMPT_CHUNKS = 3
TRT_WORKSPACE_BYTES = 4 << 30


def tensorrt_parameters(
    component: C.Component,
    dtype: str,
    *,
    sizes: Mapping[str, int],
    constants: Mapping[str, Any],
    limits: Limits,
    max_batch: int,
    cache: str,
) -> dict[str, str | int]:
    """The onnxruntime backend's TensorRT keys for ``component`` (``dtype``: its weights').

    Keys as the backend documents them (its README's parameter table): an
    unknown key fails the model's load.
    """
    return {
        "precision_mode": "FP16" if dtype == "float16" else "FP32",
        "max_workspace_size_bytes": TRT_WORKSPACE_BYTES,
        "trt_engine_cache_enable": 1,
        "trt_engine_cache_path": cache,
        **_profiles(component, sizes, constants, limits, max_batch),
    }


def profile_points(
    component: C.Component, constants: Mapping[str, Any], limits: Limits, max_batch: int
) -> dict[str, tuple[int, int, int]]:
    """``(batch, height, width)`` of the min / opt / max profiles.

    min: one image at the smallest size; opt: the typical call at the native
    size (the UNet: 2 samples, classifier-free guidance); max: the model
    config's batch at ``max_side`` (rounded down to the size step) a side.
    The UNet's text sequence: one prompt chunk for min and opt,
    :data:`TRT_MAX_PROMPT_CHUNKS` for max. The per-step models (the UNet, and
    ControlNet's models) are the UNet's case.
    """
    step = constants["size_step"]
    top = limits.max_side - limits.max_side % step
    if top < step:
        raise ExportError(
            f"request limit max_side {limits.max_side} is below this model's size step {step}: "
            "no image size is possible"
        )
    # The models called once per denoising step (the UNet, a ControlNet, the controlled
    # UNet) see both halves of classifier-free guidance.
    denoiser = any(t.name == "timestep" for t in component.spec.inputs)
    typical = min(2, max_batch) if denoiser else 1
    native = (min(constants["native_height"], top), min(constants["native_width"], top))
    return {"min": (1, step, step), "opt": (typical, *native), "max": (max_batch, top, top)}


def _profiles(
    component: C.Component,
    sizes: Mapping[str, int],
    constants: Mapping[str, Any],
    limits: Limits,
    max_batch: int,
) -> dict[str, str]:
    f = constants["vae_scale_factor"]
    profiles = {}
    for label, (batch, height, width) in profile_points(
        component, constants, limits, max_batch
    ).items():
        dynamic = {S.BATCH: batch, "height": height, "width": width}
        dynamic.update(latent_height=height // f, latent_width=width // f)
        chunks = TRT_MAX_PROMPT_CHUNKS if label == "max" else 1
        dynamic["text_sequence"] = chunks * sizes["sequence"]
        shapes = [
            f"{t.name}:" + "x".join(map(str, _shape(C.model_dims(t), {**sizes, **dynamic})))
            for t in component.spec.inputs
        ]
        profiles[f"trt_profile_{label}_shapes"] = ",".join(shapes)
    return profiles


def _shape(dims: tuple[int | str, ...], sizes: Mapping[str, int]) -> tuple[int, ...]:
    """``dims`` at ``sizes``; a ControlNet residual's ``latent_height/4`` is a quarter of
    ``latent_height`` (the size steps make it exact)."""
    out = []
    for d in dims:
        name, _, divisor = d.partition("/") if isinstance(d, str) else (d, "", "")
        out.append(C.resolve((name,), dict(sizes))[0] // int(divisor or 1))
    return tuple(out)
