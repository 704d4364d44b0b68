"""The SDXL exporter: components per family, ONNX == torch, refiner, safety checker, fp16, presets.

One export serves most tests: the tiny SDXL-Turbo base (the tiny SDXL with
SDXL-Turbo's scheduler config) with the tiny refiner beside it, the tiny SD
checkpoint's safety checker attached, and ``--preset turbo``. No server.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import assert_config_matches_onnx

from sd_pipeline import spec as S
from sd_triton.export import cli, tiny
from sd_triton.export import components as C
from sd_triton.export import triton_config as T
from sd_triton.export.checkpoint import ExportError, inspect_checkpoint, load_modules
from sd_triton.export.component_models import component_config
from sd_triton.export.options import Contents, ExportOptions, Hosting
from sd_triton.export.pipeline_models import (
    pipeline_constants,
    pipeline_parameters,
    request_limits,
)
from sd_triton.export.repository import export_repository

TOL = 1e-4  # max abs error relative to the reference's max abs value
BASE = list(C.FAMILY_COMPONENTS["sdxl"]) + ["safety_checker"]
REFINER = [f"refiner_{n}" for n in C.FAMILY_COMPONENTS["sdxl-refiner"]]


@pytest.fixture(scope="module")
def base_dir(family_checkpoints) -> Path:
    return family_checkpoints["tiny-sdxl-turbo"]


@pytest.fixture(scope="module")
def refiner_dir(family_checkpoints) -> Path:
    return family_checkpoints["tiny-sdxl-refiner"]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def export(tmp_path_factory, base_dir, refiner_dir, tiny_checkpoint):
    """The export through the command line, and its log lines."""
    out = tmp_path_factory.mktemp("sdxl") / "repo"
    records = _Records()
    logger = logging.getLogger("sd_triton.export")
    logger.addHandler(records)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        argv = [str(base_dir), str(out), "--refiner", str(refiner_dir)]
        argv += ["--safety-checker", str(tiny_checkpoint), "--preset", "turbo", "-q"]
        assert cli.main(argv) == 0
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    return out, records.lines


@pytest.fixture(scope="module")
def repo(export) -> Path:
    return export[0]


@pytest.fixture(scope="module")
def base(base_dir):
    ckpt = inspect_checkpoint(base_dir)
    return ckpt, load_modules(ckpt)


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path / "1" / "model.onnx"), options)


def _pipeline_json(repo: Path, sub: str = "") -> dict:
    return json.loads(
        (repo / "stable_diffusion" / "1" / "assets" / sub / "pipeline.json").read_text()
    )


def _max_error(got: np.ndarray, want: torch.Tensor) -> float:
    want = want.detach().numpy()
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))


# ------------------------------------------------------------------ layout and configs


def test_models_per_family(repo):
    models = sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file())
    assert models == sorted([*BASE, *REFINER, "stable_diffusion", "stable_diffusion_stream"])


@pytest.mark.parametrize("model", BASE + REFINER)
def test_config_matches_spec_and_onnx(model, repo, base):
    config = T.read_config(repo / model)
    assert config.name == model
    assert_config_matches_onnx(config, repo / model / "1" / "model.onnx")
    name = model.removeprefix("refiner_")
    spec = S.unet_spec(text_time=True) if name == "unet" else S.COMPONENTS[name]
    assert [i.name for i in config.input] == [t.name for t in spec.inputs]
    assert [o.name for o in config.output] == [t.name for t in spec.outputs]
    dims = {i.name: list(i.dims) for i in config.input}
    if name == "unet":
        # The text sequence is dynamic (long prompts); widths and time ids are the checkpoint's.
        refiner = model.startswith("refiner_")
        assert dims["encoder_hidden_states"] == [-1, 64 if refiner else 32 + 64]
        assert dims["text_embeds"] == [32] and dims["time_ids"] == [5 if refiner else 6]
    if name.startswith("text_encoder"):
        assert dims == {"input_ids": [77], "skip_layers": [1]}
        skip = next(i for i in config.input if i.name == "skip_layers")
        assert skip.HasField("reshape") and list(skip.reshape.shape) == []
        outputs = {o.name: list(o.dims) for o in config.output}
        width = 64 if name == "text_encoder_2" else 32
        assert outputs["hidden_state"] == outputs["normed_hidden_state"] == [77, width]
        assert outputs["text_embeds"] == [32]


def test_pipeline_json(repo, export):
    got = _pipeline_json(repo)
    assert got["family"] == "sdxl" and got["refiner"] is True
    assert got["text_encoders"] == ["text_encoder", "text_encoder_2"]
    assert got["text_encoder_layers"] == {"text_encoder": 5, "text_encoder_2": 5}
    assert got["force_zeros_for_empty_prompt"] is True
    assert got["requires_aesthetics_score"] is False
    assert got["unet_text_time"] is True and got["time_cond_proj_dim"] is None
    assert got["cross_attention_dim"] == 96 and got["text_width"] == 32
    assert got["safety_checker"] is True
    assert got["component_models"] == {n: n for n in BASE}
    assert got["component_versions"] == {n: 1 for n in BASE}
    assert set(got["tensor_dtypes"]) == set(BASE)
    assert got["tensor_dtypes"]["unet"]["time_ids"] == "float32"
    assets = repo / "stable_diffusion" / "1" / "assets"
    for folder in ("tokenizer", "tokenizer_2", "scheduler", "feature_extractor"):
        assert (assets / folder).is_dir(), folder
    # tokenizer_2 pads with "!" (OpenCLIP's), tokenizer with the end token.
    pad = json.loads((assets / "tokenizer_2" / "special_tokens_map.json").read_text())["pad_token"]
    assert pad == "!"


def test_refiner_assets(repo):
    refiner = repo / "stable_diffusion" / "1" / "assets" / "refiner"
    assert sorted(p.name for p in refiner.iterdir()) == [
        "pipeline.json",
        "scheduler",
        "tokenizer_2",
    ]
    got = _pipeline_json(repo, "refiner")
    assert got["family"] == "sdxl-refiner" and got["refiner"] is False
    assert got["text_encoders"] == ["text_encoder_2"]
    assert got["requires_aesthetics_score"] is True
    assert got["force_zeros_for_empty_prompt"] is False
    assert got["cross_attention_dim"] == 64 and got["safety_checker"] is False
    names = C.FAMILY_COMPONENTS["sdxl-refiner"]
    assert got["component_models"] == {n: f"refiner_{n}" for n in names}
    assert got["component_versions"] == {n: 1 for n in names}
    assert got["model_prefix"] == "refiner_"
    # The streaming model carries the same assets.
    stream = repo / "stable_diffusion_stream" / "1" / "assets" / "refiner" / "pipeline.json"
    assert json.loads(stream.read_text()) == got


# ------------------------------------------------------------------ ONNX == torch


@pytest.mark.parametrize("name", ["text_encoder", "text_encoder_2"])
def test_text_encoder_matches_torch(name, repo, base):
    """Each sample gets its own layer (skip 0, 1, 2 in one batch), normed and pooled."""
    _, modules = base
    encoder = modules[name]
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 49406, (3, 77), generator=gen)
    ids[:, 0], ids[:, 9:] = 49406, 49407  # start, 8 tokens, end (then padding)
    skips = np.array([2, 0, 1], np.int32)
    got = _session(repo / name).run(None, {"input_ids": ids.int().numpy(), "skip_layers": skips})
    with torch.no_grad():
        out = encoder(ids, output_hidden_states=True)
        hidden = torch.stack([out.hidden_states[-1 - k][i] for i, k in enumerate(skips)])
        norm = getattr(encoder, "text_model", encoder).final_layer_norm
        pooled = out.text_embeds if name == "text_encoder_2" else out.pooler_output
        for g, want in zip(got, (hidden, norm(hidden), pooled), strict=True):
            assert _max_error(g, want) < TOL
        # Skip 0, normed: the model's own last_hidden_state.
        assert _max_error(got[1][1:2], out.last_hidden_state[1:2]) < TOL
    assert np.abs(got[0][0] - got[0][1]).max() > 1e-3  # different layers differ


@pytest.mark.parametrize("chunks", [1, 3])
def test_unet_matches_torch(chunks, repo, base):
    ckpt, modules = base
    sizes = C.fixed_sizes(ckpt.configs)
    unet = C.checkpoint_components(ckpt.configs, safety_checker=False)["unet"]
    dyn = {S.BATCH: 2, "latent_height": 6, "latent_width": 10, "text_sequence": 77 * chunks}
    inputs = C.sample_inputs(unet, {**sizes, **dyn}, seed=chunks)
    inputs["time_ids"] = torch.tensor([[64.0, 64, 0, 0, 64, 64], [48, 80, 4, 0, 48, 80]])
    got = _session(repo / "unet").run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
        want = modules["unet"](
            inputs["sample"],
            inputs["timestep"],
            inputs["encoder_hidden_states"],
            added_cond_kwargs=added,
        ).sample
    assert _max_error(got, want) < TOL


def test_lcm_unet_exports_with_timestep_cond(family_checkpoints, tmp_path):
    """A UNet with time_cond_proj_dim takes the guidance embedding as ``timestep_cond``."""
    folder = family_checkpoints["tiny-sd-lcm"]
    ckpt = inspect_checkpoint(folder, safety_checker=False)
    modules = load_modules(ckpt)
    unet = C.checkpoint_components(ckpt.configs, safety_checker=False)["unet"]
    assert [t.name for t in unet.spec.inputs][-1] == "timestep_cond"
    sizes = C.fixed_sizes(ckpt.configs)
    assert sizes["time_cond_dim"] == tiny.LCM_TIME_COND_PROJ_DIM
    dyn = {S.BATCH: 2, "latent_height": 8, "latent_width": 4, "text_sequence": 77}
    inputs = C.sample_inputs(unet, {**sizes, **dyn})
    path = C.export_onnx(unet, unet.wrap(modules), inputs, tmp_path / "unet.onnx", sizes=sizes)
    got = ort.InferenceSession(str(path)).run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        args = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
        want = modules["unet"](*args, timestep_cond=inputs["timestep_cond"]).sample
        without = modules["unet"](*args, timestep_cond=inputs["timestep_cond"] * 0).sample
    assert _max_error(got, want) < TOL
    assert np.abs(got - without.numpy()).max() > 1e-4  # the embedding is used
    constants = pipeline_constants(ckpt.configs)
    assert constants["time_cond_proj_dim"] == tiny.LCM_TIME_COND_PROJ_DIM
    assert constants["unet_text_time"] is False and constants["family"] == "sd"


def test_torch_host_serves_the_sdxl_components(base_dir, base, repo, tmp_path, monkeypatch):
    """--host torch: text_encoder_2 (CLIPTextModelWithProjection) and the SDXL UNet, run
    by the torch host inside a (fake) Triton, answer as their ONNX files do."""
    from fake_pb_utils import import_model, initialize, install, outputs, request

    out = tmp_path / "torch"
    hosting = Hosting(host="torch", pipeline_instances=1)
    export_repository(base_dir, out, ExportOptions(Contents(stream_model=False), hosting))
    pb = install(monkeypatch)
    host = import_model(monkeypatch, out / "unet" / "1" / "model.py", name="sdxl_torch_host")
    ckpt, _ = base
    components = C.checkpoint_components(ckpt.configs, safety_checker=False)
    sizes = C.fixed_sizes(ckpt.configs)
    dyn = {S.BATCH: 3, "latent_height": 4, "latent_width": 6, "text_sequence": 154}
    for name in ("text_encoder_2", "unet"):
        model = initialize(host, out / name)
        arrays = {
            k: v.numpy() for k, v in C.sample_inputs(components[name], {**sizes, **dyn}).items()
        }
        [response] = model.execute([request(pb, **arrays)])
        assert not response.has_error(), response.error().message()
        got = outputs(response)
        want = _session(repo / name).run(None, arrays)
        for t, w in zip(components[name].spec.outputs, want, strict=True):
            assert _max_error(got[t.name], torch.from_numpy(w)) < TOL, (name, t.name)


# ------------------------------------------------------------------ refiner and safety checker


def _copy_with(src: Path, dst: Path, folder: str, **config) -> Path:
    """``src`` linked folder by folder, ``folder``'s config.json changed by ``config``."""
    dst.mkdir()
    for child in src.iterdir():
        if child.name == folder:
            shutil.copytree(child, dst / folder)
            path = dst / folder / "config.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
        else:
            (dst / child.name).symlink_to(child.resolve())
    return dst


def test_refiner_refused_with_one_sentence(base_dir, refiner_dir, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    cases = [
        (base_dir, tiny_checkpoint, "is not an SDXL refiner (its family is sd)"),
        (base_dir, base_dir, "is not an SDXL refiner (its family is sdxl)"),
        (tiny_checkpoint, refiner_dir, "a refiner goes with an SDXL base"),
        (
            base_dir,
            _copy_with(refiner_dir, tmp_path / "r16", "vae", latent_channels=16),
            "has 16 latent channels, the base 4",
        ),
    ]
    for src, refiner, message in cases:
        opts = ExportOptions(Contents(refiner=refiner))
        with pytest.raises(ExportError, match=re.escape(message)) as e:
            export_repository(src, out, opts)
        assert "\n" not in str(e.value)
        assert not out.exists()  # refused before anything is written


def test_safety_checker_attached(repo, export, tiny_checkpoint):
    _, lines = export
    assert any(line.startswith("attaching the safety checker of ") for line in lines)
    # The attached checker is the donor's: it decides as diffusers' module of the donor.
    from sd_triton.export.wrappers import load_module

    checker = load_module("safety_checker", tiny_checkpoint / "safety_checker")
    ckpt = inspect_checkpoint(tiny_checkpoint)
    sizes = {**C.fixed_sizes(ckpt.configs), S.BATCH: 6, "height": 16, "width": 24}
    inputs = C.sample_inputs(C.COMPONENTS["safety_checker"], sizes, seed=4)
    got = _session(repo / "safety_checker").run(None, {k: v.numpy() for k, v in inputs.items()})
    with torch.no_grad():
        images, flags = checker(clip_input=inputs["clip_input"], images=inputs["images"].clone())
    np.testing.assert_array_equal(got[1].reshape(-1), np.array(flags))
    np.testing.assert_allclose(got[0], np.asarray(images), atol=1e-6)
    processor = repo / "stable_diffusion" / "1" / "assets" / "feature_extractor"
    donor = tiny_checkpoint / "feature_extractor" / "preprocessor_config.json"
    assert (processor / "preprocessor_config.json").read_bytes() == donor.read_bytes()


def test_safety_checker_options_conflict(base_dir, tiny_checkpoint, tmp_path):
    with pytest.raises(ExportError, match="--no-safety-checker"):
        opts = ExportOptions(Contents(safety_checker=False, safety_checker_from=tiny_checkpoint))
        export_repository(base_dir, tmp_path / "out", opts)
    with pytest.raises(ExportError, match="has no safety checker to attach"):
        export_repository(
            base_dir, tmp_path / "out", ExportOptions(Contents(safety_checker_from=base_dir))
        )


def test_xl_pipeline_classes_accepted(base_dir, tmp_path):
    for cls in ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"):
        folder = tmp_path / cls
        folder.mkdir()
        for child in base_dir.iterdir():
            if child.name != "model_index.json":
                (folder / child.name).symlink_to(child.resolve())
        index = json.loads((base_dir / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": cls}))
        ckpt = inspect_checkpoint(folder)
        assert ckpt.family == "sdxl" and ckpt.text_encoders == ["text_encoder", "text_encoder_2"]
    index["_class_name"] = "StableDiffusionXLInstructPix2PixPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ExportError, match="not Stable Diffusion 1.x/2.x or SDXL"):
        inspect_checkpoint(folder)


# ------------------------------------------------------------------ fp16 and presets


@pytest.mark.parametrize("force_upcast", [True, False])
def test_fp16_auto_keeps_the_vae_fp32_when_it_must_upcast(force_upcast, base):
    """diffusers' SDXL pipelines upcast the VAE to encode and to decode (force_upcast)."""
    ckpt, _ = base
    opts = ExportOptions(Contents(precision="fp16-vae-auto"))
    resolved = opts.for_vae({**ckpt.configs["vae"], "force_upcast": force_upcast})
    vae = "float32" if force_upcast else "float16"
    components = C.checkpoint_components(ckpt.configs, safety_checker=False)
    sizes, constants = C.fixed_sizes(ckpt.configs), pipeline_constants(ckpt.configs)
    limits = request_limits(resolved, constants)
    for name, component in components.items():
        want = vae if name.startswith("vae_") else "float16"
        assert resolved.component_dtype(name) == want, name
        _, dtypes = component_config(component, resolved, sizes, constants, limits)
        floats = {t: d for t, d in dtypes.items() if d.startswith("float")}
        if name == "unet":
            assert floats.pop("timestep") == "float32"
        assert set(floats.values()) == {want}, name


def test_tensorrt_profiles_of_the_sdxl_unet(base):
    """The added conditioning at its fixed widths; the text sequence from one prompt chunk
    to three (long prompts)."""
    ckpt, _ = base
    sizes, constants = C.fixed_sizes(ckpt.configs), pipeline_constants(ckpt.configs)
    opts = ExportOptions(
        hosting=Hosting(host="onnxruntime", tensorrt=True, unet_max_batch_size=4),
        parameters={"max_side": 96},
    )
    limits = request_limits(opts, constants)
    unet = C.checkpoint_components(ckpt.configs, safety_checker=False)["unet"]
    config, _ = component_config(unet, opts, sizes, constants, limits)
    [trt] = config.optimization.execution_accelerators.gpu_execution_accelerator
    shapes = {
        label: dict(
            item.split(":") for item in trt.parameters[f"trt_profile_{label}_shapes"].split(",")
        )
        for label in ("min", "opt", "max")
    }
    assert shapes["min"]["encoder_hidden_states"] == "1x77x96"
    assert shapes["opt"]["encoder_hidden_states"] == "2x77x96"
    assert shapes["max"]["encoder_hidden_states"] == f"4x{3 * 77}x96"
    assert shapes["max"]["text_embeds"] == "4x32" and shapes["max"]["time_ids"] == "4x6"
    assert shapes["max"]["sample"] == "4x4x48x48"  # 96 px, VAE factor 2


def test_tiny_sdxl_vae_says_force_upcast(base):
    ckpt, _ = base
    assert ckpt.configs["vae"]["force_upcast"] is True


def test_turbo_preset_in_the_pipeline_config(repo, base_dir):
    for model in ("stable_diffusion", "stable_diffusion_stream"):
        params = {k: v.string_value for k, v in T.read_config(repo / model).parameters.items()}
        assert params["default_num_inference_steps"] == "1"
        assert params["default_guidance_scale"] == "0.0"
        assert params["default_scheduler"] == "euler_a"
    # The tiny Turbo's scheduler: SDXL-Turbo's Euler a with trailing timestep spacing.
    scheduler = repo / "stable_diffusion" / "1" / "assets" / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler.read_text())
    assert config["_class_name"] == "EulerAncestralDiscreteScheduler"
    assert config["timestep_spacing"] == "trailing"


def test_lcm_preset_follows_the_unet(base):
    ckpt, _ = base
    constants = pipeline_constants(ckpt.configs)
    limits = request_limits(ExportOptions(), constants)

    def params(preset, **given):
        opts = ExportOptions(Contents(preset=preset), parameters=given)
        return pipeline_parameters(opts, limits, constants)

    lcm_unet = {**constants, "time_cond_proj_dim": 32}
    got = pipeline_parameters(ExportOptions(Contents(preset="lcm")), limits, lcm_unet)
    assert got["default_num_inference_steps"] == 4 and got["default_scheduler"] == "lcm"
    assert got["default_guidance_scale"] == 8.0  # the guidance embedding's
    assert params("lcm")["default_guidance_scale"] == 1.0  # an LCM-LoRA: guidance off
    assert params("turbo", default_num_inference_steps="4")["default_num_inference_steps"] == "4"
    assert "default_num_inference_steps" not in params(None)
    with pytest.raises(ExportError, match="unknown preset"):
        ExportOptions(Contents(preset="fast")).check()


def test_tiny_variants(family_checkpoints, tmp_path):
    from diffusers import LCMScheduler

    folder = family_checkpoints["tiny-sd-lcm"]
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert unet["time_cond_proj_dim"] == tiny.LCM_TIME_COND_PROJ_DIM
    scheduler = LCMScheduler.from_pretrained(folder / "scheduler")
    assert scheduler.config.original_inference_steps == 50
    with pytest.raises(SystemExit):
        tiny.main([str(tmp_path / "never"), "--variant", "turbo"])  # Turbo is SDXL here
