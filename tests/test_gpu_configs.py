"""The GPU flavour of the exporter and the pipeline's GPU paths, checked on a CPU machine.

- the GPU repository (Triton's onnxruntime backend, TensorRT, KIND_GPU) parses
  into ``ModelConfig``s that agree with the ONNX files, with TensorRT profiles
  that name the ONNX inputs and cover the pipeline's sizes;
- fp16 TensorRT precision follows the weights (the VAE decoder stays fp32);
- the pipeline's BLS calls name the component models and versions of its
  pipeline.json, keep CPU calls as they were, and ask for GPU outputs when
  their inputs are CUDA tensors (the device logic runs with a faked CUDA).

The exports here copy the session repository's ONNX files instead of tracing
again (:func:`copy_onnx_export`): only the configs differ between flavours.
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from sd_pipeline import spec as S
from sd_triton.export import ExportError, export_repository
from sd_triton.export import components as C
from sd_triton.export import repository as R
from sd_triton.export import triton_config as T
from sd_triton.export.checkpoint import inspect_checkpoint

TRT_MAX_SIZE = 96  # pixels a side (the tiny model's native size is 64)


def copy_onnx_export(monkeypatch, source: Path) -> None:
    """Make the exporter copy ``source``'s ONNX files (same checkpoint) instead of tracing."""

    def copy(component, modules, sizes, trace_sizes, dtype, version_dir, opset, dynamo):
        version_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / component.name / "1" / R.ONNX_NAME, version_dir / R.ONNX_NAME)
        return version_dir / R.ONNX_NAME

    monkeypatch.setattr(R, "_export_component", copy)


@pytest.fixture(scope="module")
def gpu_repository(tiny_checkpoint, tiny_repository, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "repo"
    with pytest.MonkeyPatch.context() as mp:
        copy_onnx_export(mp, tiny_repository)
        export_repository(
            tiny_checkpoint,
            out,
            host="onnxruntime",
            tensorrt=True,
            trt_max_size=TRT_MAX_SIZE,
            pipeline_instances=2,
            component_instances=2,
            unet_max_batch_size=8,
        )
    return out


@pytest.fixture(scope="module")
def tiny_configs(tiny_checkpoint):
    ckpt = inspect_checkpoint(tiny_checkpoint)
    return C.fixed_sizes(ckpt.configs), R.pipeline_constants(ckpt.configs)


def _profiles(config) -> dict[str, dict[str, list[int]]]:
    """``{"min": {input: shape}, "opt": ..., "max": ...}`` from the TensorRT parameters."""
    params = config.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters
    out = {}
    for label in ("min", "opt", "max"):
        text = params[f"trt_profile_{label}_shapes"]
        out[label] = {
            name: [int(d) for d in dims.split("x")]
            for name, dims in (item.split(":") for item in text.split(","))
        }
    return out


# ------------------------------------------------------------ the GPU repository


@pytest.mark.parametrize("name", list(C.COMPONENTS))
def test_gpu_component_configs_agree_with_onnx(gpu_repository, name):
    from test_export import assert_config_matches_onnx

    config = T.read_config(gpu_repository / name)
    assert config.name == name and config.backend == "onnxruntime"
    assert not (gpu_repository / name / "1" / "model.py").exists()
    assert_config_matches_onnx(config, gpu_repository / name / "1" / R.ONNX_NAME)
    [group] = config.instance_group
    assert group.kind == T.pb.ModelInstanceGroup.KIND_GPU and group.count == 2
    assert config.version_policy.latest.num_versions == 2


@pytest.mark.parametrize("name", R.TRT_COMPONENTS)
def test_tensorrt_profiles_cover_the_pipeline_sizes(gpu_repository, tiny_configs, name):
    import onnx

    _, constants = tiny_configs
    config = T.read_config(gpu_repository / name)
    [accelerator] = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    params = accelerator.parameters
    assert set(params) == set(R.TRT_PARAMETERS)  # an unknown key fails the model's load
    assert params["precision_mode"] == "FP32"  # fp32 weights
    assert params["trt_engine_cache_enable"] == "1"
    assert params["trt_engine_cache_path"] == "/trt_cache"
    graph = onnx.load(str(gpu_repository / name / "1" / R.ONNX_NAME)).graph
    onnx_inputs = {
        i.name: [
            d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim
        ]
        for i in graph.input
    }
    profiles = _profiles(config)
    for label, shapes in profiles.items():
        assert set(shapes) == set(onnx_inputs), label
        for input_name, shape in shapes.items():
            dims = onnx_inputs[input_name]
            assert len(shape) == len(dims), (label, input_name)
            assert all(d is None or d == s for d, s in zip(dims, shape, strict=True))
    batch = {label: next(iter(shapes.values()))[0] for label, shapes in profiles.items()}
    assert batch["min"] == 1 <= batch["opt"] <= batch["max"] == config.max_batch_size
    if name == "unet":
        f, step = constants["vae_scale_factor"], constants["size_step"]
        native = constants["native_height"] // f
        assert batch["opt"] == 2  # one request with classifier-free guidance
        assert profiles["min"]["sample"][2:] == [step // f] * 2
        assert profiles["opt"]["sample"][2:] == [native] * 2
        assert profiles["max"]["sample"][2:] == [TRT_MAX_SIZE // f] * 2
        assert profiles["opt"]["timestep"] == [2]  # [B]: the model sees the reshaped timestep


def test_safety_checker_stays_on_cuda(gpu_repository):
    config = T.read_config(gpu_repository / "safety_checker")
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator


def test_gpu_pipeline_models(gpu_repository):
    for model, count in (("stable_diffusion", 2), ("stable_diffusion_stream", 1)):
        config = T.read_config(gpu_repository / model)
        [group] = config.instance_group
        assert group.kind == T.pb.ModelInstanceGroup.KIND_GPU and group.count == count
        assert config.version_policy.latest.num_versions == 1
    assets = gpu_repository / "stable_diffusion" / "1" / "assets" / "pipeline.json"
    constants = json.loads(assets.read_text())
    assert constants["component_models"] == {n: n for n in C.COMPONENTS}
    assert constants["component_versions"] == {n: 1 for n in C.COMPONENTS}


def test_fp16_tensorrt_precision_follows_the_weights(tiny_configs):
    sizes, constants = tiny_configs
    opts = R.ExportOptions(host="onnxruntime", fp16=True, tensorrt=True)
    precision = {}
    for name in R.TRT_COMPONENTS:
        config, dtypes = R._component_config(name, opts, sizes, constants)
        [accelerator] = config.optimization.execution_accelerators.gpu_execution_accelerator
        precision[name] = accelerator.parameters["precision_mode"]
        inputs = {i.name: T.pb.DataType.Name(i.data_type) for i in config.input}
        if name == "unet":
            assert inputs == {
                "sample": "TYPE_FP16",
                "timestep": "TYPE_FP32",
                "encoder_hidden_states": "TYPE_FP16",
            }
        if name == "vae_decoder":
            assert inputs == {"latent_sample": "TYPE_FP32"} and dtypes["sample"] == "float32"
    assert precision == {
        "text_encoder": "FP16",
        "unet": "FP16",
        "vae_encoder": "FP16",
        "vae_decoder": "FP32",  # SD 1.x's decoder overflows in fp16
    }


def test_gpu_option_errors(tiny_configs):
    sizes, constants = tiny_configs
    with pytest.raises(ExportError, match="--host onnxruntime"):
        R.ExportOptions(host="python", tensorrt=True).check()
    with pytest.raises(ExportError, match="model prefix"):
        R.ExportOptions(model_prefix="sd 1.5/").check()
    with pytest.raises(ExportError, match="component_instances"):
        R.ExportOptions(component_instances=0).check()
    opts = R.ExportOptions(host="onnxruntime", tensorrt=True, trt_max_size=70)
    with pytest.raises(ExportError, match="trt-max-size 70"):
        R._component_config("unet", opts, sizes, constants)


def test_torch_host_config(tiny_configs):
    sizes, constants = tiny_configs
    opts = R.ExportOptions(host="torch", gpu=True, fp16=True, model_prefix="t_")
    config, _ = R._component_config("vae_decoder", opts, sizes, constants)
    assert config.name == "t_vae_decoder" and config.backend == "python"
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["component"] == "vae_decoder"
    assert params["dtype"] == "float32"  # fp32 even on CUDA
    assert params["FORCE_CPU_ONLY_INPUT_TENSORS"] == "no"
    config, _ = R._component_config("unet", opts, sizes, constants)
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["dtype"] == "auto"  # fp16 on CUDA, fp32 on CPU
    assert config.instance_group[0].kind == T.pb.ModelInstanceGroup.KIND_GPU


# ------------------------------------------------ the pipeline's BLS calls, GPU logic


class _Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array

    def to_dlpack(self):
        return torch.utils.dlpack.to_dlpack(torch.from_numpy(np.ascontiguousarray(self._array)))

    @staticmethod
    def from_dlpack(name, capsule):
        return _Tensor(name, torch.utils.dlpack.from_dlpack(capsule).numpy().copy())


class _Response:
    def __init__(self, tensors):
        self.tensors = tensors

    def has_error(self):
        return False


@pytest.fixture
def bls(monkeypatch):
    """A fake triton_python_backend_utils that records every BLS request's keywords."""
    calls = []
    pb = types.ModuleType("triton_python_backend_utils")
    pb.Tensor = _Tensor
    pb.TRITONSERVER_MEMORY_CPU, pb.TRITONSERVER_MEMORY_GPU = 0, 2
    pb.PreferredMemory = lambda kind, device=0: ("preferred", kind, device)

    class InferenceRequest:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def exec(self):
            calls.append(self.kwargs)
            batch = self.kwargs["inputs"][0].as_numpy().shape[0]
            names = self.kwargs["requested_output_names"]
            return _Response({n: _Tensor(n, np.zeros((batch, 4, 2, 2), np.float16)) for n in names})

    pb.InferenceRequest = InferenceRequest
    pb.get_output_tensor_by_name = lambda response, name: response.tensors.get(name)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    return calls


def _config(**extra):
    from sd_pipeline.config import PipelineConfig

    base = dict(
        latent_channels=4,
        unet_in_channels=4,
        vae_scaling_factor=0.18215,
        vae_scale_factor=8,
        native_height=512,
        native_width=512,
        size_step=64,
        text_width=32,
        tokenizer_max_length=77,
        unet_max_batch_size=8,
        dtype="float16",
        tensor_dtypes={"unet": {"sample": "float16", "timestep": "float32"}},
    )
    return PipelineConfig.from_dict({**base, **extra})


def test_bls_calls_the_models_and_versions_of_pipeline_json(bls):
    from sd_pipeline.triton_components import TritonComponents

    config = _config(
        component_models={"unet": "sd21_unet"}, component_versions={"unet": 3, "text_encoder": 3}
    )
    components = TritonComponents(config)
    out = components.unet(torch.zeros(2, 4, 2, 2), torch.ones(2), torch.zeros(2, 77, 32))
    [call] = bls
    assert call["model_name"] == "sd21_unet" and call["model_version"] == 3
    assert "preferred_memory" not in call  # CPU in, CPU out: as before
    assert out.device.type == "cpu" and out.dtype == torch.float32
    sample = call["inputs"][0].as_numpy()
    assert sample.dtype == np.float16  # the export's dtype
    assert call["inputs"][1].as_numpy().shape == (2, 1)  # the config's timestep dims

    plain = TritonComponents(_config())
    plain.unet(torch.zeros(1, 4, 2, 2), torch.ones(1), torch.zeros(1, 77, 32))
    assert bls[-1]["model_name"] == "unet" and bls[-1]["model_version"] == -1


def test_gpu_calls_ask_for_outputs_on_their_device(bls):
    from sd_pipeline.triton_components import TritonComponents

    components = TritonComponents(_config(), device="cuda:1")
    assert components.device == torch.device("cuda", 1)
    unet = components._preferred_memory(S.UNET, torch.device("cuda", 1))
    assert unet == {"preferred_memory": ("preferred", 2, 1)}
    # bool outputs (the safety checker's flags) are read as numpy: CPU memory.
    checker = components._preferred_memory(S.SAFETY_CHECKER, torch.device("cuda", 1))
    assert checker == {"preferred_memory": ("preferred", 0, 0)}
    assert components._preferred_memory(S.UNET, torch.device("cpu")) == {}


@pytest.mark.parametrize("host", ["pipeline", "torch_host"])
def test_device_choice(monkeypatch, host):
    if host == "pipeline":
        from sd_pipeline.triton_components import pipeline_device as choose
    else:
        choose = _torch_host_module(monkeypatch).choose_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose("GPU", 0) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="no CUDA"):
        choose("GPU", 0, "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose("GPU", 1) == torch.device("cuda", 1)
    assert choose("CPU", 0) == torch.device("cpu")  # a KIND_CPU instance stays on the CPU
    assert choose("CPU", 0, "cuda") == torch.device("cuda", 0)
    assert choose("GPU", 1, "cpu") == torch.device("cpu")
    with pytest.raises(ValueError):
        choose("GPU", 0, "tpu")


def _torch_host_module(monkeypatch):
    """model_repository/torch_host/model.py imported with a stub pb_utils and the wrappers."""
    import importlib.util

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("pb"))
    from sd_triton.export import wrappers

    monkeypatch.setitem(sys.modules, "wrappers", wrappers)
    spec = importlib.util.spec_from_file_location("torch_host_model", R.TORCH_HOST_TEMPLATE)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
