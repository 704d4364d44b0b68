"""The web UI's prompt syntax and clip skip, served (issue 15 items 4, 5).

The tiny SD 1.x with its text encoder's final LayerNorm randomized (the
tiny model's is untrained: weight 1, bias 0, so its outputs have a mean of
rounding noise and the web UI's mean-restoring rescale would be noise too),
exported as ``syntax_*`` models and served by a real tritonserver (conftest's
``extras_server``). Each served image is compared, within one uint8 level,
with diffusers' ``StableDiffusionPipeline`` on the same weights given
``prompt_embeds`` / ``negative_prompt_embeds`` that the test computes
in-process: the web UI's chunks and weights
(:func:`sd_pipeline.prompt_syntax.encode`) over the torch text encoder. Plain
prompts are read as diffusers reads them; clip skip is diffusers'
``clip_skip``; ``prompt_syntax=diffusers`` keeps brackets as text. SDXL
likewise, on the session's tiny SDXL base (conftest's ``families_url``),
against ``StableDiffusionXLPipeline`` with both encoders' embeddings and the
pooled one.
"""

from __future__ import annotations

import shutil
import types

import numpy as np
import pytest
import torch
from helpers import bad_request_error, max_diff, served_generate

from sd_pipeline import prompt_syntax
from sd_pipeline.spec import STABLE_DIFFUSION
from sd_triton.export import Contents, ExportOptions, Hosting, Naming, export_repository
from sd_triton.export import component_models as CM

pytestmark = pytest.mark.server

PREFIX = "syntax_"
MODEL = f"{PREFIX}stable_diffusion"
MAX_CHUNKS = 3
SETTINGS = {"height": 32, "width": 48, "num_inference_steps": 3, "guidance_scale": 7.5}
WEIGHTED = "a (red:1.8) cube on a ((green)) hill, [[blue]] sky, (shiny:0.5)"
NEGATIVE = "(blurry:1.4), low quality"
# 24 weighted phrases of 5 tokens: 120 tokens, two chunks.
LONG = ", ".join(f"a (small:1.8) {c} house" for c in ["red", "blue", "green"] * 8)
BREAK = "a (red:1.8) cube BREAK ((a green hill:1.5)) under a [grey] sky"


@pytest.fixture(scope="module")
def checkpoint(build_dir, tiny_checkpoint):
    """The tiny checkpoint with a randomized final LayerNorm in its text encoder."""
    from transformers import CLIPTextModel

    path = build_dir / "tiny-sd-layernorm"
    if not (path / "model_index.json").exists():
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(tiny_checkpoint, path)
        encoder = CLIPTextModel.from_pretrained(path / "text_encoder")
        norm = encoder.final_layer_norm
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=generator))
            norm.bias.copy_(0.5 + 0.5 * torch.randn(norm.bias.shape, generator=generator))
        encoder.save_pretrained(path / "text_encoder")
    return path


@pytest.fixture(scope="module")
def url(extras_server, serve_extras, checkpoint, tiny_repository):
    """``checkpoint`` exported (its text encoder traced, the rest the session export's ONNX
    files: the same weights) as ``syntax_*`` models of conftest's extras server."""
    path = extras_server.repository
    trace = CM._export_onnx

    def export_onnx(component, modules, sizes, trace_sizes, dtype, version_dir, opts):
        if component.name == "text_encoder":
            return trace(component, modules, sizes, trace_sizes, dtype, version_dir, opts)
        version_dir.mkdir(parents=True, exist_ok=True)
        onnx = version_dir / CM.ONNX_NAME
        shutil.copyfile(tiny_repository / component.name / "1" / CM.ONNX_NAME, onnx)
        return onnx

    options = ExportOptions(
        contents=Contents(safety_checker=False, stream_model=False),
        hosting=Hosting(pipeline_instances=1),
        naming=Naming(model_prefix=PREFIX),
        parameters={"max_prompt_chunks": MAX_CHUNKS},
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CM, "_export_onnx", export_onnx)
        export_repository(checkpoint, path, options, overwrite=True)
    with serve_extras(PREFIX) as url:
        yield url


@pytest.fixture(scope="module")
def pipe(checkpoint):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        checkpoint, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    # diffusers' clip_skip reads text_encoder.text_model.final_layer_norm; transformers
    # 5's CLIPTextModel is the text model itself.
    te = pipe.text_encoder
    object.__setattr__(
        te, "text_model", types.SimpleNamespace(final_layer_norm=te.final_layer_norm)
    )
    return pipe


def web_ui_embeddings(pipe, texts: list[str], skips: list[int], weighted: bool = True):
    """``texts`` as the web UI encodes them, on the torch text encoder: row i's hidden state
    ``skips[i]`` layers before the last, through the final LayerNorm. ``weighted`` False:
    every weight 1 (the same chunks)."""
    encoder = pipe.text_encoder

    def encode_ids(ids, owner):
        with torch.no_grad():
            out = encoder(ids, output_hidden_states=True)
            layers = [out.hidden_states[-1 - skips[int(i)]][k] for k, i in enumerate(owner)]
            return encoder.final_layer_norm(torch.stack(layers)), None

    with pytest.MonkeyPatch.context() as mp:
        if not weighted:
            mp.setattr(prompt_syntax, "emphasize", lambda hidden, weights: hidden)
        embeddings, _ = prompt_syntax.encode(texts, pipe.tokenizer, encode_ids)
    return embeddings


def reference(pipe, seed: int, **settings) -> np.ndarray:
    out = pipe(generator=torch.Generator().manual_seed(seed), output_type="np", **settings)
    return (out.images * 255).round().astype(np.uint8)


def reference_web_ui(pipe, seed, prompt, negative="", clip_skip=0, weighted=True):
    """diffusers' pipeline on the web UI's embeddings of [negative, prompt]."""
    emb = web_ui_embeddings(pipe, [negative, prompt], [0, clip_skip], weighted)
    return reference(pipe, seed, prompt_embeds=emb[1:], negative_prompt_embeds=emb[:1], **SETTINGS)


@pytest.mark.parametrize(
    ("prompt", "negative", "clip_skip"),
    [(WEIGHTED, NEGATIVE, 0), (LONG, "", 0), (BREAK, "", 0), (WEIGHTED, LONG, 1)],
    ids=["weighted", "long", "break", "weighted-clip-skip"],
)
def test_web_ui_syntax_equals_diffusers_on_its_embeddings(url, pipe, prompt, negative, clip_skip):
    images, _, _ = served_generate(
        url,
        model=MODEL,
        prompt=prompt,
        negative_prompt=negative,
        clip_skip=clip_skip,
        seed=5,
        **SETTINGS,
    )
    expected = reference_web_ui(pipe, 5, prompt, negative, clip_skip)
    assert max_diff(images, expected) <= 1
    # The weights and chunks matter here: unweighted chunks, or the prompt truncated to
    # 77 tokens as diffusers reads it, give another image.
    unweighted = reference_web_ui(pipe, 5, prompt, negative, clip_skip, weighted=False)
    literal = reference(
        pipe, 5, prompt=prompt, negative_prompt=negative, clip_skip=clip_skip or None, **SETTINGS
    )
    assert max_diff(images, unweighted) > 1
    assert max_diff(images, literal) > 1


def test_long_and_break_prompts_are_two_chunks(pipe):
    assert prompt_syntax.chunk(LONG, pipe.tokenizer).ids.shape == (2, 77)
    assert prompt_syntax.chunk(BREAK, pipe.tokenizer).ids.shape == (2, 77)


@pytest.mark.parametrize("syntax", ["a1111", "diffusers"])
def test_plain_prompt_is_read_as_diffusers_reads_it(url, pipe, syntax):
    prompt = "a photo of an astronaut riding a horse"
    images, _, _ = served_generate(
        url,
        model=MODEL,
        prompt=prompt,
        negative_prompt="blurry",
        prompt_syntax=syntax,
        seed=2,
        **SETTINGS,
    )
    expected = reference(pipe, 2, prompt=prompt, negative_prompt="blurry", **SETTINGS)
    assert max_diff(images, expected) <= 1


def test_plain_prompt_gives_the_same_bytes_in_both_syntaxes(url):
    options = {"prompt": "a red cube", "negative_prompt": "blurry", "seed": 4, **SETTINGS}
    web_ui, _, _ = served_generate(url, model=MODEL, **options)
    literal, _, _ = served_generate(url, model=MODEL, prompt_syntax="diffusers", **options)
    assert np.array_equal(web_ui, literal)


def test_diffusers_syntax_keeps_brackets_as_text(url, pipe):
    images, _, _ = served_generate(
        url, prompt=WEIGHTED, negative_prompt=NEGATIVE, prompt_syntax="diffusers", seed=6,
        model=MODEL, **SETTINGS,
    )  # fmt: skip
    expected = reference(pipe, 6, prompt=WEIGHTED, negative_prompt=NEGATIVE, **SETTINGS)
    assert max_diff(images, expected) <= 1
    assert max_diff(images, reference_web_ui(pipe, 6, WEIGHTED, NEGATIVE)) > 1


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_equals_diffusers(url, pipe, clip_skip):
    options = {"prompt": "a red cube", "negative_prompt": "blurry", **SETTINGS}
    images, _, _ = served_generate(url, model=MODEL, clip_skip=clip_skip, seed=7, **options)
    expected = reference(pipe, 7, clip_skip=clip_skip, **options)
    assert max_diff(images, expected) <= 1
    assert max_diff(images, reference(pipe, 7, **options)) > 1


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"prompt_syntax": "compel"}, "unknown prompt_syntax 'compel'; choose 'a1111'"),
        ({"prompt_syntax": "A1111"}, "'diffusers': literal text"),
        # the tiny text encoder has 5 layers: clip_skip 4 leaves one
        ({"clip_skip": 5}, "clip_skip 5 is over this model's limit of 4"),
        ({"prompt": "cat, " * 40 * MAX_CHUNKS}, "prompt is 4 chunks of 75 tokens, over this"),
        ({"negative_prompt": "a BREAK b BREAK c BREAK d"}, "negative_prompt is 4 chunks"),
        ({"prompt": "a cat AND a dog"}, "'AND' (composable diffusion) is not supported"),
        ({"prompt": "a [cat:dog:0.5]"}, "prompt editing or alternation"),
    ],
)
def test_bad_input_is_invalid_arg(url, inputs, message):
    error = bad_request_error(url, inputs, MODEL)
    assert "INVALID_ARG" in str(error.status()), error
    assert message in error.message()


def test_diffusers_syntax_reads_and_and_long_prompts_as_text(url):
    images, _, _ = served_generate(
        url, prompt="a cat AND a dog, " + "cat, " * 200, prompt_syntax="diffusers", seed=1,
        model=MODEL, **SETTINGS,
    )  # fmt: skip
    assert images.shape == (1, 32, 48, 3)


def test_contract_declares_prompt_syntax():
    tensor = STABLE_DIFFUSION.input("prompt_syntax")
    assert tensor.optional and tensor.dtype == "bytes" and tensor.dims == (1,)


# ---------------------------------------------------------------------------
# SDXL: both text encoders, the pooled embedding of the first chunk, zeros for no negative

XL_MODEL = "xl_stable_diffusion"


def xl_web_ui_embeddings(pipe, prompt: str, negative: str, clip_skip: int, weighted: bool = True):
    """[negative, prompt] as the web UI reads them for SDXL: both encoders' hidden states
    ``clip_skip`` + 1 layers before the last (the negative's: 1), every text the same
    number of chunks, concatenated; the second encoder's pooled embedding of the first
    chunk."""
    texts = [negative, prompt]
    tokenizers = (pipe.tokenizer, pipe.tokenizer_2)
    chunks = max(len(prompt_syntax.chunk(t, tok).ids) for t in texts for tok in tokenizers)
    skips = [1, clip_skip + 1]
    hidden = []
    for encoder, tokenizer in zip(
        (pipe.text_encoder, pipe.text_encoder_2), tokenizers, strict=True
    ):

        def encode_ids(ids, owner, encoder=encoder):
            with torch.no_grad():
                out = encoder(ids, output_hidden_states=True)
            states = [out.hidden_states[-1 - skips[int(i)]][k] for k, i in enumerate(owner)]
            return torch.stack(states), out[0]

        with pytest.MonkeyPatch.context() as mp:
            if not weighted:
                mp.setattr(prompt_syntax, "emphasize", lambda hidden, weights: hidden)
            states, pooled = prompt_syntax.encode(texts, tokenizer, encode_ids, min_chunks=chunks)
        hidden.append(states)
    return torch.cat(hidden, dim=-1), pooled


def xl_reference(pipe, seed, prompt, negative, clip_skip=0, weighted=True):
    """diffusers' SDXL pipeline on the web UI's embeddings; ``negative`` None: zeros."""
    emb, pooled = xl_web_ui_embeddings(pipe, prompt, negative or "", clip_skip, weighted)
    negative_emb, negative_pooled = emb[:1], pooled[:1]
    if negative is None:  # force_zeros_for_empty_prompt
        negative_emb, negative_pooled = torch.zeros_like(emb[:1]), torch.zeros_like(pooled[:1])
    return reference(
        pipe,
        seed,
        prompt_embeds=emb[1:],
        negative_prompt_embeds=negative_emb,
        pooled_prompt_embeds=pooled[1:],
        negative_pooled_prompt_embeds=negative_pooled,
        **SETTINGS,
    )


def xl_served(url: str, **options) -> np.ndarray:
    import tritonclient.grpc as grpcclient
    from helpers import infer_inputs

    client = grpcclient.InferenceServerClient(url)
    try:
        return client.infer(XL_MODEL, infer_inputs(**options)).as_numpy("images")
    finally:
        client.close()


@pytest.mark.parametrize(
    ("prompt", "negative", "clip_skip"),
    [(WEIGHTED, NEGATIVE, 1), (LONG, None, 0), (BREAK, "", 0)],
    ids=["weighted-clip-skip", "long-no-negative", "break"],
)
def test_sdxl_web_ui_syntax_equals_diffusers_on_its_embeddings(
    families_url, xl_pipes, prompt, negative, clip_skip
):
    options = {"prompt": prompt, "clip_skip": clip_skip, "seed": 8, **SETTINGS}
    if negative is not None:
        options["negative_prompt"] = negative
    images = xl_served(families_url, **options)
    pipe = xl_pipes.base
    assert max_diff(images, xl_reference(pipe, 8, prompt, negative, clip_skip)) <= 1
    unweighted = xl_reference(pipe, 8, prompt, negative, clip_skip, weighted=False)
    assert max_diff(images, unweighted) > 1
    literal = {k: v for k, v in options.items() if k not in ("seed", "clip_skip")}
    assert max_diff(images, reference(pipe, 8, clip_skip=clip_skip or None, **literal)) > 1
