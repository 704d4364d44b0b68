"""LoRAs and textual-inversion embeddings fused at export (issue 15, items 2 and 3).

The adapters are made here, in code, for the tiny SD 1.x model: two LoRAs
(peft ``LoraConfig`` on the UNet's attention and the text encoder), one saved
as diffusers writes it and one converted to kohya's layout (``lora_unet_*``,
``lora_te_text_model_*``, with an ``alpha`` other than the rank), and two
embeddings: the web UI's ``.pt`` (``string_to_param``, three vectors) and
diffusers' ``learned_embeds.bin`` (one vector). ONE export
(``sd-triton-export --lora ... --embedding ...``) serves every served
assertion. The reference side is diffusers on the original files:
``load_lora_weights`` + ``set_adapters`` (unfused, peft layers at run time)
and ``load_textual_inversion``.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from helpers import bad_request_error, max_diff, reference, served_generate
from safetensors.torch import load_file, save_file

from sd_pipeline.errors import InvalidRequest
from sd_pipeline.lora_tags import adapted_prompt, expand_embeddings, strip_lora_tags
from sd_triton.export import Contents, ExportOptions, cli, export_repository
from sd_triton.export import adapters as A
from sd_triton.export.options import Naming

WEIGHTS = {"style": 0.8, "detail": 0.5}
KOHYA_ALPHA = 2.0  # rank 4: the kohya file scales its up-weights by 4 / 2 to match
RANK = 4
SERVED = {
    "prompt": "a photo of <cat-toy> on a beach",
    "negative_prompt": "badpixel, blurry",
    "height": 32,
    "width": 32,
    "num_inference_steps": 3,
    "guidance_scale": 7.5,
    "num_images_per_prompt": 1,
}
SEED = 11
PREFIX = "lora_"  # the models' names in conftest's extras repository
MODEL = f"{PREFIX}stable_diffusion"
SMALL = {"height": 32, "width": 32, "num_inference_steps": 1, "seed": 1}


# ----------------------------------------------------------------------------- the files


def _lora_layers(pipe, seed: int, text_encoder: bool) -> dict[str, torch.Tensor]:
    """A random LoRA (rank 4) of the UNet's attention (and the text encoder), as
    diffusers' ``save_lora_weights`` keys it."""
    import copy

    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    parts = {"unet": (pipe.unet, ["to_q", "to_k", "to_v", "to_out.0"])}
    if text_encoder:
        parts["text_encoder"] = (pipe.text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj"])
    layers = {}
    for prefix, (module, targets) in parts.items():
        config = LoraConfig(
            r=RANK, lora_alpha=RANK, init_lora_weights=False, target_modules=targets
        )
        model = inject_adapter_in_model(config, copy.deepcopy(module))
        for key, value in get_peft_model_state_dict(model).items():
            layers[f"{prefix}.{key}"] = value.detach().clone() * 0.5
    return layers


def _to_kohya(layers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya's layout of a diffusers-keyed LoRA: ``lora_unet_*`` / ``lora_te_text_model_*``,
    ``lora_down`` / ``lora_up``, and an ``alpha`` (the up-weights rescaled to keep the LoRA)."""
    out = {}
    for key, value in layers.items():
        module, _, kind = key.rpartition(".lora_")
        owner, _, path = module.partition(".")
        path = ("text_model." + path) if owner == "text_encoder" else path
        stem = ("lora_te_" if owner == "text_encoder" else "lora_unet_") + path.replace(".", "_")
        if kind == "A.weight":
            out[f"{stem}.lora_down.weight"] = value
            out[f"{stem}.alpha"] = torch.tensor(KOHYA_ALPHA)
        else:
            out[f"{stem}.lora_up.weight"] = value * (RANK / KOHYA_ALPHA)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory, reference_pipe):
    """The adapter files: ``{name: path}``, and the diffusers-keyed originals of the LoRAs."""
    folder = tmp_path_factory.mktemp("adapters")
    style = _lora_layers(reference_pipe, seed=1, text_encoder=True)
    detail = _lora_layers(reference_pipe, seed=2, text_encoder=False)
    paths = {
        "style": folder / "style.safetensors",  # kohya
        "detail": folder / "detail.safetensors",  # diffusers
        "style_diffusers": folder / "style-diffusers.safetensors",
        "badpixel": folder / "badpixel.pt",  # the web UI's, three vectors
        "cat_toy": folder / "learned_embeds.bin",  # diffusers', token <cat-toy>
        "wide": folder / "wide.pt",
    }
    save_file(_to_kohya(style), paths["style"], metadata={"ss_output_name": "styleAlias"})
    save_file(detail, paths["detail"])
    save_file(style, paths["style_diffusers"])
    generator = torch.Generator().manual_seed(3)
    vectors = torch.randn(3, 32, generator=generator)
    webui = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "badpixel"}
    torch.save({**webui, "step": 100, "sd_checkpoint": None}, paths["badpixel"])
    torch.save({"<cat-toy>": torch.randn(32, generator=generator)}, paths["cat_toy"])
    torch.save({"string_to_param": {"*": torch.randn(2, 768, generator=generator)}}, paths["wide"])
    return paths


@pytest.fixture(scope="module")
def repository(extras_server, tiny_checkpoint, files):
    """ONE export of the tiny model with both LoRAs and both embeddings, by the command line,
    as ``lora_*`` models of conftest's extras repository."""
    out = extras_server.repository
    argv = [str(tiny_checkpoint), str(out), "-q", "--no-stream-model", "--pipeline-instances", "1"]
    argv += ["--model-prefix", PREFIX]
    argv += ["--lora", f"{files['style']}:{WEIGHTS['style']}"]
    argv += ["--lora", f"{files['detail']}:{WEIGHTS['detail']}"]
    argv += ["--embedding", str(files["badpixel"]), "--embedding", str(files["cat_toy"])]
    assert cli.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def url(repository, serve_extras):
    with serve_extras(PREFIX) as url:
        yield url


@pytest.fixture(scope="module")
def adapted_pipe(tiny_checkpoint, files):
    """diffusers on the original files: LoRAs as peft layers (not fused), embeddings loaded."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(load_file(files["style_diffusers"]), adapter_name="style")
    pipe.load_lora_weights(load_file(files["detail"]), adapter_name="detail")
    pipe.set_adapters(list(WEIGHTS), adapter_weights=list(WEIGHTS.values()))
    pipe.load_textual_inversion(str(files["badpixel"]), token="badpixel")
    pipe.load_textual_inversion(str(files["cat_toy"]))
    return pipe


@pytest.fixture(scope="module")
def expected(adapted_pipe):
    """diffusers' image of :data:`SERVED` with the adapters."""
    return _reference(adapted_pipe)


def _served(url, **overrides):
    options = {**SERVED, **overrides}
    images, _, _ = served_generate(url, model=MODEL, **options, seed=SEED, scheduler="euler")
    return images


def _reference(pipe, **overrides):
    settings = {**SERVED, **overrides}
    return reference(pipe, "euler", SEED, **settings)[0]


# ----------------------------------------------------------------------------- served


def test_served_equals_diffusers_with_loras_and_embeddings(url, expected, reference_pipe):
    served = _served(url)
    assert max_diff(served, expected) <= 1
    # The adapters change the image: a served model that ignored them would fail above.
    plain = _reference(reference_pipe, prompt="a photo of a cat on a beach", negative_prompt="")
    assert max_diff(expected, plain) > 8


def test_the_embeddings_change_the_image(adapted_pipe, expected):
    """The parity above covers the embeddings only if they matter."""
    without = _reference(adapted_pipe, prompt="a photo of on a beach", negative_prompt="blurry")
    assert max_diff(expected, without) > 2


def test_lora_tag_at_the_exported_weight_is_removed(url, adapted_pipe):
    tagged = "<lora:style:0.8> a photo of <cat-toy> on a beach, <lora:styleAlias:0.80>"
    served = _served(url, prompt=tagged, negative_prompt="badpixel <lora:detail:0.5>")
    expected = _reference(
        adapted_pipe, prompt=" a photo of <cat-toy> on a beach, ", negative_prompt="badpixel "
    )
    assert max_diff(served, expected) <= 1


@pytest.mark.parametrize(
    ("inputs", "words"),
    [
        ({"prompt": "a cat <lora:unknown:1>"}, ["<lora:unknown:1>", "style:0.8", "detail:0.5"]),
        ({"prompt": "a cat <lora:style:0.5>"}, ["<lora:style:0.5>", "style:0.8", "at export"]),
        ({"negative_prompt": "<lora:style:1>"}, ["negative_prompt", "<lora:style:1>"]),
    ],
    ids=["unknown", "other-weight", "negative"],
)
def test_lora_tag_it_was_not_exported_with_is_invalid_arg(url, inputs, words):
    error = bad_request_error(url, inputs, MODEL)
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    for word in words:
        assert word in error.message()


# ----------------------------------------------------------------------------- records


def _addnet_hash(path) -> str:
    """kohya's addnet hash, computed here: SHA-256 of what follows the safetensors header."""
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header :]).hexdigest()[:12]


def test_pipeline_json_records_what_was_fused(repository, files, tiny_checkpoint):
    record = json.loads((repository / MODEL / "1/assets/pipeline.json").read_text())
    loras = {r["name"]: r for r in record["loras"]}
    assert list(loras) == ["style", "detail"]
    for name, weight in WEIGHTS.items():
        digest = hashlib.sha256(files[name].read_bytes()).hexdigest()
        assert loras[name]["weight"] == weight
        assert loras[name]["sha256"] == digest
        assert loras[name]["short_hash"] == _addnet_hash(files[name]) != digest[:12]
    assert loras["style"]["alias"] == "styleAlias"
    assert loras["style"]["components"] == ["text_encoder", "unet"]
    assert loras["detail"]["components"] == ["unet"]
    embeddings = {r["token"]: r for r in record["embeddings"]}
    assert {t: r["vectors"] for t, r in embeddings.items()} == {"badpixel": 3, "<cat-toy>": 1}
    digest = hashlib.sha256(files["badpixel"].read_bytes()).hexdigest()
    assert embeddings["badpixel"]["sha256"] == digest
    assert embeddings["badpixel"]["short_hash"] == digest[:12]
    assert record["source"] == str(tiny_checkpoint.resolve())  # not the temporary folder


def test_config_parameters_carry_the_web_ui_hash_lines(repository, files, url):
    client = grpcclient.InferenceServerClient(url)
    try:
        config = client.get_model_config(MODEL).config
    finally:
        client.close()
    params = {k: v.string_value for k, v in config.parameters.items()}
    style, detail = _addnet_hash(files["style"]), _addnet_hash(files["detail"])
    assert params["lora_hashes"] == f"style: {style}, detail: {detail}"
    digests = {n: hashlib.sha256(files[n].read_bytes()).hexdigest()[:12] for n in files}
    assert (
        params["ti_hashes"] == f"badpixel: {digests['badpixel']}, <cat-toy>: {digests['cat_toy']}"
    )


def test_client_infotext_names_the_loras_and_the_embeddings_used(url, files):
    from sd_triton.client import Client, parse_infotext

    with Client(url, model=MODEL, timeout_s=300) as client:
        used = client.generate("<cat-toy> on a beach", negative_prompt="badpixel", **SMALL)
        unused = client.generate("a beach", **SMALL)
    style, detail = _addnet_hash(files["style"]), _addnet_hash(files["detail"])
    digests = {n: hashlib.sha256(files[n].read_bytes()).hexdigest()[:12] for n in files}
    fields = parse_infotext(used.infotext())
    assert fields["Lora hashes"] == f"style: {style}, detail: {detail}"
    assert (
        fields["TI hashes"] == f"badpixel: {digests['badpixel']}, <cat-toy>: {digests['cat_toy']}"
    )
    assert f'Lora hashes: "style: {style}, detail: {detail}"' in used.infotext()  # as the web UI
    fields = parse_infotext(unused.infotext())
    assert fields["Lora hashes"] == f"style: {style}, detail: {detail}"
    assert "TI hashes" not in fields  # no trigger word in the prompts


# ----------------------------------------------------------------------------- bad input


def test_embedding_of_another_width_is_an_export_error(tiny_checkpoint, files, tmp_path, capsys):
    argv = [str(tiny_checkpoint), str(tmp_path / "repo"), "--embedding", str(files["wide"])]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "width 768" in err and "width 32" in err and "wide.pt" in err
    assert not (tmp_path / "repo").exists()


def test_a_file_that_is_no_lora_is_an_export_error(tiny_checkpoint, files, tmp_path, capsys):
    argv = [str(tiny_checkpoint), str(tmp_path / "repo"), "--lora", str(files["badpixel"])]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "badpixel.pt" in err and len(err.splitlines()) == 1


def test_lora_and_embedding_arguments():
    assert A.parse_lora("a/b.safetensors:0.7") == A.LoraFile(A.Path("a/b.safetensors"), 0.7)
    assert A.parse_lora("a/b.safetensors") == A.LoraFile(A.Path("a/b.safetensors"), 1.0)
    assert A.parse_embedding("e.pt:<tok>") == A.EmbeddingFile(A.Path("e.pt"), "<tok>")
    with pytest.raises(Exception, match="not a number"):
        A.parse_lora("b.safetensors:heavy")


def test_embedding_file_formats(tmp_path):
    """The web UI's .safetensors (emb_params) and SDXL pair are read; anything else is named."""
    vectors = torch.ones(2, 32)
    save_file({"emb_params": vectors}, tmp_path / "webui.safetensors")
    token, found = A._embedding_vectors(tmp_path / "webui.safetensors", None)
    assert token == "webui" and torch.equal(found[""], vectors)
    save_file(
        {"clip_l": torch.ones(1, 32), "clip_g": torch.ones(1, 64)}, tmp_path / "xl.safetensors"
    )
    token, found = A._embedding_vectors(tmp_path / "xl.safetensors", "<xl>")
    assert token == "<xl>" and {k: v.shape[1] for k, v in found.items()} == {
        "clip_l": 32,
        "clip_g": 64,
    }
    save_file({"a": vectors, "b": vectors.clone()}, tmp_path / "two.safetensors")
    with pytest.raises(A.ExportError, match="not a textual-inversion embedding.*holds a, b"):
        A._embedding_vectors(tmp_path / "two.safetensors", None)


# ----------------------------------------------------------------------------- prompt text


def test_strip_lora_tags():
    exported = {"style": 0.8, "styleAlias": 0.8}
    assert strip_lora_tags("a <lora:style:0.8>cat", exported) == "a cat"
    assert strip_lora_tags("<lora:style:0.804>, <lora:styleAlias:0.8:0.8>", exported) == ", "
    assert strip_lora_tags("a <b:c> and (x:1.2)", exported) == "a <b:c> and (x:1.2)"
    for bad in ("<lora:style>", "<lora:style:0.81>", "<lora:style:0.8:1>", "<lora:x:1>"):
        with pytest.raises(InvalidRequest, match="fused into the model at export"):
            strip_lora_tags(bad, exported)
    with pytest.raises(InvalidRequest, match="no LoRA"):
        strip_lora_tags("<lora:style:0.8>", {})
    with pytest.raises(InvalidRequest, match="hypernetworks are not supported"):
        strip_lora_tags("<hypernet:x:1>", exported)
    with pytest.raises(InvalidRequest, match="negative_prompt: <lora:style:much>"):
        strip_lora_tags("<lora:style:much>", exported, field="negative_prompt")
    assert strip_lora_tags("<lora:plain>", {"plain": 1.0}) == ""


@pytest.mark.parametrize(
    "text",
    ["badpixel", "a badpixel, <cat-toy> photo", "badpixel badpixel", "plain text", "xbadpixelx"],
)
def test_expand_embeddings_as_diffusers(adapted_pipe, text):
    expected = adapted_pipe.maybe_convert_prompt(text, adapted_pipe.tokenizer)
    assert expand_embeddings(text, {"badpixel": 3, "<cat-toy>": 1}) == expected


def test_expand_embeddings_in_any_case():
    """The tokenizer matches added tokens in any case: every vector is used, as in the web
    UI (diffusers' maybe_convert_prompt expands only the token as added)."""
    vectors = {"EasyNeg": 3}
    expanded = "EasyNeg EasyNeg_1 EasyNeg_2"
    assert expand_embeddings("easyneg, (EASYNEG:1.2)", vectors) == f"{expanded}, ({expanded}:1.2)"
    assert expand_embeddings(expanded, vectors) == f"{expanded} EasyNeg_1 EasyNeg_2"


def test_adapted_prompt_from_records():
    loras = [{"name": "style", "alias": None, "weight": 0.8}]
    embeddings = [{"token": "neg", "vectors": 2}]
    assert adapted_prompt("neg <lora:style:0.8>", loras, embeddings) == "neg neg_1 "


def test_exported_tokenizer_and_text_encoder_know_the_tokens(repository):
    """The served tokenizer has the four new tokens, the ONNX text encoder a row for each."""
    import onnx
    from transformers import CLIPTokenizer

    from sd_triton.export.component_models import ONNX_NAME

    tokenizer = CLIPTokenizer.from_pretrained(repository / MODEL / "1/assets/tokenizer")
    ids = tokenizer("badpixel badpixel_1 badpixel_2 <cat-toy>", add_special_tokens=False).input_ids
    assert ids == [49408, 49409, 49410, 49411]
    graph = onnx.load(str(repository / f"{PREFIX}text_encoder/1" / ONNX_NAME)).graph
    shapes = [list(t.dims) for t in graph.initializer]
    assert [49412, 32] in shapes and [49408, 32] not in shapes


# ----------------------------------------------------------------------------- SDXL


@pytest.fixture(scope="module")
def sdxl_checkpoint(build_dir):
    from sd_triton.export import tiny

    path = build_dir / "tiny-sdxl"
    if not (path / "model_index.json").exists():
        assert tiny.main([str(path), "--family", "sdxl"]) == 0
    return path


def _sdxl_lora(pipe) -> dict[str, torch.Tensor]:
    """A random LoRA of the tiny SDXL's UNet and both text encoders, diffusers-keyed."""
    import copy

    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(5)
    attention = ["q_proj", "k_proj", "v_proj", "out_proj"]
    parts = {
        "unet": (pipe.unet, ["to_q", "to_k", "to_v", "to_out.0"]),
        "text_encoder": (pipe.text_encoder, attention),
        "text_encoder_2": (pipe.text_encoder_2, attention),
    }
    layers = {}
    for prefix, (module, targets) in parts.items():
        config = LoraConfig(
            r=RANK, lora_alpha=RANK, init_lora_weights=False, target_modules=targets
        )
        model = inject_adapter_in_model(config, copy.deepcopy(module))
        for key, value in get_peft_model_state_dict(model).items():
            layers[f"{prefix}.{key}"] = value.detach().clone() * 0.5
    return layers


def test_sdxl_lora_and_clip_l_clip_g_embedding(
    sdxl_checkpoint, tmp_path, extras_server, serve_extras
):
    """An SDXL LoRA (UNet and both text encoders) and an SDXL embedding (clip_l into
    text_encoder, clip_g into text_encoder_2), fused, give diffusers' images in-process
    and served (the export, under ``lxl_``, in the extras server); the export records them."""
    from diffusers import StableDiffusionXLPipeline

    reference_pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_checkpoint)
    reference_pipe.set_progress_bar_config(disable=True)
    layers = _sdxl_lora(reference_pipe)
    lora, embedding = tmp_path / "xl_style.safetensors", tmp_path / "xlneg.safetensors"
    save_file(layers, lora)
    generator = torch.Generator().manual_seed(6)
    vectors = {"clip_l": torch.randn(2, 32, generator=generator)}
    vectors["clip_g"] = torch.randn(2, 64, generator=generator)
    save_file(vectors, embedding)

    reference_pipe.load_lora_weights(layers, adapter_name="xl_style")
    reference_pipe.set_adapters(["xl_style"], adapter_weights=[0.7])
    for key, encoder, tokenizer in (
        ("clip_l", reference_pipe.text_encoder, reference_pipe.tokenizer),
        ("clip_g", reference_pipe.text_encoder_2, reference_pipe.tokenizer_2),
    ):
        reference_pipe.load_textual_inversion(
            vectors[key], token="xlneg", text_encoder=encoder, tokenizer=tokenizer
        )
    settings = {"prompt": "a fox", "negative_prompt": "xlneg, blurry", "height": 32, "width": 32}
    # guidance explicit: SDXL's default is 5.0 in diffusers, 7.5 in the contract
    settings |= {"num_inference_steps": 2, "guidance_scale": 5.0, "output_type": "np"}
    expected = reference_pipe(generator=torch.Generator().manual_seed(1), **settings).images

    specs = [A.LoraFile(lora, 0.7)], [A.EmbeddingFile(embedding)]
    with A.fused_checkpoint(sdxl_checkpoint, *specs, workdir=tmp_path) as fused:
        assert [r["components"] for r in fused.loras] == [
            ["text_encoder", "text_encoder_2", "unet"]
        ]
        assert fused.embeddings[0]["text_encoders"] == ["text_encoder", "text_encoder_2"]
        pipe = StableDiffusionXLPipeline.from_pretrained(fused.path)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(generator=torch.Generator().manual_seed(1), **settings).images
        as_uint8 = [(x * 255).round().astype(np.uint8) for x in (images, expected)]
        assert max_diff(*as_uint8) <= 1
        weights = "unet/diffusion_pytorch_model.safetensors"
        fused_unet, unet = load_file(fused.path / weights), load_file(sdxl_checkpoint / weights)
        assert any(not torch.equal(fused_unet[k], unet[k]) for k in unet)  # the LoRA is in
        assert pipe.text_encoder_2.get_input_embeddings().num_embeddings == 49408 + 2
        out = extras_server.repository
        options = ExportOptions(
            contents=Contents(stream_model=False), naming=Naming(model_prefix="lxl_")
        )
        export_repository(fused.path, out, fused.options(options, sdxl_checkpoint))
    record = json.loads((out / "lxl_stable_diffusion/1/assets/pipeline.json").read_text())
    assert [(r["name"], r["weight"]) for r in record["loras"]] == [("xl_style", 0.7)]
    assert [(r["token"], r["vectors"]) for r in record["embeddings"]] == [("xlneg", 2)]
    request = {k: v for k, v in settings.items() if k != "output_type"}
    with serve_extras("lxl_") as url:
        served, _, _ = served_generate(url, model="lxl_stable_diffusion", seed=1, **request)
    assert max_diff(served, (expected * 255).round().astype(np.uint8)) <= 1
