"""ControlNet on every host and precision the exporter writes (issues 16 and 13.4).

The GPU deployments run the torch host in fp16 and Triton's onnxruntime backend
(CUDA or TensorRT) in fp16; ControlNet is exported for each, and checked here
on the CPU:

- the torch host (``--host torch``), fp32, served == diffusers'
  ``StableDiffusionControlNetPipeline`` (SD 1.x) and
  ``StableDiffusionXLControlNetPipeline`` (SDXL) within one uint8 level;
- fp16 (``--fp16``: the VAE stays fp32) on the Python-backend ONNX host
  (onnxruntime runs fp16 on the CPU) and on the torch host given ``dtype``
  float16 (what its ``auto`` means on CUDA; torch runs fp16 on the CPU too),
  served, compared with diffusers' fp32 image by PSNR (printed).

Served as tests/test_fp16.py and tests/test_gpu_torch_host.py serve: each
exported component's ``model.py`` initialized from its ``config.pbtxt``,
answering the pipeline loop's BLS calls through tests/fake_pb_utils.py (a
real tritonserver took 3 minutes to load the torch host's 7 models on the
loaded 2-core machine). Also:
- fp16's files: ``controlnet_NAME`` and ``unet_controlled`` in float16 but
  their timesteps and the ControlNet's scale, in the ONNX files, the Triton
  configs and pipeline.json's ``tensor_dtypes`` (the pipeline casts by them);
- TensorRT (``--tensorrt``, config-level: no GPU here): both models get the
  UNet's keys and profiles, the residuals' at their fractions of the latent
  size, covering the request limits.

The tiny ControlNets are test_controlnet's (``make_controlnet``), one per family.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import PIL.Image
import pytest
from fake_pb_utils import import_model, initialize, install, model_config
from helpers import assert_config_matches_onnx, max_diff, reference
from test_controlnet import control_image, make_controlnet
from test_gpu_configs import ONNXRUNTIME_BACKEND_TRT_KEYS

from sd_pipeline import Assets, generate, make_request
from sd_pipeline.config import PipelineConfig
from sd_triton.export import Contents, ExportOptions, Hosting, Naming, export_repository
from sd_triton.export import component_models as CM
from sd_triton.export import controlnet as CN
from sd_triton.export import triton_config as T

HEIGHT, WIDTH = 32, 48
SETTINGS = {
    "prompt": "a house by a lake",
    "negative_prompt": "blurry",
    "guidance_scale": 7.5,
    "height": HEIGHT,
    "width": WIDTH,
    "num_inference_steps": 3,
}
SCALE = 0.8
# The exports served together, by model prefix: (precision, host, family).
EXPORTS = {
    "torch_": ("fp32", "torch", "sd"),
    "half_": ("fp16-vae-fp32", "python", "sd"),
    "torch16_": ("fp16-vae-fp32", "torch", "sd"),
    "xl_torch_": ("fp32", "torch", "sdxl"),
}
# fp16 against diffusers' fp32 image: see PSNR_FLOOR_DB in tests/test_fp16.py (the
# plain pipeline measured 57-62 dB there). Measured here (tiny model, 32x48, 3 euler
# steps, onnxruntime 1.32 / torch 2.13 CPU): 63.6 dB (ONNX host) and 59.7 dB (torch
# host); the same request without its ControlNet scores about 24 dB (ONNX host), so a
# ControlNet lost or mangled in fp16 falls far below the floor.
PSNR_FLOOR_DB = 45.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, family_checkpoints):
    return {"sd": tiny_checkpoint, "sdxl": family_checkpoints["tiny-sdxl"]}


@pytest.fixture(scope="module")
def controlnet_dirs(tmp_path_factory, checkpoints):
    """A tiny ControlNet per family, made from its UNet."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("controlnet")
    for seed, (family, checkpoint) in enumerate(checkpoints.items()):
        unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet")
        make_controlnet(unet, seed, root / family)
    return {family: root / family for family in checkpoints}


def _options(prefix: str, precision: str, host: str, **hosting) -> ExportOptions:
    return ExportOptions(
        Contents(precision=precision, stream_model=False, safety_checker=False),
        hosting=Hosting(host=host, pipeline_instances=1, **hosting),
        naming=Naming(model_prefix=prefix),
    )


@pytest.fixture(scope="module")
def repository(tmp_path_factory, checkpoints, controlnet_dirs):
    """:data:`EXPORTS`, in one repository."""
    root = tmp_path_factory.mktemp("controlnet-hosts") / "repo"
    for prefix, (precision, host, family) in EXPORTS.items():
        options = _options(prefix, precision, host)
        controlnets = {"canny": controlnet_dirs[family]}
        export_repository(checkpoints[family], root, options, controlnets=controlnets)
    return root


@pytest.fixture(scope="module")
def pb(module_monkeypatch):
    return install(module_monkeypatch, callee_kind="CPU")


@pytest.fixture(scope="module")
def models(pb, module_monkeypatch, repository) -> dict:
    """Every component model of the repository, loaded as Triton would (the torch host's
    ``dtype`` ``auto`` as on CUDA: float16 in an fp16 export); BLS calls go to them."""
    models = {}
    for folder in sorted(repository.iterdir()):
        prefix = max((p for p in EXPORTS if folder.name.startswith(p)), key=len)
        if folder.name == f"{prefix}stable_diffusion":
            continue
        host = import_model(module_monkeypatch, folder / "1" / "model.py", name=f"h3_{folder.name}")
        dtype = model_config(folder).get("parameters", {}).get("dtype", {}).get("string_value")
        fp16 = dtype == "auto" and EXPORTS[prefix][0] != "fp32"
        parameters = {"dtype": "float16"} if fp16 else None
        models[folder.name] = initialize(host, folder, parameters=parameters)
    pb.bls = lambda request: models[request.model_name].execute([request])[0]
    return models


def served(pb, repository, prefix: str, controlled: bool = True) -> np.ndarray:
    """The image of ``prefix``'s pipeline loop over its component models (BLS calls)."""
    from sd_pipeline.triton_components import TritonComponents

    assets = Assets.load(repository / f"{prefix}stable_diffusion" / "1" / "assets")
    settings = {k: v for k, v in SETTINGS.items() if k != "prompt"}
    if controlled:
        settings["controlnet"] = ("canny",)
        settings["control_image"] = control_image(5)[None]
        settings["controlnet_conditioning_scale"] = np.array([SCALE], np.float32)
    request = make_request(assets.config, SETTINGS["prompt"], seed=3, scheduler="euler", **settings)
    pb.bls_requests.clear()
    image = generate(request, TritonComponents(assets.config), assets).images
    called = {r.model_name for r in pb.bls_requests}
    assert (f"{prefix}controlnet_canny" in called) == controlled  # not vacuous
    assert (f"{prefix}unet_controlled" in called) == controlled
    return image


@pytest.fixture(scope="module")
def expected(checkpoints, controlnet_dirs) -> dict[str, np.ndarray]:
    """diffusers' fp32 images with the ControlNet, by family."""
    from diffusers import (
        ControlNetModel,
        StableDiffusionControlNetPipeline,
        StableDiffusionXLControlNetPipeline,
    )

    images = {}
    classes = {"sd": StableDiffusionControlNetPipeline, "sdxl": StableDiffusionXLControlNetPipeline}
    for family, cls in classes.items():
        controlnet = ControlNetModel.from_pretrained(controlnet_dirs[family])
        extra = {"safety_checker": None, "requires_safety_checker": False} if family == "sd" else {}
        pipe = cls.from_pretrained(checkpoints[family], controlnet=controlnet, **extra)
        pipe.set_progress_bar_config(disable=True)
        image = PIL.Image.fromarray(control_image(5))
        images[family], _ = reference(
            pipe, "euler", 3, image=image, controlnet_conditioning_scale=SCALE, **SETTINGS
        )
    return images


# ---------------------------------------------------------------------------
# Served


@pytest.mark.parametrize("prefix", ["torch_", "xl_torch_"])
def test_torch_host_served_equals_diffusers(pb, models, repository, expected, prefix):
    got = served(pb, repository, prefix)
    assert max_diff(got, expected[EXPORTS[prefix][2]]) <= 1
    plain = served(pb, repository, prefix, controlled=False)
    assert max_diff(plain, got) > 8  # the ControlNet counts


@pytest.mark.parametrize("prefix", ["half_", "torch16_"])
def test_fp16_served_is_close_to_fp32(pb, models, repository, expected, prefix):
    score = psnr(served(pb, repository, prefix), expected["sd"])
    print(f"\nPSNR {prefix.rstrip('_')} ControlNet fp16 vs diffusers fp32: {score:.1f} dB")
    assert score >= PSNR_FLOOR_DB, f"{prefix}: PSNR {score:.1f} dB"
    # It ran in fp16: the ControlNet got float16 latents (its timestep and scale float32).
    call = next(r for r in pb.bls_requests if r.model_name == f"{prefix}controlnet_canny")
    dtypes = {t.name(): t.as_numpy().dtype for t in call.inputs()}
    assert dtypes["sample"] == dtypes["controlnet_cond"] == np.float16
    assert dtypes["timestep"] == dtypes["conditioning_scale"] == np.float32
    if EXPORTS[prefix][1] == "torch":  # and the torch host computed in float16
        for name in ("controlnet_canny", "unet_controlled"):
            assert str(models[f"{prefix}{name}"].dtype) == "torch.float16"
    else:  # the floor tells a ControlNet image from one without it (fp16 is cheap here)
        plain = served(pb, repository, prefix, controlled=False)
        score = psnr(plain, expected["sd"])
        print(f"PSNR {prefix.rstrip('_')} without the ControlNet: {score:.1f} dB")
        assert score < PSNR_FLOOR_DB - 10


# ---------------------------------------------------------------------------
# fp16's files


def _pipeline_config(repository, prefix: str) -> PipelineConfig:
    return PipelineConfig.load(
        repository / f"{prefix}stable_diffusion" / "1" / "assets" / "pipeline.json"
    )


FP32_INPUTS = {
    "controlnet_canny": {"timestep", "conditioning_scale"},
    "unet_controlled": {"timestep"},
}


@pytest.mark.parametrize("prefix", ["half_", "torch16_"])
def test_fp16_dtypes_in_configs_and_pipeline_json(repository, prefix):
    pipeline = json.loads(
        (repository / f"{prefix}stable_diffusion/1/assets/pipeline.json").read_text()
    )
    for name, fp32 in FP32_INPUTS.items():
        assert pipeline["component_dtypes"][name] == "float16"
        dtypes = pipeline["tensor_dtypes"][name]
        config = T.read_config(repository / f"{prefix}{name}")
        for entry in (*config.input, *config.output):
            want = "bool" if entry.name == "guess_mode" else "float32"
            want = want if entry.name in fp32 or want == "bool" else "float16"
            assert dtypes[entry.name] == want, (name, entry.name)
            assert (
                T.pb.DataType.Name(entry.data_type)
                == {
                    "float16": "TYPE_FP16",
                    "float32": "TYPE_FP32",
                    "bool": "TYPE_BOOL",
                }[want]
            )
        version = repository / f"{prefix}{name}" / "1"
        if prefix == "half_":
            assert_config_matches_onnx(config, version / CM.ONNX_NAME)
        else:
            component = "controlnet" if name.startswith("controlnet_") else name
            assert config.parameters["component"].string_value == component
            assert config.parameters["dtype"].string_value == "auto"  # float16 on CUDA
            assert not list(version.glob("*.onnx"))
    assert _pipeline_config(repository, prefix).controlnets == {"canny": "controlnet_canny"}


# ---------------------------------------------------------------------------
# TensorRT (config-level)


def _profiles(config) -> dict[str, dict[str, list[int]]]:
    """``{"min": {input: shape}, "opt": ..., "max": ...}`` from the TensorRT keys."""
    [accelerator] = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    params = accelerator.parameters
    assert set(params) <= ONNXRUNTIME_BACKEND_TRT_KEYS, set(params) - ONNXRUNTIME_BACKEND_TRT_KEYS
    assert params["precision_mode"] == "FP16"  # fp16 weights
    return {
        label: {
            name: [int(d) for d in dims.split("x")]
            for name, dims in (
                i.split(":") for i in params[f"trt_profile_{label}_shapes"].split(",")
            )
        }
        for label in ("min", "opt", "max")
    }


def _onnx_inputs(path) -> dict[str, list[int | None]]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {
        i.name: [
            d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim
        ]
        for i in graph.input
    }


def test_tensorrt_configs(tmp_path, monkeypatch, tiny_checkpoint, controlnet_dirs, repository):
    """--host onnxruntime --fp16 --tensorrt: the ControlNet and the controlled UNet get the
    UNet's TensorRT keys and profiles; each profile names the ONNX inputs with shapes the
    file allows, the residuals' at their fractions of the latent size (what the
    ControlNet's outputs are at the same profile), up to the request limits (the UNet's).
    The plain components' ONNX files are ``half_``'s (same weights and precision), copied."""

    def copy(component, modules, sizes, trace_sizes, dtype, version_dir, opts):
        version_dir.mkdir(parents=True, exist_ok=True)
        source = repository / f"half_{component.name}" / "1" / CM.ONNX_NAME
        return Path(shutil.copyfile(source, version_dir / CM.ONNX_NAME))

    monkeypatch.setattr(CM, "_export_onnx", copy)
    options = _options("", "fp16-vae-fp32", "onnxruntime", tensorrt=True, unet_max_batch_size=4)
    out = export_repository(
        tiny_checkpoint, tmp_path / "repo", options, controlnets={"canny": controlnet_dirs["sd"]}
    )
    pipeline = _pipeline_config(out, "")
    f = pipeline.vae_scale_factor
    unet = json.loads((tiny_checkpoint / "unet" / "config.json").read_text())
    residuals = CN.residuals(unet)
    profiles = {}
    for name in ("unet", "controlnet_canny", "unet_controlled"):
        config = T.read_config(out / name)
        assert config.backend == "onnxruntime" and config.max_batch_size == 4
        [group] = config.instance_group
        assert group.kind == T.pb.ModelInstanceGroup.KIND_GPU
        onnx_inputs = _onnx_inputs(out / name / "1" / CM.ONNX_NAME)
        assert_config_matches_onnx(config, out / name / "1" / CM.ONNX_NAME)
        profiles[name] = _profiles(config)
        for label, shapes in profiles[name].items():
            assert list(shapes) == list(onnx_inputs), (name, label)
            for input_name, shape in shapes.items():
                dims = onnx_inputs[input_name]
                assert len(shape) == len(dims), (name, label, input_name)
                assert all(d is None or d == s for d, s in zip(dims, shape, strict=True))
    for label in ("min", "opt", "max"):
        plain, cn, controlled = (profiles[n][label] for n in profiles)
        # The UNet's shapes for the inputs the three share: the same calls, the same engines' sizes.
        for shapes in (cn, controlled):
            for input_name in ("sample", "timestep", "encoder_hidden_states"):
                assert shapes[input_name] == plain[input_name], (label, input_name)
        batch, _, lh, lw = plain["sample"]
        assert cn["controlnet_cond"] == [batch, 3, lh * f, lw * f]
        for r in residuals:
            assert controlled[r.unet_input] == [batch, r.channels, lh // r.factor, lw // r.factor]
            assert lh % r.factor == 0 and lw % r.factor == 0, (label, r)
    assert profiles["unet_controlled"]["opt"]["sample"][0] == 2  # classifier-free guidance
    # The max profile: the UNet's (tests/test_gpu_configs.py: it covers every request the
    # pipeline accepts), at the config's batch.
    assert profiles["unet_controlled"]["max"]["sample"][0] == 4
