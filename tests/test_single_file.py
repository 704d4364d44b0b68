"""Single-file checkpoints (original LDM/SGM layout) -> diffusers -> the Triton repository.

Tiny models built from code are written as single files by
tests/original_layout.py (diffusers has no writer) and converted back with
``sd_triton.export.single_file``: the weights must come back bit for bit, and
the exported repository must equal the export of the diffusers folder. The
shipped full-size configs are checked on the meta device (no weights): each
family's original layout is detected as that family, by us and by diffusers.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from original_layout import MODELS, original_layout, original_state_dict, write_original
from safetensors.torch import load_file, save_file

from sd_triton.client._infotext import format_infotext, parse_infotext
from sd_triton.client._request import model_defaults
from sd_triton.client._types import GenerationSettings
from sd_triton.export import cli, tiny
from sd_triton.export.checkpoint import ExportError
from sd_triton.export.single_file import (
    FAMILIES,
    SingleFileOptions,
    config_folder,
    convert,
    detect_family,
    model_hash,
)
from sd_triton.export.tokenizer import MERGES_SHA256, VOCAB_SHA256

ONNX_COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")


def _build(build_dir: Path, name: str, make) -> Path:
    """A tiny diffusers folder, built once per build dir (``make(path)`` writes it)."""
    path = build_dir / f"single-file-{name}"
    if not (path / "model_index.json").exists():
        make(path)
    return path


@pytest.fixture(scope="module")
def folders(build_dir, tiny_checkpoint) -> dict[str, Path]:
    """Tiny diffusers folders of every family tested here."""
    sd2 = replace(
        tiny.TINY,
        text_encoder={**tiny.TINY.text_encoder, "hidden_act": "gelu"},  # OpenCLIP's
        unet={**tiny.TINY.unet, "use_linear_projection": True, "attention_head_dim": (2, 4)},
        scheduler={**tiny.SD15_SCHEDULER, "prediction_type": "v_prediction"},
    )
    sd2_inpainting = replace(tiny.inpainting(sd2), scheduler=dict(tiny.SD15_SCHEDULER))  # epsilon
    makers = {
        "sd1-inpainting": lambda p: tiny.main([str(p), "--inpainting"]),
        "sd2": lambda p: tiny.save_pipeline(tiny.build_pipeline(sd2), p),
        "sd2-inpainting": lambda p: tiny.save_pipeline(tiny.build_pipeline(sd2_inpainting), p),
        "sdxl-base": lambda p: tiny.main([str(p), "--family", "sdxl"]),
        "sdxl-refiner": lambda p: tiny.main([str(p), "--family", "sdxl-refiner"]),
    }
    return {"sd1": tiny_checkpoint} | {n: _build(build_dir, n, m) for n, m in makers.items()}


def _weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(next((folder / name).glob("*.safetensors")))


def _assert_same_weights(a: Path, b: Path) -> None:
    names = [n for n in MODELS if (a / n).is_dir()]
    assert names == [n for n in MODELS if (b / n).is_dir()]
    for name in names:
        wa, wb = _weights(a, name), _weights(b, name)
        assert wa.keys() == wb.keys(), name
        for key in wa:
            assert torch.equal(wa[key], wb[key]), f"{name}: {key}"


@pytest.mark.parametrize(
    ("family", "suffix", "prediction_type"),
    [
        ("sd1", ".safetensors", None),
        ("sd1", ".ckpt", None),
        ("sd1-inpainting", ".safetensors", None),
        ("sd2", ".safetensors", "v_prediction"),
        ("sd2-inpainting", ".ckpt", None),
        ("sdxl-base", ".safetensors", None),
        ("sdxl-refiner", ".ckpt", None),
    ],
)
def test_a_single_file_converts_back_to_the_same_weights(
    folders, tmp_path, family, suffix, prediction_type
):
    src = folders[family]
    path = write_original(src, tmp_path / f"model{suffix}")
    out = tmp_path / "diffusers"
    options = SingleFileOptions(prediction_type=prediction_type, config=src)
    found = convert(path, out, options)
    assert found == {"sd2": "sd2-v"}.get(family, family)
    _assert_same_weights(src, out)
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == (prediction_type or "epsilon")
    index = json.loads((out / "model_index.json").read_text())
    assert index.get("safety_checker", [None])[0] is None  # single files carry none
    for name in ("tokenizer", "tokenizer_2"):
        if (src / name).is_dir():
            vocab, merges = (out / name / "vocab.json"), (out / name / "merges.txt")
            assert hashlib.sha256(vocab.read_bytes()).hexdigest() == VOCAB_SHA256
            assert hashlib.sha256(merges.read_bytes()).hexdigest() == MERGES_SHA256
            tokenizer_config = json.loads((src / name / "tokenizer_config.json").read_text())
            ours = json.loads((out / name / "tokenizer_config.json").read_text())
            assert ours["pad_token"] == tokenizer_config["pad_token"]


def test_sd2_needs_its_prediction_type(folders, tmp_path):
    path = write_original(folders["sd2"], tmp_path / "sd2.safetensors")
    with pytest.raises(ExportError, match="--prediction-type v_prediction"):
        convert(path, tmp_path / "out", SingleFileOptions(config=folders["sd2"]))
    out = tmp_path / "base"
    options = SingleFileOptions(prediction_type="epsilon", config=folders["sd2"])
    assert convert(path, out, options) == "sd2-base"
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "epsilon"


def test_a_float16_file_stays_float16_and_exact(tiny_checkpoint, tmp_path):
    """Weights keep the file's dtype (half the temporary space); values are the file's."""
    half = {k: v.half() for k, v in original_state_dict(tiny_checkpoint).items()}
    save_file(half, tmp_path / "half.safetensors")
    out = tmp_path / "out"
    convert(tmp_path / "half.safetensors", out, SingleFileOptions(config=tiny_checkpoint))
    for name in ("unet", "vae", "text_encoder"):
        source = _weights(tiny_checkpoint, name)
        got = _weights(out, name)
        assert all(got[k].dtype == torch.float16 for k in got), name
        assert all(torch.equal(got[k], source[k].half()) for k in source), name


def test_a_single_file_refiner_is_converted_with_its_family_configs(folders, tmp_path, monkeypatch):
    """``--refiner FILE``: converted with the shipped configs of the family it is detected as
    (here the tiny refiner's own configs stand in for the full-size ones)."""
    from sd_triton.export import single_file as SF
    from sd_triton.export.options import Contents, ExportOptions

    path = write_original(folders["sdxl-refiner"], tmp_path / "refiner.safetensors")
    mismatch = r"shipped sdxl-refiner configs; --config DIR\?\): "
    with (
        pytest.raises(ExportError, match=mismatch),
        SF.refiner_folder(ExportOptions(Contents(refiner=path))),
    ):
        pass
    shipped = SF.config_folder
    monkeypatch.setattr(
        SF, "config_folder", lambda f: folders[f] if f == "sdxl-refiner" else shipped(f)
    )
    with SF.refiner_folder(ExportOptions(Contents(refiner=path))) as opts:
        _assert_same_weights(folders["sdxl-refiner"], opts.contents.refiner)
    assert not opts.contents.refiner.exists()  # removed with the context
    folder_opts = ExportOptions(Contents(refiner=folders["sdxl-refiner"]))
    with SF.refiner_folder(folder_opts) as opts:
        assert opts is folder_opts


def _ema_key(key: str) -> str:
    """LDM's EMA name of a UNet weight: ``model_ema.`` + the key without its dots."""
    return "model_ema." + "".join(key.split(".")[1:])


def test_ema_weights_are_used_only_when_asked(tiny_checkpoint, tmp_path):
    unet = {k: v for k, v in original_state_dict(tiny_checkpoint).items() if k.startswith("model.")}
    ema = {_ema_key(k): v + 1 for k, v in unet.items()}
    path = write_original(tiny_checkpoint, tmp_path / "with-ema.safetensors", extra=ema)
    trained = _weights(tiny_checkpoint, "unet")
    for use_ema, shift in ((False, 0), (True, 1)):
        out = tmp_path / f"ema-{use_ema}"
        convert(path, out, SingleFileOptions(ema=use_ema, config=tiny_checkpoint))
        got = _weights(out, "unet")
        assert all(torch.equal(got[k], trained[k] + shift) for k in trained)
    plain = write_original(tiny_checkpoint, tmp_path / "plain.safetensors")
    with pytest.raises(ExportError, match="no EMA weights"):
        convert(plain, tmp_path / "x", SingleFileOptions(ema=True, config=tiny_checkpoint))


def _meta_parts(folder: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """State dicts (meta tensors: shapes only) and configs of a config folder's models."""
    index = json.loads((folder / "model_index.json").read_text())
    parts, configs = {}, {}
    for name in (n for n in MODELS if index.get(n, [None])[0] is not None):
        library, class_name = index[name]
        cls = getattr(importlib.import_module(library), class_name)
        with torch.device("meta"):
            if library == "diffusers":
                model = cls.from_config(cls.load_config(folder / name))
                configs[name] = dict(model.config)
            else:
                config = cls.config_class.from_pretrained(folder / name)
                model, configs[name] = cls(config), config.to_dict()
        parts[name] = model.state_dict()
    return parts, configs


@pytest.mark.parametrize(
    ("family", "diffusers_type"),
    [
        ("sd1", "v1"),
        ("sd1-inpainting", "inpainting"),
        ("sd2-v", "v2"),
        ("sd2-base", "v2"),
        ("sd2-inpainting", "inpainting_v2"),
        ("sdxl-base", "xl_base"),
        ("sdxl-refiner", "xl_refiner"),
    ],
)
def test_shipped_configs_describe_the_full_size_layouts(family, diffusers_type):
    """Each family's full-size architecture, written in the original layout, is detected as
    that family by us and as the matching model type by diffusers (whose marker keys and
    shapes are the real checkpoints')."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    folder = config_folder(family)
    state_dict = original_layout(*_meta_parts(folder))
    prediction = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert detect_family(state_dict, prediction.get("prediction_type")) == family
    assert infer_diffusers_model_type(state_dict) == diffusers_type
    shipped = {p.name for p in config_folder("sd1").parent.iterdir() if p.is_dir()}
    assert set(FAMILIES) == {n for n in shipped if not n.startswith("controlnet-")}


# ------------------------------------------------------------------ the command line


def _export(src: Path, out: Path, *extra: str) -> int:
    return cli.main([str(src), str(out), "--no-stream-model", "-q", *extra])


# Lean exports: what is compared is the same either way.
LEAN = ("--no-stream-model", "--pipeline-instances", "1")
# pipeline.json keys that say where the model came from; everything else must be equal.
PROVENANCE = ("model_hash", "model_name", "source")


def _assert_same_onnx(a: Path, b: Path, components) -> None:
    for name in components:
        onnx_a, onnx_b = (r / name / "1" / "model.onnx" for r in (a, b))
        assert onnx_a.read_bytes() == onnx_b.read_bytes(), name


def _pipeline_json(repository: Path) -> dict:
    return json.loads((repository / "stable_diffusion/1/assets/pipeline.json").read_text())


def _assert_provenance(repository: Path, path: Path) -> None:
    """pipeline.json and the config parameters name the file, with the web UI's hash."""
    expected_hash = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    pipeline = _pipeline_json(repository)
    assert pipeline["model_hash"] == expected_hash
    assert pipeline["model_name"] == path.stem
    assert pipeline["source"] == str(path.resolve())
    config = (repository / "stable_diffusion" / "config.pbtxt").read_text()
    for key, value in (("model_hash", expected_hash), ("model_name", path.stem)):
        assert f'key: "{key}"\n  value {{\n    string_value: "{value}"' in config


@pytest.fixture(scope="module")
def single_file(tiny_checkpoint, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("single") / "tiny-sd1.safetensors"
    return write_original(tiny_checkpoint, path)


@pytest.fixture(scope="module")
def file_repository(single_file, tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "repository"
    assert _export(single_file, out, "--config", str(tiny_checkpoint), *LEAN) == 0
    return out


def test_export_of_a_single_file_equals_the_folders(file_repository, tiny_repository, single_file):
    _assert_same_onnx(file_repository, tiny_repository, ONNX_COMPONENTS)
    assert not (file_repository / "safety_checker").exists()  # single files carry none
    ours, theirs = _pipeline_json(file_repository), _pipeline_json(tiny_repository)
    for key in ("prediction_type", "vae_scaling_factor", "text_width", "native_height"):
        assert ours[key] == theirs[key]
    _assert_provenance(file_repository, single_file)


def test_sdxl_base_as_a_single_file_exports_the_same_repository(folders, tmp_path):
    src = folders["sdxl-base"]
    path = write_original(src, tmp_path / "tiny-sdxl.safetensors")
    assert _export(src, tmp_path / "folder", *LEAN) == 0
    assert _export(path, tmp_path / "file", "--config", str(src), *LEAN) == 0
    folder, file = tmp_path / "folder", tmp_path / "file"
    components = sorted(p.name for p in folder.iterdir() if p.name != "stable_diffusion")
    assert components == sorted(p.name for p in file.iterdir() if p.name != "stable_diffusion")
    assert "text_encoder_2" in components
    _assert_same_onnx(folder, file, components)
    ours, theirs = _pipeline_json(file), _pipeline_json(folder)
    assert ours["family"] == "sdxl"
    assert {k: v for k, v in ours.items() if k not in PROVENANCE} == {
        k: v for k, v in theirs.items() if k not in PROVENANCE
    }
    _assert_provenance(file, path)


def test_single_file_options_on_a_folder_are_an_error(tiny_checkpoint, tmp_path, capsys):
    assert _export(tiny_checkpoint, tmp_path / "out", "--ema") == 2
    assert "are for single files" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_ckpt_with_a_pickled_callable_is_refused_and_nothing_runs(tmp_path, capsys):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.ckpt"
    tensors = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}
    torch.save({"state_dict": tensors, "callback": Payload()}, path)
    with open(path, "rb") as f:  # the payload is really there: a plain unpickle would run it
        assert b"open" in f.read()
    assert _export(path, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refused" in err and "(it names io.open)" in err
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_an_unknown_layout_is_one_line_naming_what_was_found(tiny_checkpoint, tmp_path, capsys):
    # A diffusers-format UNet file is a single file, but not an original-layout checkpoint.
    path = tmp_path / "unet.safetensors"
    save_file(_weights(tiny_checkpoint, "unet"), path)
    assert _export(path, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "not a Stable Diffusion checkpoint in the original layout" in err
    assert "down_blocks." in err and "up_blocks." in err


def test_model_hash_is_the_web_uis(tmp_path):
    """SHA-256 of the whole file, 10 hex digits (not the legacy 8 digits of 64 KiB at 1 MiB)."""
    small = tmp_path / "abc.safetensors"
    small.write_bytes(b"abc")
    assert model_hash(small) == "ba7816bf8f"  # SHA-256("abc"), FIPS 180-2's example
    big = tmp_path / "big.ckpt"
    data = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    big.write_bytes(data)
    assert model_hash(big) == hashlib.sha256(data).hexdigest()[:10]
    legacy = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert not model_hash(big).startswith(legacy)


def test_infotext_writes_model_hash_and_name_as_the_web_ui():
    published = model_defaults({"model_hash": "ba7816bf8f", "model_name": "tiny-sd1"})
    assert published == {"model_hash": "ba7816bf8f", "model_name": "tiny-sd1"}
    settings = GenerationSettings(
        prompt="a cat",
        negative_prompt="",
        num_inference_steps=20,
        guidance_scale=7.5,
        height=64,
        width=64,
        seed=1,
        scheduler="euler_a",
        num_images_per_prompt=1,
        model="stable_diffusion",
        model_hash=published["model_hash"],
        checkpoint=published["model_name"],
    )
    text = format_infotext(settings)
    assert text.endswith("Size: 64x64, Model hash: ba7816bf8f, Model: tiny-sd1")
    assert parse_infotext(text)["Model hash"] == "ba7816bf8f"
    without = format_infotext(replace(settings, model_hash=None, checkpoint=None))
    assert without.endswith("Size: 64x64, Model: stable_diffusion")


@pytest.mark.server
@pytest.mark.slow
def test_served_images_carry_the_model_hash(file_repository, single_file):
    from sd_triton.client import Client
    from sd_triton.server import TritonServer

    expected = hashlib.sha256(single_file.read_bytes()).hexdigest()[:10]
    with (
        TritonServer(file_repository).start(timeout_s=300) as server,
        Client(server.grpc_url, timeout_s=300) as c,
    ):
        result = c.generate("a cat", num_inference_steps=2, seed=1, scheduler="euler")
    assert f"Model hash: {expected}, Model: tiny-sd1" in result.infotext()
