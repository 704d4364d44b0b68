"""The GPU flavour of the exporter and the pipeline's GPU paths, checked on a CPU machine.

- the GPU repository (Triton's onnxruntime backend, TensorRT, KIND_GPU) parses
  into ``ModelConfig``s that agree with the ONNX files, with TensorRT profiles
  that name the ONNX inputs and cover every request the pipeline accepts;
- TensorRT keys are ones the onnxruntime backend documents;
- fp16 TensorRT precision follows the weights (the VAE decoder stays fp32).

The pipeline's BLS calls are tested in tests/test_bls_memory.py, the device
rule and the torch host in tests/test_gpu_torch_host.py.

The exports here copy the session repository's ONNX files instead of tracing
again (the ``copy_onnx_export`` fixture): only the configs differ between flavours.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sd_pipeline.config import Limits, PipelineConfig
from sd_pipeline.errors import InvalidRequest
from sd_pipeline.request import make_request
from sd_triton.export import (
    Contents,
    ExportError,
    ExportOptions,
    Hosting,
    Naming,
    export_repository,
)
from sd_triton.export import component_models as CM
from sd_triton.export import components as C
from sd_triton.export import triton_config as T
from sd_triton.export.checkpoint import inspect_checkpoint
from sd_triton.export.cli import build_parser, options_from_args
from sd_triton.export.pipeline_models import pipeline_constants, request_limits
from sd_triton.export.tensorrt import TRT_COMPONENTS

TRT_MAX_SIDE = 96  # pixels a side (the tiny model's native size is 64)
# The tiny SD 1.x checkpoint's components, and those TensorRT builds engines for.
SD_COMPONENTS = [*C.FAMILY_COMPONENTS["sd"], "safety_checker"]
SD_TRT_COMPONENTS = [n for n in TRT_COMPONENTS if n in SD_COMPONENTS]

# The TensorRT keys Triton's onnxruntime backend accepts in a
# gpu_execution_accelerator "tensorrt" (it refuses to load a model with any
# other): its README, "ONNX Runtime with TensorRT optimization" and the
# "Parameter mapping" table, triton-inference-server/onnxruntime_backend at
# 013d274504599ff36f0a9518322adb5b760c03d1 (2024; the profile keys since
# onnxruntime_backend#237, February 2024, before r24.10). Written out here,
# not imported from the exporter, so a misspelt key fails this test.
ONNXRUNTIME_BACKEND_TRT_KEYS = frozenset(
    [
        "precision_mode",
        "max_workspace_size_bytes",
        "int8_calibration_table_name",
        "int8_use_native_calibration_table",
        "trt_max_partition_iterations",
        "trt_min_subgraph_size",
        "trt_dla_enable",
        "trt_dla_core",
        "trt_engine_cache_enable",
        "trt_engine_cache_path",
        "trt_engine_cache_prefix",
        "trt_dump_subgraphs",
        "trt_force_sequential_engine_build",
        "trt_context_memory_sharing_enable",
        "trt_layer_norm_fp32_fallback",
        "trt_timing_cache_enable",
        "trt_timing_cache_path",
        "trt_force_timing_cache",
        "trt_detailed_build_log",
        "trt_build_heuristics_enable",
        "trt_sparsity_enable",
        "trt_builder_optimization_level",
        "trt_auxiliary_streams",
        "trt_tactic_sources",
        "trt_extra_plugin_lib_paths",
        "trt_profile_min_shapes",
        "trt_profile_max_shapes",
        "trt_profile_opt_shapes",
        "trt_cuda_graph_enable",
        "trt_dump_ep_context_model",
        "trt_ep_context_file_path",
        "trt_ep_context_embed_mode",
    ]
)


GPU_OPTIONS = ExportOptions(
    hosting=Hosting(
        host="onnxruntime",
        tensorrt=True,
        pipeline_instances=2,
        component_instances=2,
        unet_max_batch_size=8,
    ),
    parameters={"max_side": TRT_MAX_SIDE},
)


@pytest.fixture(scope="module")
def gpu_repository(tiny_checkpoint, tiny_repository, tmp_path_factory, copy_onnx_export):
    out = tmp_path_factory.mktemp("gpu") / "repo"
    with pytest.MonkeyPatch.context() as mp:
        copy_onnx_export(mp, tiny_repository)
        export_repository(tiny_checkpoint, out, GPU_OPTIONS)
    return out


@pytest.fixture(scope="module")
def tiny_configs(tiny_checkpoint):
    ckpt = inspect_checkpoint(tiny_checkpoint)
    return C.fixed_sizes(ckpt.configs), pipeline_constants(ckpt.configs)


def _component_config(name, opts, tiny_configs):
    sizes, constants = tiny_configs
    component = C.COMPONENTS[name]  # SD 1.x's UNet
    return CM.component_config(component, opts, sizes, constants, request_limits(opts, constants))


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


@pytest.mark.parametrize("name", SD_COMPONENTS)
def test_gpu_component_configs_agree_with_onnx(gpu_repository, name):
    from helpers import assert_config_matches_onnx

    config = T.read_config(gpu_repository / name)
    assert config.name == name and config.backend == "onnxruntime"
    assert not (gpu_repository / name / "1" / "model.py").exists()
    assert_config_matches_onnx(config, gpu_repository / name / "1" / CM.ONNX_NAME)
    [group] = config.instance_group
    assert group.kind == T.pb.ModelInstanceGroup.KIND_GPU and group.count == 2
    assert config.version_policy.latest.num_versions == 2


@pytest.mark.parametrize("name", SD_TRT_COMPONENTS)
def test_tensorrt_profiles_name_the_onnx_inputs(gpu_repository, tiny_configs, name):
    import onnx

    _, constants = tiny_configs
    config = T.read_config(gpu_repository / name)
    [accelerator] = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    params = accelerator.parameters
    assert set(params) <= ONNXRUNTIME_BACKEND_TRT_KEYS, set(params) - ONNXRUNTIME_BACKEND_TRT_KEYS
    assert params["precision_mode"] == "FP32"  # fp32 weights
    assert params["trt_engine_cache_enable"] == "1"
    assert params["trt_engine_cache_path"] == "/trt_cache"
    graph = onnx.load(str(gpu_repository / name / "1" / CM.ONNX_NAME)).graph
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
        assert profiles["max"]["sample"][2:] == [TRT_MAX_SIDE // f] * 2
        assert profiles["opt"]["timestep"] == [2]  # [B]: the model sees the reshaped timestep
        # The text sequence: one 77-token prompt chunk up to TRT_MAX_PROMPT_CHUNKS (3).
        sequence = {label: p["encoder_hidden_states"][1] for label, p in profiles.items()}
        assert sequence == {"min": 77, "opt": 77, "max": 3 * 77}


def _served_limits(repository: Path) -> tuple[PipelineConfig, Limits]:
    """The pipeline's config and limits as the served model reads them."""
    assets = repository / "stable_diffusion" / "1" / "assets" / "pipeline.json"
    config = PipelineConfig.load(assets)
    parameters = T.read_config(repository / "stable_diffusion").parameters
    return config, Limits.from_parameters(
        {k: v.string_value for k, v in parameters.items()}, config
    )


def test_every_request_the_pipeline_accepts_fits_the_profiles(gpu_repository):
    config, limits = _served_limits(gpu_repository)
    f, step = config.vae_scale_factor, config.size_step
    unet = _profiles(T.read_config(gpu_repository / "unet"))
    decoder = _profiles(T.read_config(gpu_repository / "vae_decoder"))
    accepted = 0
    for height in range(step, 5 * config.native_height + 1, step):
        for width in range(step, 5 * config.native_width + 1, step):
            try:
                make_request(config, "x", height=height, width=width, seed=0, limits=limits)
            except InvalidRequest as e:
                assert "limit" in str(e), str(e)
                continue
            accepted += 1
            for profiles, name, side in ((unet, "sample", f), (decoder, "latent_sample", f)):
                low, high = profiles["min"][name][2:], profiles["max"][name][2:]
                assert low[0] <= height // side <= high[0], (height, width)
                assert low[1] <= width // side <= high[1], (height, width)
    assert accepted >= (TRT_MAX_SIDE // step) ** 2


def test_a_request_beyond_the_profiles_is_refused_naming_the_limit(gpu_repository):
    config, limits = _served_limits(gpu_repository)
    assert limits.max_side == TRT_MAX_SIDE
    # 4x the native area is within max_pixels's default, but the long side is not.
    wide = 4 * config.native_width
    assert config.native_height * wide <= 4 * config.native_height * config.native_width
    with pytest.raises(
        InvalidRequest, match=rf"width {wide} .* limit of {TRT_MAX_SIDE} .*max_side"
    ):
        make_request(config, "x", height=config.native_height, width=wide, seed=0, limits=limits)


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
    assert constants["component_models"] == {n: n for n in SD_COMPONENTS}
    assert constants["component_versions"] == {n: 1 for n in SD_COMPONENTS}


@pytest.mark.parametrize("host", ["python", "torch", "onnxruntime"])
@pytest.mark.parametrize("instances", [1, 3])
def test_cpu_export_asks_for_cpu_instances(tiny_configs, host, instances):
    """No --gpu: KIND_CPU, never left to Triton (which picks KIND_GPU on a GPU node)."""
    opts = ExportOptions(hosting=Hosting(host=host, component_instances=instances))
    for name in SD_COMPONENTS:
        config, _ = _component_config(name, opts, tiny_configs)
        [group] = config.instance_group
        assert group.kind == T.pb.ModelInstanceGroup.KIND_CPU, name
        assert group.count == instances, name


def _precision_modes(opts, tiny_configs) -> dict[str, str]:
    modes = {}
    for name in SD_TRT_COMPONENTS:
        config, _ = _component_config(name, opts, tiny_configs)
        [accelerator] = config.optimization.execution_accelerators.gpu_execution_accelerator
        modes[name] = accelerator.parameters["precision_mode"]
    return modes


def test_fp16_tensorrt_precision_follows_the_weights(tiny_configs):
    hosting = Hosting(host="onnxruntime", tensorrt=True)
    opts = ExportOptions(contents=Contents(precision="fp16-vae-fp32"), hosting=hosting)
    for name in ("unet", "vae_decoder"):
        config, dtypes = _component_config(name, opts, tiny_configs)
        inputs = {i.name: T.pb.DataType.Name(i.data_type) for i in config.input}
        if name == "unet":
            assert inputs == {
                "sample": "TYPE_FP16",
                "timestep": "TYPE_FP32",
                "encoder_hidden_states": "TYPE_FP16",
            }
        else:
            assert inputs == {"latent_sample": "TYPE_FP32"} and dtypes["sample"] == "float32"
    assert _precision_modes(opts, tiny_configs) == {
        "text_encoder": "FP16",
        "unet": "FP16",
        # SD 1.x's VAE overflows in fp16: diffusers upcasts it to encode and decode.
        "vae_encoder": "FP32",
        "vae_decoder": "FP32",
    }
    all_fp16 = ExportOptions(contents=Contents(precision="fp16"), hosting=hosting)
    assert set(_precision_modes(all_fp16, tiny_configs).values()) == {"FP16"}


@pytest.mark.parametrize(
    "argv,precision",
    [
        (["--tensorrt"], "fp16-vae-auto"),  # what the README promises: fp16 engines
        (["--tensorrt", "--precision", "fp32"], "fp32"),
        (["--fp16"], "fp16-vae-auto"),  # the VAE's force_upcast decides its decoder
        (["--fp16", "--fp16-vae-decoder"], "fp16"),
        ([], "fp32"),
    ],
)
def test_command_line_precision(argv, precision):
    args = build_parser().parse_args(["src", "out", "--host", "onnxruntime", *argv])
    assert options_from_args(args).contents.precision == precision


def test_trt_max_size_is_the_max_side_limit():
    args = build_parser().parse_args(["src", "out", "--tensorrt", "--trt-max-size", "768"])
    assert options_from_args(args).parameters["max_side"] == "768"
    args = build_parser().parse_args(
        ["src", "out", "--trt-max-size", "768", "--parameter", "max_side=512"]
    )
    with pytest.raises(ExportError, match="disagree"):
        options_from_args(args)


def test_gpu_option_errors(tiny_configs):
    with pytest.raises(ExportError, match="--host onnxruntime"):
        ExportOptions(hosting=Hosting(host="python", tensorrt=True)).check()
    with pytest.raises(ExportError, match="model prefix"):
        ExportOptions(naming=Naming(model_prefix="sd 1.5/")).check()
    with pytest.raises(ExportError, match="component_instances"):
        ExportOptions(hosting=Hosting(component_instances=0)).check()
    opts = ExportOptions(
        hosting=Hosting(host="onnxruntime", tensorrt=True), parameters={"max_side": 3}
    )
    with pytest.raises(ExportError, match="max_side 3 is below this model's size step"):
        _component_config("unet", opts, tiny_configs)


def test_torch_host_config(tiny_configs):
    opts = ExportOptions(
        contents=Contents(precision="fp16-vae-fp32"),
        hosting=Hosting(host="torch", gpu=True),
        naming=Naming(model_prefix="t_"),
    )
    config, _ = _component_config("vae_decoder", opts, tiny_configs)
    assert config.name == "t_vae_decoder" and config.backend == "python"
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["component"] == "vae_decoder"
    assert params["dtype"] == "float32"  # fp32 even on CUDA
    assert params["FORCE_CPU_ONLY_INPUT_TENSORS"] == "no"
    config, _ = _component_config("unet", opts, tiny_configs)
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["dtype"] == "auto"  # fp16 on CUDA, fp32 on CPU
    assert config.instance_group[0].kind == T.pb.ModelInstanceGroup.KIND_GPU
