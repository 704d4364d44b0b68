"""The exporter: ONNX components equal their diffusers modules, configs agree with ONNX.

Uses the session's tiny checkpoint and its exported repository (conftest).
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import assert_config_matches_onnx

from sd_pipeline import spec as S
from sd_triton.export import components as C
from sd_triton.export import triton_config as T
from sd_triton.export.checkpoint import inspect_checkpoint, load_modules
from sd_triton.export.options import PIPELINE_MODELS
from sd_triton.export.pipeline_models import pipeline_constants

TOL = 1e-4  # max abs error relative to the reference's max abs value


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    ckpt = inspect_checkpoint(tiny_checkpoint)
    modules = load_modules(ckpt)
    return ckpt, modules


@pytest.fixture(scope="module")
def sizes(checkpoint):
    ckpt, _ = checkpoint
    return C.fixed_sizes(ckpt.configs)


# The tiny SD 1.x checkpoint's components.
SD_COMPONENTS = ["text_encoder", "unet", "vae_encoder", "vae_decoder", "safety_checker"]


@pytest.fixture(scope="module")
def components(checkpoint):
    ckpt, _ = checkpoint
    return C.checkpoint_components(ckpt.configs, safety_checker=True)


@pytest.fixture(scope="module")
def sessions(tiny_repository):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return {
        name: ort.InferenceSession(str(tiny_repository / name / "1" / "model.onnx"), options)
        for name in SD_COMPONENTS
    }


# diffusers' own call for each component, the reference the ONNX must match.
def _reference(name, modules, inputs):
    with torch.no_grad():
        if name == "text_encoder":
            out = modules["text_encoder"](inputs["input_ids"].long(), output_hidden_states=True)
            skips = inputs["skip_layers"].tolist()
            hidden = torch.stack([out.hidden_states[-1 - k][i] for i, k in enumerate(skips)])
            # diffusers' clip_skip: the chosen layer through the final layer norm.
            norm = modules["text_encoder"].final_layer_norm
            return [hidden, norm(hidden), out.pooler_output]
        if name == "unet":
            unet = modules["unet"]
            return [
                unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]).sample
            ]
        if name == "vae_encoder":
            return [modules["vae"].encode(inputs["sample"]).latent_dist.parameters]
        if name == "vae_decoder":
            return [modules["vae"].decode(inputs["latent_sample"]).sample]
        if name == "safety_checker":
            images = inputs["images"].clone()
            out, flags = modules["safety_checker"](clip_input=inputs["clip_input"], images=images)
            return [out, torch.tensor(flags)]
    raise KeyError(name)


@pytest.mark.parametrize("name", SD_COMPONENTS)
@pytest.mark.parametrize(
    "batch,latent_hw,chunks",
    [(1, (8, 8), 1), (3, (6, 10), 2)],
    ids=["b1-square", "b3-nonsquare-long-prompt"],
)
def test_component_matches_diffusers(
    name, batch, latent_hw, chunks, checkpoint, sizes, components, sessions
):
    ckpt, modules = checkpoint
    factor = pipeline_constants(ckpt.configs)["vae_scale_factor"]
    lh, lw = latent_hw
    dyn = {S.BATCH: batch, "latent_height": lh, "latent_width": lw}
    dyn.update(height=lh * factor, width=lw * factor, text_sequence=chunks * sizes["sequence"])
    inputs = C.sample_inputs(components[name], {**sizes, **dyn}, seed=batch * 100 + lh)
    if name == "text_encoder":  # every skip the batch can hold, one per sample
        inputs["skip_layers"] = torch.arange(batch, dtype=torch.int32).flip(0)
    got = sessions[name].run(None, {k: v.numpy() for k, v in inputs.items()})
    want = _reference(name, modules, inputs)
    spec = components[name].spec
    for t, g, w in zip(spec.outputs, got, want, strict=True):
        w = w.numpy()
        assert g.shape == w.shape, t.name
        assert g.dtype == np.dtype(t.dtype), t.name
        if g.dtype == np.bool_:
            np.testing.assert_array_equal(g, w, err_msg=t.name)
        else:
            err = np.abs(g - w).max() / max(np.abs(w).max(), 1e-6)
            assert err < TOL, f"{name}.{t.name}: relative error {err:.2e}"


def test_unet_timestep_is_per_sample(sessions, sizes):
    """Different timesteps in one batch give each sample its own result."""
    comp = C.COMPONENTS["unet"]
    dyn = {S.BATCH: 2, "latent_height": 8, "latent_width": 8, "text_sequence": 77}
    inputs = {k: v.numpy() for k, v in C.sample_inputs(comp, {**sizes, **dyn}).items()}
    inputs["sample"][1] = inputs["sample"][0]
    inputs["encoder_hidden_states"][1] = inputs["encoder_hidden_states"][0]
    inputs["timestep"] = np.array([10.0, 10.0], np.float32)
    same = sessions["unet"].run(None, inputs)[0]
    inputs["timestep"] = np.array([10.0, 900.5], np.float32)
    diff = sessions["unet"].run(None, inputs)[0]
    np.testing.assert_allclose(same[0], same[1], atol=1e-6)
    np.testing.assert_allclose(diff[0], same[0], atol=1e-6)
    assert np.abs(diff[1] - same[1]).max() > 1e-4


# ------------------------------------------------------------------ configs


@pytest.mark.parametrize("name", SD_COMPONENTS)
def test_component_config_agrees_with_onnx(name, tiny_repository):
    config = T.read_config(tiny_repository / name)
    assert config.name == name
    assert config.backend == "python"
    assert config.max_batch_size > 0
    assert (tiny_repository / name / "1" / "model.py").is_file()
    assert (tiny_repository / name / "1" / "component_host.py").is_file()
    assert_config_matches_onnx(config, tiny_repository / name / "1" / "model.onnx")
    assert_runs_on_cpu(config)


def assert_runs_on_cpu(config) -> None:
    """A CPU export names KIND_CPU: left to Triton, a GPU node would make KIND_GPU instances."""
    assert [g.kind for g in config.instance_group] == [T.pb.ModelInstanceGroup.KIND_CPU]


def test_unet_config_batches_dynamically(tiny_repository):
    config = T.read_config(tiny_repository / "unet")
    assert config.max_batch_size == 16
    assert config.HasField("dynamic_batching")
    # 0: a lone request does not wait at every step (benchmarks/overhead.py measured it)
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    timestep = next(i for i in config.input if i.name == "timestep")
    assert list(timestep.dims) == [1]
    assert timestep.HasField("reshape") and list(timestep.reshape.shape) == []
    assert timestep.data_type == T.pb.TYPE_FP32
    for other in ("text_encoder", "vae_decoder", "safety_checker"):
        assert not T.read_config(tiny_repository / other).HasField("dynamic_batching")


def test_config_round_trips(tiny_repository, tmp_path):
    config = T.read_config(tiny_repository / "unet")
    T.write_config(config, tmp_path)
    assert T.read_config(tmp_path) == config


def test_export_copies_no_bytecode(tiny_checkpoint, tmp_path):
    # Checked on a fresh export: the session repository has been served, and
    # the server's own imports write __pycache__ there.
    from sd_triton.export import export_repository

    export_repository(tiny_checkpoint, tmp_path / "repo")
    assert not list((tmp_path / "repo").rglob("__pycache__"))


@pytest.mark.parametrize("model", list(PIPELINE_MODELS))
def test_pipeline_model(model, tiny_repository):
    config = T.read_config(tiny_repository / model)
    spec = PIPELINE_MODELS[model]
    assert config.name == model
    assert config.backend == "python" and config.max_batch_size == 0
    assert config.model_transaction_policy.decoupled == bool(spec.extra.get("decoupled"))
    assert [i.name for i in config.input] == [t.name for t in spec.inputs]
    assert [o.name for o in config.output] == [t.name for t in spec.outputs]
    for entry, t in zip(config.input, spec.inputs, strict=True):
        assert entry.optional == t.optional, t.name
        assert list(entry.dims) == list(t.triton_dims), t.name
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["max_steps"] == "150" and params["max_images"] == "8"
    assert int(params["max_pixels"]) == 4 * 64 * 64
    assert_runs_on_cpu(config)
    version = tiny_repository / model / "1"
    assert (version / "sd_pipeline" / "spec.py").is_file()
    assert (version / "component_host.py").is_file()
    assert (version / "assets" / "pipeline.json").is_file()


def test_pipeline_json(tiny_repository, tiny_checkpoint):
    from transformers import CLIPTokenizer

    assets = tiny_repository / "stable_diffusion" / "1" / "assets"
    constants = json.loads((assets / "pipeline.json").read_text())
    assert constants["latent_channels"] == 4
    assert constants["unet_in_channels"] == 4
    assert constants["vae_scaling_factor"] == pytest.approx(0.18215)
    assert constants["vae_scale_factor"] == 2
    assert constants["native_height"] == constants["native_width"] == 64
    assert constants["size_step"] == 4
    assert constants["text_width"] == 32
    tokenizer = CLIPTokenizer.from_pretrained(tiny_checkpoint / "tokenizer")
    assert constants["tokenizer_max_length"] == tokenizer.model_max_length
    assert constants["unet_max_batch_size"] == 16
    assert constants["dtype"] == "float32"
    assert constants["source"] == str(tiny_checkpoint.resolve())
    assert constants["tensor_dtypes"]["unet"]["timestep"] == "float32"
    # SD 1.x: one text encoder, no added conditioning.
    assert constants["family"] == "sd" and constants["text_encoders"] == ["text_encoder"]
    assert constants["text_encoder_layers"] == {"text_encoder": 5}
    assert constants["cross_attention_dim"] == 32
    assert constants["unet_text_time"] is False and constants["time_cond_proj_dim"] is None
    assert constants["force_zeros_for_empty_prompt"] is False
    assert constants["requires_aesthetics_score"] is False and constants["refiner"] is False
    assert list(constants["component_models"]) == SD_COMPONENTS


def test_assets_load(tiny_repository):
    from diffusers import DDIMScheduler, PNDMScheduler
    from transformers import CLIPImageProcessor, CLIPTokenizer

    assets = tiny_repository / "stable_diffusion" / "1" / "assets"
    tokenizer = CLIPTokenizer.from_pretrained(assets / "tokenizer")
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    config = PNDMScheduler.load_config(assets / "scheduler")
    assert config["steps_offset"] == 1 and config["skip_prk_steps"] is True
    # clip_sample: false survives for the schedulers that read it (DDIM).
    assert DDIMScheduler.from_config(config).config.clip_sample is False
    processor = CLIPImageProcessor.from_pretrained(assets / "feature_extractor")
    assert processor.crop_size["height"] == 224


def test_files_readable_by_everyone(tiny_repository):
    for path in tiny_repository.rglob("*"):
        assert path.stat().st_mode & 0o004, path
