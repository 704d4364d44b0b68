"""Helpers shared by test modules: diffusers references, served requests, config checks.

Test modules import these from here, never from one another; shared fixtures
live in conftest.py.
"""

from __future__ import annotations

import queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

MODEL = "stable_diffusion"

# The reference side builds its schedulers itself, from diffusers' classes.
REFERENCE_SCHEDULERS = {
    None: None,  # the checkpoint's own (PNDM)
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def sampler_reference_table() -> dict[str, tuple[str, dict]]:
    """Every alias -> (diffusers class, config overrides), written from diffusers' own
    options (independently of the pipeline's scheduler table)."""
    flags = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
    solvers = {
        "lms": ("LMSDiscreteScheduler", {}),
        "euler": ("EulerDiscreteScheduler", {}),
        "heun": ("HeunDiscreteScheduler", {}),
        "dpm2": ("KDPM2DiscreteScheduler", {}),
        "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
        "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
        "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
        "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
        "unipc": ("UniPCMultistepScheduler", {}),
        "deis": ("DEISMultistepScheduler", {}),
    }
    table = {a: s for a, s in REFERENCE_SCHEDULERS.items() if a is not None}
    table |= {
        "ddpm": ("DDPMScheduler", {}),
        "lcm": ("LCMScheduler", {}),
        "tcd": ("TCDScheduler", {}),
        **{a: s for a, s in solvers.items() if a not in table},
    }
    for alias, (cls, extra) in solvers.items():
        for suffix, flag in zip(("karras", "exponential", "beta"), flags, strict=True):
            table.setdefault(f"{alias}_{suffix}", (cls, {**extra, flag: True}))
    return table


SETTINGS = {
    "prompt": "a photo of an astronaut riding a horse",
    "negative_prompt": "blurry, low quality",
    "height": 32,
    "width": 48,
    "num_inference_steps": 3,
    "guidance_scale": 7.5,
    "num_images_per_prompt": 2,
}

IMG2IMG = {
    "prompt": "a watercolor of a fox",
    "negative_prompt": "photo",
    "num_inference_steps": 4,
    "guidance_scale": 7.5,
    "num_images_per_prompt": 2,
}


# ---------------------------------------------------------------------------
# The reference side: diffusers' pipelines on the same weights


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def reference(pipe, scheduler: str | None, seed: int, **settings):
    """diffusers' images (uint8, rounded as numpy_to_pil) and NSFW flags (all false from a
    pipeline without a safety checker: SDXL's)."""
    import diffusers
    import torch

    original = pipe.scheduler
    if REFERENCE_SCHEDULERS[scheduler] is not None:
        cls_name, overrides = REFERENCE_SCHEDULERS[scheduler]
        pipe.scheduler = getattr(diffusers, cls_name).from_config(original.config, **overrides)
    try:
        out = pipe(generator=torch.Generator().manual_seed(seed), output_type="np", **settings)
    finally:
        pipe.scheduler = original
    images = (out.images * 255).round().astype(np.uint8)
    flags = getattr(out, "nsfw_content_detected", None)
    return images, np.zeros(len(images), bool) if flags is None else np.asarray(flags, bool)


def source_image(height: int = 32, width: int = 48) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


def source_mask(height: int = 32, width: int = 48) -> np.ndarray:
    """255 = repaint: a rectangle, plus grey pixels either side of the 0.5 threshold."""
    mask = np.zeros((height, width), np.uint8)
    mask[8:24, 12:40] = 255
    mask[0:2, 0:4] = 127  # kept
    mask[0:2, 44:48] = 128  # repainted
    return mask


def img2img_reference(pipe, scheduler, seed, image, **settings):
    import PIL.Image
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    return reference(img2img, scheduler, seed, image=PIL.Image.fromarray(image), **settings)


def inpaint_reference(pipe, scheduler, seed, image, mask, **settings):
    import PIL.Image
    from diffusers import StableDiffusionInpaintPipeline

    inpaint = StableDiffusionInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    height, width = image.shape[:2]
    return reference(
        inpaint,
        scheduler,
        seed,
        image=PIL.Image.fromarray(image),
        mask_image=PIL.Image.fromarray(mask),
        height=height,
        width=width,
        **settings,
    )


# ---------------------------------------------------------------------------
# The served side: raw gRPC requests to the stable_diffusion model


def as_array(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, str | bytes):
        return np.array([value.encode() if isinstance(value, str) else value], dtype=object)
    if isinstance(value, bool):
        return np.array([value])
    if isinstance(value, int):
        return np.array([value], np.int32)
    return np.array([value], np.float32)


def infer_inputs(**options) -> list[grpcclient.InferInput]:
    inputs = []
    for name, value in options.items():
        if name == "seed" and not isinstance(value, np.ndarray):
            value = np.array([value], np.int64)
        array = as_array(value)
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def served_generate(url: str, *, model: str = MODEL, **options):
    """(images, nsfw_content_detected, seeds) of one request to the served pipeline
    (``model``: another pipeline of the repository, e.g. a prefixed one)."""
    client = grpcclient.InferenceServerClient(url)
    try:
        result = client.infer(model, infer_inputs(**options))
    finally:
        client.close()
    return (
        result.as_numpy("images"),
        result.as_numpy("nsfw_content_detected"),
        result.as_numpy("seeds"),
    )


def stream(url: str, model: str, *, cancel_after: int | None = None, **options):
    """All responses of one streamed request: (progress dicts, final result or error)."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(model, infer_inputs(**options), enable_empty_final_response=True)
        progress, final = [], None
        while True:
            result, error = responses.get(timeout=120)
            if error is not None:
                return progress, error
            response = result.get_response()
            is_final = response.parameters["triton_final_response"].bool_param
            names = {o.name for o in response.outputs}
            if "images" in names:
                final = result
            elif names:
                progress.append({n: result.as_numpy(n) for n in names})
                if cancel_after is not None and len(progress) == cancel_after:
                    client.stop_stream(cancel_requests=True)
                    return progress, None
            if is_final:
                return progress, final
    finally:
        client.close()


def bad_request_error(url: str, inputs: dict, model: str = MODEL) -> InferenceServerException:
    options = {"prompt": "a cat", "num_inference_steps": 2, "height": 32, "width": 32, **inputs}
    options = {k: v for k, v in options.items() if v is not None}
    client = grpcclient.InferenceServerClient(url)
    try:
        with pytest.raises(InferenceServerException) as e:
            client.infer(model, infer_inputs(**options))
    finally:
        client.close()
    return e.value


# ---------------------------------------------------------------------------
# Exported configs against their ONNX files


def _onnx_io(path):
    import onnx

    dtypes = {
        onnx.TensorProto.FLOAT: "TYPE_FP32",
        onnx.TensorProto.FLOAT16: "TYPE_FP16",
        onnx.TensorProto.INT32: "TYPE_INT32",
        onnx.TensorProto.INT64: "TYPE_INT64",
        onnx.TensorProto.BOOL: "TYPE_BOOL",
    }
    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
            out.append((v.name, dtypes[t.elem_type], dims))
        return out

    return describe(graph.input), describe(graph.output)


def assert_config_matches_onnx(config, onnx_path):
    """Names (in order), dtypes, ranks, batch dim and fixed dims of config vs ONNX."""
    from tritonclient.grpc import model_config_pb2 as pb

    inputs, outputs = _onnx_io(onnx_path)
    for entries, io in ((config.input, inputs), (config.output, outputs)):
        assert [e.name for e in entries] == [name for name, _, _ in io]
        for e, (name, dtype, dims) in zip(entries, io, strict=True):
            assert pb.DataType.Name(e.data_type) == dtype, name
            shape = list(e.reshape.shape) if e.HasField("reshape") else list(e.dims)
            assert len(dims) == len(shape) + 1, f"{name}: rank"
            assert isinstance(dims[0], str), f"{name}: batch dim must be dynamic in ONNX"
            for c, o in zip(shape, dims[1:], strict=True):
                assert (c == -1) == isinstance(o, str), f"{name}: {shape} vs {dims}"
                assert c == -1 or c == o, f"{name}: {shape} vs {dims}"


# ControlNets (tests/test_controlnet.py, tests/test_unet_in_pipeline_combos.py)
CONTROLNET_EMBEDDING_CHANNELS = (16, 32)


def control_image(seed: int, height: int = 32, width: int = 48) -> np.ndarray:
    """A control map: blocks of random grey levels (edges at several scales)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)
    return np.repeat(np.repeat(blocks, 4, axis=0), 4, axis=1)


def make_controlnet(unet, seed: int, path) -> None:
    """A ControlNet from ``unet`` with random output convolutions (zero-initialised ones would
    give residuals of 0), saved to ``path``."""
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    model = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=CONTROLNET_EMBEDDING_CHANNELS
    )
    gen = torch.Generator().manual_seed(10 + seed)
    convs = [*model.controlnet_down_blocks, model.controlnet_mid_block]
    with torch.no_grad():
        for p in (p for conv in convs for p in conv.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(path)
