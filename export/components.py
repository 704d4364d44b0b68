"""Export wrappers for the five component models, generic over the tensor contract.

Each component is declared once (:class:`Component`): its ``ModelSpec`` from
``sd_triton.pipeline.spec`` and a function that wraps the diffusers /
transformers module in a ``torch.nn.Module`` whose ``forward`` takes the
spec's inputs in order and returns its outputs in order. Everything else is
generic over the spec: sample inputs, dynamic axes, ONNX export, per-tensor
dtypes and the Triton config.

Which dims are dynamic: the batch and the spatial sizes (:data:`DYNAMIC_DIMS`).
Every other symbolic dim of the spec (channels, text width, sequence length,
CLIP input size) is fixed by the checkpoint's weights and resolved from its
configs (:func:`fixed_sizes`), so the ONNX files and the Triton configs state
it exactly (Triton's onnxruntime backend rejects a ``-1`` in the config where
the model has a fixed size).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd_triton.pipeline import spec as S

if TYPE_CHECKING:
    import torch

__all__ = [
    "COMPONENTS",
    "DYNAMIC_DIMS",
    "Component",
    "export_onnx",
    "fixed_sizes",
    "model_dims",
    "sample_inputs",
    "tensor_dtype",
]

# Dims that stay dynamic in the ONNX graphs and are -1 in Triton configs.
DYNAMIC_DIMS = frozenset(
    {S.BATCH, "height", "width", "latent_height", "latent_width", "num_images"}
)

# Float tensors that stay float32 in an fp16 export: fractional timesteps must
# not be rounded, and the safety checker's images only pass through (fp16
# would cost up to a uint8 level).
FP32_TENSORS = frozenset(
    {("unet", "timestep"), ("safety_checker", "images"), ("safety_checker", "out_images")}
)

# ONNX files larger than this are written with their weights in one external
# data file (protobuf's 2 GiB limit).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
EXTERNAL_DATA_NAME = "model.onnx.data"


def model_dims(tensor: S.TensorSpec) -> tuple[int | str, ...]:
    """Dims as the model itself sees them (Triton's ``reshape`` applied)."""
    if tensor.reshape is None:
        return tensor.dims
    return ((S.BATCH,) if tensor.batched else ()) + tuple(tensor.reshape)


def tensor_dtype(component: str, tensor: S.TensorSpec, component_dtype: str) -> str:
    """A tensor's numpy dtype name in an export whose float weights are ``component_dtype``."""
    if tensor.dtype != "float32" or (component, tensor.name) in FP32_TENSORS:
        return tensor.dtype
    return component_dtype


# --------------------------------------------------------------------------
# Wrappers: forward(*spec inputs) -> spec outputs


def _wrap(forward: Callable[..., Any], **modules: Any) -> torch.nn.Module:
    import torch

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, module in modules.items():
                setattr(self, name, module)

        def forward(self, *args):
            return forward(self, *args)

    return Wrapper().eval()


def _eager_attention(model: Any) -> None:
    """Plain attention for export: with SDPA, torch.onnx's fp16 graph mixes float types."""
    model.set_attn_implementation("eager")


def _text_encoder(modules: dict[str, Any]) -> torch.nn.Module:
    import torch

    _eager_attention(modules["text_encoder"])

    def forward(self, input_ids):
        return self.text_encoder(input_ids.to(torch.int64), return_dict=False)[0]

    return _wrap(forward, text_encoder=modules["text_encoder"])


def _unet(modules: dict[str, Any]) -> torch.nn.Module:
    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    return _wrap(forward, unet=modules["unet"])


def _vae_encoder(modules: dict[str, Any]) -> torch.nn.Module:
    def forward(self, sample):
        # Mean and log-variance concatenated on channels, as diffusers'
        # DiagonalGaussianDistribution.parameters.
        return self.vae.encode(sample).latent_dist.parameters

    return _wrap(forward, vae=modules["vae"])


def _vae_decoder(modules: dict[str, Any]) -> torch.nn.Module:
    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]

    return _wrap(forward, vae=modules["vae"])


def _safety_checker(modules: dict[str, Any]) -> torch.nn.Module:
    """diffusers' ``StableDiffusionSafetyChecker.forward`` as one graph.

    Same decision as diffusers' eager ``forward`` (scores rounded to 3
    decimals, special-care concepts lower the other thresholds by 0.01); the
    blackout is a ``torch.where`` (the boolean-mask assignment of
    ``forward_onnx`` exports but fails in onnxruntime). Scores are computed in
    float32 whatever the weights' dtype.
    """
    import torch

    def cosine(a, b):
        a = torch.nn.functional.normalize(a.float(), dim=-1)
        b = torch.nn.functional.normalize(b.float(), dim=-1)
        return a @ b.T

    def fired(scores):
        # round(score, 3) > 0, as diffusers decides.
        return torch.round(scores * 1000.0) > 0

    _eager_attention(modules["safety_checker"].vision_model)

    def forward(self, clip_input, images):
        c = self.checker
        embeds = c.visual_projection(c.vision_model(clip_input)[1])
        special = cosine(embeds, c.special_care_embeds) - c.special_care_embeds_weights.float()
        special_care = fired(special).any(dim=1, keepdim=True)
        adjustment = special_care.to(torch.float32) * 0.01
        concept = cosine(embeds, c.concept_embeds) - c.concept_embeds_weights.float() + adjustment
        has_nsfw = fired(concept).any(dim=1)
        blackout = has_nsfw.reshape(-1, *([1] * (images.dim() - 1)))
        out_images = torch.where(blackout, torch.zeros_like(images), images)
        return out_images, has_nsfw

    return _wrap(forward, checker=modules["safety_checker"])


@dataclass(frozen=True)
class Component:
    """One component model: its contract and how to wrap its module for export."""

    spec: S.ModelSpec
    wrap: Callable[[dict[str, Any]], torch.nn.Module]
    # Checkpoint modules it needs (diffusers folder names).
    modules: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.spec.name


COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component(S.TEXT_ENCODER, _text_encoder, ("text_encoder",)),
        Component(S.UNET, _unet, ("unet",)),
        Component(S.VAE_ENCODER, _vae_encoder, ("vae",)),
        Component(S.VAE_DECODER, _vae_decoder, ("vae",)),
        Component(S.SAFETY_CHECKER, _safety_checker, ("safety_checker",)),
    )
}


# --------------------------------------------------------------------------
# Sizes and sample inputs


def fixed_sizes(configs: dict[str, dict[str, Any]]) -> dict[str, int]:
    """The spec's non-dynamic symbolic dims, read from a checkpoint's configs.

    ``configs`` maps folder names (``unet``, ``vae``, ``text_encoder``,
    ``tokenizer``, ``safety_checker``, ``feature_extractor``) to their config
    dicts; the safety checker's entries are left out when it has none.
    """
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    sizes = {
        "sequence": int(configs["tokenizer"]["model_max_length"]),
        "text_width": int(text["hidden_size"]),
        "in_channels": int(unet["in_channels"]),
        "latent_channels": int(vae["latent_channels"]),
        "latent_parameters": 2 * int(vae["latent_channels"]),
        "vocab_size": int(text["vocab_size"]),
        "num_train_timesteps": int(configs["scheduler"]["num_train_timesteps"]),
    }
    if "safety_checker" in configs:
        side = int(configs["safety_checker"]["vision_config"]["image_size"])
        sizes.update(clip_height=side, clip_width=side)
    return sizes


def resolve(dims: tuple[int | str, ...], sizes: dict[str, int]) -> tuple[int, ...]:
    """Concrete dims; a symbolic dim missing from ``sizes`` is an error."""
    try:
        return tuple(d if isinstance(d, int) else sizes[d] for d in dims)
    except KeyError as e:
        raise KeyError(f"no size given for dim {e.args[0]!r} of {dims}") from None


def sample_inputs(
    component: Component,
    sizes: dict[str, int],
    component_dtype: str = "float32",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random inputs for ``component`` at ``sizes`` (fixed and dynamic dims), by name.

    Values lie in each input's meaningful range: token ids within the
    vocabulary, timesteps within the training schedule, images in [0, 1].
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    inputs = {}
    for t in component.spec.inputs:
        shape = resolve(model_dims(t), sizes)
        dtype = getattr(torch, tensor_dtype(component.name, t, component_dtype))
        if not dtype.is_floating_point:
            x = torch.randint(0, sizes.get("vocab_size", 2), shape, generator=gen)
        elif t.name == "timestep":
            x = torch.rand(shape, generator=gen) * (sizes.get("num_train_timesteps", 1000) - 1)
        elif t.name == "images":
            x = torch.rand(shape, generator=gen)
        else:
            x = torch.randn(shape, generator=gen)
        inputs[t.name] = x.to(dtype)
    return inputs


def dynamic_axes(component: Component) -> dict[str, dict[int, str]]:
    return {
        t.name: {i: d for i, d in enumerate(model_dims(t)) if d in DYNAMIC_DIMS}
        for t in component.spec.inputs + component.spec.outputs
    }


# --------------------------------------------------------------------------
# ONNX export


def export_onnx(
    component: Component,
    module: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    path: Path,
    *,
    sizes: dict[str, int] | None = None,
    opset: int = 17,
    dynamo: bool = False,
) -> Path:
    """Export ``module`` (a :class:`Component` wrapper) to ``path`` with the spec's names.

    Dynamic axes follow :data:`DYNAMIC_DIMS`. A model over ~2 GB is written
    with its weights in one external data file beside it. Files are made
    readable by everyone (the server may run as another user). The graph's
    inputs and outputs get the spec's dims: dynamic dims named as in the spec,
    the others fixed to their ``sizes`` (shape inference sometimes leaves
    them symbolic).
    """
    import onnx
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = component.spec
    names_in = [t.name for t in spec.inputs]
    names_out = [t.name for t in spec.outputs]
    args = tuple(inputs[n] for n in names_in)
    with (
        tempfile.TemporaryDirectory(dir=path.parent) as tmp,
        torch.no_grad(),
        warnings.catch_warnings(),
    ):
        # Tracing warns about every Python branch on a shape; the dynamic dims
        # are chosen so that those branches do not depend on them.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        # The TorchScript exporter is deprecated (use dynamo=True to move on).
        warnings.simplefilter("ignore", DeprecationWarning)
        tmp_path = Path(tmp) / "model.onnx"
        kwargs: dict[str, Any] = dict(
            input_names=names_in,
            output_names=names_out,
            opset_version=opset,
            dynamo=dynamo,
            verbose=False,
        )
        if dynamo:
            kwargs["dynamic_shapes"] = _dynamic_shapes(component)
        else:
            kwargs["dynamic_axes"] = dynamic_axes(component)
            kwargs["do_constant_folding"] = True
        torch.onnx.export(module, args, str(tmp_path), **kwargs)
        model = onnx.load(str(tmp_path))
        _set_io_dims(model, component, sizes or {})
        for p in (path, path.parent / EXTERNAL_DATA_NAME):
            p.unlink(missing_ok=True)
        if model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
            onnx.save_model(
                model,
                str(path),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=EXTERNAL_DATA_NAME,
                size_threshold=1024,
            )
        else:
            onnx.save_model(model, str(path))
    for p in (path, path.parent / EXTERNAL_DATA_NAME):
        if p.exists():
            os.chmod(p, 0o644)
    return path


def _set_io_dims(model: Any, component: Component, sizes: dict[str, int]) -> None:
    """Write the spec's dims on the graph's inputs and outputs."""
    specs = {t.name: t for t in component.spec.inputs + component.spec.outputs}
    for value in list(model.graph.input) + list(model.graph.output):
        t = specs.get(value.name)
        if t is None:
            continue
        dims = value.type.tensor_type.shape.dim
        for dim, d in zip(dims, model_dims(t), strict=True):
            if isinstance(d, int):
                dim.dim_value = d
            elif d in DYNAMIC_DIMS:
                dim.dim_param = d
            elif d in sizes:
                dim.dim_value = sizes[d]


def _dynamic_shapes(component: Component) -> tuple:
    """torch.export's ``dynamic_shapes`` for a wrapper's ``forward(*args)``."""
    from torch.export import Dim

    shapes = tuple(
        {i: Dim.AUTO for i, d in enumerate(model_dims(t)) if d in DYNAMIC_DIMS} or None
        for t in component.spec.inputs
    )
    return (shapes,)  # one entry: the *args tuple
