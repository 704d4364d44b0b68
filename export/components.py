"""Export wrappers for the component models, generic over the tensor contract.

Each component is declared once (:class:`Component`): its ``ModelSpec`` from
``sd_pipeline.spec`` and a function that wraps the diffusers /
transformers module in a ``torch.nn.Module`` whose ``forward`` takes the
spec's inputs in order and returns its outputs in order (:mod:`.wrappers`,
which the torch host runs too). Everything else is
generic over the spec: sample inputs, dynamic axes, ONNX export, per-tensor
dtypes and the Triton config.

Which components a checkpoint has depends on its family (:func:`checkpoint_components`:
SD 1.x/2.x, SDXL base, SDXL refiner), and the UNet's inputs on its config
(SDXL's added conditioning, LCM's guidance embedding).

Which dims are dynamic: the batch, the spatial sizes and the UNet's text sequence
(77 tokens per prompt chunk: long prompts) (:data:`DYNAMIC_DIMS`).
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
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd_pipeline import spec as S

from . import wrappers as W
from .checkpoint import ExportError, family

if TYPE_CHECKING:
    import torch

__all__ = [
    "COMPONENTS",
    "DYNAMIC_DIMS",
    "FAMILY_COMPONENTS",
    "Component",
    "checkpoint_components",
    "export_onnx",
    "fixed_sizes",
    "model_dims",
    "sample_inputs",
    "tensor_dtype",
]

# Dims that stay dynamic in the ONNX graphs and are -1 in Triton configs.
DYNAMIC_DIMS = frozenset(
    {S.BATCH, "height", "width", "latent_height", "latent_width", "num_images", "text_sequence"}
    | {"K"}  # the pipeline's ControlNets per request (control_image, controlnet, ...)
)

# Float tensors that stay float32 in an fp16 export (see wrappers.FP32_TENSORS).
FP32_TENSORS = W.FP32_TENSORS

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


def _component(spec: S.ModelSpec) -> Component:
    return Component(spec, partial(W.wrap, spec.name), W.MODULES[spec.name])


# Every component with SD 1.x/2.x's UNet (:func:`checkpoint_components` gives a
# checkpoint's own).
COMPONENTS: dict[str, Component] = {
    spec.name: _component(spec)
    for spec in (
        S.TEXT_ENCODER,
        S.TEXT_ENCODER_2,
        S.UNET,
        S.VAE_ENCODER,
        S.VAE_DECODER,
        S.SAFETY_CHECKER,
    )
}

# The components of each family (``checkpoint.family``), the safety checker aside.
FAMILY_COMPONENTS: dict[str, tuple[str, ...]] = {
    "sd": ("text_encoder", "unet", "vae_encoder", "vae_decoder"),
    "sdxl": ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"),
    "sdxl-refiner": ("text_encoder_2", "unet", "vae_encoder", "vae_decoder"),
}


def checkpoint_components(
    configs: dict[str, dict[str, Any]], *, safety_checker: bool
) -> dict[str, Component]:
    """The components a checkpoint exports, in export order, with its own UNet contract.

    ``configs``: folder -> config (``checkpoint.Checkpoint.configs``).
    """
    names = FAMILY_COMPONENTS[family(configs)] + (("safety_checker",) if safety_checker else ())
    unet = _component(S.unet_spec(**W.unet_inputs(configs["unet"])))
    return {n: unet if n == "unet" else COMPONENTS[n] for n in names}


# --------------------------------------------------------------------------
# Sizes and sample inputs


def fixed_sizes(configs: dict[str, dict[str, Any]]) -> dict[str, int]:
    """The spec's non-dynamic symbolic dims, read from a checkpoint's configs.

    ``configs`` maps folder names (``unet``, ``vae``, ``text_encoder``,
    ``text_encoder_2``, ``tokenizer``, ``tokenizer_2``, ``scheduler``,
    ``safety_checker``) to their config dicts; a component the checkpoint does
    not have is left out.
    """
    unet, vae = configs["unet"], configs["vae"]
    tokenizer = configs.get("tokenizer") or configs["tokenizer_2"]
    sizes = {
        "sequence": int(tokenizer["model_max_length"]),
        "in_channels": int(unet["in_channels"]),
        "latent_channels": int(vae["latent_channels"]),
        "latent_parameters": 2 * int(vae["latent_channels"]),
        "cross_attention_dim": int(unet["cross_attention_dim"]),
        "num_train_timesteps": int(configs["scheduler"]["num_train_timesteps"]),
    }
    vocab = []
    for folder, suffix in (("text_encoder", ""), ("text_encoder_2", "_2")):
        if folder in configs:
            text = configs[folder]
            sizes[f"text_width{suffix}"] = int(text["hidden_size"])
            # CLIPTextModel pools to its width; CLIPTextModelWithProjection projects.
            pooled = text["projection_dim"] if folder == "text_encoder_2" else text["hidden_size"]
            sizes[f"pooled_width{suffix}"] = int(pooled)
            vocab.append(int(text["vocab_size"]))
    sizes["vocab_size"] = min(vocab)
    if unet.get("addition_embed_type") == "text_time":
        sizes["time_ids"] = _time_ids(unet, sizes["pooled_width_2"])
    if unet.get("time_cond_proj_dim") is not None:
        sizes["time_cond_dim"] = int(unet["time_cond_proj_dim"])
    if "safety_checker" in configs:
        side = int(configs["safety_checker"]["vision_config"]["image_size"])
        sizes.update(clip_height=side, clip_width=side)
    return sizes


def _time_ids(unet: dict[str, Any], pooled_width_2: int) -> int:
    """SDXL's time ids per sample: the added embedding's input is text_encoder_2's pooled
    projection plus ``addition_time_embed_dim`` per time id (base 6, refiner 5)."""
    total, each = unet["projection_class_embeddings_input_dim"], unet["addition_time_embed_dim"]
    count, rest = divmod(int(total) - pooled_width_2, int(each))
    if rest or count < 1:
        raise ExportError(
            f"the UNet's projection_class_embeddings_input_dim {total} is not text_encoder_2's "
            f"projection_dim {pooled_width_2} plus a multiple of addition_time_embed_dim {each}"
        )
    return count


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
    vocabulary, layers to skip 0-2, timesteps within the training schedule,
    images in [0, 1].
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    inputs = {}
    for t in component.spec.inputs:
        shape = resolve(model_dims(t), sizes)
        dtype = getattr(torch, tensor_dtype(component.name, t, component_dtype))
        if t.name == "skip_layers":
            x = torch.randint(0, 3, shape, generator=gen)  # 0-2: the skips pipelines use
        elif not dtype.is_floating_point:
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
    args = tuple(inputs[t.name] for t in component.spec.inputs)
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
        kwargs = _export_kwargs(component, opset, dynamo)
        torch.onnx.export(module, args, str(tmp_path), **kwargs)
        model = onnx.load(str(tmp_path))
        _set_io_dims(model, component, sizes or {})
        _save(model, path)
    return path


def _export_kwargs(component: Component, opset: int, dynamo: bool) -> dict[str, Any]:
    """``torch.onnx.export``'s keywords: the spec's names, dynamic dims for either exporter."""
    kwargs: dict[str, Any] = dict(
        input_names=[t.name for t in component.spec.inputs],
        output_names=[t.name for t in component.spec.outputs],
        opset_version=opset,
        dynamo=dynamo,
        verbose=False,
    )
    if dynamo:
        kwargs["dynamic_shapes"] = _dynamic_shapes(component)
    else:
        kwargs["dynamic_axes"] = dynamic_axes(component)
        kwargs["do_constant_folding"] = True
    return kwargs


def _save(model: Any, path: Path) -> None:
    """Write ``model`` to ``path`` (weights in one external file past ~2 GB), readable by all."""
    import onnx

    data = path.parent / EXTERNAL_DATA_NAME
    for p in (path, data):
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
    for p in (path, data):
        if p.exists():
            os.chmod(p, 0o644)


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
