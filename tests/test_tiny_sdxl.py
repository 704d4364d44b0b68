"""The tiny SDXL base and refiner built from code: they load and run in diffusers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sd_triton.export import tiny
from sd_triton.export.checkpoint import ExportError, family


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sdxl") / "base"
    assert tiny.main([str(out), "--family", "sdxl"]) == 0
    return out


@pytest.fixture(scope="module")
def refiner_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sdxl") / "refiner"
    assert tiny.main([str(out), "--family", "sdxl-refiner"]) == 0
    return out


def _configs(folder: Path) -> dict[str, dict]:
    """Every component's config.json, by folder name."""
    return {c.parent.name: json.loads(c.read_text()) for c in folder.glob("*/config.json")}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in folder.rglob("*") if f.is_file()}


def _generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_base_runs_in_diffusers(base_dir):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(base_dir)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert pipe.text_encoder.config.hidden_size == 32
    assert pipe.text_encoder_2.config.hidden_size == 64
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert pipe.vae.config.force_upcast and pipe.config.force_zeros_for_empty_prompt
    assert pipe.default_sample_size * pipe.vae_scale_factor == 64
    for height, width in ((64, 64), (48, 64)):
        images = pipe(
            ["a photo of a cat"] * 3,
            num_inference_steps=2,
            height=height,
            width=width,
            generator=_generators(0, 0, 1),
            output_type="np",
        ).images
        assert images.shape == (3, height, width, 3)
        assert np.isfinite(images).all() and images.std() > 0
        # The same seed, the same image (up to batched float rounding).
        np.testing.assert_allclose(images[0], images[1], rtol=0, atol=1e-5)
        assert np.abs(images[0] - images[2]).max() > 0.01  # another seed, another image


def test_refiner_runs_in_diffusers(refiner_dir):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder is None and pipe.tokenizer is None
    assert pipe.config.requires_aesthetics_score
    image = torch.rand((1, 3, 48, 64), generator=torch.Generator().manual_seed(3))
    images = pipe(
        ["a photo of a cat"] * 2,
        image=image,
        strength=0.5,
        num_inference_steps=4,
        generator=_generators(0, 1),
        output_type="np",
    ).images
    assert images.shape == (2, 48, 64, 3)
    assert np.isfinite(images).all()
    assert np.abs(images[0] - images[1]).max() > 0.01


def test_refiner_shares_the_base_vae_and_second_text_encoder(base_dir, refiner_dir):
    for name in ("vae", "text_encoder_2"):
        base = _files(base_dir / name)
        assert base == _files(refiner_dir / name), name


def test_build_is_byte_identical(base_dir, refiner_dir, tmp_path):
    for src, flag in ((base_dir, "sdxl"), (refiner_dir, "sdxl-refiner")):
        again = tmp_path / flag
        assert tiny.main([str(again), "--family", flag]) == 0
        want, got = _files(src), _files(again)
        assert want.keys() == got.keys()
        for name in want:
            assert want[name] == got[name], name


def test_family_from_configs(base_dir, refiner_dir):
    assert family(_configs(base_dir)) == "sdxl"
    assert family(_configs(refiner_dir)) == "sdxl-refiner"
    assert family({"unet": tiny.TINY.unet, "text_encoder": tiny.TINY.text_encoder}) == "sd"
    without_second_encoder = {k: v for k, v in _configs(base_dir).items() if k != "text_encoder_2"}
    with pytest.raises(ExportError, match="text_encoder_2"):
        family(without_second_encoder)


def test_unet_added_conditioning_fits_the_encoders(base_dir, refiner_dir):
    """Pooled projection + time ids (6 for the base, 5 for the refiner) make the UNet's input."""
    for folder, time_ids in ((base_dir, 6), (refiner_dir, 5)):
        configs = _configs(folder)
        unet, encoder_2 = configs["unet"], configs["text_encoder_2"]
        widths = sum(
            configs[k]["hidden_size"] for k in ("text_encoder", "text_encoder_2") if k in configs
        )
        assert unet["cross_attention_dim"] == widths
        assert unet["projection_class_embeddings_input_dim"] == (
            encoder_2["projection_dim"] + time_ids * unet["addition_time_embed_dim"]
        )


def test_sd_options_are_refused_for_sdxl(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tiny.main([str(tmp_path / "x"), "--family", "sdxl", "--inpainting"])
    assert "--family sd" in capsys.readouterr().err


def test_base_hands_latents_to_the_refiner(base_dir, refiner_dir):
    """diffusers' ensemble of experts: the base stops at denoising_end, the refiner goes on."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline.from_pretrained(base_dir)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_dir)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    latents = base(
        "a photo of a cat",
        num_inference_steps=4,
        denoising_end=0.5,
        generator=_generators(0),
        output_type="latent",
    ).images
    assert latents.shape == (1, 4, 32, 32)
    images = refiner(
        "a photo of a cat",
        image=latents,
        num_inference_steps=4,
        denoising_start=0.5,
        generator=_generators(0),
        output_type="np",
    ).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
