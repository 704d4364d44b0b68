"""Triton ``config.pbtxt`` files as data: built as ``ModelConfig`` messages, read back.

Every config is generated from the tensor contract (``sd_pipeline.spec``)
through ``tritonclient.grpc.model_config_pb2.ModelConfig`` and written with
protobuf's ``text_format``, as pytriton does; :func:`read_config` parses one
back for tests and tools.

Dims: the batch dim is Triton's implicit one (``max_batch_size > 0``); dynamic
dims are ``-1``; the other symbolic dims are resolved from the checkpoint
(``sizes``). Triton does not accept empty ``dims``, so a per-sample scalar
(``[B]``) is declared ``dims: [1]`` with ``reshape: { shape: [] }``, as the
spec declares the UNet's ``timestep``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from sd_pipeline import spec as S

from .components import DYNAMIC_DIMS

__all__ = [
    "add_tensorrt",
    "component_config",
    "pipeline_config",
    "read_config",
    "set_instance_group",
    "set_version_policy",
    "tensor_entry_dims",
    "write_config",
]

CONFIG_NAME = "config.pbtxt"


def tensor_entry_dims(
    tensor: S.TensorSpec, sizes: Mapping[str, int], batched: bool
) -> tuple[list[int], list[int] | None]:
    """``(dims, reshape)`` of a tensor in a config (``reshape`` None when there is none)."""
    dims = tensor.dims[1:] if batched and tensor.batched else tensor.dims
    resolved = [
        d if isinstance(d, int) else (-1 if d in DYNAMIC_DIMS else int(sizes[d])) for d in dims
    ]
    reshape = list(tensor.reshape) if tensor.reshape is not None else None
    if not resolved:
        # Triton needs non-empty dims: a per-sample scalar is [1] seen as [].
        resolved, reshape = [1], []
    return resolved, reshape


def _add_tensors(
    entries, tensors: tuple[S.TensorSpec, ...], dtypes: Mapping[str, str], sizes, batched: bool
) -> None:
    for t in tensors:
        dims, reshape = tensor_entry_dims(t, sizes, batched)
        entry = entries.add(
            name=t.name,
            data_type=pb.DataType.Value(S.TRITON_DTYPES[dtypes.get(t.name, t.dtype)]),
            dims=dims,
        )
        if reshape is not None:
            entry.reshape.SetInParent()
            entry.reshape.shape.extend(reshape)
        if t.optional and hasattr(entry, "optional"):
            entry.optional = True


def _set_parameters(config: pb.ModelConfig, parameters: Mapping[str, object]) -> None:
    for key, value in parameters.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        config.parameters[key].string_value = str(value)


def component_config(
    model: S.ModelSpec,
    *,
    sizes: Mapping[str, int],
    dtypes: Mapping[str, str],
    backend: str,
    max_batch_size: int,
    dynamic_batching: bool = False,
    max_queue_delay_us: int = 0,
    preferred_batch_sizes: tuple[int, ...] = (),
    parameters: Mapping[str, object] | None = None,
) -> pb.ModelConfig:
    """Config of a component model (batched, one ONNX file) from its spec.

    ``dtypes`` maps tensor names to numpy dtype names (an fp16 export's);
    tensors not in it keep the spec's dtype.
    """
    if max_batch_size < 1:
        raise ValueError(f"{model.name}: max_batch_size must be >= 1, got {max_batch_size}")
    config = pb.ModelConfig(name=model.name, backend=backend, max_batch_size=max_batch_size)
    _add_tensors(config.input, model.inputs, dtypes, sizes, batched=True)
    _add_tensors(config.output, model.outputs, dtypes, sizes, batched=True)
    if dynamic_batching:
        config.dynamic_batching.SetInParent()  # present even with every field at 0
        config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
        sizes_ok = [b for b in preferred_batch_sizes if 1 <= b <= max_batch_size]
        config.dynamic_batching.preferred_batch_size.extend(sizes_ok)
    _set_parameters(config, parameters or {})
    return config


def pipeline_config(
    model: S.ModelSpec = S.STABLE_DIFFUSION,
    *,
    parameters: Mapping[str, object] | None = None,
    instance_count: int = 1,
    max_queue_size: int = 0,
    queue_timeout_s: float = 0,
) -> pb.ModelConfig:
    """Config of a public pipeline model (Python backend, no batch dim).

    A spec with ``extra["decoupled"]`` (the streaming twin) gets a decoupled
    transaction policy. The unary model gets a bounded queue when
    ``max_queue_size`` > 0: Triton's dynamic batcher (it forms no batches at
    ``max_batch_size`` 0, measured on 2.51) with a queue policy that refuses
    a request beyond ``max_queue_size`` waiting at once (UNAVAILABLE,
    "Exceeds maximum queue size") and one still waiting after
    ``queue_timeout_s`` (UNAVAILABLE, "Request timeout expired"; a client's
    per-request ``timeout`` may lower it). The decoupled model holds its
    requests on its own threads, so it enforces the same parameters itself.
    """
    config = pb.ModelConfig(name=model.name, backend="python", max_batch_size=0)
    if model.extra.get("decoupled"):
        config.model_transaction_policy.decoupled = True
    elif max_queue_size > 0 or queue_timeout_s > 0:
        policy = config.dynamic_batching.default_queue_policy
        policy.max_queue_size = max(0, max_queue_size)
        policy.default_timeout_microseconds = round(max(0.0, queue_timeout_s) * 1e6)
        policy.allow_timeout_override = True
        policy.timeout_action = pb.ModelQueuePolicy.REJECT
    _add_tensors(config.input, model.inputs, {}, {}, batched=False)
    _add_tensors(config.output, model.outputs, {}, {}, batched=False)
    config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=instance_count)
    _set_parameters(config, parameters or {})
    return config


def set_instance_group(config: pb.ModelConfig, *, gpu: bool, count: int) -> None:
    """One instance group of ``count`` instances, ``KIND_GPU`` (per GPU) or ``KIND_CPU``.

    Never left to Triton (no kind, or ``KIND_AUTO``): that means a GPU
    instance wherever the server sees a GPU, so a repository exported for the
    CPU would ask its hosts for CUDA on a GPU node, which they refuse.
    """
    if count < 1:
        raise ValueError(f"{config.name}: instance count must be >= 1, got {count}")
    kind = pb.ModelInstanceGroup.KIND_GPU if gpu else pb.ModelInstanceGroup.KIND_CPU
    del config.instance_group[:]
    config.instance_group.add(kind=kind, count=count)


def set_version_policy(config: pb.ModelConfig, latest: int) -> None:
    """Serve the ``latest`` highest-numbered versions on disk (``version_policy { latest }``)."""
    if latest < 1:
        raise ValueError(f"{config.name}: latest versions must be >= 1, got {latest}")
    config.version_policy.latest.num_versions = latest


def add_tensorrt(config: pb.ModelConfig, parameters: Mapping[str, object]) -> None:
    """Run the model with onnxruntime's TensorRT execution provider on GPU instances.

    ``parameters`` are the onnxruntime backend's TensorRT keys (``precision_mode``,
    ``trt_engine_cache_path``, ``trt_profile_min_shapes``, ...); operators
    TensorRT cannot run fall back to the CUDA execution provider.
    """
    accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
    accelerator = accelerators.add(name="tensorrt")
    for key, value in parameters.items():
        if value is not None:
            accelerator.parameters[key] = str(value)


def write_config(config: pb.ModelConfig, folder: str | Path) -> Path:
    """Write ``config`` as ``folder/config.pbtxt``."""
    path = Path(folder) / CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text_format.MessageToString(config))
    return path


def read_config(path: str | Path) -> pb.ModelConfig:
    """Parse a ``config.pbtxt`` (or the folder holding one) into a ``ModelConfig``."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_NAME
    return text_format.Parse(path.read_text(), pb.ModelConfig())
