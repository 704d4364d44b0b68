"""The random-weight SD 1.x builders: tiny (tests) and full size (benchmarks)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from sd_triton.export import tiny


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_reloads_as_sd1_pipeline(pipe, tiny_checkpoint):
    from diffusers import PNDMScheduler
    from transformers import CLIPTokenizer

    assert isinstance(pipe.scheduler, PNDMScheduler)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert list(pipe.unet.config.block_out_channels) == [32, 64]
    assert pipe.text_encoder.config.num_hidden_layers == 5
    assert pipe.text_encoder.config.vocab_size == 49408
    assert pipe.vae_scale_factor == 2
    assert (tiny_checkpoint / "tokenizer" / "vocab.json").is_file()
    scheduler = json.loads((tiny_checkpoint / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["clip_sample"] is False and scheduler["steps_offset"] == 1
    assert scheduler["beta_schedule"] == "scaled_linear"


def test_build_is_deterministic(pipe):
    again = tiny.build_pipeline(tiny.TINY, seed=0)
    for name in ("unet", "vae", "text_encoder", "safety_checker"):
        a = dict(getattr(pipe, name).state_dict())
        b = dict(getattr(again, name).state_dict())
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{name}.{key}")


@pytest.fixture(scope="module")
def generated(pipe):
    """Eight 2-step 32x32 generations (two prompts x four seeds): images and diffusers' flags."""
    out = pipe(
        ["a photo of a cat"] * 4 + ["a watercolor landscape"] * 4,
        num_inference_steps=2,
        height=32,
        width=32,
        generator=[torch.Generator().manual_seed(s) for s in [0, 1, 2, 3] * 2],
        output_type="np",
    )
    return out.images, list(out.nsfw_content_detected)


def test_safety_checker_flags_some_and_passes_others(generated):
    images, flags = generated
    assert any(flags) and not all(flags), flags
    for image, flagged in zip(images, flags, strict=True):
        assert (image.max() == 0) == flagged  # flagged images are blacked out


def test_onnx_safety_checker_agrees_with_diffusers(pipe, generated, tiny_repository):
    """On real generations: the same flags, flagged images blacked out, others untouched."""
    # Generated images that diffusers blacked out cannot be re-checked as
    # they were: add images decoded from random latents (the calibration's kind).
    with torch.no_grad():
        latents = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(7))
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    candidates = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    candidates = np.concatenate([candidates, generated[0]]).astype(np.float32)
    clip_input = pipe.feature_extractor(pipe.numpy_to_pil(candidates), return_tensors="np")
    clip_input = clip_input.pixel_values.astype(np.float32)
    with torch.no_grad():
        _, want = pipe.safety_checker(
            clip_input=torch.from_numpy(clip_input), images=candidates.copy()
        )
    session = ort.InferenceSession(str(tiny_repository / "safety_checker" / "1" / "model.onnx"))
    out_images, got = session.run(None, {"clip_input": clip_input, "images": candidates})
    np.testing.assert_array_equal(got, np.array(want))
    assert got[:8].any() and not got[:8].all(), got
    for image, out, flagged in zip(candidates, out_images, got, strict=True):
        np.testing.assert_array_equal(out, np.zeros_like(image) if flagged else image)


def test_full_size_architecture_is_sd15():
    """SD 1.5's parameter counts, built on the meta device (no memory, no time)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    def count(module):
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        unet = UNet2DConditionModel(**tiny.SD15.unet)
        vae = AutoencoderKL(**tiny.SD15.vae)
        text = CLIPTextModel(CLIPTextConfig(**tiny.SD15.text_encoder))
        checker = tiny.build_safety_checker(tiny.SD15, seed=0)
    assert count(unet) == 859_520_964
    assert count(vae) == 83_653_863
    assert count(text) == 123_060_480
    assert 300e6 < count(checker.vision_model) < 310e6
