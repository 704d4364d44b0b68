"""ControlNet served end to end (issue 16 items 1-2-3) == diffusers' StableDiffusionControlNetPipeline.

Two tiny ControlNets are made from the tiny SD 1.x UNet with
``ControlNetModel.from_unet`` (their zero-initialised output convolutions get
random weights, or every residual would be 0 and nothing here could fail),
saved as diffusers folders and exported beside the tiny model with
``export_repository(..., controlnets=...)`` (what ``sd-triton-export
--controlnet NAME=DIR`` calls) into a private repository served by its own
tritonserver, with the tiny SDXL, its ControlNet and the tiny refiner (``xl_``). Served
images equal diffusers' within one uint8 level: one and two ControlNets, conditioning
scales, guidance start/end, guess mode, two samplers; SDXL, also with the refiner after
the ControlNet base (text-to-image and inpainting); img2img and
inpainting (SD 1.x and SDXL, two samplers each, diffusers' default scales and
strengths); requests with and without ControlNet sent together equal
themselves sent alone; bad inputs are INVALID_ARG with a sentence.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import pytest
from helpers import (
    bad_request_error,
    control_image,
    make_controlnet,
    max_diff,
    reference,
    served_generate,
)

from sd_triton.client.control import canny
from sd_triton.export import ExportOptions, export_repository
from sd_triton.export import controlnet as CN
from sd_triton.export import triton_config as T
from sd_triton.export.checkpoint import ExportError
from sd_triton.export.options import Contents, Hosting, Naming
from sd_triton.server import TritonServer

NAMES = ("canny", "depth")
# The tiny VAE's images are 2x its latents: one downsampling in the control image embedding.
HEIGHT, WIDTH = 32, 48
BASE = {"prompt": "a house by a lake", "negative_prompt": "blurry", "guidance_scale": 7.5}


@pytest.fixture(scope="module")
def controlnet_dirs(tmp_path_factory, tiny_checkpoint) -> dict[str, object]:
    """Two tiny ControlNets (diffusers folders) made from the tiny UNet."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("controlnets")
    unet = UNet2DConditionModel.from_pretrained(tiny_checkpoint / "unet")
    for seed, name in enumerate(NAMES):
        make_controlnet(unet, seed, root / name)
    return {name: root / name for name in NAMES}


@pytest.fixture(scope="module")
def tiny_sdxl(build_dir, tmp_path_factory):
    """The tiny SDXL base and a ControlNet made from its UNet."""
    import subprocess
    import sys

    from diffusers import UNet2DConditionModel

    path = build_dir / "tiny-sdxl"
    if not (path / "model_index.json").exists():
        tiny = [sys.executable, "-m", "sd_triton.export.tiny", str(path), "--family", "sdxl"]
        subprocess.run(tiny, check=True)
    controlnet = tmp_path_factory.mktemp("controlnet-xl") / "canny"
    make_controlnet(UNet2DConditionModel.from_pretrained(path / "unet"), 7, controlnet)
    return path, controlnet


@pytest.fixture(scope="module")
def depth_file(controlnet_dirs, tmp_path_factory):
    """The ``depth`` ControlNet as a single file in lllyasviel's layout (what the web UI's
    users have): exported from it, the served ``depth`` is the folder's byte for byte
    (test_controlnet_export.py), and the model publishes the file's hash."""
    from diffusers import ControlNetModel
    from original_layout import controlnet_original_layout
    from safetensors.torch import save_file

    model = ControlNetModel.from_pretrained(controlnet_dirs["depth"])
    path = tmp_path_factory.mktemp("controlnet-file") / "control_tiny_depth.safetensors"
    save_file(controlnet_original_layout(model.state_dict(), dict(model.config)), path)
    return path


@pytest.fixture(scope="module")
def repository(
    tmp_path_factory, tiny_checkpoint, controlnet_dirs, depth_file, tiny_sdxl, family_checkpoints
):
    """The tiny SD 1.x with two ControlNets (``depth`` from a single file), and the tiny
    SDXL (``xl_``) with one and the tiny refiner beside it."""
    root = tmp_path_factory.mktemp("controlnet-repo") / "repo"
    options = ExportOptions(Contents(stream_model=False, safety_checker=False))
    sources = {
        "canny": controlnet_dirs["canny"],
        "depth": CN.ControlNetSource(depth_file, config=controlnet_dirs["depth"]),
    }
    export_repository(tiny_checkpoint, root, options, controlnets=sources)
    refiner = family_checkpoints["tiny-sdxl-refiner"]
    xl = ExportOptions(
        Contents(stream_model=False, refiner=refiner), naming=Naming(model_prefix="xl_")
    )
    export_repository(tiny_sdxl[0], root, xl, controlnets={"canny": tiny_sdxl[1]})
    return root


@pytest.fixture(scope="module")
def url(repository):
    with TritonServer(repository).start(timeout_s=300) as server:
        yield server.grpc_url


@pytest.fixture(scope="module")
def pipes(tiny_checkpoint, controlnet_dirs):
    """``pipes(names)``: diffusers' ControlNet pipeline with those ControlNets."""
    from diffusers import (
        ControlNetModel,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
    )

    base = StableDiffusionPipeline.from_pretrained(
        tiny_checkpoint, safety_checker=None, requires_safety_checker=False
    )
    models = {n: ControlNetModel.from_pretrained(d) for n, d in controlnet_dirs.items()}

    def make(names: tuple[str, ...]):
        nets = [models[n] for n in names]
        components = {k: v for k, v in base.components.items() if k != "image_encoder"}
        pipe = StableDiffusionControlNetPipeline(
            **components, controlnet=nets[0] if len(nets) == 1 else nets
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


def served(url: str, names, images, seed: int, **settings):
    """(images, flags) of the served pipeline with ControlNets ``names`` on ``images``."""
    extra = {}
    if names:
        extra["controlnet"] = np.array([n.encode() for n in names], dtype=object)
        extra["control_image"] = np.stack(images)
    for key in ("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end"):
        if key in settings:
            settings[key] = np.asarray(settings[key], np.float32)
    settings = {k: v for k, v in settings.items() if v is not None}
    out, flags, _ = served_generate(url, seed=seed, **extra, **settings)
    return out, flags


def expected(pipes, names, images, seed: int, scheduler=None, **settings):
    """diffusers' images with the same settings (lists when several ControlNets)."""
    pils = [PIL.Image.fromarray(i) for i in images]
    for key in ("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end"):
        if key in settings and len(names) == 1:
            settings[key] = settings[key][0]
    image = pils[0] if len(names) == 1 else pils
    return reference(pipes(tuple(names)), scheduler, seed, image=image, **settings)


# (ControlNets, scheduler, settings)
CASES = {
    "one": (("canny",), None, {"num_images_per_prompt": 2, "num_inference_steps": 3}),
    "two_scales_windows_euler_a": (
        ("canny", "depth"),
        "euler_a",
        {
            "num_inference_steps": 5,
            "controlnet_conditioning_scale": [0.7, 1.3],
            "control_guidance_start": [0.0, 0.4],
            "control_guidance_end": [0.6, 1.0],
        },
    ),
    "guess_mode": (
        ("depth",),
        "euler_a",
        {"num_inference_steps": 3, "guess_mode": True, "controlnet_conditioning_scale": [0.8]},
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_served_equals_diffusers(url, pipes, case):
    names, scheduler, settings = CASES[case]
    images = [control_image(5 + i) for i in range(len(names))]
    common = {**BASE, "height": HEIGHT, "width": WIDTH}
    got, _ = served(url, names, images, 7, scheduler=scheduler, **common, **dict(settings))
    want, _ = expected(pipes, names, images, 7, scheduler, **common, **dict(settings))
    assert got.shape == want.shape
    assert max_diff(got, want) <= 1
    # Not vacuous: the ControlNets change the image.
    steps = {
        k: v for k, v in settings.items() if k in ("num_inference_steps", "num_images_per_prompt")
    }
    plain, _ = served(url, (), [], 7, scheduler=scheduler, **common, **steps)
    assert max_diff(plain, got) > 8


def test_controlnets_kept_off_change_nothing(url):
    """A window that never covers a step and a zero scale: the plain UNet's image."""
    common = {**BASE, "height": HEIGHT, "width": WIDTH, "num_inference_steps": 3}
    plain, _ = served(url, (), [], 3, **common)
    images = [control_image(1), control_image(2)]
    off = {"controlnet_conditioning_scale": [0.0, 1.0], "control_guidance_start": [0.0, 0.99]}
    got, _ = served(url, NAMES, images, 3, **common, **off)
    assert max_diff(plain, got) == 0


def test_concurrent_requests_equal_themselves_alone(url):
    """Requests with and without ControlNet at once (their UNet calls batch where they can)."""
    common = {**BASE, "height": HEIGHT, "width": WIDTH, "num_inference_steps": 3}
    requests = [
        ((), [], 11),
        (("canny",), [control_image(8)], 12),
        (NAMES, [control_image(9), control_image(10)], 13),
        ((), [], 14),
    ]
    alone = [served(url, n, i, s, **common)[0] for n, i, s in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(served, url, n, i, s, **common) for n, i, s in requests]
        together = [f.result()[0] for f in futures]
    for a, b in zip(alone, together, strict=True):
        assert max_diff(a, b) == 0


def test_pipeline_json_and_models(repository):
    import json

    record = json.loads(
        next(repository.glob("stable_diffusion/1/assets/pipeline.json")).read_text()
    )
    assert record["controlnets"] == {n: f"controlnet_{n}" for n in NAMES}
    assert record["controlnet_residuals"] == 7  # conv_in, 2 resnets, downsampler, 2; mid
    for model in ("controlnet_canny", "controlnet_depth", "unet_controlled", "unet"):
        config = T.read_config(repository / model / T.CONFIG_NAME)
        assert config.name == model and config.HasField("dynamic_batching")


# ---------------------------------------------------------------------------
# Bad input


def _bad(url: str, **inputs) -> str:
    return str(bad_request_error(url, {"height": HEIGHT, "width": WIDTH, **inputs}))


def _names(*names: str) -> np.ndarray:
    return np.array([n.encode() for n in names], dtype=object)


def test_bad_inputs_are_invalid_arg(url):
    one = control_image(0)[None]
    error = _bad(url, controlnet=_names("pose"), control_image=one)
    assert "INVALID_ARG" in error or "StatusCode.INVALID_ARGUMENT" in error
    assert "no ControlNet 'pose' in this repository; it has canny, depth" in error
    error = _bad(url, controlnet=_names("canny"), control_image=control_image(0, 32, 32)[None])
    assert "control_image is 32x32 (height x width), the output 32x48" in error
    error = _bad(url, controlnet=_names("canny", "depth"), control_image=one)
    assert "controlnet names 2 ControlNet(s) but control_image has 1" in error
    error = _bad(
        url,
        controlnet=_names("canny"),
        control_image=one,
        control_guidance_start=np.array([0.5], np.float32),
        control_guidance_end=np.array([0.5], np.float32),
    )
    assert "need 0 <= start < end <= 1" in error
    error = _bad(
        url,
        controlnet=_names("canny"),
        control_image=one,
        controlnet_conditioning_scale=np.array([1.0, 0.5, 0.2], np.float32),
        control_guidance_end=np.array([1.0, 0.5], np.float32),
    )
    assert (
        "controlnet names 1 ControlNet(s) but controlnet_conditioning_scale has 3, "
        "control_guidance_end has 2" in error
    )
    nan = np.array([np.nan], np.float32)
    error = _bad(
        url, controlnet=_names("canny"), control_image=one, controlnet_conditioning_scale=nan
    )
    assert "controlnet_conditioning_scale must be finite, got [nan]" in error
    error = _bad(url, control_image=one)
    assert "control_image given without controlnet" in error
    error = _bad(url, guess_mode=True)
    assert "guess_mode given without controlnet" in error


def test_export_refuses_what_it_cannot_do(tmp_path, tiny_checkpoint, controlnet_dirs):
    with pytest.raises(ExportError, match="--controlnet name 'Canny!'"):
        export_repository(tiny_checkpoint, tmp_path / "a", controlnets={"Canny!": tmp_path})
    with pytest.raises(ExportError, match="not a diffusers ControlNet folder"):
        export_repository(tiny_checkpoint, tmp_path / "b", controlnets={"canny": tmp_path})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # Every precision and host goes (tests/test_controlnet_hosts.py exports them).
    fp16 = ExportOptions(Contents(precision="fp16"), hosting=Hosting(host="torch"))
    assert CN.check_request(controlnet_dirs, fp16) is None
    assert CN.check_request({}, fp16) is None


def test_export_command_line_takes_controlnet(tmp_path, tiny_checkpoint, capsys):
    from sd_triton.export import cli as export_cli

    argv = [str(tiny_checkpoint), str(tmp_path / "out"), "--controlnet", f"Edges={tmp_path}"]
    assert export_cli.main(argv) == 2
    assert "--controlnet name 'Edges'" in capsys.readouterr().err
    argv[-1] = f"edges={tmp_path}"
    assert export_cli.main(argv) == 2
    assert f"--controlnet edges={tmp_path}: not a diffusers ControlNet folder" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# The client: canny, and sd-triton generate --control


def photo() -> np.ndarray:
    """A grey image with a white rectangle: edges on its border only."""
    image = np.full((HEIGHT, WIDTH, 3), 60, np.uint8)
    image[8:24, 12:36] = 230
    return image


def test_canny_finds_the_edges():
    edges = canny(photo())
    assert edges.shape == (HEIGHT, WIDTH, 3) and edges.dtype == np.uint8
    assert set(np.unique(edges)) == {0, 255}
    assert (edges[..., 0] == edges[..., 2]).all()  # one channel, repeated to RGB
    on = edges[..., 0] > 0
    assert on[8:24, 11:13].any() and on[8:24, 35:37].any() and on[7:9, 12:36].any()
    assert not on[12:20, 16:32].any() and not on[:4].any()  # flat regions: no edges
    # The thresholds count: a faint step is an edge at 10/20, not at 100/200.
    faint = np.full((HEIGHT, WIDTH, 3), 100, np.uint8)
    faint[:, WIDTH // 2 :] = 112
    assert canny(faint, 10, 20).any() and not canny(faint).any()


def test_cli_control_reaches_the_server(url, tmp_path, depth_file):
    import hashlib

    from sd_triton.client import cli, read_infotext

    PIL.Image.fromarray(photo()).save(tmp_path / "photo.png")
    PIL.Image.fromarray(control_image(4)).save(tmp_path / "map.png")
    out = tmp_path / "out.png"
    argv = ["generate", BASE["prompt"], "-o", str(out), "--url", url, "--no-progress"]
    argv += ["--size", f"{WIDTH}x{HEIGHT}", "--steps", "3", "--seed", "21"]
    argv += ["--control", f"canny:canny:{tmp_path / 'photo.png'}", "--control-scale", "0.9"]
    argv += ["--control", f"depth:{tmp_path / 'map.png'}", "--control-scale", "1.1"]
    assert cli.main(argv) == cli.EXIT_OK
    got = np.asarray(PIL.Image.open(out).convert("RGB"))
    images = [canny(photo()), control_image(4)]
    want, _ = served(
        url, NAMES, images, 21, prompt=BASE["prompt"], height=HEIGHT, width=WIDTH,
        num_inference_steps=3, controlnet_conditioning_scale=[0.9, 1.1],
    )  # fmt: skip
    assert max_diff(got, want[0]) == 0
    # The PNG names each unit as the web UI's extension does, the single file by its hash.
    text = read_infotext(out)
    digest = hashlib.sha256(depth_file.read_bytes()).hexdigest()[:10]
    assert 'ControlNet 0: "Module: canny, Model: canny, Weight: 0.9,' in text
    assert f'ControlNet 1: "Module: none, Model: depth [{digest}], Weight: 1.1,' in text
    with pytest.raises(SystemExit) as e:  # argparse's usage error, exit 2
        cli.main([*argv, "--control", "pose"])
    assert e.value.code == 2


# ---------------------------------------------------------------------------
# img2img and inpainting with ControlNet: diffusers' ControlNet img2img / inpaint pipelines,
# SD 1.x and SDXL, a deterministic and an ancestral sampler each

EDIT_PIPELINES = {
    ("sd", "img2img"): "StableDiffusionControlNetImg2ImgPipeline",
    ("sd", "inpaint"): "StableDiffusionControlNetInpaintPipeline",
    ("xl", "img2img"): "StableDiffusionXLControlNetImg2ImgPipeline",
    ("xl", "inpaint"): "StableDiffusionXLControlNetInpaintPipeline",
}
# (family, mode, scheduler, settings). Strength 0.7 is not exact in binary: at 10 steps
# diffusers runs int(10 * 0.7) = 7 of them, a float32 0.7 would run 6. No scale sent but
# in one case: the served default is diffusers' default for the family and mode.
EDIT_CASES = {
    "img2img": ("sd", "img2img", None, {"strength": 0.7, "num_inference_steps": 4}),
    "img2img_euler_a_scale": (
        "sd",
        "img2img",
        "euler_a",
        {"strength": 0.7, "num_inference_steps": 4, "controlnet_conditioning_scale": [1.2]},
    ),
    "inpaint_euler_a": ("sd", "inpaint", "euler_a", {"strength": 1.0, "num_inference_steps": 3}),
    "inpaint_dpmpp_2m": ("sd", "inpaint", "dpmpp_2m", {"strength": 0.7, "num_inference_steps": 4}),
    "xl_img2img_euler": ("xl", "img2img", "euler", {"strength": 0.7, "num_inference_steps": 10}),
    # No strength: diffusers' SDXL ControlNet img2img default, 0.8 (SDXL img2img's is 0.3).
    "xl_img2img_euler_a": ("xl", "img2img", "euler_a", {"num_inference_steps": 4}),
    "xl_inpaint_euler": ("xl", "inpaint", "euler", {"strength": 0.7, "num_inference_steps": 4}),
    "xl_inpaint_euler_a": ("xl", "inpaint", "euler_a", {"strength": 0.7, "num_inference_steps": 4}),
}


@pytest.mark.parametrize("case", EDIT_CASES)
def test_edits_with_controlnet_equal_diffusers(url, pipes, xl_pipe, case):
    import diffusers
    from helpers import source_image, source_mask

    from sd_pipeline.request import DEFAULT_CONTROLNET_SCALE

    family, mode, scheduler, settings = EDIT_CASES[case]
    inputs = {"image": source_image(HEIGHT, WIDTH)}
    if mode == "inpaint":
        inputs["mask_image"] = source_mask(HEIGHT, WIDTH)
    control = control_image(6)
    model = "xl_stable_diffusion" if family == "xl" else "stable_diffusion"
    request = {**BASE, **inputs, "scheduler": scheduler, "model": model}
    got, _ = served(url, ("canny",), [control], 9, **request, **settings)
    base = xl_pipe if family == "xl" else pipes(("canny",))
    pipe = getattr(diffusers, EDIT_PIPELINES[family, mode])(**base.components)
    pipe.set_progress_bar_config(disable=True)
    pils = {k: PIL.Image.fromarray(v) for k, v in inputs.items()}
    steps = {k: v for k, v in settings.items() if k != "controlnet_conditioning_scale"}
    scale = settings.get("controlnet_conditioning_scale")
    scales = {} if scale is None else {"controlnet_conditioning_scale": scale[0]}
    want, _ = reference(
        pipe, scheduler, 9, **pils, control_image=PIL.Image.fromarray(control),
        height=HEIGHT, width=WIDTH, **BASE, **steps, **scales,
    )  # fmt: skip
    assert max_diff(got, want) <= 1
    # Not vacuous: the ControlNet changes the image, and so would another default scale.
    plain, _ = served(url, (), [], 9, **request, **steps)
    assert max_diff(plain, got) > 8
    default = DEFAULT_CONTROLNET_SCALE[family == "xl", mode]
    if scale is None and default != 1.0:
        full = {**steps, "controlnet_conditioning_scale": [1.0]}
        unscaled, _ = served(url, ("canny",), [control], 9, **request, **full)
        assert max_diff(unscaled, got) > 1


def test_defaults_are_diffusers():
    """The default controlnet_conditioning_scale per family and mode, and the default strength
    with ControlNet: diffusers' ControlNet pipelines'."""
    import inspect

    import diffusers

    from sd_pipeline.request import DEFAULT_CONTROLNET_SCALE, default_strength

    def default(name: str, argument: str):
        call = getattr(diffusers, name).__call__
        return inspect.signature(call).parameters[argument].default

    pipelines = {
        ("sd", "txt2img"): "StableDiffusionControlNetPipeline",
        ("xl", "txt2img"): "StableDiffusionXLControlNetPipeline",
        **EDIT_PIPELINES,
    }
    for (family, mode), name in pipelines.items():
        scale = default(name, "controlnet_conditioning_scale")
        assert DEFAULT_CONTROLNET_SCALE[family == "xl", mode] == scale, name
    assert len(DEFAULT_CONTROLNET_SCALE) == len(pipelines)
    for (family, mode), name in EDIT_PIPELINES.items():
        strength = default(name, "strength")
        assert default_strength(family == "xl", mode == "inpaint", True) == strength, name


def test_in_process_over_diffusers_modules_is_bit_exact(repository, pipes):
    """The loop over DiffusersComponents (the ControlNet modules themselves) == diffusers."""
    import torch

    from sd_pipeline import Assets, DiffusersComponents, generate, make_request

    assets = Assets.load(repository / "stable_diffusion" / "1" / "assets")
    pipe = pipes(NAMES)
    nets = dict(zip(("controlnet_canny", "controlnet_depth"), pipe.controlnet.nets, strict=True))
    components = DiffusersComponents.from_pipeline(pipe)
    components.controlnets = nets
    images = [control_image(3), control_image(4)]
    settings = {
        "num_inference_steps": 3,
        "controlnet_conditioning_scale": [0.5, 1.5],
        "control_guidance_end": [1.0, 0.5],
    }
    request = make_request(
        assets.config, BASE["prompt"], negative_prompt=BASE["negative_prompt"],
        guidance_scale=BASE["guidance_scale"], height=HEIGHT, width=WIDTH, seed=4,
        num_inference_steps=3, controlnet=NAMES, control_image=np.stack(images),
        controlnet_conditioning_scale=np.array([0.5, 1.5], np.float32),
        control_guidance_end=np.array([1.0, 0.5], np.float32),
    )  # fmt: skip
    with torch.no_grad():
        got = generate(request, components, assets).images
    want, _ = expected(pipes, NAMES, images, 4, **BASE, height=HEIGHT, width=WIDTH, **settings)
    assert max_diff(got, want) == 0


# ---------------------------------------------------------------------------
# SDXL


@pytest.fixture(scope="module")
def xl_pipe(tiny_sdxl):
    """diffusers' StableDiffusionXLControlNetPipeline on the tiny SDXL and its ControlNet."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    path, controlnet_dir = tiny_sdxl
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        path, controlnet=ControlNetModel.from_pretrained(controlnet_dir)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    ("guess_mode", "scheduler"), [(False, "euler_a"), (True, "euler_a"), (False, "dpmpp_2m")]
)
def test_sdxl_served_equals_diffusers(url, xl_pipe, guess_mode, scheduler):
    control = control_image(12)
    settings = {**BASE, "height": HEIGHT, "width": WIDTH, "num_inference_steps": 3}
    want, _ = reference(
        xl_pipe, scheduler, 5, image=PIL.Image.fromarray(control), guess_mode=guess_mode,
        controlnet_conditioning_scale=0.9, **settings,
    )  # fmt: skip
    request = {**settings, "scheduler": scheduler, "model": "xl_stable_diffusion"}
    got, _ = served(
        url, ("canny",), [control], 5, guess_mode=guess_mode,
        controlnet_conditioning_scale=[0.9], **request,
    )  # fmt: skip
    plain, _ = served(url, (), [], 5, **request)
    assert max_diff(got, want) <= 1
    assert max_diff(plain, got) > 8


# ---------------------------------------------------------------------------
# Two ControlNets and the hires fix in one request (the web UI's enable_hr with
# ControlNet units) == diffusers' ControlNet pipeline with output_type="latent", the
# web UI's upscale, then the ControlNet img2img pipeline with the same maps (which it
# resizes to the second pass's size itself) and a fresh generator.

HIRES_CASES = {
    # family, upscaler, scheduler, hr_scale, second-pass steps, strength, height, width
    "latent_euler_a": ("sd", "latent", "euler_a", 1.5, 0, 0.7, HEIGHT, WIDTH),
    # 1.7 is not exact in binary: 24 x 40 -> int(40.8) x int(68.0) = 40 x 68, as the web UI
    "lanczos_1.7_pndm": ("sd", "lanczos", None, 1.7, 4, 0.6, 24, 40),
    "sdxl_latent_euler": ("xl", "latent", "euler", 1.5, 0, 0.7, HEIGHT, WIDTH),
}


def _hires_reference(pipe, maps, seed: int, case: str, settings: dict):
    """uint8 images of txt2img -> upscale -> img2img with ``pipe``'s ControlNets on ``maps``."""
    import diffusers
    import torch
    from helpers import REFERENCE_SCHEDULERS

    family, upscaler, scheduler, scale, steps, strength, _, _ = HIRES_CASES[case]
    pils = [PIL.Image.fromarray(m) for m in maps]
    control = {k: settings[k] for k in ("controlnet_conditioning_scale", "control_guidance_end")}
    if len(maps) == 1:  # one ControlNet: diffusers takes plain values
        pils, control = pils[0], {k: v[0] for k, v in control.items()}
    size = {k: settings[k] for k in ("height", "width", "num_inference_steps")}
    original = pipe.scheduler
    if REFERENCE_SCHEDULERS[scheduler] is not None:
        cls_name, overrides = REFERENCE_SCHEDULERS[scheduler]
        pipe.scheduler = getattr(diffusers, cls_name).from_config(original.config, **overrides)
    try:
        latents = pipe(
            generator=torch.Generator().manual_seed(seed), image=pils, output_type="latent",
            **BASE, **control, **size,
        ).images  # fmt: skip
    finally:
        pipe.scheduler = original
    height, width = int(settings["height"] * scale), int(settings["width"] * scale)
    if upscaler == "latent":
        f = pipe.vae_scale_factor
        image = torch.nn.functional.interpolate(
            latents, size=(height // f, width // f), mode="bilinear", antialias=False
        )
    else:
        with torch.no_grad():
            decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        images = pipe.image_processor.postprocess(decoded, output_type="pil")
        image = [i.resize((width, height), PIL.Image.LANCZOS) for i in images]
    img2img = getattr(diffusers, EDIT_PIPELINES[family, "img2img"])(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    second = {"num_inference_steps": steps or settings["num_inference_steps"]}
    want, _ = reference(
        img2img, scheduler, seed, image=image, control_image=pils, strength=strength,
        height=height, width=width, **BASE, **control, **second,
    )  # fmt: skip
    return want


@pytest.mark.parametrize("case", HIRES_CASES)
def test_controlnets_with_the_hires_fix_equal_diffusers(url, pipes, xl_pipe, case):
    """Two ControlNets (SD 1.x), one (SDXL), in both passes of the hires fix."""
    family, upscaler, scheduler, scale, steps, strength, height, width = HIRES_CASES[case]
    names = NAMES if family == "sd" else ("canny",)
    maps = [control_image(21 + k, height, width) for k in range(len(names))]
    settings = {
        "height": height,
        "width": width,
        "num_inference_steps": 4,
        "controlnet_conditioning_scale": [0.7, 1.3][: len(names)],
        "control_guidance_end": [0.8, 0.6][: len(names)],
    }
    hires = {
        "enable_hr": True,
        "hr_scale": scale,
        "hr_upscaler": upscaler,
        "hr_second_pass_steps": steps,
        "hr_denoising_strength": strength,
    }
    model = {"model": "xl_stable_diffusion"} if family == "xl" else {}
    request = {"scheduler": scheduler, **BASE, **hires, **model}
    got, _ = served(url, names, maps, 31, **request, **settings)
    assert got.shape[1:3] == (int(height * scale), int(width * scale))
    pipe = pipes(NAMES) if family == "sd" else xl_pipe
    want = _hires_reference(pipe, maps, 31, case, dict(settings))
    assert max_diff(got, want) <= 1
    # Without the ControlNets the image differs (the comparison above has power).
    size = {k: settings[k] for k in ("height", "width", "num_inference_steps")}
    plain, _ = served(url, (), [], 31, **request, **size)
    assert max_diff(plain, got) > 8


# ---------------------------------------------------------------------------
# SDXL with its refiner after the ControlNet base (refiner_switch_at) == diffusers'
# ensemble of experts with the ControlNet pipeline as the base: one generator,
# StableDiffusionXLControlNetPipeline(denoising_end=switch, output_type="latent"), then the
# refiner (StableDiffusionXLImg2ImgPipeline, denoising_start=switch) without ControlNet.

# scheduler, settings. 0.7 is not exact in binary. diffusers lays the ControlNet's window
# over the whole schedule, before denoising_end cuts it: at 5 steps Euler a's base runs 3 of
# [801, 601, 401, 201, 1] (those >= 300), and an end of 0.4 keeps the ControlNet at 2 of them
# ((i + 1) / 5 <= 0.4; over the base's 3 it would be 1); Heun's base runs 5 of its 9
# timesteps, of which an end of 0.45 keeps 4 (over the base's 5 it would be 2).
REFINER_CASES = {
    "euler_a_end_0.4": ("euler_a", {"control_guidance_end": [0.4], "num_images_per_prompt": 2}),
    "heun_scale_end_0.45": (
        "heun",
        {"controlnet_conditioning_scale": [0.8], "control_guidance_end": [0.45]},
    ),
}
SWITCH = 0.7


@pytest.fixture(scope="module")
def xl_refiner(family_checkpoints):
    """diffusers' StableDiffusionXLImg2ImgPipeline on the tiny refiner."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(family_checkpoints["tiny-sdxl-refiner"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _refined_reference(pipes, scheduler, seed: int, refine=None, **settings) -> np.ndarray:
    """uint8 images of the ControlNet base (``settings``) up to SWITCH, then the refiner
    (the same settings but the size, the image and the ControlNet's, plus ``refine``), with
    one generator."""
    import diffusers
    import torch
    from helpers import REFERENCE_SCHEDULERS

    originals = [pipe.scheduler for pipe in pipes]
    if REFERENCE_SCHEDULERS[scheduler] is not None:
        cls_name, overrides = REFERENCE_SCHEDULERS[scheduler]
        for pipe in pipes:
            pipe.scheduler = getattr(diffusers, cls_name).from_config(
                pipe.scheduler.config, **overrides
            )
    base, refiner = pipes
    base_only = ("height", "width", "image", "controlnet_conditioning_scale")
    shared = {
        k: v for k, v in settings.items() if k not in base_only and not k.startswith("control_")
    }
    generator = torch.Generator().manual_seed(seed)
    try:
        latents = base(
            generator=generator, denoising_end=SWITCH, output_type="latent", **settings
        ).images
        out = refiner(
            generator=generator,
            image=latents,
            denoising_start=SWITCH,
            output_type="np",
            **shared,
            **(refine or {}),
        ).images
    finally:
        for pipe, original in zip(pipes, originals, strict=True):
            pipe.scheduler = original
    return (out * 255).round().astype(np.uint8)


@pytest.mark.parametrize("case", REFINER_CASES)
def test_sdxl_controlnet_then_refiner_equals_diffusers(url, xl_pipe, xl_refiner, case):
    scheduler, settings = REFINER_CASES[case]
    control = control_image(41)
    common = {**BASE, "height": HEIGHT, "width": WIDTH, "num_inference_steps": 5}
    cn = {k: v for k, v in settings.items() if k.startswith("control")}
    n = settings.get("num_images_per_prompt", 1)
    request = {**common, "num_images_per_prompt": n, "scheduler": scheduler}
    request |= {"model": "xl_stable_diffusion", "refiner_switch_at": SWITCH}
    got, _ = served(url, ("canny",), [control], 3, **request, **cn)
    want = _refined_reference(
        (xl_pipe, xl_refiner), scheduler, 3, image=PIL.Image.fromarray(control),
        num_images_per_prompt=n, **common, **{k: v[0] for k, v in cn.items()},
    )  # fmt: skip
    assert got.shape == (n, HEIGHT, WIDTH, 3)
    assert max_diff(got, want) <= 1
    # Not vacuous: the ControlNet's share survives the refiner.
    plain, _ = served(url, (), [], 3, **request)
    assert max_diff(plain, got) > 8


def test_sdxl_controlnet_inpainting_then_refiner_equals_diffusers(url, xl_pipe, family_checkpoints):
    """StableDiffusionXLControlNetInpaintPipeline(strength, denoising_end) then the refiner's
    StableDiffusionXLInpaintPipeline(denoising_start). The window lies over the strength's
    share before the cut: at 10 steps of Euler a, strength 0.65 runs 6 of them and the base
    the first 3 (>= 300); control_guidance_end 0.4 keeps the ControlNet for 2 (over the
    base's 3: 1; over all 10: 3)."""
    from diffusers import (
        StableDiffusionXLControlNetInpaintPipeline,
        StableDiffusionXLInpaintPipeline,
    )
    from helpers import source_image, source_mask

    base = StableDiffusionXLControlNetInpaintPipeline(**xl_pipe.components)
    refiner = StableDiffusionXLInpaintPipeline.from_pretrained(
        family_checkpoints["tiny-sdxl-refiner"]
    )
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    image, mask = source_image(HEIGHT, WIDTH), source_mask(HEIGHT, WIDTH)
    control = control_image(43)
    common = {**BASE, "num_inference_steps": 10, "strength": 0.65}
    request = {**common, "image": image, "mask_image": mask, "scheduler": "euler_a"}
    request |= {"model": "xl_stable_diffusion", "refiner_switch_at": SWITCH}
    got, _ = served(url, ("canny",), [control], 5, control_guidance_end=[0.4], **request)
    pils = {k: PIL.Image.fromarray(v) for k, v in (("image", image), ("mask_image", mask))}
    want = _refined_reference(
        (base, refiner), "euler_a", 5, control_image=PIL.Image.fromarray(control),
        control_guidance_end=0.4, height=HEIGHT, width=WIDTH, **pils, **common,
        refine={"height": HEIGHT, "width": WIDTH},
    )  # fmt: skip
    assert max_diff(got, want) <= 1
    # Not vacuous: the ControlNet's share survives the refiner, and the window matters.
    plain, _ = served(url, (), [], 5, **request)
    assert max_diff(plain, got) > 8
    wider, _ = served(url, ("canny",), [control], 5, control_guidance_end=[0.5], **request)
    assert max_diff(wider, got) > 1


def test_cli_controlnet_with_refiner_writes_infotext_that_reproduces_it(url, tmp_path):
    from sd_triton.client import cli, infotext_options, parse_infotext, read_infotext

    PIL.Image.fromarray(control_image(42)).save(tmp_path / "map.png")
    out = tmp_path / "out.png"
    argv = ["generate", BASE["prompt"], "-o", str(out), "--url", url, "--no-progress"]
    argv += ["--model", "xl_stable_diffusion", "--size", f"{WIDTH}x{HEIGHT}", "--steps", "5"]
    argv += ["--seed", "8", "--scheduler", "euler_a", "--refiner-switch-at", "0.7"]
    argv += ["--control", f"canny:{tmp_path / 'map.png'}", "--control-end", "0.4"]
    assert cli.main(argv) == cli.EXIT_OK
    fields = parse_infotext(read_infotext(out))
    assert fields["Refiner"].startswith("tiny-sdxl-refiner") and "ControlNet 0" in fields
    options = infotext_options(fields)
    assert options["refiner_switch_at"] == 0.7
    assert options["controlnet"] == ["canny"] and options["control_guidance_end"] == [0.4]
    # The text and the map give the image again.
    names, seed = options.pop("controlnet"), options.pop("seed")
    again, _ = served(url, names, [control_image(42)], seed, model="xl_stable_diffusion", **options)
    assert max_diff(np.asarray(PIL.Image.open(out).convert("RGB")), again[0]) == 0


def test_controlnet_with_refiner_refuses_an_image_and_the_hires_fix(url):
    """With ControlNet the refiner follows text-to-image and inpainting, not img2img
    (diffusers' SDXL ControlNet img2img pipeline has no denoising_end at all), and not the
    hires fix."""
    unit = {"controlnet": _names("canny"), "control_image": control_image(0)[None]}
    request = {"height": HEIGHT, "width": WIDTH, "refiner_switch_at": 0.7, **unit}
    for extra, words in (
        ({"image": control_image(1)}, "refiner_switch_at applies to text-to-image and inpai"),
        ({"enable_hr": True}, "enable_hr with refiner_switch_at is not supported"),
    ):
        error = str(bad_request_error(url, request | extra, model="xl_stable_diffusion"))
        assert "INVALID_ARG" in error or "StatusCode.INVALID_ARGUMENT" in error
        assert words in error
