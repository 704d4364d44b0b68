"""ControlNet component models: a ControlNet's residuals, and the UNet that takes them.

A ControlNet (diffusers' ``ControlNetModel``; SD 1.x/2.x, or SDXL's with the
added ``text_embeds`` / ``time_ids`` conditioning) sees the UNet's inputs plus
a control image and returns one residual per UNet down-block output and one
for the mid block; the UNet adds them to its skip connections
(``down_block_additional_residuals``, ``mid_block_additional_residual``). Here
both become component models over the project's tensor contract:

- :func:`controlnet_component`: inputs ``sample``, ``timestep``,
  ``encoder_hidden_states``, ``controlnet_cond`` (the control image, [0, 1],
  pixel size), ``conditioning_scale`` and ``guess_mode`` (both per sample, so
  requests with different scales batch together) (+ SDXL's ``text_embeds``,
  ``time_ids``); outputs ``down_block_res_0`` .. ``down_block_res_{N-1}`` and
  ``mid_block_res``, already scaled as diffusers scales them;
- :func:`controlled_unet_component`: the UNet's inputs plus
  ``down_block_additional_residual_0`` .. ``_{N-1}`` and
  ``mid_block_additional_residual`` (the sum over the request's ControlNets);
  beside the plain UNet, so requests without ControlNet pay nothing.

The residuals' spatial sizes follow the latents' (``latent_height/2`` is half
the latent height, and so on): they are dynamic, and named apart in the ONNX
files, since TensorRT takes inputs that share a dimension name to be equal.
:func:`export_onnx` exports either through ``components.export_onnx`` and
:func:`triton_config` writes the Triton config through ``triton_config``. Both
run their module through ``wrappers.wrap`` (``controlnet``, ``unet_controlled``),
so every host the exporter writes serves them as it serves the UNet: the ONNX
hosts in fp32 or fp16 (the timesteps and the scale stay float32), TensorRT with
the UNet's profiles, and the torch host from the saved modules.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd_pipeline import controlnet as P
from sd_pipeline import spec as S
from sd_pipeline.controlnet import CONTROLLED_UNET, CONTROLNET_INPUTS

from . import components as C
from . import triton_config as T
from . import wrappers as W
from .checkpoint import ExportError, load_state_dict
from .options import ExportOptions

if TYPE_CHECKING:
    from tritonclient.grpc import model_config_pb2

__all__ = [
    "CONTROLNET_CONFIGS",
    "CONTROLNET_INPUTS",
    "FAMILY_NAMES",
    "SD2_CROSS_ATTENTION_DIM",
    "ControlNetSource",
    "Residual",
    "add_controlnets",
    "check_compatible",
    "check_family",
    "check_fit",
    "check_request",
    "config_family",
    "controlled_unet_component",
    "controlnet_component",
    "controlnet_sources",
    "export_onnx",
    "kind",
    "residual_sizes",
    "residuals",
    "shapes_of",
    "single_file_family",
    "tensor_dtypes",
    "triton_config",
]

# The UNet's config keys that decide the residuals' number and shapes. Not
# in_channels: an inpainting UNet (9 channels) takes a 4-channel ControlNet's
# residuals (diffusers' ControlNet inpaint pipeline gives it the plain latents).
_ARCHITECTURE_KEYS = (
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "cross_attention_dim",
    "addition_embed_type",
)


@dataclass(frozen=True)
class Residual:
    """One residual: the ControlNet's output name, the controlled UNet's input name,
    its channels and its downsampling from the latents (1, 2, 4, ...)."""

    output: str
    unet_input: str
    channels: int
    factor: int

    @property
    def dims(self) -> tuple[int | str, ...]:
        if self.factor == 1:
            return (S.BATCH, self.channels, "latent_height", "latent_width")
        return (
            S.BATCH,
            self.channels,
            f"latent_height/{self.factor}",
            f"latent_width/{self.factor}",
        )


def residuals(config: Mapping[str, Any]) -> tuple[Residual, ...]:
    """The residuals of a UNet (or ControlNet) config: down blocks in order, then the mid block.

    As diffusers' UNet: ``conv_in``'s output, then each down block's resnet outputs
    (``layers_per_block``) and its downsampler's (all blocks but the last).
    """
    channels = list(config["block_out_channels"])
    layers = config["layers_per_block"]
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    shapes, factor = [(channels[0], 1)], 1
    for i, c in enumerate(channels):
        shapes += [(c, factor)] * layers[i]
        if i < len(channels) - 1:
            factor *= 2
            shapes.append((c, factor))
    shapes.append((channels[-1], factor))  # the mid block's
    names = P.residual_names(len(shapes))
    return tuple(
        Residual(out, unet_input, c, f)
        for (out, unet_input), (c, f) in zip(names, shapes, strict=True)
    )


def residual_sizes(config: Mapping[str, Any], sizes: Mapping[str, int]) -> dict[str, int]:
    """The residuals' spatial dims at ``sizes``' ``latent_height`` and ``latent_width``."""
    out = {}
    for r in residuals(config):
        for dim, side in zip(r.dims[2:], ("latent_height", "latent_width"), strict=True):
            out[dim] = sizes[side] // r.factor
    return out


def check_compatible(
    controlnet_config: Mapping[str, Any], unet_config: Mapping[str, Any], vae_scale_factor: int
) -> None:
    """Raise ``ExportError`` unless the ControlNet is for the UNet's family
    (:func:`check_family`), its residuals fit the UNet and its control image is at the
    VAE's pixel size; ``global_pool_conditions`` ControlNets are refused."""
    check_family(controlnet_config, unet_config)
    differ = [
        k
        for k in _ARCHITECTURE_KEYS
        if _norm(controlnet_config.get(k)) != _norm(unet_config.get(k))
    ]
    if differ:
        raise ExportError(
            f"the ControlNet does not fit the UNet: {', '.join(differ)} differ "
            "(a ControlNet for another model family?)"
        )
    embedding = controlnet_config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
    if 2 ** (len(embedding) - 1) != vae_scale_factor:
        raise ExportError(
            f"the ControlNet's control image is {2 ** (len(embedding) - 1)}x its latents, "
            f"the VAE's images {vae_scale_factor}x"
        )
    if controlnet_config.get("global_pool_conditions"):
        raise ExportError("ControlNets with global_pool_conditions are not supported")


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, list | tuple) else value


def config_family(config: Mapping[str, Any]) -> str:
    """``sd1``, ``sd2`` or ``sdxl`` (a key of :data:`CONTROLNET_CONFIGS`): the family of a
    UNet or ControlNet config, as :func:`single_file_family` tells it from a file's tensors
    (SDXL's added conditioning, else the cross-attention width: 1024 is SD 2.x's, anything
    else, the tiny test models' too, counts as SD 1.x)."""
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return _width_family(config.get("cross_attention_dim"))


def _width_family(width: Any) -> str:
    return "sd2" if width == SD2_CROSS_ATTENTION_DIM else "sd1"


def check_family(controlnet_config: Mapping[str, Any], unet_config: Mapping[str, Any]) -> None:
    """Raise ``ExportError``, naming both families, for a ControlNet of another family
    (:func:`config_family`) than the UNet it would steer."""
    ours, theirs = config_family(controlnet_config), config_family(unet_config)
    if ours != theirs:
        raise ExportError(
            f"a ControlNet for {FAMILY_NAMES[ours]}, the checkpoint is {FAMILY_NAMES[theirs]} "
            "(a ControlNet works only with the model family it was trained for)"
        )


# --------------------------------------------------------------------------
# The two components


def controlnet_component(config: Mapping[str, Any], name: str = "controlnet") -> C.Component:
    """The ControlNet of ``config`` (its ``config.json``) as a component: module ``controlnet``."""
    # A ControlNet takes SDXL's added conditioning, never LCM's guidance embedding.
    unet = S.unet_spec(text_time=W.unet_inputs(config)["text_time"])
    sample, timestep, text, *added = unet.inputs
    sample = replace(sample, dims=(S.BATCH, int(config["in_channels"]), *sample.dims[2:]))
    conditioning = int(config.get("conditioning_channels", 3))
    cond, *rest = CONTROLNET_INPUTS
    cond = replace(cond, dims=(S.BATCH, conditioning, *cond.dims[2:]))
    spec = S.ModelSpec(
        name=name,
        inputs=(sample, timestep, text, cond, *rest, *added),
        outputs=tuple(S.TensorSpec(r.output, "float32", r.dims) for r in residuals(config)),
        description="ControlNet: the UNet's inputs and a control image -> the UNet's residuals.",
    )
    return C.Component(spec, partial(W.wrap, "controlnet"), W.MODULES["controlnet"])


def controlled_unet_component(
    config: Mapping[str, Any], name: str = CONTROLLED_UNET
) -> C.Component:
    """The UNet of ``config`` with the residual inputs: module ``unet``."""
    unet = S.unet_spec(**W.unet_inputs(config))
    extra = tuple(S.TensorSpec(r.unet_input, "float32", r.dims) for r in residuals(config))
    spec = replace(
        unet,
        name=name,
        inputs=unet.inputs + extra,
        description="Denoising UNet plus ControlNet residuals (summed over the ControlNets).",
    )
    return C.Component(spec, partial(W.wrap, CONTROLLED_UNET), W.MODULES[CONTROLLED_UNET])


def kind(component: C.Component) -> str:
    """``controlnet`` or ``unet_controlled``: the wrapper (``wrappers.wrap``) a component of
    this module runs, what the torch host's ``component`` parameter and
    ``wrappers.FP32_TENSORS`` name it by (a ControlNet's model name carries its own)."""
    return "controlnet" if component.modules == W.MODULES["controlnet"] else CONTROLLED_UNET


def tensor_dtypes(component: C.Component, dtype: str) -> dict[str, str]:
    """Each tensor's numpy dtype in an export whose float weights are ``dtype`` (the
    timesteps and the ControlNet's scale stay float32, as ``wrappers.FP32_TENSORS`` says)."""
    return {
        t.name: C.tensor_dtype(kind(component), t, dtype)
        for t in component.spec.inputs + component.spec.outputs
    }


# --------------------------------------------------------------------------
# ONNX and Triton


def _dynamic_names(spec: S.ModelSpec) -> S.ModelSpec:
    """``spec`` with each residual dim named as the latent dim it follows (dynamic in
    ``components.DYNAMIC_DIMS``): what the generic export and config writers understand."""

    def plain(t: S.TensorSpec) -> S.TensorSpec:
        dims = tuple(d.split("/")[0] if isinstance(d, str) else d for d in t.dims)
        return replace(t, dims=dims)

    return replace(
        spec, inputs=tuple(map(plain, spec.inputs)), outputs=tuple(map(plain, spec.outputs))
    )


def export_onnx(
    component: C.Component,
    modules: Mapping[str, Any],
    path: str | Path,
    sizes: Mapping[str, int],
    *,
    opset: int = 17,
    dynamo: bool = False,
    dtype: str = "float32",
) -> Path:
    """Trace ``component`` (:func:`controlnet_component` or :func:`controlled_unet_component`)
    over ``modules`` to ``path``, with dynamic batch and spatial dims.

    ``sizes``: the fixed dims (``components.fixed_sizes``) and the trace's dynamic ones
    (``B``, ``latent_height``, ``latent_width``, ``height``, ``width``, ``text_sequence``).
    The residuals' dims are named apart in the file (``latent_height/2``, ...).
    ``dtype``: the weights' (the modules are converted in place, as the exporter converts
    the UNet's) and the float tensors' but :func:`tensor_dtypes`' float32 ones.
    """
    import onnx
    import torch

    from .component_models import _convert

    _convert(modules, component.modules, dtype)
    config = modules[component.modules[0]].config
    trace = {**sizes, **residual_sizes(config, sizes)}
    dtypes = tensor_dtypes(component, dtype)
    inputs = {
        name: x.to(getattr(torch, dtypes[name]))
        for name, x in C.sample_inputs(component, trace).items()
    }
    exportable = C.Component(_dynamic_names(component.spec), component.wrap, component.modules)
    path = C.export_onnx(
        exportable,
        component.wrap(modules),
        inputs,
        Path(path),
        sizes=dict(sizes),
        opset=opset,
        dynamo=dynamo,
    )
    # Rename the residuals' dims; the weights (inline or external) stay as written.
    model = onnx.load(str(path), load_external_data=False)
    specs = {t.name: t for t in component.spec.inputs + component.spec.outputs}
    for value in list(model.graph.input) + list(model.graph.output):
        t = specs[value.name]
        for dim, d in zip(value.type.tensor_type.shape.dim, C.model_dims(t), strict=True):
            if isinstance(d, str) and "/" in d:
                dim.dim_param = d
    onnx.save_model(model, str(path))
    return path


def triton_config(
    component: C.Component,
    sizes: Mapping[str, int],
    *,
    backend: str = "python",
    max_batch_size: int = 16,
    gpu: bool = False,
    instances: int = 1,
    parameters: Mapping[str, object] | None = None,
    dtype: str = "float32",
    max_queue_delay_us: int = 0,
    preferred_batch_sizes: tuple[int, ...] = (),
    tensorrt: Mapping[str, object] | None = None,
) -> model_config_pb2.ModelConfig:
    """``component``'s Triton config: batched, dynamic batching (one call per step, as the
    UNet), dynamic spatial dims, fixed dims from ``sizes``, float tensors in ``dtype`` but
    :func:`tensor_dtypes`' float32 ones; ``tensorrt``: the TensorRT keys
    (``tensorrt.tensorrt_parameters``) for Triton's onnxruntime backend on a GPU."""
    config = T.component_config(
        _dynamic_names(component.spec),
        sizes=sizes,
        dtypes=tensor_dtypes(component, dtype),
        backend=backend,
        max_batch_size=max_batch_size,
        dynamic_batching=True,
        max_queue_delay_us=max_queue_delay_us,
        preferred_batch_sizes=preferred_batch_sizes,
        parameters=parameters,
    )
    T.set_instance_group(config, gpu=gpu, count=instances)
    if tensorrt:
        T.add_tensorrt(config, tensorrt)
    return config


# --------------------------------------------------------------------------
# Beside a checkpoint's export (sd-triton-export --controlnet NAME=PATH)

# A request names a ControlNet by NAME; its model is {prefix}controlnet_{NAME}.
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


def check_request(controlnets: Mapping[str, Path | ControlNetSource], opts: ExportOptions) -> None:
    """Raise ``ExportError`` unless ``controlnets`` (NAME -> folder, single file or
    :class:`ControlNetSource`) can be exported with ``opts``."""
    bad = [n for n in controlnets if not _NAME.fullmatch(n)]
    if bad:
        raise ExportError(
            f"--controlnet name {bad[0]!r}: use lower-case letters, digits, '_' and '-' "
            "(it becomes part of a model name)"
        )
    if not controlnets:
        return
    for name, value in controlnets.items():
        _check_source(name, _source(value))


# --------------------------------------------------------------------------
# Where a ControlNet comes from: a diffusers folder, or a single file

# The shipped weightless config (export/configs/) of each family's single files, and the
# family's name in messages.
CONTROLNET_CONFIGS = {"sd1": "controlnet-sd1", "sd2": "controlnet-sd2", "sdxl": "controlnet-sdxl"}
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
# SD 2.x's text width (OpenCLIP ViT-H), SD 1.x's is 768: diffusers' single-file loader
# tells a v2 checkpoint by it (infer_diffusers_model_type: the width of
# model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight), but a
# ControlNet file lacks that prefix and diffusers calls SD 1.x and 2.x ones "controlnet"
# alike; here any cross-attention key's width says it, in either layout.
SD2_CROSS_ATTENTION_DIM = 1024
CROSS_ATTENTION_KEY = ".attn2.to_k.weight"
# lllyasviel's (ControlNet v1.0 / v1.1) layout: LDM's UNet encoder names, the control
# image's input_hint_block and the zero_convs, with or without control_model.
ORIGINAL_PREFIX = "control_model."
ORIGINAL_MARKER = "input_hint_block.0.weight"
# diffusers' layout: ControlNetModel.state_dict() in one file.
DIFFUSERS_MARKER = "controlnet_cond_embedding.conv_in.weight"


@dataclass(frozen=True)
class ControlNetSource:
    """A ControlNet to export: a diffusers folder, or a single file (``.safetensors``,
    ``.ckpt``, ``.pth``) and, for sizes its keys cannot tell, ``config``: a diffusers
    ControlNet folder whose ``config.json`` describes it (default: the shipped config of
    the family its layout says)."""

    path: Path
    config: Path | None = None


def controlnet_sources(
    pairs: Iterable[tuple[str, str | Path]], configs: Iterable[tuple[str, str | Path]] = ()
) -> dict[str, ControlNetSource]:
    """``--controlnet NAME=PATH`` and ``--controlnet-config NAME=DIR`` pairs, as sources."""
    sources = {name: ControlNetSource(Path(path)) for name, path in pairs}
    for name, config in configs:
        if name not in sources:
            raise ExportError(f"--controlnet-config {name}={config}: no --controlnet {name}=...")
        sources[name] = replace(sources[name], config=Path(config))
    return sources


def _source(value: str | Path | ControlNetSource) -> ControlNetSource:
    return value if isinstance(value, ControlNetSource) else ControlNetSource(Path(value))


def _check_source(name: str, source: ControlNetSource) -> None:
    from .single_file import is_single_file

    where = f"--controlnet {name}={source.path}"
    if is_single_file(source.path):
        if not source.path.is_file():
            raise ExportError(f"{where}: no such file")
        if source.config is not None and not (source.config / "config.json").is_file():
            raise ExportError(f"--controlnet-config {name}={source.config}: no config.json there")
    elif source.config is not None:
        raise ExportError(f"--controlnet-config {name}=...: it is for single files, not folders")
    elif not (source.path / "config.json").is_file():
        raise ExportError(
            f"{where}: not a diffusers ControlNet folder (no config.json) nor a ControlNet "
            "file (.safetensors, .ckpt, .pth)"
        )


def single_file_family(shapes: Mapping[str, Sequence[int]]) -> str:
    """``sd1``, ``sd2`` or ``sdxl`` (a key of :data:`CONTROLNET_CONFIGS`): the family of a
    single-file ControlNet whose tensors have ``shapes`` (name -> shape), from its layout
    (lllyasviel's or diffusers'), SDXL's added embedding and the cross-attention width
    (:data:`SD2_CROSS_ATTENTION_DIM`), as :func:`config_family` tells a config's."""
    from .single_file import _prefixes

    if ORIGINAL_MARKER in shapes or ORIGINAL_PREFIX + ORIGINAL_MARKER in shapes:
        if any(k.removeprefix(ORIGINAL_PREFIX).startswith("label_emb.") for k in shapes):
            raise ExportError(
                "an SDXL ControlNet in the original layout, which diffusers does not convert: "
                "use its diffusers-layout file or folder"
            )
    elif DIFFUSERS_MARKER in shapes:
        if "add_embedding.linear_1.weight" in shapes:
            return "sdxl"
    else:
        raise ExportError(
            f"not a ControlNet (no {ORIGINAL_MARKER} nor {DIFFUSERS_MARKER}); "
            f"found {_prefixes(list(shapes))}"
        )
    widths = (shape[-1] for k, shape in sorted(shapes.items()) if k.endswith(CROSS_ATTENTION_KEY))
    return _width_family(next(widths, None))


def shapes_of(state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in ``state_dict`` (what :func:`single_file_family` reads)."""
    return {k: tuple(getattr(v, "shape", ())) for k, v in state_dict.items()}


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of a weights file (of a ``.safetensors``, from its header alone)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with contextlib.suppress(Exception), safe_open(path, "pt") as f:
            names = f.keys()  # a safe_open is not iterable
            return {k: tuple(f.get_slice(k).get_shape()) for k in names}
    return shapes_of(load_state_dict(path))  # says what is wrong with the file


def _config(source: ControlNetSource) -> tuple[dict[str, Any], str | None]:
    """The ControlNet config of ``source`` (its folder's, its ``config``, or the shipped
    config of the family a single file's layout says) and that shipped config's name."""
    from .single_file import config_folder, is_single_file

    folder, shipped = source.path, None
    if is_single_file(source.path):
        family = single_file_family(_shapes(source.path))
        shipped = None if source.config else CONTROLNET_CONFIGS[family]
        folder = source.config or config_folder(CONTROLNET_CONFIGS[family])
    return json.loads((folder / "config.json").read_text()), shipped


def check_fit(
    controlnets: Mapping[str, Path | ControlNetSource],
    unet_config: Mapping[str, Any],
    vae_scale_factor: int,
) -> None:
    """Raise ``ExportError`` for a ControlNet that is none or does not fit the UNet
    (:func:`check_compatible`), read from configs and file headers: before the export."""
    for name, value in controlnets.items():
        source = _source(value)
        where = f"--controlnet {name}={source.path}"
        try:
            config, shipped = _config(source)
            check_family(config, unet_config)  # whatever the config: no --controlnet-config hint
        except ExportError as e:
            raise ExportError(f"{where}: {e}") from None
        try:
            check_compatible(config, unet_config, vae_scale_factor)
        except ExportError as e:
            other = f" (other sizes: --controlnet-config {name}=DIR)"
            hint = f"; read with the shipped {shipped} config{other}" if shipped else ""
            raise ExportError(f"{where}: {e}{hint}") from None


def _from_single_file(source: ControlNetSource):
    """The ControlNet of a single file, converted by diffusers against its config."""
    from diffusers import ControlNetModel

    from .single_file import _check_loaded, config_folder

    state_dict = load_state_dict(source.path)
    family = single_file_family(shapes_of(state_dict))
    config = source.config or config_folder(CONTROLNET_CONFIGS[family])
    try:
        model = ControlNetModel.from_single_file(
            state_dict, config=str(config), local_files_only=True
        )
    except Exception as e:  # diffusers raises many kinds
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = "" if source.config else f" (with the shipped {CONTROLNET_CONFIGS[family]} config)"
        raise ExportError(f"cannot be converted{hint}: {first}") from e
    _check_loaded("controlnet", model)
    return model


def _load_controlnet(name: str, source: ControlNetSource):
    """The ControlNet of ``source`` (a folder or a single file), float32, eval mode."""
    from diffusers import ControlNetModel

    from .single_file import is_single_file

    where = f"--controlnet {name}={source.path}"
    try:
        if is_single_file(source.path):
            return _from_single_file(source).float().eval()
        return ControlNetModel.from_pretrained(source.path).float().eval()
    except ExportError as e:
        raise ExportError(f"{where}: {e}") from None
    except Exception as e:  # diffusers raises many kinds
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"{where} cannot be loaded: {first}") from e


def _hashes(controlnets: Mapping[str, Path | ControlNetSource]) -> dict[str, str]:
    """The web UI's hash (:func:`.single_file.model_hash`) of each single-file ControlNet."""
    from .single_file import is_single_file, model_hash

    paths = {name: _source(value).path for name, value in controlnets.items()}
    return {name: model_hash(path) for name, path in paths.items() if is_single_file(path)}


def _write(
    component: C.Component,
    modules: Mapping[str, Any],
    plan: Any,
    opts: ExportOptions,
    staging: Path,
    version: str,
) -> None:
    """Write ``component`` (weights, host code, config) to ``staging`` and record it in
    ``plan``: as ``component_models.write_component`` writes the UNet (the host's files,
    the precision's dtype, TensorRT's keys)."""
    from . import component_models as CM

    key, hosting = component.name, opts.hosting
    folder, dtype = staging / opts.model_name(key), opts.component_dtype(kind(component))
    if hosting.host == "torch":
        CM._save_torch_modules(component, dict(modules), dtype, folder / version)
    else:
        path, trace = folder / version / CM.ONNX_NAME, {**plan.sizes, **plan.trace_sizes}
        export_onnx(component, modules, path, trace, opset=opts.contents.opset, dtype=dtype)
    CM._copy_host_code(hosting.host, folder / version)
    config = triton_config(
        component,
        plan.sizes,
        backend=CM.BACKENDS[hosting.host],
        max_batch_size=hosting.unet_max_batch_size,
        gpu=hosting.on_gpu,
        instances=hosting.component_instances,
        parameters=CM._host_parameters(kind(component), opts),
        dtype=dtype,
        max_queue_delay_us=hosting.max_queue_delay_us,
        preferred_batch_sizes=hosting.preferred_batch_sizes,
        tensorrt=_tensorrt(component, dtype, plan, opts),
    )
    config.name = opts.model_name(key)
    T.set_version_policy(config, opts.naming.keep_versions)
    T.write_config(config, folder)
    plan.components[key] = component
    plan.configs[key] = config
    plan.tensor_dtypes[key] = tensor_dtypes(component, dtype)


def _tensorrt(component: C.Component, dtype: str, plan: Any, opts: ExportOptions):
    """The TensorRT keys of ``component`` with ``--tensorrt`` (profiles as the UNet's, the
    residuals' at their fractions of the latent size); None without."""
    if not opts.hosting.tensorrt:
        return None
    from .tensorrt import tensorrt_parameters

    return tensorrt_parameters(
        component,
        dtype,
        sizes=plan.sizes,
        constants=plan.constants,
        limits=plan.limits,
        max_batch=opts.hosting.unet_max_batch_size,
        cache=opts.hosting.trt_cache,
    )


def add_controlnets(
    plan: Any,
    ckpt: Any,
    controlnets: Mapping[str, Path | ControlNetSource],
    opts: ExportOptions,
    staging: Path,
    version: str,
) -> None:
    """Export each ControlNet (NAME -> diffusers folder or :class:`ControlNetSource`) as
    ``{prefix}controlnet_{NAME}`` and the controlled UNet as ``{prefix}unet_controlled``
    into ``staging``.

    ``plan`` (the repository's export plan) gains their components, configs and tensor
    dtypes, so pipeline.json names and versions them as every component, and
    pipeline.json's ``controlnets`` / ``controlnet_residuals`` (:mod:`sd_pipeline.controlnet`)
    and ``controlnet_hashes`` (the web UI's hash of each single file, also a config
    parameter of the pipeline models).
    """
    if not controlnets:
        return
    check_request(controlnets, opts)
    from .wrappers import load_module

    unet = load_module("unet", ckpt.folder("unet")).float().eval()
    names = {}
    for name, value in controlnets.items():
        source = _source(value)
        model = _load_controlnet(name, source)
        try:
            check_compatible(model.config, unet.config, plan.constants["vae_scale_factor"])
        except ExportError as e:
            raise ExportError(f"--controlnet {name}={source.path}: {e}") from None
        names[name] = f"controlnet_{name}"
        component = controlnet_component(model.config, names[name])
        _write(component, {"controlnet": model}, plan, opts, staging, version)
    _write(controlled_unet_component(unet.config), {"unet": unet}, plan, opts, staging, version)
    plan.constants.update(P.controlnet_record(names, len(residuals(unet.config))))
    hashes = _hashes(controlnets)
    if hashes:
        plan.constants["controlnet_hashes"] = hashes
