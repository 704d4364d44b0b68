"""The pipeline's BLS calls (sd_pipeline/triton_components.py), over tests/fake_pb_utils.py.

A BLS call's outputs land in the memory the call states (``preferred_memory``);
unstated, Triton r24.10 puts them where the callee allocates them: GPU memory
for a GPU onnxruntime instance, where ``as_numpy()`` raises. The fake places
them so, and the whole loop (text-to-image with the safety checker, and
img2img through the VAE encoder) runs over ``TritonComponents`` whose calls
the tiny repository's ONNX files answer: every call must state the memory its
outputs are consumed in, or these tests fail here, not on a GPU node.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from fake_pb_utils import import_model, initialize, install

from sd_pipeline import OnnxComponents, generate, make_request
from sd_pipeline import spec as S


def onnx_answer(repository):
    """A BLS handler: the component models of ``repository``, run by onnxruntime."""
    onnx = OnnxComponents(repository)
    methods = {
        S.TEXT_ENCODER.name: onnx.encode_text,
        S.UNET.name: onnx.unet,
        S.VAE_ENCODER.name: onnx.vae_encode,
        S.VAE_DECODER.name: onnx.vae_decode,
        S.SAFETY_CHECKER.name: onnx.safety_check,
    }

    def answer(request):
        spec = S.COMPONENTS[request.model_name]
        given = {t.name(): torch.from_numpy(t.as_numpy()) for t in request.inputs()}
        args = []
        for t in spec.inputs:
            x = given[t.name]
            args.append(x.reshape(len(x), *t.reshape) if t.reshape is not None else x)
        out = methods[spec.name](*args)
        out = out if isinstance(out, tuple) else (out,)
        return {t.name: o.numpy() for t, o in zip(spec.outputs, out, strict=True)}

    return answer


def _requests(config):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    common = dict(height=32, width=32, num_inference_steps=2, seed=3, scheduler="euler")
    return [
        make_request(config, "a red bicycle", num_images_per_prompt=2, **common),
        make_request(config, "a red bicycle", image=image, strength=0.5, **common),
    ]


@pytest.mark.parametrize("callee_kind", ["GPU", "CPU"])
def test_cpu_loop_reads_every_output_wherever_the_callee_runs(
    monkeypatch, tiny_repository, assets, callee_kind
):
    from sd_pipeline.triton_components import TritonComponents

    pb = install(monkeypatch, onnx_answer(tiny_repository), callee_kind=callee_kind)
    served = TritonComponents(assets.config)
    direct = OnnxComponents(tiny_repository)
    for req in _requests(assets.config):
        got = generate(req, served, assets)
        want = generate(req, direct, assets)
        np.testing.assert_array_equal(got.images, want.images)
        np.testing.assert_array_equal(got.nsfw_content_detected, want.nsfw_content_detected)
    called = {r.model_name for r in pb.bls_requests}
    # Every component model of the export, once at least.
    assert called == set(assets.config.component_models.values())
    cpu = pb.PreferredMemory(pb.TRITONSERVER_MEMORY_CPU, 0)
    assert all(r.preferred_memory == cpu for r in pb.bls_requests)


@pytest.fixture
def fp16_config(assets):
    """The tiny export's config, as an fp16 export's (the UNet's sample in float16)."""
    fp16 = {"unet": {"sample": "float16", "timestep": "float32"}}
    return dataclasses.replace(assets.config, tensor_dtypes=fp16)


def _zeros(request):
    batch = request.inputs()[0].as_numpy().shape[0]
    return {n: np.zeros((batch, 4, 2, 2), np.float16) for n in request.requested_output_names()}


def test_bls_calls_the_models_and_versions_of_pipeline_json(monkeypatch, fp16_config):
    from sd_pipeline.triton_components import TritonComponents

    pb = install(monkeypatch, _zeros)
    config = dataclasses.replace(
        fp16_config,
        component_models={"unet": "sd21_unet"},
        component_versions={"unet": 3, "text_encoder": 3},
    )
    components = TritonComponents(config)
    out = components.unet(torch.zeros(2, 4, 2, 2), torch.ones(2), torch.zeros(2, 77, 32))
    [call] = pb.bls_requests
    assert call.model_name == "sd21_unet" and call.model_version == 3
    assert out.device.type == "cpu" and out.dtype == torch.float32
    sample, timestep, _ = call.inputs()
    assert sample.as_numpy().dtype == np.float16  # the export's dtype
    assert timestep.as_numpy().shape == (2, 1)  # the config's timestep dims

    plain = TritonComponents(
        dataclasses.replace(fp16_config, component_models={}, component_versions={})
    )
    plain.unet(torch.zeros(1, 4, 2, 2), torch.ones(1), torch.zeros(1, 77, 32))
    assert pb.bls_requests[-1].model_name == "unet"
    assert pb.bls_requests[-1].model_version == -1


def test_gpu_calls_ask_for_outputs_where_they_are_consumed(monkeypatch, fp16_config):
    """CUDA can't run here: the choice for a loop on cuda:1 is checked directly."""
    from sd_pipeline.triton_components import TritonComponents

    pb = install(monkeypatch)
    components = TritonComponents(fp16_config, device="cuda:1")
    assert components.device == torch.device("cuda", 1)
    gpu1 = pb.PreferredMemory(pb.TRITONSERVER_MEMORY_GPU, 1)
    cpu = pb.PreferredMemory(pb.TRITONSERVER_MEMORY_CPU, 0)
    for model in (S.TEXT_ENCODER, S.UNET, S.VAE_ENCODER, S.VAE_DECODER):
        assert components._preferred_memory(model, torch.device("cuda", 1)) == gpu1
    # has_nsfw_concepts is bool, read as numpy: the safety checker answers in CPU memory.
    assert components._preferred_memory(S.SAFETY_CHECKER, torch.device("cuda", 1)) == cpu
    assert components._preferred_memory(S.UNET, torch.device("cpu")) == cpu


def _pipeline(monkeypatch, repository, kind: str, **parameters):
    """The exported pipeline model.py (component_host.py beside it), initialized."""
    install(monkeypatch)
    folder = repository / "stable_diffusion"
    module = import_model(monkeypatch, folder / "1" / "model.py", name="pipeline_under_test")
    return initialize(module, folder, kind=kind, parameters=parameters)


def test_pipeline_follows_the_hosts_device_rule(monkeypatch, tiny_repository):
    """A KIND_GPU pipeline instance whose torch sees no CUDA fails to load, as a host does."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (tiny_repository / "stable_diffusion" / "1" / "component_host.py").is_file()
    with pytest.raises(RuntimeError, match="KIND_GPU instance, but this runtime sees no CUDA"):
        _pipeline(monkeypatch, tiny_repository, "GPU")
    model = _pipeline(monkeypatch, tiny_repository, "GPU", device="cpu")
    assert model.components.device == torch.device("cpu")
    assert _pipeline(monkeypatch, tiny_repository, "CPU").components.device.type == "cpu"
