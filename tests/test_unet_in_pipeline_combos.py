"""The UNet in the pipeline's process (``--unet-in-pipeline``) with what else users send.

The in-process UNet serves only the plain UNet's steps; ControlNet's steps go by BLS to
the controlled UNet (``unet_controlled``) and the refiner's to its own UNet
(``refiner_unet``). On conftest's shared explicit-control server (``serve_extras``):

- the tiny SD 1.x with one ControlNet, in-pipeline (``ipcn_``, the session export's ONNX
  files, the ControlNet and the controlled UNet traced): a ControlNet request equals
  diffusers' ``StableDiffusionControlNetPipeline`` and a plain request on the same
  pipeline ``StableDiffusionPipeline``, within one uint8 level; the pipeline's
  ``sd_unet_*`` metrics count the plain request's steps and none of the ControlNet
  request's, Triton's statistics of ``ipcn_unet_controlled`` the reverse; a ControlNet
  window over half the steps splits them between the two, and equals diffusers too;
- the tiny SDXL base with its refiner, in-pipeline (``ipxr_``, the families repository's
  ONNX files, only the models such a request calls loaded): ``refiner_switch_at`` equals
  diffusers' base (``denoising_end``, latents out) then refiner (``denoising_start``)
  with one generator; the base's steps ran in-process, the refiner's by BLS (Triton's
  statistics of ``ipxr_refiner_unet``), together every step once.
"""

from __future__ import annotations

import shutil

import numpy as np
import PIL.Image
import pytest
import torch
import tritonclient.grpc as grpcclient
from helpers import (
    REFERENCE_SCHEDULERS,
    control_image,
    make_controlnet,
    max_diff,
    reference,
    served_generate,
)
from polling import metric, scrape

from sd_triton.export import Contents, ExportOptions, Hosting, Naming, export_repository

CN_PREFIX = "ipcn_"
CN_MODEL = f"{CN_PREFIX}stable_diffusion"
CONTROLLED = f"{CN_PREFIX}unet_controlled"
XR_PREFIX = "ipxr_"
XL_PREFIX = "xl_"  # the families repository's SDXL base with its refiner
XR_MODEL = f"{XR_PREFIX}stable_diffusion"
REFINER_UNET = f"{XR_PREFIX}refiner_unet"

HEIGHT, WIDTH = 32, 48


def unet_metrics(metrics_url: str, model: str) -> np.ndarray:
    """(executions, requests, samples) of ``model``'s in-process UNet so far."""
    text = scrape(metrics_url)
    names = ("sd_unet_executions_total", "sd_unet_requests_total", "sd_unet_samples_total")
    return np.array([metric(text, name, model=model) for name in names])


def successes(server, model: str) -> int:
    """Requests ``model`` has answered (Triton's statistics, every version)."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        stats = client.get_inference_statistics(
            model, headers=server.grpc_admin_headers, as_json=True
        )
    finally:
        client.close()
    return sum(
        int(s.get("inference_stats", {}).get("success", {}).get("count", 0))
        for s in stats["model_stats"]
    )


@pytest.fixture(scope="module")
def metrics_url(extras_server):
    return extras_server.metrics_url


# ---------------------------------------------------------------------------
# SD 1.x with a ControlNet


# The tiny VAE's images are 2x its latents: one downsampling in the control image embedding.


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory, tiny_checkpoint):
    """A tiny ControlNet from the tiny UNet (as tests/test_controlnet.py makes them)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_checkpoint / "unet")
    path = tmp_path_factory.mktemp("ipcn-controlnet") / "canny"
    make_controlnet(unet, 0, path)
    return path


@pytest.fixture(scope="module")
def cn_url(extras_server, serve_extras, tiny_checkpoint, tiny_repository, copy_onnx_export,
           controlnet_dir):  # fmt: skip
    options = ExportOptions(
        contents=Contents(stream_model=False, safety_checker=False),
        hosting=Hosting(unet_in_pipeline=True),
        naming=Naming(model_prefix=CN_PREFIX),
    )
    path = extras_server.repository
    with pytest.MonkeyPatch.context() as mp:
        copy_onnx_export(mp, tiny_repository)  # the base components; the ControlNet's traced
        export_repository(
            tiny_checkpoint, path, options, overwrite=True, controlnets={"canny": controlnet_dir}
        )
    assert not (path / f"{CN_PREFIX}unet").exists()
    assert (path / CN_MODEL / "1" / "unet" / "model.onnx").is_file()
    assert (path / CONTROLLED).is_dir() and (path / f"{CN_PREFIX}controlnet_canny").is_dir()
    with serve_extras(CN_PREFIX) as url:
        yield url


@pytest.fixture(scope="module")
def sd_pipes(tiny_checkpoint, controlnet_dir):
    """diffusers' plain and ControlNet pipelines on the tiny SD 1.x (no safety checker)."""
    from diffusers import (
        ControlNetModel,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
    )

    base = StableDiffusionPipeline.from_pretrained(
        tiny_checkpoint, safety_checker=None, requires_safety_checker=False
    )
    base.set_progress_bar_config(disable=True)
    components = {k: v for k, v in base.components.items() if k != "image_encoder"}
    controlled = StableDiffusionControlNetPipeline(
        **components, controlnet=ControlNetModel.from_pretrained(controlnet_dir)
    )
    controlled.set_progress_bar_config(disable=True)
    return base, controlled


CN_SETTINGS = {
    "prompt": "a house by a lake",
    "negative_prompt": "blurry",
    "guidance_scale": 7.5,
    "height": HEIGHT,
    "width": WIDTH,
    "num_inference_steps": 4,
}


def test_controlnet_and_plain_requests_on_one_in_pipeline_model(
    cn_url, extras_server, metrics_url, sd_pipes
):
    base, controlled = sd_pipes
    steps = CN_SETTINGS["num_inference_steps"]
    image = control_image(5)

    # ControlNet: every step by BLS to the controlled UNet (one guided call of 2 rows each).
    before, calls = unet_metrics(metrics_url, CN_MODEL), successes(extras_server, CONTROLLED)
    got, _, _ = served_generate(
        cn_url, model=CN_MODEL, scheduler="euler", seed=7, **CN_SETTINGS,
        controlnet=np.array([b"canny"], dtype=object), control_image=image[None],
    )  # fmt: skip
    assert (unet_metrics(metrics_url, CN_MODEL) - before).tolist() == [0, 0, 0]
    assert successes(extras_server, CONTROLLED) - calls == steps
    want, _ = reference(controlled, "euler", 7, image=PIL.Image.fromarray(image), **CN_SETTINGS)
    assert got.shape == want.shape == (1, HEIGHT, WIDTH, 3)
    assert max_diff(got, want) <= 1

    # Plain, on the same pipeline: every step in its process, none to the controlled UNet.
    before, calls = unet_metrics(metrics_url, CN_MODEL), successes(extras_server, CONTROLLED)
    plain, _, _ = served_generate(cn_url, model=CN_MODEL, scheduler="euler", seed=7, **CN_SETTINGS)
    executions, requests, samples = unet_metrics(metrics_url, CN_MODEL) - before
    assert executions == requests == steps and samples == 2 * steps
    assert successes(extras_server, CONTROLLED) == calls
    want, _ = reference(base, "euler", 7, **CN_SETTINGS)
    assert max_diff(plain, want) <= 1
    # Not vacuous: the ControlNet changes the image.
    assert max_diff(plain, got) > 8

    # A window over the first half: its steps by BLS, the rest in the pipeline's process.
    before, calls = unet_metrics(metrics_url, CN_MODEL), successes(extras_server, CONTROLLED)
    half, _, _ = served_generate(
        cn_url, model=CN_MODEL, scheduler="euler", seed=7, **CN_SETTINGS,
        controlnet=np.array([b"canny"], dtype=object), control_image=image[None],
        control_guidance_end=np.array([0.5], np.float32),
    )  # fmt: skip
    executions, requests, _ = unet_metrics(metrics_url, CN_MODEL) - before
    assert executions == requests == steps // 2
    assert successes(extras_server, CONTROLLED) - calls == steps // 2
    want, _ = reference(
        controlled, "euler", 7, image=PIL.Image.fromarray(image), control_guidance_end=0.5,
        **CN_SETTINGS,
    )  # fmt: skip
    assert max_diff(half, want) <= 1
    assert min(max_diff(half, got), max_diff(half, plain)) > 1


# ---------------------------------------------------------------------------
# SDXL base + refiner


# What a request with refiner_switch_at calls by BLS (the base's UNet is in the pipeline; the
# refiner's stage encodes its prompt with its own text encoder and decodes the image).
XR_LOADED = [
    "text_encoder",
    "text_encoder_2",
    "refiner_text_encoder_2",
    "refiner_unet",
    "refiner_vae_decoder",
]


@pytest.fixture(scope="module")
def xr_url(extras_server, serve_extras, family_checkpoints, families_repository):
    """The tiny SDXL base with its refiner, in-pipeline (``ipxr_``): the ONNX files of the
    families repository's ``xl_`` export (the same checkpoints), no tracing."""
    from sd_triton.export import component_models as CM

    def copy(component, modules, sizes, trace_sizes, dtype, version_dir, opts):
        model = XL_PREFIX + version_dir.parent.name.removeprefix(XR_PREFIX)
        version_dir.mkdir(parents=True, exist_ok=True)
        onnx = version_dir / CM.ONNX_NAME
        shutil.copyfile(families_repository / model / "1" / CM.ONNX_NAME, onnx)
        return onnx

    options = ExportOptions(
        contents=Contents(stream_model=False, refiner=family_checkpoints["tiny-sdxl-refiner"]),
        hosting=Hosting(unet_in_pipeline=True),
        naming=Naming(model_prefix=XR_PREFIX),
    )
    path = extras_server.repository
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CM, "_export_onnx", copy)
        export_repository(family_checkpoints["tiny-sdxl"], path, options, overwrite=True)
    assert not (path / f"{XR_PREFIX}unet").exists()
    assert (path / XR_MODEL / "1" / "unet" / "model.onnx").is_file()
    assert (path / REFINER_UNET / "1" / "model.onnx").is_file()
    with serve_extras(XR_PREFIX, only=[XR_MODEL, *(XR_PREFIX + n for n in XR_LOADED)]) as url:
        yield url


XR_SETTINGS = {
    "prompt": "a red cube",
    "negative_prompt": "blurry",
    "height": HEIGHT,
    "width": WIDTH,
    "num_inference_steps": 8,
    "guidance_scale": 5.0,
}
SWITCH = 0.7


def ensemble(xl_pipes, scheduler: str, seed: int, switch: float, **settings) -> np.ndarray:
    """diffusers' base(denoising_end) -> latents -> refiner(denoising_start), one generator."""
    import diffusers

    cls_name, overrides = REFERENCE_SCHEDULERS[scheduler]
    generator = torch.Generator().manual_seed(seed)
    pipes = (xl_pipes.base, xl_pipes.refiner)
    originals = [p.scheduler for p in pipes]
    for pipe, original in zip(pipes, originals, strict=True):
        pipe.scheduler = getattr(diffusers, cls_name).from_config(original.config, **overrides)
    try:
        latents = xl_pipes.base(
            generator=generator, denoising_end=switch, output_type="latent", **settings
        ).images
        settings = {k: v for k, v in settings.items() if k not in ("height", "width")}
        out = xl_pipes.refiner(
            generator=generator, image=latents, denoising_start=switch, output_type="np",
            **settings,
        ).images  # fmt: skip
    finally:
        for pipe, original in zip(pipes, originals, strict=True):
            pipe.scheduler = original
    return (out * 255).round().astype(np.uint8)


def test_sdxl_base_in_process_then_refiner_by_bls_equals_diffusers(
    xr_url, extras_server, metrics_url, xl_pipes
):
    steps = XR_SETTINGS["num_inference_steps"]
    before = unet_metrics(metrics_url, XR_MODEL)
    calls = successes(extras_server, REFINER_UNET)
    images, _, _ = served_generate(
        xr_url, model=XR_MODEL, scheduler="euler_a", seed=9, refiner_switch_at=SWITCH,
        **XR_SETTINGS,
    )  # fmt: skip
    executions, requests, samples = unet_metrics(metrics_url, XR_MODEL) - before
    refined = successes(extras_server, REFINER_UNET) - calls
    # The base's steps in the pipeline's process (one guided run of 2 rows each), the
    # refiner's by BLS; every step once (euler_a: one UNet call per step).
    assert executions == requests and samples == 2 * requests
    assert requests > 0 and refined > 0 and requests + refined == steps, (requests, refined)
    expected = ensemble(xl_pipes, "euler_a", 9, SWITCH, **XR_SETTINGS)
    assert images.shape == expected.shape == (1, HEIGHT, WIDTH, 3)
    assert max_diff(images, expected) <= 1
