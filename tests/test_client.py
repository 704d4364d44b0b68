"""The client's pure parts, no server: request building, result decoding, error mapping, PNG text.

Responses are real tritonclient ``InferResult`` objects built from protobuf
messages, so decoding is tested against the library's own parsing.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from sd_pipeline import spec as S
from sd_triton.client import (
    A1111_SAMPLERS,
    A1111_UPSCALERS,
    AsyncClient,
    CancelledError,
    Client,
    DeadlineExceededError,
    GenerationRequest,
    GenerationResult,
    GenerationSettings,
    InvalidRequestError,
    ProgressEvent,
    SDTritonError,
    ServerError,
    UnavailableError,
    format_infotext,
    infotext_options,
    parse_infotext,
    read_infotext,
    save_png,
)
from sd_triton.client._errors import translate
from sd_triton.client._infotext import output_paths
from sd_triton.client._request import StreamDecoder, decode_result, model_defaults

# --------------------------------------------------------------------------- helpers


def infer_result(
    outputs: dict[str, np.ndarray],
    *,
    model: str = "stable_diffusion",
    version: str = "1",
    final: bool | None = None,
) -> grpcclient.InferResult:
    """A tritonclient InferResult, as the server would send it."""
    response = service_pb2.ModelInferResponse(model_name=model, model_version=version)
    for name, array in outputs.items():
        tensor = response.outputs.add(name=name, datatype=np_to_triton_dtype(array.dtype))
        tensor.shape.extend(array.shape)
        response.raw_output_contents.append(array.tobytes())
    if final is not None:
        response.parameters["triton_final_response"].bool_param = final
    return grpcclient.InferResult(response)


def images_response(n: int = 2, h: int = 16, w: int = 24, seed: int = 123, **kwargs):
    images = np.random.default_rng(0).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    outputs = {
        "images": images,
        "nsfw_content_detected": np.arange(n) % 2 == 1,
        "seeds": np.full(n, seed, np.int64),
    }
    return images, infer_result(outputs, **kwargs)


def progress_response(step: int, total: int, preview: bool = False):
    outputs = {
        "step": np.array([step], np.int32),
        "total_steps": np.array([total], np.int32),
        "elapsed_s": np.array([0.5 * step], np.float32),
    }
    if preview:
        outputs["preview_images"] = np.zeros((1, 2, 3, 3), np.uint8)
    return infer_result(outputs, model="stable_diffusion_stream", final=False)


class FakeRpcError(grpc.RpcError):
    """What grpc.aio raises from a stream (tritonclient does not wrap it)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def settings_for(**overrides) -> GenerationSettings:
    values = dict(
        prompt="a photo of a cat",
        negative_prompt=None,
        num_inference_steps=20,
        guidance_scale=7.5,
        height=512,
        width=768,
        seed=123,
        scheduler="euler_a",
        num_images_per_prompt=1,
        model="stable_diffusion",
    )
    return GenerationSettings(**(values | overrides))


# --------------------------------------------------------------------------- requests


def sent(request: GenerationRequest, model: S.ModelSpec = S.STABLE_DIFFUSION) -> dict:
    """name -> (datatype, shape, numpy value) of the tensors a request sends."""
    out = {}
    for infer_input in request.to_inputs(model):
        tensor = infer_input._get_tensor()
        out[tensor.name] = (tensor.datatype, list(tensor.shape), infer_input)
    return out


def test_only_given_options_are_sent():
    assert list(sent(GenerationRequest(prompt="a cat"))) == ["prompt"]


# Every text-to-image option, SDXL's and the hires fix's included, with a value of its type.
EVERY_OPTION = dict(
    negative_prompt="a dog",
    num_inference_steps=20,
    guidance_scale=7,
    height=512,
    width=768,
    seed=2**40,
    scheduler="euler_a",
    num_images_per_prompt=2,
    guidance_rescale=0.7,
    clip_skip=1,
    prompt_syntax="diffusers",
    prompt_2="an oil painting, gold frame",
    negative_prompt_2="blurry: low quality",
    original_size=(1024, 2048),
    crops_coords_top_left=(64, 32),
    target_size=(512, 768),
    negative_original_size=(256, 384),
    negative_crops_coords_top_left=(0, 16),
    negative_target_size=(512, 512),
    aesthetic_score=7.0,
    negative_aesthetic_score=2.0,
    refiner_switch_at=0.8,
    enable_hr=True,
    hr_scale=1.5,
    hr_upscaler="latent_bicubic",
    hr_denoising_strength=0.55,
    hr_second_pass_steps=12,
)


# Two ControlNets' options: one value each.
CONTROL_OPTIONS = dict(
    controlnet=["canny", "depth"],
    controlnet_conditioning_scale=[1.0, 0.5],
    control_guidance_start=(0.0, 0.1),
    control_guidance_end=[1, 0.9],
    guess_mode=True,
)


def test_every_option_is_sent_with_the_contracts_type_and_shape():
    tensors = sent(GenerationRequest(prompt="a cat", **EVERY_OPTION, **CONTROL_OPTIONS))
    image_inputs = {"image", "mask_image", "strength", "control_image"}
    assert set(tensors) == {t.name for t in S.STABLE_DIFFUSION.inputs} - image_inputs
    for tensor in S.STABLE_DIFFUSION.inputs:
        if tensor.name in tensors:
            datatype, shape, _ = tensors[tensor.name]
            dims = [2 if d == "K" else d for d in tensor.dims]  # K: two ControlNets
            assert (datatype, shape) == (tensor.datatype, dims), tensor.name


def test_controlnet_inputs_take_one_value_per_controlnet_or_one_for_one():
    edges = Image.new("RGB", (24, 16), (255, 255, 255))
    depth = np.zeros((16, 24, 3), np.uint8)
    two = {
        t.name(): t
        for t in GenerationRequest(
            prompt="x", control_image=[edges, depth], controlnet=["a", "b"]
        ).to_inputs()
    }
    assert (two["control_image"].datatype(), two["control_image"].shape()) == (
        "UINT8",
        [2, 16, 24, 3],
    )
    assert np.frombuffer(two["control_image"]._get_content(), np.uint8)[:3].tolist() == [255] * 3
    one = {
        t.name(): t
        for t in GenerationRequest(
            prompt="x", control_image=depth, controlnet="a", controlnet_conditioning_scale=0.5
        ).to_inputs()
    }
    assert one["control_image"].shape() == [1, 16, 24, 3] and one["controlnet"].shape() == [1]
    assert np.frombuffer(
        one["controlnet_conditioning_scale"]._get_content(), np.float32
    ).tolist() == [0.5]
    with pytest.raises(
        InvalidRequestError, match="control_image: the images must have one size, got 24x16, 8x8"
    ):
        GenerationRequest(
            prompt="x", control_image=[edges, np.zeros((8, 8, 3), np.uint8)]
        ).to_inputs()
    with pytest.raises(InvalidRequestError, match="controlnet must hold one value per ControlNet"):
        GenerationRequest(prompt="x", controlnet=[]).to_inputs()
    with pytest.raises(InvalidRequestError, match="control_guidance_end must be a number"):
        GenerationRequest(prompt="x", control_guidance_end=[1.0, "x"]).to_inputs()


def test_pairs_are_sent_as_two_int32_in_diffusers_order():
    request = GenerationRequest(
        prompt="x", original_size=(1024, 2048), crops_coords_top_left=[64, 0]
    )
    tensors = {t.name(): t for t in request.to_inputs()}
    for name, expected in (("original_size", [1024, 2048]), ("crops_coords_top_left", [64, 0])):
        raw = tensors[name]._get_content()  # the bytes on the wire: little-endian int32
        assert np.frombuffer(raw, np.int32).tolist() == expected
        assert tensors[name].datatype() == "INT32" and tensors[name].shape() == [2]


def test_image_inputs_leave_room_for_img2img_and_inpainting():
    image = Image.new("RGB", (64, 32), (255, 0, 0))
    mask = np.zeros((32, 64), np.uint8)
    tensors = sent(GenerationRequest(prompt="x", image=image, mask_image=mask, strength=0.5))
    assert tensors["image"][:2] == ("UINT8", [32, 64, 3])
    assert tensors["mask_image"][:2] == ("UINT8", [32, 64])
    assert tensors["strength"][:2] == ("FP32", [1])


def test_preview_is_a_streaming_model_input_only():
    request = GenerationRequest(prompt="x", preview=True)
    assert sent(request, S.STABLE_DIFFUSION_STREAM)["preview"][:2] == ("BOOL", [1])
    with pytest.raises(InvalidRequestError, match="stable_diffusion takes no input 'preview'"):
        request.to_inputs(S.STABLE_DIFFUSION)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prompt": b"bytes"}, "prompt must be a string"),
        ({"num_inference_steps": 2.5}, "num_inference_steps must be an integer"),
        ({"num_inference_steps": True}, "num_inference_steps must be an integer"),
        ({"height": 2**31}, "height must fit in int32"),
        ({"seed": 2**63}, "seed must fit in int64"),
        ({"guidance_scale": "7"}, "guidance_scale must be a number"),
        ({"image": np.zeros((4, 4, 3), np.float32)}, "image must be uint8"),
        ({"mask_image": np.zeros((4, 4, 3), np.uint8)}, r"mask_image must have shape \[H, W\]"),
        ({"original_size": 1024}, r"original_size must be two integers \(height, width\)"),
        ({"target_size": (1024, 1024, 3)}, r"target_size must be two integers"),
        ({"crops_coords_top_left": (0.5, 0)}, r"crops_coords_top_left .* \(top, left\)"),
        ({"negative_original_size": (2**31, 1)}, "negative_original_size must fit in int32"),
        ({"clip_skip": 1.0}, "clip_skip must be an integer"),
        ({"prompt_2": 2}, "prompt_2 must be a string"),
    ],
)
def test_wrong_python_types_are_invalid_requests_before_sending(options, message):
    with pytest.raises(InvalidRequestError, match=message):
        GenerationRequest(**({"prompt": "x"} | options)).to_inputs()


def test_request_fields_are_the_contracts_inputs():
    fields = set(inspect.signature(GenerationRequest).parameters)
    assert fields == {t.name for t in S.STABLE_DIFFUSION_STREAM.inputs}


@pytest.mark.parametrize("cls", [Client, AsyncClient])
@pytest.mark.parametrize("method", ["generate", "submit", "stream"])
def test_call_options_mirror_the_contract(cls, method):
    params = inspect.signature(getattr(cls, method)).parameters
    options = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    contract = {t.name for t in S.STABLE_DIFFUSION_STREAM.inputs}
    assert options - {"timeout_s"} <= contract
    assert contract - options - {"prompt"} <= {"image", "mask_image", "strength", "preview"}


# --------------------------------------------------------------------------- results


def test_decode_result_reports_images_flags_seeds_model_and_settings():
    images, response = images_response(n=2, h=16, w=24, seed=99, version="3")
    request = GenerationRequest(prompt="a cat", num_inference_steps=4, scheduler="ddim")
    result = decode_result(response, request)
    assert [np.asarray(im).tolist() for im in result.images] == images.tolist()
    assert all(im.mode == "RGB" and im.size == (24, 16) for im in result.images)
    assert result.nsfw_content_detected == [False, True]
    assert result.seeds == [99, 99]
    assert (result.model_name, result.model_version) == ("stable_diffusion", "3")
    assert result.settings == settings_for(
        prompt="a cat",
        num_inference_steps=4,
        height=16,
        width=24,
        seed=99,
        scheduler="ddim",
        num_images_per_prompt=2,
    )


def test_settings_fill_omitted_options_with_the_contracts_and_models_defaults():
    _, response = images_response(n=1)
    request = GenerationRequest(prompt="a cat")
    settings = decode_result(response, request).settings
    assert settings.num_inference_steps == S.STABLE_DIFFUSION.input("num_inference_steps").default
    assert settings.guidance_scale == S.STABLE_DIFFUSION.input("guidance_scale").default
    assert settings.negative_prompt is None  # not sent: SDXL's zero embeddings differ from ""
    assert (settings.guidance_rescale, settings.clip_skip) == (0.0, 0)
    assert settings.scheduler == "default"
    published = model_defaults({"default_scheduler": "pndm", "max_steps": "150"})
    assert decode_result(response, request, published).settings.scheduler == "pndm"


def test_settings_report_a_models_own_defaults_and_its_familys_strength():
    _, response = images_response(n=1)
    turbo = model_defaults(
        {"default_num_inference_steps": "1", "default_guidance_scale": "0.0", "family": "sdxl"}
    )
    settings = decode_result(response, GenerationRequest(prompt="a cat"), turbo).settings
    assert (settings.num_inference_steps, settings.guidance_scale) == (1, 0.0)
    sent = GenerationRequest(prompt="a cat", num_inference_steps=3, guidance_scale=2.0)
    assert decode_result(response, sent, turbo).settings.num_inference_steps == 3
    image, mask = np.zeros((16, 24, 3), np.uint8), np.zeros((16, 24), np.uint8)
    strengths = [
        decode_result(response, GenerationRequest(prompt="x", **kw), facts).settings.strength
        for facts in ({}, turbo)
        for kw in ({"image": image}, {"image": image, "mask_image": mask})
    ]
    assert strengths == [0.8, 1.0, 0.3, 0.9999]  # diffusers' defaults: SD, then SDXL


def test_settings_report_the_sdxl_options_sent_and_the_refiner():
    _, response = images_response(n=2, h=512, w=768, seed=EVERY_OPTION["seed"])
    options = {k: v for k, v in EVERY_OPTION.items() if not k.startswith(("hr_", "enable_hr"))}
    settings = decode_result(response, GenerationRequest(prompt="x", **options)).settings
    for name, value in options.items():
        assert getattr(settings, name) == value, name
    assert settings.refiner == "refiner"  # the model publishes no refiner checkpoint
    facts = model_defaults(
        {"refiner_model_name": "sdxl_refiner", "refiner_model_hash": "7440042bbd"}
    )
    settings = decode_result(response, GenerationRequest(prompt="x", **options), facts).settings
    assert settings.refiner == "sdxl_refiner [7440042bbd]"
    assert decode_result(response, GenerationRequest(prompt="x"), facts).settings.refiner is None


def test_hires_settings_report_the_first_pass_size_and_the_second_passes_defaults():
    _, response = images_response(n=1, h=96, w=144)  # 1.5 x (64, 96)
    request = GenerationRequest(prompt="x", enable_hr=True, hr_scale=1.5)
    settings = decode_result(response, request).settings
    assert (settings.height, settings.width) == (64, 96)
    assert (settings.enable_hr, settings.hr_scale, settings.hr_upscaler) == (True, 1.5, "latent")
    assert (settings.hr_denoising_strength, settings.hr_second_pass_steps) == (0.7, 0)
    _, response = images_response(n=1, h=870, w=1088)  # int(1.7 x (512, 640)): truncated
    request = GenerationRequest(prompt="x", enable_hr=True, hr_scale=1.7)
    assert decode_result(response, request).settings.height == 512
    plain = decode_result(response, GenerationRequest(prompt="x")).settings
    assert (plain.height, plain.width, plain.enable_hr, plain.hr_scale) == (870, 1088, False, None)


def test_a_response_without_images_is_a_server_error():
    with pytest.raises(ServerError, match="lacks images"):
        decode_result(infer_result({"seeds": np.zeros(1, np.int64)}), GenerationRequest(prompt="x"))


def test_stream_decoder_yields_progress_then_the_result():
    decoder = StreamDecoder(GenerationRequest(prompt="x"), {}, model="stable_diffusion")
    events = [decoder.feed(progress_response(i, 3, preview=True), None) for i in (1, 2, 3)]
    assert [(e.step, e.total_steps, e.elapsed_s) for e in events] == [
        (1, 3, 0.5),
        (2, 3, 1.0),
        (3, 3, 1.5),
    ]
    assert events[-1].fraction == 1.0 and events[0].previews[0].size == (3, 2)
    _, final = images_response(model="stable_diffusion_stream", final=True)
    result = decoder.feed(final, None)
    assert isinstance(result, GenerationResult) and decoder.result is result
    assert result.model_name == "stable_diffusion_stream"
    assert result.settings.model == "stable_diffusion"  # the infotext names the unary model


def test_stream_decoder_skips_an_empty_final_response_only_after_images():
    decoder = StreamDecoder(GenerationRequest(prompt="x"), {}, model="m")
    assert decoder.feed(infer_result({}, final=False), None) is None
    with pytest.raises(ServerError, match="without sending images"):
        decoder.feed(infer_result({}, final=True), None)


def test_stream_errors_before_the_loop_are_invalid_requests_after_it_server_errors():
    message = "num_inference_steps must be at least 1, got 0"
    decoder = StreamDecoder(GenerationRequest(prompt="x"), {}, model="m")
    with pytest.raises(InvalidRequestError) as info:
        decoder.feed(None, InferenceServerException(message))
    assert info.value.message == message and info.value.status is None
    decoder.feed(progress_response(1, 3), None)
    with pytest.raises(ServerError):
        decoder.feed(None, InferenceServerException("unet: out of memory"))
    fresh = StreamDecoder(GenerationRequest(prompt="x"), {}, model="m")
    with pytest.raises(ServerError):
        fresh.feed(None, InferenceServerException("internal error: RuntimeError: boom"))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        ("StatusCode.INVALID_ARGUMENT", InvalidRequestError),
        ("StatusCode.UNAVAILABLE", UnavailableError),
        ("StatusCode.NOT_FOUND", UnavailableError),
        ("StatusCode.RESOURCE_EXHAUSTED", UnavailableError),
        ("StatusCode.DEADLINE_EXCEEDED", DeadlineExceededError),
        ("StatusCode.CANCELLED", CancelledError),
        ("StatusCode.INTERNAL", ServerError),
        ("StatusCode.UNIMPLEMENTED", ServerError),
        ("StatusCode.UNKNOWN", ServerError),
    ],
)
def test_statuses_map_to_the_exception_tree_with_the_message_intact(status, cls):
    message = "height must be a positive multiple of 64 pixels, got 500: ünïcode\nsecond line"
    error = translate(InferenceServerException(message, status=status, debug_details="x"))
    assert type(error) is cls
    assert isinstance(error, SDTritonError)
    assert (error.message, str(error), error.status) == (message, message, status)


def test_raw_grpc_errors_map_too():
    error = translate(FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
    assert type(error) is DeadlineExceededError and error.status == "StatusCode.DEADLINE_EXCEEDED"


def test_connection_errors_name_the_address():
    exc = InferenceServerException("failed to connect", status="StatusCode.UNAVAILABLE")
    assert str(translate(exc, context="host:1")) == "host:1: failed to connect"
    exc = InferenceServerException("Request for unknown model: 'x'", status="StatusCode.NOT_FOUND")
    assert str(translate(exc, context="host:1")) == "Request for unknown model: 'x'"


@pytest.mark.parametrize(
    "message",
    [
        "Request for unknown model: 'nope' is not found",
        "Request for unknown model: 'sd' has no available versions",
    ],
)
def test_tritons_own_unavailable_messages_are_recognised_without_status(message):
    assert type(translate(InferenceServerException(message), in_band=InvalidRequestError)) is (
        UnavailableError
    )


def test_error_classes_are_also_the_builtin_kinds():
    assert issubclass(InvalidRequestError, ValueError)
    assert issubclass(DeadlineExceededError, TimeoutError)
    for cls in (
        InvalidRequestError,
        UnavailableError,
        DeadlineExceededError,
        CancelledError,
        ServerError,
    ):
        assert issubclass(cls, SDTritonError)
    with pytest.raises(TimeoutError):
        raise DeadlineExceededError("Deadline Exceeded")


# --------------------------------------------------------------------------- infotext and PNG


def test_infotext_is_automatic1111s_format():
    text = format_infotext(settings_for(negative_prompt="blurry"))
    assert text == (
        "a photo of a cat\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 123, Size: 768x512, Model: stable_diffusion"
    )


def test_infotext_omits_an_absent_negative_prompt_and_quotes_like_the_web_ui():
    text = format_infotext(settings_for(scheduler="dpmpp_2m_karras", model="sd: v1, tiny"))
    assert text.splitlines() == [
        "a photo of a cat",
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 123, "
        'Size: 768x512, Model: "sd: v1, tiny"',
    ]
    assert "Negative prompt" not in parse_infotext(text)
    # An empty negative prompt that was sent is written: SDXL encodes it, unlike none.
    empty = format_infotext(settings_for(negative_prompt=""))
    assert empty.splitlines()[1] == "Negative prompt: "
    assert parse_infotext(empty)["Negative prompt"] == ""


def test_infotext_writes_the_new_settings_under_the_web_uis_keys():
    s = settings_for(
        clip_skip=1,
        guidance_rescale=0.7,
        prompt_2="oil painting, gold frame",
        original_size=(1024, 2048),
        crops_coords_top_left=(64, 32),
        refiner_switch_at=0.8,
        refiner="sdxl_refiner [7440042bbd]",
    )
    assert format_infotext(s).splitlines()[-1] == (
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 123, Size: 768x512, "
        "Model: stable_diffusion, Clip skip: 2, CFG Rescale: 0.7, "
        'Prompt 2: "oil painting, gold frame", Original size: 2048x1024, '
        'Crops coords top left: "64,32", Refiner: sdxl_refiner [7440042bbd], '
        "Refiner switch at: 0.8"
    )
    hires = settings_for(
        enable_hr=True,
        hr_scale=2.0,
        hr_upscaler="latent_bicubic",
        hr_denoising_strength=0.5,
        hr_second_pass_steps=0,
    )
    assert format_infotext(hires).endswith(
        "Hires upscale: 2.0, Hires upscaler: Latent (bicubic), Denoising strength: 0.5"
    )
    assert "Clip skip" not in format_infotext(settings_for())  # the web UI's 1: the default


def test_infotext_options_reproduce_every_option_sent():
    _, response = images_response(n=2, h=96, w=144, seed=EVERY_OPTION["seed"])
    request = GenerationRequest(
        prompt="a cat,\nsecond line", **EVERY_OPTION | {"height": 64, "width": 96}
    )
    result = decode_result(response, request)
    options = infotext_options(parse_infotext(result.infotext(1)))
    assert options == {"prompt": request.prompt, **EVERY_OPTION, "height": 64, "width": 96}


def test_infotext_options_read_the_web_uis_and_its_extensions_texts():
    text = (
        "a castle\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, "
        "Size: 832x1216, Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Denoising strength: 0.4, "
        "Clip skip: 2, Hires upscale: 1.5, Hires steps: 10, Hires upscaler: Latent (nearest-exact), "
        "Refiner: sdxl_refiner [7440042bbd], Refiner switch at: 0.8, Version: v1.10.1"
    )
    assert infotext_options(parse_infotext(text)) == {
        "prompt": "a castle",
        "num_inference_steps": 20,
        "scheduler": "dpmpp_2m_karras",
        "guidance_scale": 7.0,
        "seed": 1,
        "height": 1216,
        "width": 832,
        "clip_skip": 1,
        "enable_hr": True,
        "hr_scale": 1.5,
        "hr_second_pass_steps": 10,
        "hr_upscaler": "latent_nearest_exact",
        "hr_denoising_strength": 0.4,
        "refiner_switch_at": 0.8,
    }
    for key in ("CFG Rescale", "CFG Rescale φ", "CFG Rescale phi", "Rescale CFG"):
        fields = parse_infotext(f"x\nSteps: 4, Seed: 2, {key}: 0.7, Denoising strength: 0.6")
        assert infotext_options(fields) == {
            "prompt": "x",
            "num_inference_steps": 4,
            "seed": 2,
            "guidance_rescale": 0.7,
            "strength": 0.6,
        }, key


def test_controlnet_infotext_is_the_extensions_and_reads_back(tmp_path):
    """Each ControlNet as the web UI's ControlNet extension writes a unit (``ControlNet N``):
    preprocessor, model with its file's published hash, weight, window, control mode."""
    from sd_triton.client import cli
    from sd_triton.client.control import with_modules

    controls = {
        "controlnet": ["canny", "depth"],
        "controlnet_conditioning_scale": [0.8, 1.0],
        "control_guidance_start": [0.0, 0.2],
        "control_guidance_end": [1.0, 0.75],
        "guess_mode": True,
    }
    _, response = images_response(n=1, h=64, w=96, seed=5)
    published = model_defaults({"controlnet_hashes": "canny: 0123456789, other: 9876543210"})
    result = decode_result(response, GenerationRequest(prompt="a house", **controls), published)
    text = with_modules(result, ["canny", "none"]).infotext()
    mode = "Control Mode: ControlNet is more important"
    assert text.splitlines()[-1].endswith(
        'ControlNet 0: "Module: canny, Model: canny [0123456789], Weight: 0.8, '
        f'Guidance Start: 0.0, Guidance End: 1.0, {mode}", '
        'ControlNet 1: "Module: none, Model: depth, Weight: 1.0, '
        f'Guidance Start: 0.2, Guidance End: 0.75, {mode}"'
    )
    options = infotext_options(parse_infotext(text))
    assert {k: options[k] for k in controls} == controls
    # One ControlNet given as plain values, defaults for the rest, no guess mode.
    one = decode_result(response, GenerationRequest(prompt="x", controlnet="canny")).infotext()
    assert 'ControlNet 0: "Module: none, Model: canny, Weight: 1.0, ' in one
    # No scale sent with an image: the server's default for the family and mode (diffusers').
    image, mask = np.zeros((64, 96, 3), np.uint8), np.zeros((64, 96), np.uint8)
    xl = model_defaults({"family": "sdxl"})
    weights = [
        decode_result(response, GenerationRequest(prompt="x", controlnet="canny", **kw), facts)
        .settings.controlnets[0]
        .weight
        for facts in ({}, xl)
        for kw in ({"image": image}, {"image": image, "mask_image": mask})
    ]
    assert weights == [0.8, 0.5, 0.8, 1.0]  # SD img2img, inpainting; SDXL img2img, inpainting
    sdxl_img2img = GenerationRequest(prompt="x", controlnet="canny", image=image)
    assert decode_result(response, sdxl_img2img, xl).settings.strength == 0.8  # not SDXL's 0.3
    assert "Control Mode: Balanced" in one
    assert "guess_mode" not in infotext_options(parse_infotext(one))
    # sd-triton generate --control records which maps it made (what with_modules writes).
    Image.new("RGB", (32, 32), "white").save(tmp_path / "map.png")
    argv = ["generate", "x", "--control", f"canny:canny:{tmp_path / 'map.png'}"]
    args = cli.build_parser().parse_args([*argv, "--control", f"depth:{tmp_path / 'map.png'}"])
    assert args.controlnet == ["canny", "depth"] and args.control_module == ["canny", "none"]
    # The extension's own unit, with the fields sd-triton does not have.
    extension = (
        'a room\nSteps: 20, Seed: 1, ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny '
        "[d14c016b], Weight: 1, Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: "
        "100, Threshold B: 200, Guidance Start: 0, Guidance End: 0.5, Pixel Perfect: False, "
        'Control Mode: Balanced", Version: v1.10.1'
    )
    assert infotext_options(parse_infotext(extension)) == {
        "prompt": "a room",
        "num_inference_steps": 20,
        "seed": 1,
        "controlnet": ["control_v11p_sd15_canny"],
        "controlnet_conditioning_scale": [1.0],
        "control_guidance_start": [0.0],
        "control_guidance_end": [0.5],
    }


def test_every_hires_upscaler_has_a_web_ui_name():
    description = S.STABLE_DIFFUSION.input("hr_upscaler").description
    aliases = set(re.findall(r"\b(?:latent\w*|lanczos|nearest)\b", description))
    assert aliases and aliases <= set(A1111_UPSCALERS)


def test_infotext_of_several_images_gives_batch_size_and_position():
    text = format_infotext(settings_for(num_images_per_prompt=3, strength=0.75), index=2)
    assert text.endswith("Denoising strength: 0.75, Batch size: 3, Batch pos: 2")


def test_every_pipeline_scheduler_has_a_web_ui_sampler_name():
    from sd_pipeline.schedulers import SCHEDULERS

    assert set(SCHEDULERS) <= set(A1111_SAMPLERS)


@settings(max_examples=50, deadline=None)
@given(
    prompt=st.text(min_size=1).filter(lambda s: s.strip() and "\r" not in s),
    negative=st.text().filter(lambda s: "\r" not in s and "Negative prompt:" not in s),
    seed=st.integers(0, 2**63 - 1),
)
def test_infotext_parses_back(prompt, negative, seed):
    assume("Negative prompt:" not in prompt)  # ambiguous for every reader of this format
    s = settings_for(prompt=prompt, negative_prompt=negative, seed=seed, model="m, n")
    parsed = parse_infotext(format_infotext(s))
    assert parsed["Prompt"] == prompt
    assert parsed["Negative prompt"] == negative
    assert parsed["Seed"] == str(seed)
    assert parsed["Model"] == "m, n"
    assert parsed["Sampler"] == "Euler a" and parsed["Size"] == "768x512"


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 8
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert zlib.crc32(kind + body) == int.from_bytes(
            data[pos + 8 + length : pos + 12 + length], "big"
        )
        chunks.append((kind, body))
        pos += 12 + length
    return chunks


def test_png_carries_the_settings_in_a_text_chunk(tmp_path):
    text = format_infotext(settings_for(negative_prompt="blurry"))
    image = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    path = save_png(image, tmp_path / "a.png", text)
    assert read_infotext(path) == text
    chunks = dict(_png_chunks(path.read_bytes()))
    assert chunks[b"tEXt"] == b"parameters\x00" + text.encode("latin-1")
    with Image.open(path) as reread:
        assert np.array_equal(np.asarray(reread), np.asarray(image))


def test_png_with_a_non_latin_prompt_uses_an_utf8_chunk(tmp_path):
    text = format_infotext(settings_for(prompt="一只猫的照片"))
    path = save_png(Image.new("RGB", (2, 2)), tmp_path / "a.png", text)
    assert read_infotext(path) == text
    assert b"iTXt" in dict(_png_chunks(path.read_bytes()))


def test_result_save_writes_one_png_per_image(tmp_path):
    _, response = images_response(n=3, seed=5)
    result = decode_result(response, GenerationRequest(prompt="a cat", num_inference_steps=2))
    paths = result.save(tmp_path / "out.png")
    assert [p.name for p in paths] == ["out.png", "out-1.png", "out-2.png"]
    for i, path in enumerate(paths):
        assert read_infotext(path) == result.infotext(i)
        assert parse_infotext(read_infotext(path))["Batch pos"] == str(i)
    assert output_paths("x/y.png", 1) == [Path("x/y.png")]


def test_progress_event_fraction():
    assert ProgressEvent(step=5, total_steps=20, elapsed_s=1.0).fraction == 0.25
    assert ProgressEvent(step=0, total_steps=0, elapsed_s=0.0).fraction == 0.0


# --------------------------------------------------------------------------- installable without torch

BLOCKER = textwrap.dedent(
    """
    import sys

    class Block:
        BLOCKED = ("torch", "diffusers", "transformers", "onnxruntime", "onnx", "scipy")

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ImportError(f"blocked import of {name}")

    sys.meta_path.insert(0, Block())
    import sd_triton.client
    import sd_triton.client.cli
    from sd_triton.client import AsyncClient, Client

    Client("127.0.0.1:1").close()
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in Block.BLOCKED)
    assert not heavy, heavy
    print("ok")
    """
)


def test_client_imports_without_torch_or_diffusers():
    env = dict(os.environ, PYTHONPATH="")
    out = subprocess.run(
        [sys.executable, "-c", BLOCKER], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# --------------------------------------------------------------------------- one core, two transports


def public_methods(cls) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(getattr(cls, name))
        for name in dir(cls)
        if not name.startswith("_") and callable(getattr(cls, name))
    }


def test_async_client_mirrors_every_method_of_the_client():
    sync, aio = public_methods(Client), public_methods(AsyncClient)
    assert set(aio) == set(sync)
    assert {"img2img", "inpaint", "outpaint", "load_model", "unload_model"} <= set(aio)
    for name, signature in sync.items():
        assert list(aio[name].parameters.values()) == list(signature.parameters.values()), name
    assert inspect.signature(AsyncClient) == inspect.signature(Client)


# --------------------------------------------------------------------------- retries and deadlines


def call_with_fake_infer(cls, error_status: str, *, timeout_s: float | None, **options):
    """Run ``generate`` on ``cls`` whose every attempt fails with ``error_status``.

    Returns (the error raised, each attempt's client_timeout, seconds the call took).
    """
    timeouts: list[float | None] = []

    def infer(model, inputs, **kwargs):
        timeouts.append(kwargs["client_timeout"])
        raise InferenceServerException("refused", status=error_status)

    async def ainfer(model, inputs, **kwargs):
        return infer(model, inputs, **kwargs)

    async def run_async():
        async with AsyncClient("127.0.0.1:1", **options) as client:
            client._client.infer = ainfer
            return await client.generate("a cat", scheduler="ddim", timeout_s=timeout_s)

    t0 = time.monotonic()
    with pytest.raises(SDTritonError) as info:
        if cls is Client:
            with Client("127.0.0.1:1", **options) as client:
                client._client.infer = infer
                client.generate("a cat", scheduler="ddim", timeout_s=timeout_s)
        else:
            asyncio.run(run_async())
    return info.value, timeouts, time.monotonic() - t0


@pytest.mark.parametrize("cls", [Client, AsyncClient])
@pytest.mark.parametrize(
    "status",
    [
        "StatusCode.NOT_FOUND",
        "StatusCode.RESOURCE_EXHAUSTED",
        "StatusCode.INTERNAL",
        "StatusCode.INVALID_ARGUMENT",
        "StatusCode.DEADLINE_EXCEEDED",
    ],
)
def test_only_unavailable_is_retried(cls, status):
    error, timeouts, _ = call_with_fake_infer(
        cls, status, timeout_s=None, retries=3, backoff_s=0.01
    )
    assert error.status == status
    assert len(timeouts) == 1, f"{status} was sent {len(timeouts)} times"
    error, timeouts, _ = call_with_fake_infer(
        cls, "StatusCode.UNAVAILABLE", timeout_s=None, retries=3, backoff_s=0.01
    )
    assert isinstance(error, UnavailableError) and len(timeouts) == 4


@pytest.mark.parametrize("cls", [Client, AsyncClient])
def test_timeout_s_bounds_all_attempts_and_backoff_together(cls):
    limit = 0.8
    error, timeouts, took = call_with_fake_infer(
        cls,
        "StatusCode.UNAVAILABLE",
        timeout_s=limit,
        retries=100,
        backoff_s=0.1,
        max_backoff_s=0.1,
    )
    assert isinstance(error, UnavailableError)
    assert took <= limit + 0.3, f"the call took {took:.2f} s with timeout_s={limit}"
    assert 2 <= len(timeouts) < 100
    # Each attempt gets the time left, which shrinks by at least the wait before it.
    assert timeouts[0] <= limit
    assert all(
        later <= earlier - 0.04 for earlier, later in zip(timeouts, timeouts[1:], strict=False)
    )


def test_a_retry_whose_wait_would_pass_the_deadline_is_not_made():
    error, timeouts, took = call_with_fake_infer(
        Client, "StatusCode.UNAVAILABLE", timeout_s=1.0, retries=3, backoff_s=5.0
    )
    assert isinstance(error, UnavailableError) and len(timeouts) == 1 and took < 1.0


def test_a_load_on_a_server_without_model_control_says_how_to_start_one():
    """tritonserver 2.51 started with model control none answers a load with the words below
    (measured with `make serve` and an admin key): the client adds what to do about it."""
    from sd_triton.client import Client, UnavailableError

    refused = UnavailableError(
        "127.0.0.1:1: explicit model load / unload is not allowed if polling is enabled",
        status="StatusCode.UNAVAILABLE",
    )
    with Client("127.0.0.1:1", admin_key="k" * 16) as client:
        error = client._admin_error(refused)
        other = client._admin_error(UnavailableError("unknown model", status="x"))
    assert type(error) is UnavailableError and error.status == "StatusCode.UNAVAILABLE"
    assert str(error).startswith(refused.message + " (this server loads its models once")
    assert "sd-triton-server --model-control explicit" in str(error)
    assert str(other) == "unknown model"
