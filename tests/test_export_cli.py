"""The exporter's command line and options: clear errors, fp16, the onnxruntime host."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sd_triton.export import Contents, ExportError, ExportOptions, Hosting, export_repository
from sd_triton.export import components as C
from sd_triton.export import triton_config as T

SD_COMPONENTS = [*C.FAMILY_COMPONENTS["sd"], "safety_checker"]


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "sd_triton.export.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_clean_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("sd-triton-export: error: ")
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def configs_only(tiny_checkpoint, tmp_path):
    """A copy of the tiny checkpoint's layout and configs, without weights."""
    dest = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return dest


def test_not_a_checkpoint(tmp_path):
    assert_clean_error(run_cli(tmp_path, tmp_path / "out"), "not a Stable Diffusion checkpoint")
    assert not (tmp_path / "out").exists()


def test_source_missing(tmp_path):
    assert_clean_error(run_cli(tmp_path / "nope", tmp_path / "out"), "is not a folder")


@pytest.mark.parametrize("component", ["unet", "tokenizer", "safety_checker"])
def test_missing_component(configs_only, tmp_path, component):
    shutil.rmtree(configs_only / component)
    proc = run_cli(configs_only, tmp_path / "out")
    assert_clean_error(proc, f"missing component '{component}'")
    if component == "safety_checker":
        assert "--no-safety-checker" in proc.stderr


def test_tokenizer_without_vocabulary(configs_only, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        (configs_only / "tokenizer" / name).unlink()
    assert_clean_error(run_cli(configs_only, tmp_path / "out"), "'tokenizer'", "tokenizer.json")


def test_not_stable_diffusion(configs_only, tmp_path):
    index = json.loads((configs_only / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusion3Pipeline"
    (configs_only / "model_index.json").write_text(json.dumps(index))
    assert_clean_error(run_cli(configs_only, tmp_path / "out"), "StableDiffusion3Pipeline")


def test_existing_repository_needs_overwrite(tiny_checkpoint, tiny_repository):
    before = (tiny_repository / "unet" / "config.pbtxt").stat().st_mtime_ns
    proc = run_cli(tiny_checkpoint, tiny_repository)
    assert_clean_error(proc, "already holds a model repository", "--overwrite")
    assert (tiny_repository / "unet" / "config.pbtxt").stat().st_mtime_ns == before


def test_unloadable_weights_name_the_component(configs_only, tmp_path):
    with pytest.raises(ExportError, match="component '.*' .* cannot be loaded"):
        export_repository(configs_only, tmp_path / "out")


def test_bad_argument_values(tiny_checkpoint, tmp_path):
    proc = run_cli(tiny_checkpoint, tmp_path / "out", "--unet-max-batch-size", "0")
    assert_clean_error(proc, "unet_max_batch_size")
    assert run_cli(tiny_checkpoint, tmp_path / "out", "--host", "tensorrt").returncode == 2
    proc = run_cli(tiny_checkpoint, tmp_path / "out", "--precision", "fp8")
    assert proc.returncode == 2 and "invalid choice: 'fp8'" in proc.stderr


def test_bad_request_limit_is_a_clean_error(tiny_checkpoint, tmp_path, capsys):
    from sd_triton.export.cli import main

    # In-process (the subprocess path is covered above): saves importing torch again.
    out = tmp_path / "out"
    assert main([str(tiny_checkpoint), str(out), "--parameter", "max_side=lots", "-q"]) == 2
    assert "error: model parameter max_side must be an integer" in capsys.readouterr().err
    assert not out.exists() or not list(out.iterdir())


@pytest.mark.parametrize("host", ["python", "torch", "onnxruntime"])
def test_missing_component_host_is_an_error_naming_it(tiny_checkpoint, tmp_path, monkeypatch, host):
    """component_host.py is package data: every host's model.py and the pipeline's import
    it, so an install without it must not write a repository that fails at load."""
    from sd_triton.export import component_models as CM
    from sd_triton.export import pipeline_models as PM

    monkeypatch.setattr(CM, "COMPONENT_HOST_SOURCE", tmp_path / "gone" / "component_host.py")
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"component_host\.py not found at .*gone"):
        export_repository(tiny_checkpoint, out, ExportOptions(hosting=Hosting(host=host)))
    assert not out.exists()  # refused before any work
    # Where it is copied, too (each copy is checked, not only the first).
    version = tmp_path / "1"
    version.mkdir()
    with pytest.raises(ExportError, match=r"component_host\.py not found"):
        PM._copy_pipeline_code(version)
    if host != "onnxruntime":  # Triton's own backend runs no code of ours
        with pytest.raises(ExportError, match=r"component_host\.py not found"):
            CM._copy_host_code(host, version)


# ------------------------------------------------- fp16 + onnxruntime host


@pytest.fixture(scope="module")
def fp16_repository(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16") / "repo"
    options = ExportOptions(
        contents=Contents(precision="fp16-vae-fp32", name="tiny-sd1"),
        hosting=Hosting(host="onnxruntime", unet_max_batch_size=4, preferred_batch_sizes=(2, 4)),
        parameters={"max_steps": 60, "scheduler_default": "euler"},
    )
    export_repository(tiny_checkpoint, out, options)
    return out


def _initializer_types(path):
    model = onnx.load(str(path))
    return {onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer}


def test_fp16_weights(fp16_repository):
    for name in ("text_encoder", "unet"):
        assert _initializer_types(fp16_repository / name / "1" / "model.onnx") == {"FLOAT16"}
    # The SD 1.x VAE overflows in fp16: encoder and decoder kept in fp32.
    for name in ("vae_encoder", "vae_decoder"):
        assert _initializer_types(fp16_repository / name / "1" / "model.onnx") == {"FLOAT"}


def test_fp16_configs_and_dtypes(fp16_repository):
    from helpers import assert_config_matches_onnx

    pb = T.pb
    for name in SD_COMPONENTS:
        config = T.read_config(fp16_repository / name)
        assert config.backend == "onnxruntime"
        assert not (fp16_repository / name / "1" / "model.py").exists()
        assert_config_matches_onnx(config, fp16_repository / name / "1" / "model.onnx")
    unet = T.read_config(fp16_repository / "unet")
    types = {i.name: i.data_type for i in unet.input}
    assert types == {
        "sample": pb.TYPE_FP16,
        "timestep": pb.TYPE_FP32,
        "encoder_hidden_states": pb.TYPE_FP16,
    }
    assert unet.max_batch_size == 4
    assert list(unet.dynamic_batching.preferred_batch_size) == [2, 4]
    for name in ("vae_encoder", "vae_decoder"):
        assert T.read_config(fp16_repository / name).input[0].data_type == pb.TYPE_FP32

    constants = json.loads(
        (fp16_repository / "stable_diffusion" / "1" / "assets" / "pipeline.json").read_text()
    )
    assert constants["dtype"] == "float16"
    assert constants["source"] == "tiny-sd1"
    assert constants["component_dtypes"]["vae_decoder"] == "float32"
    assert constants["component_dtypes"]["vae_encoder"] == "float32"
    assert constants["tensor_dtypes"]["unet"]["timestep"] == "float32"
    assert constants["tensor_dtypes"]["safety_checker"]["clip_input"] == "float16"
    params = T.read_config(fp16_repository / "stable_diffusion").parameters
    assert params["max_steps"].string_value == "60"
    assert params["scheduler_default"].string_value == "euler"
    assert params["max_images"].string_value == "8"


def test_fp16_unet_runs_close_to_fp32(fp16_repository, tiny_repository, tiny_checkpoint):
    from sd_triton.export.checkpoint import inspect_checkpoint

    comp = C.COMPONENTS["unet"]
    sizes = {"B": 2, "latent_height": 8, "latent_width": 8, "text_sequence": 77}
    sizes.update(C.fixed_sizes(inspect_checkpoint(tiny_checkpoint).configs))
    feeds32 = {k: v.numpy() for k, v in C.sample_inputs(comp, sizes).items()}
    feeds16 = {k: v.astype(np.float16) if k != "timestep" else v for k, v in feeds32.items()}
    ref = ort.InferenceSession(str(tiny_repository / "unet" / "1" / "model.onnx"))
    half = ort.InferenceSession(str(fp16_repository / "unet" / "1" / "model.onnx"))
    want = ref.run(None, feeds32)[0]
    got = half.run(None, feeds16)[0]
    assert got.dtype == np.float16
    assert np.abs(got.astype(np.float32) - want).max() / np.abs(want).max() < 2e-2


def test_overwrite_replaces(tiny_checkpoint, fp16_repository):
    from sd_triton.export.cli import main

    # In-process (the subprocess path is covered above): saves importing torch again.
    args = [tiny_checkpoint, fp16_repository, "--overwrite", "--no-safety-checker", "-q"]
    assert main([str(a) for a in args]) == 0
    assert not (fp16_repository / "safety_checker").exists()
    assert T.read_config(fp16_repository / "unet").backend == "python"
    constants = json.loads(
        (fp16_repository / "stable_diffusion" / "1" / "assets" / "pipeline.json").read_text()
    )
    assert constants["safety_checker"] is False and constants["dtype"] == "float32"


def test_failed_export_leaves_output_untouched(tiny_checkpoint, tmp_path, monkeypatch):
    from sd_triton.export import repository

    out = tmp_path / "out"
    out.mkdir()
    write_component = repository.write_component

    def fail_at_unet(component, *args, **kwargs):
        if component.name == "unet":  # after the text encoder was staged
            raise RuntimeError("disk full")
        return write_component(component, *args, **kwargs)

    monkeypatch.setattr(repository, "write_component", fail_at_unet)
    with pytest.raises(RuntimeError, match="disk full"):
        export_repository(tiny_checkpoint, out, ExportOptions(Contents(safety_checker=False)))
    assert list(out.iterdir()) == []  # no staging folder, no half-written model


def test_tokenizer_json_only_is_accepted(configs_only, tmp_path):
    from transformers import CLIPTokenizer

    from sd_triton.export.checkpoint import inspect_checkpoint
    from sd_triton.export.pipeline_models import write_assets

    folder = configs_only / "tokenizer"
    CLIPTokenizer.from_pretrained(folder).save_pretrained(tmp_path / "saved")
    shutil.rmtree(folder)
    shutil.copytree(tmp_path / "saved", folder)
    assert not (folder / "vocab.json").exists() and (folder / "tokenizer.json").exists()
    ckpt = inspect_checkpoint(configs_only)
    assert [f.name for f in ckpt.tokenizer_files["tokenizer"]][0] == "tokenizer.json"
    write_assets(ckpt, tmp_path / "assets", {})
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "assets" / "tokenizer")
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


# ------------------------------------------------- checkpoints without a safety checker


@pytest.fixture(scope="module")
def no_checker_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint as SD 2.x and most community models ship: model_index.json
    says ``safety_checker: null`` (and ``feature_extractor: null``), no folders."""
    dest = tmp_path_factory.mktemp("no-checker") / "ckpt"
    skip = shutil.ignore_patterns("safety_checker", "feature_extractor")
    shutil.copytree(tiny_checkpoint, dest, ignore=skip)
    index = json.loads((dest / "model_index.json").read_text())
    index.update(safety_checker=[None, None], feature_extractor=[None, None])
    index["requires_safety_checker"] = False
    (dest / "model_index.json").write_text(json.dumps(index))
    return dest


def test_checkpoint_without_safety_checker_exports_as_is(
    no_checker_checkpoint, tiny_repository, tmp_path, monkeypatch, caplog, copy_onnx_export
):
    from diffusers import StableDiffusionPipeline
    from helpers import max_diff

    from sd_pipeline import Assets, OnnxComponents, generate, make_request
    from sd_triton.export.cli import main

    copy_onnx_export(monkeypatch, tiny_repository)  # same weights: no tracing again
    out = tmp_path / "repo"
    with caplog.at_level(logging.INFO, logger="sd_triton.export"):
        assert main([str(no_checker_checkpoint), str(out)]) == 0  # no --no-safety-checker
    assert "has no safety checker (model_index.json): exporting without one" in caplog.text
    assert not (out / "safety_checker").exists()
    assets = Assets.load(out / "stable_diffusion" / "1" / "assets")
    assert assets.config.safety_checker is False
    assert "safety_checker" not in assets.config.component_models

    # The exported pipeline runs without it and equals diffusers' pipeline without one.
    settings = dict(prompt="a red bicycle", height=32, width=32, num_inference_steps=2)
    result = generate(make_request(assets.config, seed=5, **settings), OnnxComponents(out), assets)
    pipe = StableDiffusionPipeline.from_pretrained(no_checker_checkpoint)
    assert pipe.safety_checker is None
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(generator=torch.Generator().manual_seed(5), output_type="np", **settings)
    assert max_diff(result.images, (expected.images * 255).round().astype(np.uint8)) <= 1
    assert not result.nsfw_content_detected.any()
