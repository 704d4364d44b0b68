"""fp16 exports run, and their images are compared with fp32 (issue 13.4).

Every fp16 repository the exporter writes (``--precision fp16`` and
``fp16-vae-fp32``, i.e. ``--fp16`` with and without ``--fp16-vae-decoder``;
the Python-backend ONNX host and the torch host) is served in-process: each
component's exported ``model.py`` (with ``component_host.py`` and
``wrappers.py`` beside it) is initialized from its ``config.pbtxt`` and
answers the pipeline's BLS calls through tests/fake_pb_utils.py, and the
pipeline's loop (``TritonComponents`` over the export's pipeline.json)
generates an image. onnxruntime runs fp16 ONNX models on the CPU; the torch
host is given ``dtype`` float16 where its config says ``auto`` (what ``auto``
means on CUDA), since torch runs fp16 convolutions, norms and SDPA on the CPU
too. The image is compared with the fp32 export's (PSNR printed); the VAE's
fp32 rule (encoder and decoder, as diffusers upcasts both) is checked in the
files written.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from fake_pb_utils import import_model, initialize, install, model_config

from sd_pipeline import Assets, OnnxComponents, generate, make_request
from sd_pipeline import spec as S
from sd_triton.export import Contents, ExportOptions, Hosting, export_repository
from sd_triton.export import component_models as CM
from sd_triton.export import components as C
from sd_triton.export import triton_config as T

# fp16 carries 11 significant bits: each component's outputs differ from fp32
# by ~1e-3 relative, and the sampler compounds that over the steps. Measured
# on the tiny model (32x32, 2 euler steps, onnxruntime 1.32 / torch 2.13 CPU):
# 61.3 / 62.0 dB (ONNX host fp16 / fp16-vae-fp32), 57.6 / 57.9 dB (torch
# host), i.e. 0.3 uint8 levels RMS. 45 dB (1.4 levels RMS) leaves room for
# other CPUs' kernels; an fp16 image that went wrong (overflow, a dtype
# mix-up, NaN -> black) scores well under 20 dB.
PSNR_FLOOR_DB = 45.0
VARIANTS = [
    ("python", "fp16"),
    ("python", "fp16-vae-fp32"),
    ("torch", "fp16"),
    ("torch", "fp16-vae-fp32"),
]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def exports(tiny_checkpoint, tiny_repository, tmp_path_factory):
    """The four fp16 repositories. ONNX files are traced once per dtype: the
    fp16-vae-fp32 export reuses the fp16 export's (and the fp32 session
    repository's decoder), as a new trace of the same checkpoint would write."""
    out = {}
    for host, precision in VARIANTS:
        path = tmp_path_factory.mktemp(f"{host}-{precision}") / "repo"
        options = ExportOptions(
            contents=Contents(precision=precision, stream_model=False),
            hosting=Hosting(host=host, pipeline_instances=1),
        )
        with pytest.MonkeyPatch.context() as mp:
            if (host, precision) == ("python", "fp16-vae-fp32"):
                sources = {"float16": out["python", "fp16"], "float32": tiny_repository}
                mp.setattr(CM, "_export_onnx", _copy_onnx(sources))
            export_repository(tiny_checkpoint, path, options)
        out[host, precision] = path
    return out


def _copy_onnx(sources):
    def copy(component, modules, sizes, trace_sizes, dtype, version_dir, opts):
        version_dir.mkdir(parents=True, exist_ok=True)
        source = sources[dtype] / component.name / "1" / CM.ONNX_NAME
        shutil.copyfile(source, version_dir / CM.ONNX_NAME)
        return version_dir / CM.ONNX_NAME

    return copy


@pytest.fixture(scope="module")
def pb(module_monkeypatch):
    return install(module_monkeypatch, callee_kind="CPU")


def serve(pb, monkeypatch, repository, tag: str) -> dict:
    """The repository's component models, loaded as Triton would; BLS calls go to them."""
    models = {}
    for name in [*C.FAMILY_COMPONENTS["sd"], S.SAFETY_CHECKER.name]:
        folder = repository / name
        host = import_model(monkeypatch, folder / "1" / "model.py", name=f"{tag}_{name}")
        dtype = model_config(folder).get("parameters", {}).get("dtype", {}).get("string_value")
        parameters = {"dtype": "float16"} if dtype == "auto" else None  # auto on CUDA
        models[name] = initialize(host, folder, parameters=parameters)
    pb.bls = lambda request: models[request.model_name].execute([request])[0]
    return models


def _request(config):
    return make_request(
        config,
        "a photo of a cat",
        height=32,
        width=32,
        num_inference_steps=2,
        seed=2,
        scheduler="euler",
    )


@pytest.fixture(scope="module")
def fp32_image(tiny_repository):
    assets = Assets.load(tiny_repository / "stable_diffusion" / "1" / "assets")
    return generate(_request(assets.config), OnnxComponents(tiny_repository), assets)


@pytest.mark.parametrize(("host", "precision"), VARIANTS)
def test_fp16_image_is_close_to_fp32(pb, module_monkeypatch, exports, fp32_image, host, precision):
    from sd_pipeline.triton_components import TritonComponents

    repository = exports[host, precision]
    assets = Assets.load(repository / "stable_diffusion" / "1" / "assets")
    models = serve(pb, module_monkeypatch, repository, f"{host}_{precision}")
    pb.bls_requests.clear()
    result = generate(_request(assets.config), TritonComponents(assets.config), assets)

    # It ran in fp16: the UNet got float16 latents (its timestep stays float32).
    unet_call = next(r for r in pb.bls_requests if r.model_name == "unet")
    sample, timestep, states = (t.as_numpy() for t in unet_call.inputs())
    assert sample.dtype == states.dtype == np.float16 and timestep.dtype == np.float32
    if host == "torch":
        assert str(models["unet"].dtype) == "torch.float16"

    np.testing.assert_array_equal(result.nsfw_content_detected, fp32_image.nsfw_content_detected)
    assert not fp32_image.nsfw_content_detected.any()  # a black image would prove nothing
    score = psnr(result.images, fp32_image.images)
    print(f"\nPSNR {host} {precision} vs fp32: {score:.1f} dB")
    assert score >= PSNR_FLOOR_DB, f"{host} {precision}: PSNR {score:.1f} dB"


def _vae_dtype(repository) -> str:
    """The VAE's dtype as written: encoder and decoder agree, and pipeline.json, config
    and ONNX file agree."""
    assets = repository / "stable_diffusion" / "1" / "assets" / "pipeline.json"
    dtypes = json.loads(assets.read_text())["component_dtypes"]
    dtype = dtypes["vae_decoder"]
    assert dtypes["vae_encoder"] == dtype
    for name in ("vae_encoder", "vae_decoder"):
        [tensor] = T.read_config(repository / name).input
        assert T.pb.DataType.Name(tensor.data_type) == f"TYPE_FP{dtype[-2:]}"
        session = ort.InferenceSession(str(repository / name / "1" / CM.ONNX_NAME))
        onnx_type = {"float32": "tensor(float)", "float16": "tensor(float16)"}[dtype]
        assert session.get_inputs()[0].type == onnx_type
    return dtype


@pytest.mark.parametrize("force_upcast", [True, False, None])
def test_fp16_vae_follows_its_force_upcast(
    tiny_checkpoint, tiny_repository, exports, tmp_path, monkeypatch, force_upcast
):
    """--fp16 (fp16-vae-auto) reads the VAE's config as diffusers does: force_upcast true
    (or absent: AutoencoderKL's default) keeps the VAE (encoder and decoder) fp32, false
    lets it go fp16."""
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, checkpoint)
    vae_json = checkpoint / "vae" / "config.json"
    vae = json.loads(vae_json.read_text())
    assert vae["force_upcast"] is True  # the tiny VAE says what SD 1.x and SDXL VAEs say
    if force_upcast is None:
        del vae["force_upcast"]
    else:
        vae["force_upcast"] = force_upcast
    vae_json.write_text(json.dumps(vae))
    sources = {"float16": exports["python", "fp16"], "float32": tiny_repository}
    monkeypatch.setattr(CM, "_export_onnx", _copy_onnx(sources))
    options = ExportOptions(
        contents=Contents(precision="fp16-vae-auto", safety_checker=False, stream_model=False),
        hosting=Hosting(pipeline_instances=1),
    )
    repository = export_repository(checkpoint, tmp_path / "repo", options)
    assert _vae_dtype(repository) == ("float16" if force_upcast is False else "float32")
    assert T.read_config(repository / "unet").input[0].data_type == T.pb.TYPE_FP16
    # An explicit choice wins over the VAE's config.
    explicit = ExportOptions(contents=Contents(precision="fp16"))
    assert explicit.for_vae(vae).component_dtype("vae_decoder") == "float16"
    explicit = ExportOptions(contents=Contents(precision="fp16-vae-fp32"))
    assert explicit.for_vae(vae).component_dtype("vae_decoder") == "float32"
    assert explicit.for_vae(vae).component_dtype("vae_encoder") == "float32"
    with pytest.raises(ValueError, match="resolve it"):
        options.component_dtype("vae_decoder")  # never guessed before the VAE is read


@pytest.mark.parametrize("host", ["python", "torch"])
def test_vae_stays_fp32_unless_asked(exports, host):
    """--fp16 (fp16-vae-fp32) keeps the VAE encoder and decoder fp32; --fp16-vae-decoder
    (fp16) does not."""
    for precision, vae in (("fp16-vae-fp32", "float32"), ("fp16", "float16")):
        repository = exports[host, precision]
        constants = json.loads(
            (repository / "stable_diffusion" / "1" / "assets" / "pipeline.json").read_text()
        )
        assert constants["component_dtypes"]["unet"] == "float16"
        for name in ("vae_encoder", "vae_decoder"):
            assert constants["component_dtypes"][name] == vae
            config = T.read_config(repository / name)
            [tensor] = config.input
            assert T.pb.DataType.Name(tensor.data_type) == f"TYPE_FP{vae[-2:]}"
            version = repository / name / "1"
            if host == "python":
                session = ort.InferenceSession(str(version / "model.onnx"))
                onnx_type = {"float32": "tensor(float)", "float16": "tensor(float16)"}[vae]
                assert session.get_inputs()[0].type == onnx_type
            else:
                assert config.parameters["dtype"].string_value == (
                    "float32" if vae == "float32" else "auto"
                )
