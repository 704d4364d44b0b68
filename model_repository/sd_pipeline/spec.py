"""The tensor contract, declared once.

Every tensor that crosses a Triton model boundary is described here: the
five component models (text encoder, UNet, VAE encoder/decoder, safety
checker) and the public ``stable_diffusion`` model. The exporter builds the
ONNX graphs' input/output names and dynamic axes and every ``config.pbtxt``
from these descriptions; the pipeline makes its BLS calls with them; tests
check configs and ONNX files against them.

Dimensions are ints (fixed) or strings (symbolic, dynamic). ``"B"`` is the
batch dimension: in Triton configs it is the implicit batch dimension
(``max_batch_size > 0``), everything after it is ``dims``.

This module must stay importable with only the standard library: it ships
inside the model repository and is imported by the exporter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BATCH = "B"

# Triton config data types by the numpy dtype names we use.
TRITON_DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
    "bytes": "TYPE_STRING",
}


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor: numpy dtype name and dims (ints or symbolic names)."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]
    optional: bool = False
    # When set, Triton presents the tensor to the model with this shape
    # (config ``reshape``); used for the per-sample UNet timestep, declared
    # ``dims: [1]`` and seen by the model as ``[B]``.
    reshape: tuple[int, ...] | None = None
    description: str = ""
    # What an optional input means when it is absent (None: no fixed value,
    # e.g. a size that depends on the model, or a random seed).
    default: object = None

    @property
    def batched(self) -> bool:
        return bool(self.dims) and self.dims[0] == BATCH

    @property
    def triton_dims(self) -> tuple[int, ...]:
        """Dims as a Triton config writes them: batch dropped, dynamic = -1."""
        dims = self.dims[1:] if self.batched else self.dims
        return tuple(d if isinstance(d, int) else -1 for d in dims)

    @property
    def triton_dtype(self) -> str:
        """The type as a Triton model config writes it: ``TYPE_FP32``, ``TYPE_STRING``."""
        return TRITON_DTYPES[self.dtype]

    @property
    def datatype(self) -> str:
        """The type as Triton's clients and protocol name it: ``FP32``, ``BYTES``."""
        return "BYTES" if self.dtype == "bytes" else self.triton_dtype.removeprefix("TYPE_")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    description: str = ""
    extra: dict = field(default_factory=dict)

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


# Component models. Names follow diffusers / Optimum's ONNX export. "dtype"
# here is the fp32 export's; an fp16 export turns every float32 tensor into
# float16 except the UNet timestep (fractional timesteps must not be rounded).
def _text_encoder(name: str, suffix: str = "") -> ModelSpec:
    width, pooled = f"text_width{suffix}", f"pooled_width{suffix}"
    return ModelSpec(
        name=name,
        inputs=(
            TensorSpec("input_ids", "int32", (BATCH, "sequence")),
            # Layers skipped from the end, per sample: 0 = the last layer. SD 1.x/2.x
            # use the normed last layer (diffusers' clip_skip N: skip N); SDXL the
            # penultimate layer as it is (clip_skip N: skip N + 1).
            TensorSpec("skip_layers", "int32", (BATCH, 1), reshape=()),
        ),
        outputs=(
            TensorSpec("hidden_state", "float32", (BATCH, "sequence", width)),
            TensorSpec("normed_hidden_state", "float32", (BATCH, "sequence", width)),
            # The pooled output (end-of-text token); a CLIPTextModelWithProjection's
            # is projected (SDXL's text_embeds).
            TensorSpec("text_embeds", "float32", (BATCH, pooled)),
        ),
        description="CLIP text model: token ids -> per-token embeddings of a chosen layer, "
        "and the pooled embedding.",
    )


TEXT_ENCODER = _text_encoder("text_encoder")
# SDXL's second text encoder (OpenCLIP ViT-bigG, with projection).
TEXT_ENCODER_2 = _text_encoder("text_encoder_2", "_2")

# The UNet's conditioning inputs beyond the text: SDXL's added conditioning
# (the pooled text embedding and the size/crop/aesthetic time ids), and the
# guidance embedding of a UNet distilled with guidance (LCM's
# ``time_cond_proj_dim``).
_TEXT_TIME = (
    TensorSpec("text_embeds", "float32", (BATCH, "pooled_width_2")),
    TensorSpec("time_ids", "float32", (BATCH, "time_ids")),
)
_TIMESTEP_COND = (TensorSpec("timestep_cond", "float32", (BATCH, "time_cond_dim")),)


def unet_spec(*, text_time: bool = False, timestep_cond: bool = False) -> ModelSpec:
    """The UNet's contract: SD 1.x/2.x's, plus SDXL's ``text_time`` inputs and/or LCM's
    ``timestep_cond`` when the checkpoint's UNet has them."""
    inputs = (
        TensorSpec("sample", "float32", (BATCH, "in_channels", "latent_height", "latent_width")),
        TensorSpec("timestep", "float32", (BATCH, 1), reshape=()),
        # 77 tokens per 75-token prompt chunk: dynamic.
        TensorSpec(
            "encoder_hidden_states", "float32", (BATCH, "text_sequence", "cross_attention_dim")
        ),
    )
    inputs += (_TEXT_TIME if text_time else ()) + (_TIMESTEP_COND if timestep_cond else ())
    return ModelSpec(
        name="unet",
        inputs=inputs,
        outputs=(
            TensorSpec(
                "out_sample",
                "float32",
                (BATCH, "latent_channels", "latent_height", "latent_width"),
            ),
        ),
        description="Denoising UNet; timestep is per sample so requests at different steps "
        "batch together.",
    )


UNET = unet_spec()

VAE_ENCODER = ModelSpec(
    name="vae_encoder",
    inputs=(TensorSpec("sample", "float32", (BATCH, 3, "height", "width")),),
    outputs=(
        # Mean and log-variance of the latent distribution, concatenated on
        # channels (2 * latent_channels): the pipeline samples from it with
        # the request's generator, exactly as diffusers does.
        TensorSpec(
            "latent_parameters",
            "float32",
            (BATCH, "latent_parameters", "latent_height", "latent_width"),
        ),
    ),
    description="VAE encoder: image in [-1, 1] -> latent distribution parameters.",
)

VAE_DECODER = ModelSpec(
    name="vae_decoder",
    inputs=(
        TensorSpec(
            "latent_sample", "float32", (BATCH, "latent_channels", "latent_height", "latent_width")
        ),
    ),
    outputs=(TensorSpec("sample", "float32", (BATCH, 3, "height", "width")),),
    description="VAE decoder: unscaled latents -> image in [-1, 1].",
)

SAFETY_CHECKER = ModelSpec(
    name="safety_checker",
    inputs=(
        TensorSpec("clip_input", "float32", (BATCH, 3, "clip_height", "clip_width")),
        TensorSpec("images", "float32", (BATCH, "height", "width", 3)),
    ),
    outputs=(
        TensorSpec("out_images", "float32", (BATCH, "height", "width", 3)),
        TensorSpec("has_nsfw_concepts", "bool", (BATCH,)),
    ),
    description="Stable Diffusion safety checker: flags NSFW images and blacks them out.",
)

# Every component model by name (the UNet as SD 1.x/2.x's; :func:`unet_spec`
# gives a checkpoint's own).
COMPONENTS: dict[str, ModelSpec] = {
    m.name: m
    for m in (TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_ENCODER, VAE_DECODER, SAFETY_CHECKER)
}

# The public model. One request = one prompt; no Triton batch dimension
# (max_batch_size 0), so dims are the full shapes a client sends. Defaults
# follow diffusers' StableDiffusionPipeline.__call__.
STABLE_DIFFUSION = ModelSpec(
    name="stable_diffusion",
    inputs=(
        TensorSpec("prompt", "bytes", (1,), description="UTF-8 text prompt"),
        TensorSpec(
            "negative_prompt",
            "bytes",
            (1,),
            optional=True,
            description="absent: SD 1.x/2.x encode an empty text; SDXL base uses zero "
            "embeddings (force_zeros_for_empty_prompt), as diffusers; an empty string is encoded",
        ),
        TensorSpec(
            "height",
            "int32",
            (1,),
            optional=True,
            description="pixels; default: the model's native size",
        ),
        TensorSpec(
            "width",
            "int32",
            (1,),
            optional=True,
            description="pixels; default: the model's native size",
        ),
        TensorSpec("num_inference_steps", "int32", (1,), optional=True, default=50),
        TensorSpec(
            "guidance_scale",
            "float32",
            (1,),
            optional=True,
            default=7.5,
            description="<= 1 turns classifier-free guidance off; default as diffusers: "
            "7.5, SDXL 5.0 (SDXL inpainting without ControlNet 7.5), or the model's preset",
        ),
        TensorSpec(
            "seed", "int64", (1,), optional=True, description="default: random, reported in seeds"
        ),
        TensorSpec(
            "scheduler",
            "bytes",
            (1,),
            optional=True,
            description="ddim, pndm, lms, euler, euler_a, heun, dpmpp_2m, dpmpp_2m_karras, unipc; "
            "default: the model's own scheduler config",
        ),
        TensorSpec("num_images_per_prompt", "int32", (1,), optional=True, default=1),
        TensorSpec(
            "image",
            "uint8",
            ("height", "width", 3),
            optional=True,
            description="img2img source (RGB); sets height and width",
        ),
        TensorSpec(
            "mask_image",
            "uint8",
            ("height", "width"),
            optional=True,
            description="inpainting: the image's size, 255 = repaint (binarized at 128)",
        ),
        TensorSpec(
            "strength",
            "float32",
            (1,),
            optional=True,
            default=0.8,
            description="img2img and inpainting: in (0, 1], how much of the schedule to run; "
            "default as diffusers: SD 0.8 (inpainting 1.0), SDXL 0.3 (inpainting 0.9999; "
            "img2img with ControlNet 0.8)",
        ),
        TensorSpec(
            "guidance_rescale",
            "float32",
            (1,),
            optional=True,
            default=0.0,
            description="in [0, 1]: rescales the guided noise (diffusers' guidance_rescale); "
            "SD 1.x/2.x text-to-image and every SDXL mode",
        ),
        TensorSpec(
            "clip_skip",
            "int32",
            (1,),
            optional=True,
            default=0,
            description="text encoder layers to skip from the end, as diffusers' clip_skip "
            "(the web UI's Clip skip N is N - 1)",
        ),
        TensorSpec(
            "prompt_syntax",
            "bytes",
            (1,),
            optional=True,
            description="a1111: the web UI's weights, BREAK and 75-token chunks; diffusers: "
            "literal text, truncated to 77 tokens; default: the model's config parameter "
            "prompt_syntax (a1111)",
        ),
        TensorSpec(
            "prompt_2",
            "bytes",
            (1,),
            optional=True,
            description="SDXL base: the text for text_encoder_2; default: prompt",
        ),
        TensorSpec(
            "negative_prompt_2",
            "bytes",
            (1,),
            optional=True,
            description="SDXL base: the negative text for text_encoder_2; default: negative_prompt",
        ),
        *(
            TensorSpec(
                name,
                "int32",
                (2,),
                optional=True,
                description=f"SDXL: {what} (height, width) or (top, left) as diffusers' {name}",
            )
            for name, what in (
                ("original_size", "size conditioning, default: the output size"),
                ("crops_coords_top_left", "crop conditioning, default (0, 0)"),
                ("target_size", "size conditioning, default: the output size"),
                ("negative_original_size", "negative size conditioning"),
                ("negative_crops_coords_top_left", "negative crop conditioning"),
                ("negative_target_size", "negative size conditioning"),
            )
        ),
        TensorSpec(
            "aesthetic_score",
            "float32",
            (1,),
            optional=True,
            default=6.0,
            description="SDXL refiner: aesthetic conditioning",
        ),
        TensorSpec(
            "negative_aesthetic_score",
            "float32",
            (1,),
            optional=True,
            default=2.5,
            description="SDXL refiner: negative aesthetic conditioning",
        ),
        TensorSpec(
            "refiner_switch_at",
            "float32",
            (1,),
            optional=True,
            description="SDXL base with a refiner: in (0, 1), the fraction of the schedule the "
            "base runs before the refiner takes over (the web UI's name)",
        ),
        # The web UI's hires fix (sd_pipeline.hires): txt2img, enlarge, img2img.
        TensorSpec(
            "enable_hr",
            "bool",
            (1,),
            optional=True,
            default=False,
            description="text-to-image: run a second, img2img pass at hr_scale times the size "
            "(the web UI's hires fix); the hr_* inputs need it",
        ),
        TensorSpec(
            "hr_scale",
            "float32",
            (1,),
            optional=True,
            default=2.0,
            description="hires fix: >= 1; the second pass is int(height x hr_scale) x "
            "int(width x hr_scale), which must be on the model's size step",
        ),
        TensorSpec(
            "hr_upscaler",
            "bytes",
            (1,),
            optional=True,
            default="latent",
            description="hires fix: latent (bilinear, as the web UI's Latent), latent_antialiased, "
            "latent_bicubic, latent_bicubic_antialiased, latent_nearest, latent_nearest_exact; "
            "or decode, resize with PIL and encode: lanczos, nearest",
        ),
        TensorSpec(
            "hr_denoising_strength",
            "float32",
            (1,),
            optional=True,
            default=0.7,
            description="hires fix: in (0, 1], the second pass's img2img strength",
        ),
        TensorSpec(
            "hr_second_pass_steps",
            "int32",
            (1,),
            optional=True,
            default=0,
            description="hires fix: the second pass's num_inference_steps (it runs "
            "int(steps x hr_denoising_strength) of them); 0: num_inference_steps",
        ),
        # ControlNet (sd_pipeline.controlnet): K ControlNets exported with the model.
        TensorSpec(
            "control_image",
            "uint8",
            ("K", "height", "width", 3),
            optional=True,
            description="ControlNet: one RGB control image per ControlNet, at the output size",
        ),
        TensorSpec(
            "controlnet",
            "bytes",
            ("K",),
            optional=True,
            description="ControlNet: the names of the K ControlNets (the exporter's --controlnet "
            "NAME=PATH), in control_image's order",
        ),
        TensorSpec(
            "controlnet_conditioning_scale",
            "float32",
            ("K",),
            optional=True,
            default=1.0,
            description="ControlNet: each ControlNet's residuals are multiplied by this; "
            "default as diffusers: 1.0 (img2img 0.8; inpainting: SD 0.5, SDXL 1.0)",
        ),
        TensorSpec(
            "control_guidance_start",
            "float32",
            ("K",),
            optional=True,
            default=0.0,
            description="ControlNet: the fraction of the steps after which each ControlNet starts",
        ),
        TensorSpec(
            "control_guidance_end",
            "float32",
            ("K",),
            optional=True,
            default=1.0,
            description="ControlNet: the fraction of the steps after which each ControlNet stops",
        ),
        TensorSpec(
            "guess_mode",
            "bool",
            (1,),
            optional=True,
            default=False,
            description="ControlNet: the ControlNets see the conditional half only (diffusers' "
            "guess_mode), their residuals ramped from 0.1 to 1",
        ),
    ),
    outputs=(
        TensorSpec("images", "uint8", ("num_images", "height", "width", 3)),
        TensorSpec("nsfw_content_detected", "bool", ("num_images",)),
        TensorSpec(
            "seeds",
            "int64",
            ("num_images",),
            description="the request's seed for every image: one generator seeded with it "
            "draws the latents of all images at once, as diffusers does",
        ),
    ),
    description="Text-to-image, img2img and inpainting with Stable Diffusion.",
)

# The same pipeline as a decoupled (streaming) model: one progress response
# per denoising step (step, total_steps, elapsed_s, and preview_images when
# asked for), then the images response, which carries the FINAL flag. Served by the
# same model.py with ``model_transaction_policy { decoupled: true }``.
STABLE_DIFFUSION_STREAM = ModelSpec(
    name="stable_diffusion_stream",
    inputs=STABLE_DIFFUSION.inputs
    + (
        TensorSpec(
            "preview",
            "bool",
            (1,),
            optional=True,
            default=False,
            description="add a small RGB preview of the latents to every progress response",
        ),
    ),
    outputs=STABLE_DIFFUSION.outputs
    + (
        TensorSpec("step", "int32", (1,), description="denoising steps done, 1..total_steps"),
        TensorSpec("total_steps", "int32", (1,), description="UNet evaluations of the whole run"),
        TensorSpec("elapsed_s", "float32", (1,), description="seconds since the request started"),
        TensorSpec(
            "preview_images",
            "uint8",
            ("num_images", "latent_height", "latent_width", 3),
            description="latents mapped to RGB at latent resolution (progress responses only)",
        ),
    ),
    description="stable_diffusion, decoupled: progress per step, then the images.",
    extra={"decoupled": True},
)

PIPELINES: dict[str, ModelSpec] = {m.name: m for m in (STABLE_DIFFUSION, STABLE_DIFFUSION_STREAM)}


# Triton's admin APIs (model repository, shared memory, logging, trace) are
# restricted to requests that carry this header with the node's key
# (docs/security.md). The key reaches the server and the command-line client
# through one of these environment variables: the key itself, or the path of a
# file holding it (a Docker or Kubernetes secret). Inference, health, metadata
# and statistics need no key.
ADMIN_KEY_HEADER = "sd-triton-admin-key"
ADMIN_KEY_ENV = "SD_TRITON_ADMIN_KEY"
ADMIN_KEY_FILE_ENV = "SD_TRITON_ADMIN_KEY_FILE"
# Triton prefixes the header a gRPC request must carry (HTTP: the header as it is).
ADMIN_KEY_GRPC_HEADER = f"triton-grpc-protocol-{ADMIN_KEY_HEADER}"
