"""ControlNet export (issue 16.1): the ControlNet and the controlled UNet as component models.

A tiny ControlNet is made from each tiny UNet (SD 1.x and SDXL) with
``ControlNetModel.from_unet``; its zero-initialised output convolutions get
random weights, or every residual would be 0 and nothing below could fail.
Both components are exported to ONNX (traced at one batch and size, run at
others), compared with diffusers' modules called as its ControlNet pipelines
call them, and served by a real tritonserver from the Triton configs written
for them.

Single files (``sd-triton-export --controlnet NAME=FILE``): the tiny ControlNets
written in lllyasviel's layout (SD 1.x; ``tests/original_layout.py``) and in
diffusers' layout in one file export the folder's ONNX byte for byte, with the
web UI's hash published; files that are not ControlNets or do not fit are refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import tritonclient.grpc as grpcclient
from diffusers import ControlNetModel, UNet2DConditionModel
from helpers import assert_config_matches_onnx
from original_layout import controlnet_original_layout
from safetensors.torch import save_file
from tritonclient.utils import np_to_triton_dtype

from sd_triton.export import component_models as CM
from sd_triton.export import components as C
from sd_triton.export import controlnet as CN
from sd_triton.export import tiny
from sd_triton.export import triton_config as T
from sd_triton.export.checkpoint import ExportError
from sd_triton.server import TritonServer

ARCHITECTURES = {"sd": tiny.TINY, "sdxl": tiny.TINY_SDXL}
# The tiny VAE's images are 2x its latents: a control image embedding with one
# downsampling (diffusers' default has three, for SD's 8x).
EMBEDDING_CHANNELS = (16, 32)
VAE_SCALE = 2
# Traced at one batch and size, checked at others.
TRACE = {"B": 2, "latent_height": 12, "latent_width": 20, "text_sequence": 77}
RUN = {"B": 3, "latent_height": 8, "latent_width": 16, "text_sequence": 77}
SCALES = np.array([0.5, 1.0, 1.3], np.float32)
GUESS = np.array([False, True, False])
TOLERANCE = 1e-4  # onnxruntime vs torch, fp32: measured ~3e-6


@dataclass
class Models:
    family: str
    unet: UNet2DConditionModel
    controlnet: ControlNetModel
    sizes: dict  # fixed dims, as components.fixed_sizes reads them from the checkpoint

    @property
    def controlnet_component(self) -> C.Component:
        return CN.controlnet_component(self.controlnet.config, f"controlnet_{self.family}")

    @property
    def unet_component(self) -> C.Component:
        return CN.controlled_unet_component(self.unet.config, f"unet_controlled_{self.family}")

    def at(self, dims: dict) -> dict:
        """Every dim of both components at ``dims`` (batch, latent size, text length)."""
        pixels = {
            "height": dims["latent_height"] * VAE_SCALE,
            "width": dims["latent_width"] * VAE_SCALE,
        }
        out = {**self.sizes, **dims, **pixels}
        return {**out, **CN.residual_sizes(self.unet.config, out)}


def build(family: str) -> Models:
    arch = ARCHITECTURES[family]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**arch.unet).eval()
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=EMBEDDING_CHANNELS
    ).eval()
    gen = torch.Generator().manual_seed(1)
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    with torch.no_grad():
        for p in (p for conv in zero_convs for p in conv.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    configs = {
        "unet": dict(arch.unet),
        "vae": dict(arch.vae),
        "scheduler": dict(arch.scheduler),
        "tokenizer": {"model_max_length": 77},
    }
    for folder in ("text_encoder", "text_encoder_2"):
        if getattr(arch, folder, None):
            configs[folder] = dict(getattr(arch, folder))
    return Models(family, unet, controlnet, C.fixed_sizes(configs))


@pytest.fixture(scope="module")
def models() -> dict[str, Models]:
    return {family: build(family) for family in ARCHITECTURES}


@pytest.fixture(scope="module")
def repository(models, tmp_path_factory):
    """Both components of both families, exported with the Python-backend ONNX host."""
    root = tmp_path_factory.mktemp("controlnet-repo")
    host_code = {"model.py": CM.HOST_TEMPLATES["python"]}
    host_code[CM.COMPONENT_HOST_SOURCE.name] = CM.COMPONENT_HOST_SOURCE
    for m in models.values():
        for component, modules in (
            (m.controlnet_component, {"controlnet": m.controlnet}),
            (m.unet_component, {"unet": m.unet}),
        ):
            folder = root / component.name
            CN.export_onnx(component, modules, folder / "1" / CM.ONNX_NAME, m.at(TRACE))
            CM.copy_code(host_code, folder / "1")
            T.write_config(CN.triton_config(component, m.sizes), folder)
    return root


def run_inputs(m: Models, component: C.Component, seed: int = 3) -> dict[str, np.ndarray]:
    """Inputs at :data:`RUN` (not the traced sizes), with per-sample scales and guess modes."""
    inputs = C.sample_inputs(component, m.at(RUN), seed=seed)
    arrays = {name: x.numpy() for name, x in inputs.items()}
    if "conditioning_scale" in arrays:
        arrays.update(conditioning_scale=SCALES, guess_mode=GUESS)
        arrays["controlnet_cond"] = np.random.default_rng(seed).random(
            arrays["controlnet_cond"].shape, dtype=np.float32
        )
    return arrays


def added(m: Models, x: dict, rows: slice) -> dict:
    """diffusers' ``added_cond_kwargs`` (SDXL) for ``rows`` of the inputs ``x``."""
    if "text_embeds" not in x:
        return {}
    names = ("text_embeds", "time_ids")
    return {"added_cond_kwargs": {n: torch.from_numpy(x[n][rows]) for n in names}}


def controlnet_reference(m: Models, x: dict) -> list[np.ndarray]:
    """diffusers' ControlNet, one sample at a time with its float scale and guess mode."""
    per_sample = []
    with torch.no_grad():
        for b in range(len(x["sample"])):
            rows = slice(b, b + 1)
            down, mid = m.controlnet(
                torch.from_numpy(x["sample"][rows]),
                torch.from_numpy(x["timestep"][rows]),
                encoder_hidden_states=torch.from_numpy(x["encoder_hidden_states"][rows]),
                controlnet_cond=torch.from_numpy(x["controlnet_cond"][rows]),
                conditioning_scale=float(x["conditioning_scale"][b]),
                guess_mode=bool(x["guess_mode"][b]),
                return_dict=False,
                **added(m, x, rows),
            )
            per_sample.append([r.numpy() for r in (*down, mid)])
    return [np.concatenate(rs) for rs in zip(*per_sample, strict=True)]


def unet_reference(m: Models, x: dict, residuals: list | None) -> np.ndarray:
    """diffusers' UNet with the residuals as its ControlNet pipelines pass them (or none)."""
    kwargs = added(m, x, slice(None))
    if residuals is not None:
        res = [torch.from_numpy(np.array(r)) for r in residuals]
        kwargs.update(
            down_block_additional_residuals=res[:-1], mid_block_additional_residual=res[-1]
        )
    with torch.no_grad():
        return m.unet(
            torch.from_numpy(x["sample"]),
            torch.from_numpy(x["timestep"]),
            torch.from_numpy(x["encoder_hidden_states"]),
            return_dict=False,
            **kwargs,
        )[0].numpy()


def max_abs(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def session(repository, component: C.Component) -> ort.InferenceSession:
    return ort.InferenceSession(str(repository / component.name / "1" / CM.ONNX_NAME))


# ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ARCHITECTURES)
def test_residuals_match_the_modules(models, family):
    m = models[family]
    x = run_inputs(m, m.controlnet_component)
    outputs = controlnet_reference(m, x)
    expected = CN.residuals(m.unet.config)
    assert len(outputs) == len(expected) == len(m.controlnet.controlnet_down_blocks) + 1
    sizes = m.at(RUN)
    for r, out in zip(expected, outputs, strict=True):
        assert out.shape == C.resolve(r.dims, sizes), r.output


@pytest.mark.parametrize("family", ARCHITECTURES)
def test_controlnet_onnx_equals_diffusers(models, repository, family):
    m = models[family]
    component = m.controlnet_component
    x = run_inputs(m, component)
    got = session(repository, component).run(None, x)
    expected = controlnet_reference(m, x)
    assert max_abs(got, expected) <= TOLERANCE
    # Not vacuous: no residual is near 0, and the per-sample scales (and guess mode) count.
    assert min(float(np.abs(r).max()) for r in expected) > 0.1
    unscaled = {**x, "conditioning_scale": np.ones(3, np.float32), "guess_mode": np.zeros(3, bool)}
    assert max_abs(got, controlnet_reference(m, unscaled)) > 0.1


@pytest.mark.parametrize("family", ARCHITECTURES)
def test_controlled_unet_onnx_equals_diffusers(models, repository, family):
    m = models[family]
    residuals = controlnet_reference(m, run_inputs(m, m.controlnet_component))
    component = m.unet_component
    x = run_inputs(m, component)
    x.update({r.unet_input: v for r, v in zip(CN.residuals(m.unet.config), residuals, strict=True)})
    got = session(repository, component).run(None, x)[0]
    expected = unet_reference(m, x, residuals)
    assert float(np.abs(got - expected).max()) <= TOLERANCE
    assert float(np.abs(expected - unet_reference(m, x, None)).max()) > 0.01  # residuals count


@pytest.mark.parametrize("family", ARCHITECTURES)
def test_files_name_residual_dims_apart_and_configs_match(models, repository, family):
    m = models[family]
    for component, is_unet in ((m.controlnet_component, False), (m.unet_component, True)):
        path = repository / component.name / "1" / CM.ONNX_NAME
        graph = onnx.load(str(path), load_external_data=False).graph
        dims = {
            v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*graph.input, *graph.output)
        }
        assert dims[component.spec.inputs[0].name] == ["B", 4, "latent_height", "latent_width"]
        for r in CN.residuals(m.unet.config):
            factor = "" if r.factor == 1 else f"/{r.factor}"
            expected = ["B", r.channels, f"latent_height{factor}", f"latent_width{factor}"]
            assert dims[r.unet_input if is_unet else r.output] == expected
        config = T.read_config(repository / component.name / T.CONFIG_NAME)
        assert_config_matches_onnx(config, path)
        assert config.HasField("dynamic_batching")


def test_incompatible_controlnets_are_refused(models):
    sd, sdxl = models["sd"], models["sdxl"]
    CN.check_compatible(sd.controlnet.config, sd.unet.config, VAE_SCALE)
    # An inpainting UNet takes a plain ControlNet's residuals.
    CN.check_compatible(sd.controlnet.config, {**sd.unet.config, "in_channels": 9}, VAE_SCALE)
    with pytest.raises(ExportError, match="^a ControlNet for SD 1.x, the checkpoint is SDXL "):
        CN.check_compatible(sd.controlnet.config, sdxl.unet.config, VAE_SCALE)
    fewer = {**sd.unet.config, "layers_per_block": 1}
    with pytest.raises(ExportError, match="does not fit the UNet: layers_per_block differ"):
        CN.check_compatible(sd.controlnet.config, fewer, VAE_SCALE)
    with pytest.raises(ExportError, match="control image is 2x its latents, the VAE's images 8x"):
        CN.check_compatible(sd.controlnet.config, sd.unet.config, 8)
    pooled = {**sd.controlnet.config, "global_pool_conditions": True}
    with pytest.raises(ExportError, match="global_pool_conditions"):
        CN.check_compatible(pooled, sd.unet.config, VAE_SCALE)


# ---------------------------------------------------------------------------
# Served


@pytest.fixture(scope="module")
def url(repository):
    with TritonServer(repository).start(timeout_s=300) as server:
        yield server.grpc_url


def infer(url: str, model: str, inputs: dict, outputs: list[str]) -> list[np.ndarray]:
    """One request; per-sample scalars go as Triton's ``[B, 1]``."""
    tensors = []
    for name, value in inputs.items():
        array = value.reshape(-1, 1) if value.ndim == 1 else value
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    client = grpcclient.InferenceServerClient(url)
    try:
        result = client.infer(model, tensors)
    finally:
        client.close()
    return [result.as_numpy(name) for name in outputs]


@pytest.mark.parametrize("family", ARCHITECTURES)
def test_served_controlnet_and_controlled_unet(models, url, family):
    m = models[family]
    cn, unet = m.controlnet_component, m.unet_component
    x = run_inputs(m, cn, seed=7)
    residuals = infer(url, cn.name, x, [t.name for t in cn.spec.outputs])
    assert max_abs(residuals, controlnet_reference(m, x)) <= TOLERANCE
    y = {t.name: x[t.name] for t in unet.spec.inputs if t.name in x}
    y.update({r.unet_input: v for r, v in zip(CN.residuals(m.unet.config), residuals, strict=True)})
    (out,) = infer(url, unet.name, y, ["out_sample"])
    assert float(np.abs(out - unet_reference(m, y, residuals)).max()) <= TOLERANCE


# ---------------------------------------------------------------------------
# Single files: sd-triton-export --controlnet NAME=FILE (issue 16.1)

# Lean exports: what is compared is the same either way.
LEAN = ("-q", "--no-stream-model", "--no-safety-checker", "--pipeline-instances", "1")


@pytest.fixture(scope="module")
def controlnet_files(models, tmp_path_factory) -> dict[str, Path]:
    """Each family's tiny ControlNet as a diffusers folder (``sd``, ``sdxl``) and as single
    files: diffusers' layout (``sd-diffusers``, ``sdxl-diffusers``: ``state_dict()`` in one
    ``.safetensors``) and, SD 1.x, lllyasviel's: ``control_model.*`` in a ``.safetensors``
    (``sd-original``) and unprefixed in a ``.pth`` pickle (``sd-pth``)."""
    root = tmp_path_factory.mktemp("controlnet-files")
    files = {}
    for family, m in models.items():
        m.controlnet.save_pretrained(root / family)
        files[family] = root / family
        state = {k: v.contiguous() for k, v in m.controlnet.state_dict().items()}
        files[f"{family}-diffusers"] = root / f"{family}-diffusers.safetensors"
        save_file(state, files[f"{family}-diffusers"])
    sd = models["sd"].controlnet
    original = controlnet_original_layout(sd.state_dict(), dict(sd.config))
    files["sd-original"] = root / "control_tiny_sd.safetensors"
    save_file(original, files["sd-original"])
    files["sd-pth"] = root / "control_tiny_sd.pth"
    torch.save(
        {k.removeprefix(CN.ORIGINAL_PREFIX): v for k, v in original.items()}, files["sd-pth"]
    )
    return files


def export_cli(src: Path, out: Path, *extra: str) -> int:
    from sd_triton.export import cli

    return cli.main([str(src), str(out), *LEAN, *extra])


def single_file_args(files: dict[str, Path], config: Path) -> list[str]:
    """``--controlnet NAME=FILE --controlnet-config NAME=DIR`` for each of ``files``."""
    argv = []
    for name, path in files.items():
        argv += ["--controlnet", f"{name}={path}", "--controlnet-config", f"{name}={config}"]
    return argv


def assert_same_onnx(repository: Path, names) -> None:
    """The ControlNets ``names`` were exported byte for byte as the folder's (``folder``)."""
    folder = (repository / "controlnet_folder" / "1" / CM.ONNX_NAME).read_bytes()
    for name in names:
        assert (repository / f"controlnet_{name}" / "1" / CM.ONNX_NAME).read_bytes() == folder, name


def assert_hashes(repository: Path, files: dict[str, Path]) -> None:
    """pipeline.json and the pipeline model's config carry each file's web UI hash
    (SHA-256 of the file, 10 digits); the folder has none."""
    expected = {n: hashlib.sha256(p.read_bytes()).hexdigest()[:10] for n, p in files.items()}
    pipeline = json.loads((repository / "stable_diffusion/1/assets/pipeline.json").read_text())
    assert pipeline["controlnet_hashes"] == expected
    config = T.read_config(repository / "stable_diffusion" / T.CONFIG_NAME)
    published = config.parameters["controlnet_hashes"].string_value
    assert published == ", ".join(f"{n}: {h}" for n, h in expected.items())


def test_sd_single_files_export_as_the_folder(tiny_checkpoint, controlnet_files, tmp_path):
    """lllyasviel's layout (prefixed .safetensors, unprefixed .pth) and diffusers' layout."""
    files = {n: controlnet_files[f"sd-{n}"] for n in ("original", "pth", "diffusers")}
    argv = ["--controlnet", f"folder={controlnet_files['sd']}"]
    argv += single_file_args(files, controlnet_files["sd"])
    assert export_cli(tiny_checkpoint, tmp_path / "repo", *argv) == 0
    assert_same_onnx(tmp_path / "repo", files)
    assert_hashes(tmp_path / "repo", files)


def test_sdxl_single_file_exports_as_the_folder(models, controlnet_files, tmp_path):
    """diffusers' layout in one file, as SDXL ControlNets ship: the exporter's loader and
    ONNX export give the folder's file byte for byte (the command line around them is the
    SD 1.x test's)."""
    sources = {
        "folder": CN.ControlNetSource(controlnet_files["sdxl"]),
        "file": CN.ControlNetSource(controlnet_files["sdxl-diffusers"], controlnet_files["sdxl"]),
    }
    onnx_files = []
    for name, source in sources.items():
        model = CN._load_controlnet(name, source)
        component = CN.controlnet_component(model.config, "controlnet_xl")
        path = tmp_path / name / CM.ONNX_NAME
        onnx_files.append(
            CN.export_onnx(component, {"controlnet": model}, path, models["sdxl"].at(TRACE))
        )
    assert onnx_files[0].read_bytes() == onnx_files[1].read_bytes()


def test_single_files_that_do_not_fit_are_refused(
    tiny_checkpoint, controlnet_files, tmp_path, capsys
):
    """Exit 2 with one sentence, before anything is exported; nothing written."""
    out = tmp_path / "out"
    sdxl, sdxl_file = controlnet_files["sdxl"], controlnet_files["sdxl-diffusers"]
    unet_file = tiny_checkpoint / "unet" / "diffusion_pytorch_model.safetensors"
    cases = [
        # Another family (its own config given): both named, the folder path's refusal.
        (
            ["--controlnet", f"xl={sdxl_file}", "--controlnet-config", f"xl={sdxl}"],
            f"--controlnet xl={sdxl_file}: a ControlNet for SDXL, the checkpoint is SD 1.x ",
            "(a ControlNet works only with the model family it was trained for)",
        ),
        # Read with the shipped config, whose sizes are not the tiny model's: the
        # message says which config was used and what to do.
        (
            ["--controlnet", f"sd={controlnet_files['sd-original']}"],
            "does not fit the UNet: ",
            "; read with the shipped controlnet-sd1 config (other sizes: --controlnet-config sd=DIR)",
        ),
        # A UNet is not a ControlNet.
        (
            ["--controlnet", f"unet={unet_file}"],
            f"--controlnet unet={unet_file}: not a ControlNet (no input_hint_block.0.weight "
            "nor controlnet_cond_embedding.conv_in.weight); found ",
            "down_blocks.",
        ),
        (["--controlnet-config", f"canny={sdxl}"], "--controlnet-config canny=", "no --controlnet"),
    ]
    for argv, *sentences in cases:
        assert export_cli(tiny_checkpoint, out, *argv) == 2, argv
        err = capsys.readouterr().err
        assert all(s in err for s in sentences) and len(err.strip().splitlines()) == 1, err
        assert ("shipped" in err) == ("shipped" in sentences[-1]), err  # only where it was
        assert not out.exists()


def test_shipped_controlnet_configs_fit_their_families():
    """The full-size architectures of the shipped configs (on PyTorch's meta device) fit
    their families' UNets and VAEs, and their single-file layouts (lllyasviel's for SD 1.x,
    diffusers' for SDXL) are told apart as we and diffusers tell them; diffusers converts
    lllyasviel's layout back to every tensor of the SD 1.x config, in its shape."""
    from diffusers.loaders.single_file_utils import (
        convert_controlnet_checkpoint,
        infer_diffusers_model_type,
    )

    from sd_triton.export.single_file import config_folder

    for family, base, diffusers_type in (
        ("sd1", "sd1", "controlnet"),
        ("sdxl", "sdxl-base", "controlnet_xl_large"),
    ):
        folder = config_folder(CN.CONTROLNET_CONFIGS[family])
        with torch.device("meta"):
            model = ControlNetModel.from_config(ControlNetModel.load_config(folder))
        unet = json.loads((config_folder(base) / "unet" / "config.json").read_text())
        CN.check_compatible(model.config, unet, 8)
        state = model.state_dict()
        if family == "sd1":
            shapes = {k: v.shape for k, v in state.items()}
            state = controlnet_original_layout(state, dict(model.config))
            converted = convert_controlnet_checkpoint(checkpoint=state, config=dict(model.config))
            assert {k: v.shape for k, v in converted.items()} == shapes
        assert CN.single_file_family(CN.shapes_of(state)) == family
        assert infer_diffusers_model_type(state) == diffusers_type
