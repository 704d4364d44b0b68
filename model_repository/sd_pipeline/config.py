"""What the pipeline knows about its model: constants, limits and assets.

Nothing here is a literal about Stable Diffusion: every constant is read from
the exported ``assets/`` folder (``pipeline.json``, the tokenizer, the
scheduler config, the safety checker's preprocessor config) and every request
limit from the Triton model config's ``parameters``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from . import spec as S

__all__ = [
    "LIMIT_DEFAULTS",
    "LIMIT_NATIVE_AREA_FACTORS",
    "LIMIT_NATIVE_SIDE_FACTORS",
    "Assets",
    "Limits",
    "PipelineConfig",
]


# The folder inside a pipeline's version folder that holds the UNet model's version folder
# (host code and weights) when the pipeline runs the UNet itself (unet_in_pipeline).
UNET_FOLDER = "unet"


@dataclass(frozen=True)
class PipelineConfig:
    """The model constants of ``assets/pipeline.json`` (written by the exporter)."""

    latent_channels: int
    unet_in_channels: int
    vae_scaling_factor: float
    vae_scale_factor: int  # pixels per latent pixel
    native_height: int
    native_width: int
    size_step: int  # height and width must be multiples of this
    tokenizer_max_length: int
    unet_max_batch_size: int
    vae_shift_factor: float | None = None
    safety_checker: bool = True
    # The invisible watermark of diffusers' SDXL pipelines (see watermark.py).
    watermark: bool = False
    # Per-component, per-tensor numpy dtype names of the export (fp16 exports
    # keep some tensors float32); tensors not listed follow spec.py.
    tensor_dtypes: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # The component models the pipeline calls: their names (the exporter's
    # --model-prefix) and the version of each exported with this pipeline.
    # Absent: the plain names, whatever version the server serves.
    component_models: Mapping[str, str] = field(default_factory=dict)
    component_versions: Mapping[str, int] = field(default_factory=dict)
    # The model family ("sd": SD 1.x/2.x, "sdxl", "sdxl-refiner") and what sets
    # its conditioning apart (diffusers' pipeline and UNet configs):
    family: str = "sd"
    # the text encoders, in the order their hidden states are concatenated
    text_encoders: tuple[str, ...] = ("text_encoder",)
    # each text encoder's transformer layers (the upper bound of clip_skip);
    # absent: not checked here (the text encoder clamps)
    text_encoder_layers: Mapping[str, int] = field(default_factory=dict)
    # the text encoders' Triton max_batch_size (prompt chunks are sent in slices of
    # at most this); absent: 8, the exporter's default
    text_encoder_max_batch_size: int = 8
    # SDXL: an absent negative prompt means zero embeddings (model_index.json)
    force_zeros_for_empty_prompt: bool = False
    # SDXL refiner: time ids end with an aesthetic score instead of the target size
    requires_aesthetics_score: bool = False
    # the UNet takes SDXL's added conditioning (text_embeds, time_ids)
    unet_text_time: bool = False
    # the UNet takes a guidance embedding of this size (LCM-distilled UNets)
    time_cond_proj_dim: int | None = None
    # a refiner is exported beside this (SDXL base) model, assets in assets/refiner/
    refiner: bool = False
    # LoRAs and textual-inversion embeddings fused at export (their records:
    # names, weights, trigger tokens; see lora_tags.py)
    loras: tuple[Mapping[str, Any], ...] = ()
    embeddings: tuple[Mapping[str, Any], ...] = ()
    # ControlNets exported beside the model (--controlnet NAME=PATH): request name ->
    # component name (a key of component_models), and the residuals each returns
    controlnets: Mapping[str, str] = field(default_factory=dict)
    controlnet_residuals: int = 0
    # The UNet model's Triton config as JSON data (what Triton hands a model's
    # initialize), for a pipeline that runs the UNet's host in its own process
    # (config parameter unet_in_pipeline; triton_components.InProcessUNet).
    unet_config: Mapping[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PipelineConfig:
        """Build from ``pipeline.json``'s content; unknown keys are ignored, missing ones named."""
        known = {f.name: f for f in fields(cls)}
        required = [
            f.name for f in known.values() if f.default is MISSING and f.default_factory is MISSING
        ]
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"pipeline.json lacks {', '.join(missing)}")
        values = {k: v for k, v in data.items() if k in known}
        config = cls(**values)
        config._check()
        return config

    @classmethod
    def load(cls, path: str | Path) -> PipelineConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @property
    def is_xl(self) -> bool:
        """SDXL base or refiner."""
        return self.family in ("sdxl", "sdxl-refiner")

    def _check(self) -> None:
        if self.family not in ("sd", "sdxl", "sdxl-refiner"):
            raise ValueError(f"pipeline.json: unknown family {self.family!r}")
        object.__setattr__(self, "text_encoders", tuple(self.text_encoders))
        for name in ("vae_scale_factor", "size_step", "native_height", "native_width"):
            if getattr(self, name) <= 0:
                raise ValueError(f"pipeline.json: {name} must be positive")
        if self.size_step % self.vae_scale_factor:
            raise ValueError("pipeline.json: size_step must be a multiple of vae_scale_factor")
        if self.unet_max_batch_size < 1:
            raise ValueError("pipeline.json: unet_max_batch_size must be at least 1")
        # A 4-channel UNet, or an inpainting UNet: latents + mask + masked image latents.
        if self.unet_in_channels not in (self.latent_channels, 2 * self.latent_channels + 1):
            raise ValueError(
                f"pipeline.json: unet_in_channels {self.unet_in_channels} is neither "
                f"latent_channels ({self.latent_channels}) nor 2 x latent_channels + 1 (inpainting)"
            )

    def tensor_dtype(self, model: S.ModelSpec, tensor: str) -> str:
        """Numpy dtype name of ``model``'s tensor in this export."""
        exported = self.tensor_dtypes.get(model.name, {})
        if tensor in exported:
            return exported[tensor]
        for t in model.inputs + model.outputs:
            if t.name == tensor:
                return t.dtype
        raise KeyError(f"{model.name} has no tensor {tensor!r}")


def _positive_int(parameters: Mapping[str, Any], name: str, default: int) -> int:
    raw = parameters.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"model parameter {name} must be an integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"model parameter {name} must be at least 1, got {value}")
    return value


# The request limits' defaults, the one table: the exporter writes them into
# the stable_diffusion models' config parameters and the model falls back on
# them for a parameter that is absent. A fixed value, or (for the limits that
# scale with the model) a multiple of the model's native area: max_pixels 4x
# (1024 x 1024 for SD 1.x at 512 x 512), max_work 400x (100 steps of 4
# native-size images, or of one image at max_pixels).
LIMIT_DEFAULTS: Mapping[str, int] = {
    "max_steps": 150,
    "max_images": 8,
    "max_prompt_bytes": 16 * 1024,
    "max_prompt_chunks": 8,
}
LIMIT_NATIVE_AREA_FACTORS: Mapping[str, int] = {"max_pixels": 4, "max_work": 400}
# max_side: 2x the model's longer native side (1024 for SD 1.x), so the square at
# max_pixels fits; TensorRT shape profiles (the exporter's --tensorrt) end at it.
LIMIT_NATIVE_SIDE_FACTORS: Mapping[str, int] = {"max_side": 2}


@dataclass(frozen=True)
class Limits:
    """Per-request limits, from the Triton model config's ``parameters``.

    ``max_steps``: scheduler steps (num_inference_steps); ``max_pixels``:
    height * width; ``max_images``: num_images_per_prompt;
    ``max_prompt_bytes``: UTF-8 bytes of prompt and of negative_prompt,
    checked before anything is decoded or tokenized (this only stops a
    megabyte of text from costing CPU); ``max_work``: the work
    budget, height * width * num_images_per_prompt * num_inference_steps
    ("pixel-steps"), so that the single limits cannot be maxed out together;
    ``max_side``: height and width each; ``max_prompt_chunks``: the 75-token
    chunks of a prompt in the web UI's syntax (:mod:`.prompt_syntax`; 8 is
    600 tokens), each text of a request.
    Defaults: :data:`LIMIT_DEFAULTS`, :data:`LIMIT_NATIVE_AREA_FACTORS` and
    :data:`LIMIT_NATIVE_SIDE_FACTORS`.
    """

    max_steps: int
    max_pixels: int
    max_images: int
    max_prompt_bytes: int
    max_work: int
    max_side: int
    max_prompt_chunks: int = LIMIT_DEFAULTS["max_prompt_chunks"]

    @classmethod
    def default(cls, native_height: int, native_width: int) -> Limits:
        """The default limits of a model whose native size is ``native_height`` x ``native_width``."""
        area = native_height * native_width
        scaled = {name: factor * area for name, factor in LIMIT_NATIVE_AREA_FACTORS.items()}
        side = max(native_height, native_width)
        scaled.update({name: f * side for name, f in LIMIT_NATIVE_SIDE_FACTORS.items()})
        return cls(**LIMIT_DEFAULTS, **scaled)

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any], config: PipelineConfig) -> Limits:
        """``parameters``: name -> string value (Triton's ``string_value``s, flattened)."""
        default = cls.default(config.native_height, config.native_width)
        return cls(
            **{
                f.name: _positive_int(parameters, f.name, getattr(default, f.name))
                for f in fields(cls)
            }
        )

    def parameters(self) -> dict[str, int]:
        """The limits as the model config's parameters (name -> value)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Assets:
    """Everything the loop reads besides the components: config, tokenizer, schedulers, CLIP preprocessing.

    Loaded once per model instance from the exported ``assets/`` folder and
    shared by all requests (read-only, except the tokenizer, which is
    guarded: a fast tokenizer is not safe to call from two threads at once).
    """

    def __init__(
        self,
        config: PipelineConfig,
        tokenizer: Any,
        scheduler_config: Mapping[str, Any],
        feature_extractor: Any | None,
        *,
        tokenizer_2: Any | None = None,
        refiner: Assets | None = None,
    ) -> None:
        if config.safety_checker and feature_extractor is None:
            raise ValueError("the model has a safety checker but no feature_extractor config")
        if config.refiner and refiner is None:
            raise ValueError("the model has a refiner but no refiner assets")
        if config.watermark:
            from . import watermark

            watermark.require()
        self.config = config
        # One tokenizer per text encoder (config.text_encoders), by encoder name.
        self.tokenizers = {"text_encoder": tokenizer, "text_encoder_2": tokenizer_2}
        missing = [n for n in config.text_encoders if self.tokenizers.get(n) is None]
        if missing:
            raise ValueError(f"the model has no tokenizer for {', '.join(missing)}")
        self.scheduler_config = dict(scheduler_config)
        self.feature_extractor = feature_extractor
        self.refiner = refiner
        self._tokenizer_lock = threading.Lock()

    @property
    def tokenizer(self) -> Any:
        """The first text encoder's tokenizer."""
        return self.tokenizers[self.config.text_encoders[0]]

    @classmethod
    def load(cls, folder: str | Path) -> Assets:
        """Load ``folder`` (``<repo>/stable_diffusion/1/assets``) as the exporter wrote it."""
        from transformers import CLIPImageProcessor, CLIPTokenizer

        folder = Path(folder)
        config = PipelineConfig.load(folder / "pipeline.json")
        tokenizers = {
            name: CLIPTokenizer.from_pretrained(folder / name)
            for name in ("tokenizer", "tokenizer_2")
            if (folder / name).is_dir()
        }
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        feature_extractor = None
        if (folder / "feature_extractor" / "preprocessor_config.json").is_file():
            feature_extractor = CLIPImageProcessor.from_pretrained(folder / "feature_extractor")
        refiner = cls.load(folder / "refiner") if config.refiner else None
        return cls(
            config,
            tokenizers.get("tokenizer"),
            scheduler_config,
            feature_extractor,
            tokenizer_2=tokenizers.get("tokenizer_2"),
            refiner=refiner,
        )

    def tokenize(self, texts: list[str], encoder: str | None = None):
        """Token ids ``[len(texts), tokenizer_max_length]`` (int64), padded and truncated as
        diffusers does, by ``encoder``'s tokenizer (default: the first text encoder's)."""
        tokenizer = self.tokenizers[encoder] if encoder else self.tokenizer
        with self._tokenizer_lock:
            return tokenizer(
                texts,
                padding="max_length",
                max_length=self.config.tokenizer_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
