"""Stable Diffusion 1.x pipelines with random weights, built from code.

Two architectures, one builder (:func:`build_pipeline`):

- :data:`TINY`: a few-hundred-kB SD 1.x pipeline for tests (UNet with
  ``block_out_channels=(32, 64)``, a 5-layer CLIP text model of width 32, a
  2-block VAE, a tiny CLIP safety checker). Native size 64x64 px, size step
  4 px (VAE factor 2 x one UNet downsampling). Builds in about a second.
- :data:`SD15`: SD 1.5's published architecture (UNet 860 M parameters, CLIP
  ViT-L/14 text encoder 123 M, VAE, ViT-L/14 safety checker) with random
  weights, for benchmarks: same cost per step as the real model.

Both use the real SD 1.x CLIP tokenizer (see :mod:`.tokenizer`) and SD 1.5's
PNDM scheduler config. Every component is initialised from its own fixed seed,
so a build is deterministic.

The safety checker's concept thresholds are calibrated at build time so that
it flags some images and passes others: only concept 0 is live, with its
threshold at the median of its cosine scores over images decoded from random
latents; every other concept (and special-care concept) has a threshold above
any cosine (2.0), so it never fires.

:func:`inpainting` turns either into an SD inpainting architecture (UNet
``in_channels=9``: latents, mask, masked image latents), saved as a
``StableDiffusionInpaintPipeline``; every other weight is the same.

:func:`turbo` and :func:`lcm` make distilled variants: a Turbo model is
its base with SDXL-Turbo's scheduler config (Euler a, trailing timestep spacing);
an LCM model has a UNet with a guidance embedding (``time_cond_proj_dim``) and
an ``LCMScheduler`` config (LCM-Dreamshaper-v7's / lcm-sdxl's).

:func:`build_xl_pipeline` builds a tiny SDXL base (:data:`TINY_SDXL`: two CLIP
text encoders of widths 32 and 64, a ``text_time`` UNet, a 2-block VAE with
``force_upcast``) or refiner (:data:`TINY_SDXL_REFINER`: ``text_encoder_2``
only, a UNet conditioned on 5 time ids with the aesthetic score). Both use
SDXL's Euler scheduler config and ship no safety checker, as SDXL does. The
refiner's VAE and ``text_encoder_2`` have the base's weights, as the real pair.

Command line::

    python -m sd_triton.export.tiny OUT_DIR [--full-size] [--inpainting] [--seed N]
    python -m sd_triton.export.tiny OUT_DIR --family sdxl|sdxl-refiner [--seed N]
    python -m sd_triton.export.tiny OUT_DIR [--family sd|sdxl] --variant turbo|lcm
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import tokenizer as clip_tokenizer

__all__ = [
    "SD15",
    "TINY",
    "TINY_SDXL",
    "TINY_SDXL_REFINER",
    "Architecture",
    "XLArchitecture",
    "build_pipeline",
    "build_xl_pipeline",
    "inpainting",
    "lcm",
    "main",
    "save_pipeline",
    "turbo",
]

log = logging.getLogger(__name__)

# SD 1.5's scheduler_config.json.
SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "trained_betas": None,
}

# OpenAI CLIP's image normalisation (SD 1.5's feature_extractor).
CLIP_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

# A concept threshold no cosine reaches: the concept never fires.
NEVER = 2.0


@dataclass(frozen=True)
class Architecture:
    """Configs of an SD 1.x pipeline's components (diffusers / transformers kwargs)."""

    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    safety_vision: dict[str, Any]
    projection_dim: int
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD15_SCHEDULER))
    # Latent side used to decode the images that calibrate the safety checker.
    calibration_latent_size: int = 32
    calibration_images: int = 8


# The text encoder reads what SD 1.x's CLIP tokenizer writes: its vocabulary, its length.
_CLIP_TEXT_COMMON = {
    "vocab_size": clip_tokenizer.VOCAB_SIZE,
    "max_position_embeddings": clip_tokenizer.MAX_LENGTH,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

TINY = Architecture(
    name="tiny-sd1",
    unet={
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    vae={
        "sample_size": 64,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "norm_num_groups": 32,
    },
    text_encoder={
        **_CLIP_TEXT_COMMON,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 5,
        "projection_dim": 32,
    },
    safety_vision={
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "image_size": 224,
        "patch_size": 32,
        "hidden_act": "quick_gelu",
        "projection_dim": 32,
    },
    projection_dim=32,
    calibration_latent_size=32,
    calibration_images=16,
)

# stable-diffusion-v1-5's unet/, vae/, text_encoder/ configs and
# CompVis/stable-diffusion-safety-checker's vision tower (CLIP ViT-L/14).
SD15 = Architecture(
    name="sd15-random",
    unet={
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "down_block_types": (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        "up_block_types": (
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
        "norm_eps": 1e-5,
    },
    vae={
        "sample_size": 512,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "scaling_factor": 0.18215,
    },
    text_encoder={
        **_CLIP_TEXT_COMMON,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "projection_dim": 768,
    },
    safety_vision={
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "image_size": 224,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    },
    projection_dim=768,
    calibration_latent_size=16,
    calibration_images=4,
)


# stabilityai/stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json
# (the refiner's is the same).
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# SDXL's tokenizer_2 (OpenCLIP ViT-bigG's) pads with "!", not with the end token.
SDXL_TOKENIZER_2_PAD = "!"


@dataclass(frozen=True)
class XLArchitecture:
    """Configs of an SDXL pipeline's components; no ``text_encoder`` makes it a refiner."""

    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any] | None
    text_encoder_2: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SDXL_SCHEDULER))

    @property
    def is_refiner(self) -> bool:
        return self.text_encoder is None


_XL_TIME_EMBED_DIM = 8
_XL_TEXT_ENCODER_2 = {
    **_CLIP_TEXT_COMMON,
    "hidden_size": 64,  # differs from text_encoder's 32: single-file loaders tell them apart
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 5,
    "projection_dim": 32,
    "hidden_act": "gelu",  # OpenCLIP ViT-bigG's
}
# The SD 1.x tiny UNet's blocks, with SDXL's attention layout and added conditioning.
_XL_UNET = {
    **TINY.unet,
    "attention_head_dim": (2, 4),
    "transformer_layers_per_block": (1, 2),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": _XL_TIME_EMBED_DIM,
    # Both text encoders' penultimate hidden states, concatenated.
    "cross_attention_dim": 32 + 64,
    # text_encoder_2's pooled projection + 6 time ids (original size, crop, target size).
    "projection_class_embeddings_input_dim": 32 + 6 * _XL_TIME_EMBED_DIM,
}

TINY_SDXL = XLArchitecture(
    name="tiny-sdxl",
    unet=_XL_UNET,
    vae={**TINY.vae, "scaling_factor": 0.13025, "force_upcast": True},  # SDXL VAE's
    text_encoder=dict(TINY.text_encoder),
    text_encoder_2=_XL_TEXT_ENCODER_2,
)

TINY_SDXL_REFINER = XLArchitecture(
    name="tiny-sdxl-refiner",
    unet={
        **_XL_UNET,
        # text_encoder_2's penultimate hidden states only.
        "cross_attention_dim": 64,
        # pooled projection + 5 time ids (original size, crop, aesthetic score).
        "projection_class_embeddings_input_dim": 32 + 5 * _XL_TIME_EMBED_DIM,
    },
    vae=TINY_SDXL.vae,
    text_encoder=None,
    text_encoder_2=_XL_TEXT_ENCODER_2,
)


# stabilityai/sdxl-turbo's scheduler/scheduler_config.json.
SDXL_TURBO_SCHEDULER = {
    **SDXL_SCHEDULER,
    "_class_name": "EulerAncestralDiscreteScheduler",
    "timestep_spacing": "trailing",
}

# SimianLuo/LCM_Dreamshaper_v7's scheduler/scheduler_config.json (lcm-sdxl's differs
# only in what LCMScheduler ignores).
LCM_SCHEDULER = {
    "_class_name": "LCMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "original_inference_steps": 50,
    "prediction_type": "epsilon",
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "timestep_scaling": 10.0,
    "trained_betas": None,
}
# The tiny UNet's guidance embedding width (LCM-Dreamshaper-v7's is 256).
LCM_TIME_COND_PROJ_DIM = 32


def turbo(arch: XLArchitecture) -> XLArchitecture:
    """``arch`` as a Turbo model: the same weights, SDXL-Turbo's scheduler config."""
    from dataclasses import replace

    return replace(arch, name=f"{arch.name}-turbo", scheduler=dict(SDXL_TURBO_SCHEDULER))


def lcm(arch: Architecture | XLArchitecture) -> Architecture | XLArchitecture:
    """``arch`` as an LCM model: a UNet with a guidance embedding, LCMScheduler's config."""
    from dataclasses import replace

    unet = {**arch.unet, "time_cond_proj_dim": LCM_TIME_COND_PROJ_DIM}
    return replace(arch, name=f"{arch.name}-lcm", unet=unet, scheduler=dict(LCM_SCHEDULER))


def _scheduler(config: dict[str, Any], default: str):
    """The diffusers scheduler ``config`` names (``_class_name``), else ``default``."""
    import diffusers

    return getattr(diffusers, config.get("_class_name", default)).from_config(config)


def inpainting(arch: Architecture) -> Architecture:
    """``arch`` with an inpainting UNet: latents + mask + masked image latents in (2 x 4 + 1)."""
    from dataclasses import replace

    channels = 2 * arch.vae["latent_channels"] + 1
    return replace(
        arch, name=f"{arch.name}-inpainting", unet={**arch.unet, "in_channels": channels}
    )


def _seeded(seed: int):
    import torch

    torch.manual_seed(seed)


def build_safety_checker(arch: Architecture, seed: int):
    """A randomly initialised ``StableDiffusionSafetyChecker`` (thresholds not yet set)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    # Only the vision tower is used; the text config just completes CLIPConfig.
    config = CLIPConfig(
        text_config=dict(arch.text_encoder),
        vision_config=dict(arch.safety_vision),
        projection_dim=arch.projection_dim,
    )
    _seeded(seed)
    return StableDiffusionSafetyChecker(config).eval()


def build_feature_extractor(arch: Architecture):
    from transformers import CLIPImageProcessor

    side = arch.safety_vision["image_size"]
    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": side},
        resample=3,  # bicubic
        do_center_crop=True,
        crop_size={"height": side, "width": side},
        do_normalize=True,
        image_mean=CLIP_IMAGE_MEAN,
        image_std=CLIP_IMAGE_STD,
        do_convert_rgb=True,
    )


def calibrate_safety_checker(checker, vae, feature_extractor, arch: Architecture, seed: int):
    """Make concept 0 fire on about half of the images the VAE decodes.

    Images are decoded from random latents (``arch.calibration_images`` of
    them) and embedded by the checker's vision tower. Concept 0's embedding
    is their mean plus a random direction within their spread, so its cosine
    varies from image to image; its threshold lies midway between the two
    cosines around the median. Every other concept (and special-care
    concept) gets a threshold no cosine reaches.
    """
    import torch
    from diffusers.image_processor import VaeImageProcessor

    gen = torch.Generator().manual_seed(seed)
    side = arch.calibration_latent_size
    latents = torch.randn(
        (arch.calibration_images, vae.config.latent_channels, side, side), generator=gen
    )
    with torch.no_grad():
        images = vae.decode(latents / vae.config.scaling_factor).sample
        pil = VaeImageProcessor().postprocess(images, output_type="pil")
        clip_input = feature_extractor(pil, return_tensors="pt").pixel_values
        embeds = checker.visual_projection(checker.vision_model(clip_input)[1])
        embeds = torch.nn.functional.normalize(embeds, dim=-1)
        # A concept direction that separates the images: the spread of the
        # embeddings around their mean, plus the mean, so scores vary widely.
        centered = embeds - embeds.mean(0, keepdim=True)
        direction = torch.randn(embeds.shape[1], generator=gen) @ centered.T @ centered
        concept = torch.nn.functional.normalize(direction, dim=0) + embeds.mean(0)
        cos = embeds @ torch.nn.functional.normalize(concept, dim=0)
        threshold = cos.median().item()
        # Put the threshold midway between the two scores around the median,
        # far from any calibration image (diffusers rounds scores to 3 decimals).
        below = cos[cos <= threshold].max().item()
        above = cos[cos > threshold].min().item()
        threshold = (below + above) / 2
        checker.concept_embeds.data[:] = torch.randn(checker.concept_embeds.shape, generator=gen)
        checker.concept_embeds.data[0] = concept
        checker.concept_embeds_weights.data.fill_(NEVER)
        checker.concept_embeds_weights.data[0] = threshold
        checker.special_care_embeds.data[:] = torch.randn(
            checker.special_care_embeds.shape, generator=gen
        )
        checker.special_care_embeds_weights.data.fill_(NEVER)
    log.debug("safety checker concept 0: threshold %.4f, cosines %s", threshold, cos.tolist())
    return checker


def build_pipeline(arch: Architecture = TINY, seed: int = 0):
    """Build an SD 1.x ``StableDiffusionPipeline`` with random weights from ``arch``.

    An inpainting UNet (more input than latent channels) makes it a
    ``StableDiffusionInpaintPipeline``.
    """
    import tempfile

    from diffusers import (
        AutoencoderKL,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .tokenizer import write_clip_tokenizer

    _seeded(seed)
    unet = UNet2DConditionModel(**arch.unet).eval()
    _seeded(seed + 1)
    vae = AutoencoderKL(**arch.vae).eval()
    _seeded(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**arch.text_encoder)).eval()
    feature_extractor = build_feature_extractor(arch)
    checker = build_safety_checker(arch, seed + 3)
    calibrate_safety_checker(checker, vae, feature_extractor, arch, seed + 4)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp))
    inpaint = arch.unet["in_channels"] != arch.vae["latent_channels"]
    cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
    return cls(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        # from_config keeps keys PNDM ignores (clip_sample: other schedulers read it).
        scheduler=_scheduler(arch.scheduler, "PNDMScheduler"),
        safety_checker=checker,
        feature_extractor=feature_extractor,
        requires_safety_checker=True,
    )


def build_xl_pipeline(arch: XLArchitecture = TINY_SDXL, seed: int = 0):
    """Build an SDXL base (``StableDiffusionXLPipeline``) or refiner with random weights.

    Each component has its own seed, the same in base and refiner, so a base
    and a refiner built with one seed share their VAE and ``text_encoder_2``.
    """
    import tempfile

    from diffusers import (
        AutoencoderKL,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    from .tokenizer import write_clip_tokenizer

    _seeded(seed + (4 if arch.is_refiner else 0))
    unet = UNet2DConditionModel(**arch.unet).eval()
    _seeded(seed + 1)
    vae = AutoencoderKL(**arch.vae).eval()
    text_encoder = tokenizer = None
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_clip_tokenizer(tmp)
        if not arch.is_refiner:
            _seeded(seed + 2)
            text_encoder = CLIPTextModel(CLIPTextConfig(**arch.text_encoder)).eval()
            tokenizer = CLIPTokenizer.from_pretrained(folder)
        tokenizer_2 = CLIPTokenizer.from_pretrained(folder, pad_token=SDXL_TOKENIZER_2_PAD)
    _seeded(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**arch.text_encoder_2)).eval()
    components = dict(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_scheduler(arch.scheduler, "EulerDiscreteScheduler"),
        add_watermarker=False,  # SDXL's invisible watermark is not part of the model
    )
    if arch.is_refiner:
        # stable-diffusion-xl-refiner-1.0's model_index.json.
        return StableDiffusionXLImg2ImgPipeline(
            **components, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False
        )
    return StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=True)


def save_pipeline(pipe, out_dir: str | Path) -> Path:
    """Save ``pipe`` in diffusers format; tokenizers as SD 1.x's vocab.json + merges.txt.

    transformers 5's ``save_pretrained`` writes only ``tokenizer.json``; published
    SD folders carry ``vocab.json`` + ``merges.txt``, so those are written instead.
    """
    import shutil

    from .tokenizer import write_clip_tokenizer

    out = Path(out_dir)
    pipe.save_pretrained(out)
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(pipe, name, None) is not None:
            shutil.rmtree(out / name)
            write_clip_tokenizer(out / name)
    if getattr(pipe, "tokenizer_2", None) is not None:
        _pad_with(out / "tokenizer_2", SDXL_TOKENIZER_2_PAD)
    return out


def _pad_with(folder: Path, pad_token: str) -> None:
    """Set the pad token in a tokenizer folder's two config files."""
    import json

    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        config = json.loads((folder / name).read_text())
        config["pad_token"] = pad_token
        (folder / name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sd_triton.export.tiny",
        description="Build an SD diffusers folder with random weights (tiny SD 1.x by default).",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--full-size",
        action="store_true",
        help="SD 1.5's full architecture (UNet 860M parameters) instead of the tiny one",
    )
    parser.add_argument(
        "--inpainting",
        action="store_true",
        help="an inpainting UNet (9 input channels), as SD inpainting checkpoints",
    )
    parser.add_argument(
        "--family",
        choices=("sd", "sdxl", "sdxl-refiner"),
        default="sd",
        help="sd: SD 1.x (default); sdxl, sdxl-refiner: a tiny SDXL base or refiner",
    )
    parser.add_argument(
        "--variant",
        choices=("turbo", "lcm"),
        default=None,
        help="turbo: SDXL-Turbo's scheduler config (--family sdxl); lcm: a UNet with a "
        "guidance embedding (time_cond_proj_dim) and an LCMScheduler config (sd or sdxl)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.family != "sd" and (args.full_size or args.inpainting):
        parser.error("--full-size and --inpainting are for --family sd")
    if args.variant == "turbo" and args.family != "sdxl":
        parser.error("--variant turbo is for --family sdxl")
    if args.variant == "lcm" and args.family == "sdxl-refiner":
        parser.error("--variant lcm is for --family sd or sdxl")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    start = time.perf_counter()
    if args.family == "sd":
        arch = SD15 if args.full_size else TINY
        if args.inpainting:
            arch = inpainting(arch)
        arch = lcm(arch) if args.variant == "lcm" else arch
        pipe = build_pipeline(arch, seed=args.seed)
    else:
        arch = TINY_SDXL if args.family == "sdxl" else TINY_SDXL_REFINER
        arch = {"turbo": turbo, "lcm": lcm}.get(args.variant or "", lambda a: a)(arch)
        pipe = build_xl_pipeline(arch, seed=args.seed)
    save_pipeline(pipe, args.out_dir)
    log.info("%s: wrote %s in %.1f s", arch.name, args.out_dir, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
