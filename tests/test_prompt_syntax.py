"""AUTOMATIC1111's prompt syntax: parsing, 75-token chunks and the weighted encoding.

Unit tests, no server: the real SD 1.x CLIP tokenizer (rebuilt offline) and
tiny random CLIP text encoders from ``sd_triton.export.tiny``'s configs. The
parser is checked against the web UI's own documented examples; the encoding
against a reference written here token by token in float64, from token ids
spelled out by hand.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from sd_pipeline.components import DiffusersComponents
from sd_pipeline.conditioning import check_prompt_chunks, condition
from sd_pipeline.config import Assets, PipelineConfig
from sd_pipeline.errors import InvalidRequest
from sd_pipeline.prompt_syntax import (
    BREAK,
    chunk,
    emphasize,
    encode,
    parse_attention,
    uses_syntax,
)
from sd_pipeline.request import make_request, model_defaults
from sd_triton.export.tiny import TINY, TINY_SDXL
from sd_triton.export.tokenizer import write_clip_tokenizer

BOS, EOS = 49406, 49407
# Single-token words of SD 1.x's CLIP vocabulary.
A, CAT, COMMA, DOG, ON, MAT, RED = 320, 2368, 267, 1929, 525, 9063, 736
BREAK_WORD = 2568  # "break</w>"


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    return write_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_folder):
    return CLIPTokenizer.from_pretrained(tokenizer_folder)


@pytest.fixture(scope="module")
def tokenizer_2(tokenizer_folder):
    """SDXL's second tokenizer: the same vocabulary, padded with "!" (id 0)."""
    return CLIPTokenizer.from_pretrained(tokenizer_folder, pad_token="!")


def with_trained_layer_norms(model):
    """Random layer-norm scales and shifts, as a trained CLIP has.

    A fresh LayerNorm (scale 1, shift 0) makes every output vector's mean 0,
    so the chunk mean that the web UI restores would be rounding noise.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(module.weight, mean=1.0, std=0.2)
            torch.nn.init.normal_(module.bias, std=0.2)
    return model.eval()


@pytest.fixture(scope="module")
def text_model():
    torch.manual_seed(0)
    return with_trained_layer_norms(CLIPTextModel(CLIPTextConfig(**TINY.text_encoder)))


@pytest.fixture(scope="module")
def text_model_2():
    torch.manual_seed(1)
    config = CLIPTextConfig(**TINY_SDXL.text_encoder_2)
    return with_trained_layer_norms(CLIPTextModelWithProjection(config))


class Recorder:
    """An ``encode_ids`` over a text model that remembers what it was called with."""

    def __init__(self, model, *, pooled: bool = False) -> None:
        self.model, self.pooled, self.calls = model, pooled, []

    @torch.no_grad()
    def __call__(self, ids, text_index):
        out = self.model(ids, output_hidden_states=self.pooled)
        hidden = out.hidden_states[-2] if self.pooled else out.last_hidden_state
        self.calls.append((ids, text_index, hidden))
        return hidden, (out.text_embeds if self.pooled else None)


def diffusers_ids(tokenizer, texts):
    return tokenizer(
        texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids


# -- parsing: the web UI's documented examples and its lenient corners ------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),
        ("(a:1.5)", [("a", 1.5)]),
        ("(a: 1.5 ) b", [("a", 1.5), (" b", 1.0)]),
        ("[a]", [("a", 1 / 1.1)]),
        ("((a))", [("a", 1.1 * 1.1)]),
        ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
        ("((a:1.5) b)", [("a", 1.5 * 1.1), (" b", 1.1)]),
        ("a \\\\ b", [("a \\ b", 1.0)]),
        ("a \\ b", [("a  b", 1.0)]),  # a lone backslash is dropped
        ("smile :) ]", [("smile :) ]", 1.0)]),  # closers nothing opened: literal
        ("(a:1.2", [("a:1.2", 1.1)]),  # never closed: the weight is text, (x) applies
        ("[a:b]", [("a:b", 1 / 1.1)]),
        ("", [("", 1.0)]),
        ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
        ("a BREAK BREAK b", [("a", 1.0), BREAK, ("", 1.0), BREAK, ("b", 1.0)]),
        ("a break b ABREAK", [("a break b ABREAK", 1.0)]),
        # Inside brackets the web UI weights its marker too: the word, weighted -1.1.
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
    ],
)
def test_parse_attention_as_the_web_ui(text, expected):
    assert parse_attention(text) == expected


@pytest.mark.parametrize(
    "text",
    ["a [cat:dog:0.5] b", "[cat:10]", "[cat: .5]", "(x [a|b])", "x [[a]:-2]", "cats AND dogs"],
)
def test_sampler_time_syntax_is_refused(tokenizer, text):
    with pytest.raises(InvalidRequest, match="encoded once, before sampling"):
        chunk(text, tokenizer)
    assert uses_syntax(text, tokenizer)  # so the caller reaches the refusal


def test_a_weight_that_is_not_a_number_is_refused(tokenizer):
    with pytest.raises(InvalidRequest, match=r"'1\.2\.3' is not a number"):
        chunk("(cat:1.2.3)", tokenizer)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("\\[cat:0.5\\]", ["[</w>", "cat</w>", ":</w>", "0</w>", ".</w>", "5</w>", "]</w>"]),
        ("[cat:dog]", ["cat</w>", ":</w>", "dog</w>"]),
        ("cats and dogs", ["cats</w>", "and</w>", "dogs</w>"]),
    ],
)
def test_look_alikes_of_sampler_time_syntax_are_text(tokenizer, text, tokens):
    ids = chunk(text, tokenizer).ids[0]
    assert ids[1 : 1 + len(tokens)].tolist() == tokenizer.convert_tokens_to_ids(tokens)


# -- uses_syntax: when the caller keeps diffusers' encoding ------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a photo of a cat", False),
        ("", False),
        ("smile :)", False),
        ("cat " * 75, False),
        ("cat " * 76, True),
        ("a (cat)", True),
        ("a [cat]", True),
        ("a \\(cat\\)", True),  # the web UI drops the backslashes, diffusers keeps them
        ("a (cat:1.0)", True),
        ("a BREAK cat", True),
    ],
)
def test_uses_syntax(tokenizer, text, expected):
    assert uses_syntax(text, tokenizer) is expected


# -- chunking ----------------------------------------------------------------------------


def frame(tokens, pad=EOS):
    """bos + tokens + eos, padded to 77, written out plainly."""
    row = [BOS, *tokens, EOS]
    return row + [pad] * (77 - len(row))


def test_a_short_prompt_is_diffusers_ids_for_both_sdxl_tokenizers(tokenizer, tokenizer_2):
    for tok in (tokenizer, tokenizer_2):
        chunks = chunk("a cat on a mat", tok)
        assert torch.equal(chunks.ids, diffusers_ids(tok, ["a cat on a mat"]))
        assert torch.equal(chunks.weights, torch.ones(1, 77))
    assert chunk("", tokenizer_2).ids[0].tolist() == frame([], pad=0)


def test_weights_sit_on_their_tokens(tokenizer):
    chunks = chunk("a (cat:1.5) on [[a mat]]", tokenizer)
    assert chunks.ids[0].tolist() == frame([A, CAT, ON, A, MAT])
    m = 1 / 1.1 / 1.1
    expected = [1.0, 1.0, 1.5, 1.0, m, m] + [1.0] * 71
    assert torch.equal(chunks.weights[0], torch.tensor(expected, dtype=torch.float32))


def test_long_prompts_are_75_token_chunks(tokenizer, tokenizer_2):
    assert chunk("cat " * 75, tokenizer).ids.tolist() == [[BOS] + [CAT] * 75 + [EOS]]
    chunks = chunk("cat " * 100, tokenizer_2)
    assert chunks.ids.tolist() == [[BOS] + [CAT] * 75 + [EOS], frame([CAT] * 25, pad=0)]


def test_comma_backtrack_moves_the_words_after_a_late_comma(tokenizer):
    text = "cat " * 70 + ", " + "dog " * 10  # comma at 70; the chunk fills at 75
    moved = [frame([CAT] * 70 + [COMMA]), frame([DOG] * 10)]
    assert chunk(text, tokenizer).ids.tolist() == moved
    cut_at_75 = [[BOS] + [CAT] * 70 + [COMMA] + [DOG] * 4 + [EOS], frame([DOG] * 6)]
    assert chunk(text, tokenizer, comma_padding_backtrack=0).ids.tolist() == cut_at_75
    # The chunk's end is 5 tokens after the comma: a backtrack of 5 moves them, 4 does not.
    assert chunk(text, tokenizer, comma_padding_backtrack=5).ids.tolist() == moved
    assert chunk(text, tokenizer, comma_padding_backtrack=4).ids.tolist() == cut_at_75


def test_a_comma_that_arrives_on_a_full_chunk_opens_the_next(tokenizer):
    chunks = chunk("cat " * 75 + ", dog", tokenizer)
    assert chunks.ids.tolist() == [[BOS] + [CAT] * 75 + [EOS], frame([COMMA, DOG])]


def test_break_starts_a_chunk(tokenizer):
    assert chunk("cat BREAK dog", tokenizer).ids.tolist() == [frame([CAT]), frame([DOG])]
    assert chunk("cat BREAK BREAK dog", tokenizer).ids.tolist() == [
        frame([CAT]),
        frame([]),
        frame([DOG]),
    ]
    assert chunk("cat BREAK", tokenizer).ids.tolist() == [frame([CAT])]
    assert chunk("", tokenizer).ids.tolist() == [frame([])]
    # The web UI's bracketed BREAK: the word "break" with weight -1.1, no new chunk.
    chunks = chunk("(cat BREAK)", tokenizer)
    assert chunks.ids.tolist() == [frame([CAT, BREAK_WORD])]
    assert chunks.weights[0, 1:3].tolist() == pytest.approx([1.1, -1.1])


# -- the weighted encoding against a reference written token by token --------------------


def reference(model, chunks, pad=EOS, hidden_of=lambda out: out.last_hidden_state):
    """Encode hand-written ``[(token, weight), ...]`` chunks one by one; weights in float64.

    Every hidden vector is multiplied by its token's weight, then the chunk
    is scaled so that its mean over all positions and features is what it
    was before weighting.
    """
    encoded = []
    for tokens in chunks:
        ids = frame([t for t, _ in tokens], pad)
        weights = [1.0] + [w for _, w in tokens] + [1.0] * (76 - len(tokens))
        with torch.no_grad():
            z = hidden_of(model(torch.tensor([ids]), output_hidden_states=True))[0]
        z = z.double()
        before = z.sum().item() / z.numel()
        for position in range(77):
            z[position] = z[position] * weights[position]
        after = z.sum().item() / z.numel()
        encoded.append(z * (before / after))
    return torch.cat(encoded)


def test_weighted_prompt_equals_the_reference(tokenizer, text_model):
    text = "a (cat:1.5) on [[a mat]] BREAK ((red)) dog"
    m = 1 / 1.1 / 1.1
    chunks = [[(A, 1.0), (CAT, 1.5), (ON, 1.0), (A, m), (MAT, m)], [(RED, 1.21), (DOG, 1.0)]]
    hidden, pooled = encode([text], tokenizer, Recorder(text_model))
    assert pooled is None
    assert hidden.shape == (1, 2 * 77, 32)
    expected = reference(text_model, chunks).float()
    torch.testing.assert_close(hidden[0], expected, rtol=1e-5, atol=1e-5)
    # Weights moved the embedding: not the unweighted encoding of the same tokens.
    plain = reference(text_model, [[(t, 1.0) for t, _ in c] for c in chunks]).float()
    assert (hidden[0] - plain).abs().max() > 1e-2


def test_long_prompt_with_comma_backtrack_equals_the_reference(tokenizer, text_model):
    text = "(cat) " * 70 + ", " + "[dog] " * 10
    w, v = 1.1, 1 / 1.1
    chunks = [[(CAT, w)] * 70 + [(COMMA, 1.0)], [(DOG, v)] * 10]
    hidden, _ = encode([text], tokenizer, Recorder(text_model))
    torch.testing.assert_close(hidden[0], reference(text_model, chunks).float())


def test_shorter_texts_are_padded_with_their_empty_chunk_in_one_call(tokenizer, text_model):
    recorder = Recorder(text_model)
    hidden, _ = encode(["(cat)", "cat " * 80, "dog BREAK dog BREAK dog"], tokenizer, recorder)
    assert hidden.shape == (3, 3 * 77, 32)
    [(ids, text_index, raw)] = recorder.calls  # one call: 1 + 2 + 3 chunks, 2 empty ones
    assert text_index.tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    assert ids[1].tolist() == ids[4].tolist() == frame([])
    for text, empty_row, padding in ((0, 1, (1, 2)), (1, 4, (2,))):
        for c in padding:
            assert torch.equal(hidden[text, 77 * c : 77 * (c + 1)], raw[empty_row])
    assert torch.equal(hidden[1, :154], raw[2:4].flatten(0, 1))  # no weights: as encoded
    torch.testing.assert_close(
        hidden[0, :77], reference(text_model, [[(CAT, 1.1)]]).float(), rtol=1e-5, atol=1e-5
    )


def test_min_chunks_pads_every_text(tokenizer, text_model):
    recorder = Recorder(text_model)
    hidden, _ = encode(["cat", "dog"], tokenizer, recorder, min_chunks=2)
    [(ids, text_index, raw)] = recorder.calls
    assert text_index.tolist() == [0, 0, 1, 1]
    assert ids[1].tolist() == ids[3].tolist() == frame([])
    assert hidden.shape == (2, 154, 32)
    assert torch.equal(hidden[1, 77:], raw[3])


def test_plain_prompts_encode_exactly_as_diffusers(tokenizer, text_model):
    texts = ["", "a photo of a cat, on a mat"]
    hidden, _ = encode(texts, tokenizer, Recorder(text_model))
    with torch.no_grad():
        expected = text_model(diffusers_ids(tokenizer, texts)).last_hidden_state
    assert torch.equal(hidden, expected)


def test_sdxl_second_encoder_pooled_comes_from_the_first_chunk(
    tokenizer, tokenizer_2, text_model, text_model_2
):
    texts = ["", "(a cat:1.3) " + "on a mat, " * 30]  # two chunks
    hidden, _ = encode(texts, tokenizer, Recorder(text_model))
    hidden_2, pooled = encode(texts, tokenizer_2, Recorder(text_model_2, pooled=True))
    assert hidden.shape[:2] == hidden_2.shape[:2] == (2, 154)  # concatenable on the last dim
    first_ids = torch.stack([chunk(t, tokenizer_2).ids[0] for t in texts])
    with torch.no_grad():
        expected = text_model_2(first_ids).text_embeds
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)
    # The empty negative, padded to two chunks, is exactly diffusers' "" for encoder 2.
    with torch.no_grad():
        out = text_model_2(diffusers_ids(tokenizer_2, [""]), output_hidden_states=True)
    torch.testing.assert_close(hidden_2[0, :77], out.hidden_states[-2][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled[0], out.text_embeds[0], rtol=0, atol=1e-6)
    reference_2 = reference(
        text_model_2,
        [[(A, 1.3), (CAT, 1.3)] + [(ON, 1.0), (A, 1.0), (MAT, 1.0), (COMMA, 1.0)] * 18],
        pad=0,
        hidden_of=lambda out: out.hidden_states[-2],
    )
    torch.testing.assert_close(hidden_2[1, :77], reference_2.float(), rtol=1e-5, atol=1e-5)


def test_unit_weights_change_nothing_bit_for_bit():
    torch.manual_seed(0)
    hidden = torch.randn(3, 77, 16)
    hidden[1] -= hidden[1].mean()  # a chunk whose mean is (almost) zero
    for dtype in (torch.float32, torch.float16):
        h = hidden.to(dtype)
        assert torch.equal(emphasize(h, torch.ones(3, 77)), h)
    weights = torch.ones(3, 77)
    weights[2, 5] = 2.0
    out = emphasize(hidden, weights)
    assert torch.equal(out[:2], hidden[:2])
    torch.testing.assert_close(out[2].mean(), hidden[2].mean())
    assert not torch.equal(out[2], hidden[2])


# ---------------------------------------------------------------------------
# Wired into the pipeline's conditioning (sd_pipeline.conditioning), in-process


class CountingComponents(DiffusersComponents):
    """The diffusers modules as components; remembers each text encoder call's rows."""

    def __init__(self, **modules) -> None:
        super().__init__(unet=None, vae=None, **modules)
        self.calls: list[tuple[str, list[int]]] = []

    def encode_text(self, input_ids, skip_layers, *, encoder="text_encoder"):
        self.calls.append((encoder, skip_layers.tolist()))
        return super().encode_text(input_ids, skip_layers, encoder=encoder)


def make_assets(tokenizer, tokenizer_2=None, **config) -> Assets:
    constants = {
        "latent_channels": 4,
        "unet_in_channels": 4,
        "vae_scaling_factor": 0.18215,
        "vae_scale_factor": 8,
        "native_height": 64,
        "native_width": 64,
        "size_step": 16,
        "tokenizer_max_length": 77,
        "unet_max_batch_size": 4,
        "safety_checker": False,
        "text_encoder_layers": {"text_encoder": 5, "text_encoder_2": 5},
    }
    pipeline = PipelineConfig.from_dict({**constants, **config})
    return Assets(pipeline, tokenizer, {}, None, tokenizer_2=tokenizer_2)


def sd_request(assets, prompt, **options):
    return make_request(assets.config, prompt, height=64, width=64, seed=0, **options)


def test_plain_request_is_diffusers_encoding_in_one_call(tokenizer, text_model):
    assets = make_assets(tokenizer)
    for syntax in ("a1111", "diffusers"):
        components = CountingComponents(text_encoder=text_model)
        request = sd_request(
            assets, "a photo of a cat", negative_prompt="blurry", clip_skip=1, prompt_syntax=syntax
        )
        embeddings = condition(request, components, assets).embeddings
        ids = diffusers_ids(tokenizer, ["blurry", "a photo of a cat"])
        expected = components.encode_text(ids, torch.tensor([0, 1])).normed_hidden_state
        assert torch.equal(embeddings, expected)
        assert components.calls[0] == ("text_encoder", [0, 1]) and len(components.calls) == 2


def test_weighted_long_prompt_is_encoded_in_slices_of_the_encoders_batch(tokenizer, text_model):
    assets = make_assets(tokenizer, text_encoder_max_batch_size=2)
    components = CountingComponents(text_encoder=text_model)
    prompt = "(a cat:1.3) " + "on a mat, " * 45  # three chunks
    request = sd_request(
        assets, prompt, negative_prompt="[blurry]", clip_skip=2, num_images_per_prompt=2
    )
    embeddings = condition(request, components, assets).embeddings
    # [negative, negative's empty chunk] and three chunks of the prompt: 5 rows, 2 at a time
    assert components.calls == [
        ("text_encoder", [0, 0]),
        ("text_encoder", [2, 2]),
        ("text_encoder", [2]),
    ]

    def encode_ids(ids, owner):
        with torch.no_grad():
            out = text_model(ids, output_hidden_states=True)
        skips = torch.tensor([0, 2])[owner]
        picked = torch.stack([out.hidden_states[-1 - s][k] for k, s in enumerate(skips.tolist())])
        return text_model.final_layer_norm(picked), None

    expected, _ = encode(["[blurry]", prompt], tokenizer, encode_ids)
    assert embeddings.shape == (4, 3 * 77, 32)
    torch.testing.assert_close(embeddings, expected.repeat_interleave(2, dim=0))


def test_diffusers_syntax_truncates_and_keeps_brackets(tokenizer, text_model):
    assets = make_assets(tokenizer)
    components = CountingComponents(text_encoder=text_model)
    prompt = "(a cat:1.3) " + "on a mat, " * 45
    request = sd_request(assets, prompt, prompt_syntax="diffusers")
    embeddings = condition(request, components, assets).embeddings
    ids = diffusers_ids(tokenizer, ["", prompt])
    expected = components.encode_text(ids, torch.tensor([0, 0])).normed_hidden_state
    assert torch.equal(embeddings, expected)


def test_sdxl_encoders_get_the_same_chunk_count_and_zeros_for_no_negative(
    tokenizer, tokenizer_2, text_model, text_model_2
):
    assets = make_assets(
        tokenizer,
        tokenizer_2,
        family="sdxl",
        text_encoders=["text_encoder", "text_encoder_2"],
        force_zeros_for_empty_prompt=True,
    )
    components = CountingComponents(text_encoder=text_model, text_encoder_2=text_model_2)
    prompt_2 = "a (dog:0.8), " + "on a mat, " * 30  # two chunks
    request = sd_request(assets, "a red cat", prompt_2=prompt_2)
    conditioning = condition(request, components, assets)
    embeddings, pooled = conditioning.embeddings, conditioning.added["text_embeds"]
    assert embeddings.shape == (2, 2 * 77, 32 + 64)
    assert not embeddings[0].any() and not pooled[0].any()  # the absent negative prompt
    # Encoder 1's one-chunk prompt is padded with its empty chunk to two; clip_skip 0
    # skips one layer (SDXL's penultimate).
    assert components.calls == [("text_encoder", [1, 1]), ("text_encoder_2", [1, 1])]
    with torch.no_grad():
        out = text_model(diffusers_ids(tokenizer, ["a red cat", ""]), output_hidden_states=True)
        first_chunk = chunk(prompt_2, tokenizer_2).ids[:1]
        expected_pooled = text_model_2(first_chunk).text_embeds
    torch.testing.assert_close(embeddings[1, :, :32], out.hidden_states[-2].flatten(0, 1))
    torch.testing.assert_close(pooled[1:], expected_pooled)


def test_check_prompt_chunks(tokenizer):
    assets = make_assets(tokenizer)
    long = "cat, " * 160  # 320 tokens: five chunks
    check_prompt_chunks(sd_request(assets, long), assets, 5)
    with pytest.raises(InvalidRequest, match="prompt is 5 chunks of 75 tokens, over .* of 4"):
        check_prompt_chunks(sd_request(assets, long), assets, 4)
    with pytest.raises(InvalidRequest, match="negative_prompt is 2 chunks"):
        check_prompt_chunks(sd_request(assets, "a", negative_prompt="a BREAK b"), assets, 1)
    check_prompt_chunks(sd_request(assets, long, prompt_syntax="diffusers"), assets, 1)


def test_prompt_syntax_default_from_the_model_config():
    assert model_defaults({"prompt_syntax": "diffusers"}) == {"prompt_syntax": "diffusers"}
    assert model_defaults({"prompt_syntax": " "}) == {}
    with pytest.raises(ValueError, match="prompt_syntax must be a1111 or diffusers, got 'x'"):
        model_defaults({"prompt_syntax": "x"})


@pytest.mark.parametrize(("family", "most"), [("sd", 4), ("sdxl", 3)])
def test_clip_skip_leaves_one_layer(tokenizer, tokenizer_2, family, most):
    encoders = ["text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    assets = make_assets(tokenizer, tokenizer_2, family=family, text_encoders=encoders)
    sd_request(assets, "a cat", clip_skip=most)
    with pytest.raises(InvalidRequest, match=f"clip_skip {most + 1} is over .* limit of {most}"):
        sd_request(assets, "a cat", clip_skip=most + 1)
