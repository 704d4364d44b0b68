"""SD 1.x's CLIP tokenizer, rebuilt offline from open-clip-torch's BPE file.

Golden ids depend on transformers' tokenizer (no ftfy clean-up in v5), so the
major version is pinned in pyproject (``transformers>=5,<6``) and asserted
here: another major version fails this file loudly instead of skipping it.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import transformers

from sd_triton.export import tokenizer as tok

CAT = [49406, 320, 1125, 539, 320, 2368, 49407]


def test_transformers_major_version_is_the_pinned_one():
    assert transformers.__version__.split(".")[0] == "5", (
        f"golden token ids are for transformers 5 (pyproject pins >=5,<6), "
        f"found {transformers.__version__}"
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tok.write_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_files_are_sd15s_byte_for_byte(folder):
    assert _sha256(folder / "vocab.json") == tok.VOCAB_SHA256
    assert _sha256(folder / "merges.txt") == tok.MERGES_SHA256


def test_vocabulary_layout(folder):
    vocab = json.loads((folder / "vocab.json").read_text())
    assert len(vocab) == tok.VOCAB_SIZE == 49408
    assert vocab[tok.BOS_TOKEN] == 49406
    assert vocab[tok.EOS_TOKEN] == 49407
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    merges = (folder / "merges.txt").read_text().splitlines()
    assert merges[0] == "#version: 0.2"
    assert len(merges) - 1 == tok.NUM_MERGES == 48894


@pytest.fixture(scope="module", params=["slow", "fast"])
def clip_tokenizer(request, folder):
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    cls = CLIPTokenizer if request.param == "slow" else CLIPTokenizerFast
    return cls.from_pretrained(folder)


def test_known_ids(clip_tokenizer):
    assert clip_tokenizer("a photo of a cat").input_ids == CAT
    # Lower-cased, punctuation split off.
    assert clip_tokenizer("A Photo of a CAT!").input_ids == CAT[:-1] + [256, 49407]


def test_special_tokens_and_length(clip_tokenizer):
    assert clip_tokenizer.model_max_length == tok.MAX_LENGTH == 77  # SD 1.x's CLIP context
    assert clip_tokenizer.bos_token_id == 49406
    assert clip_tokenizer.eos_token_id == 49407
    assert clip_tokenizer.pad_token_id == 49407


def test_long_prompt_truncated_to_model_max_length(clip_tokenizer):
    length = clip_tokenizer.model_max_length
    ids = clip_tokenizer(
        "a very long prompt " * 40, padding="max_length", truncation=True, max_length=length
    ).input_ids
    assert len(ids) == length
    assert ids[0] == 49406 and ids[-1] == 49407


def test_short_prompt_padded_with_eos(clip_tokenizer):
    length = clip_tokenizer.model_max_length
    ids = clip_tokenizer("a photo of a cat", padding="max_length", max_length=length).input_ids
    assert ids[:7] == CAT
    assert ids[7:] == [49407] * (length - 7)


def test_missing_bpe_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        tok.build_vocab_and_merges(tmp_path / "nope.txt.gz")
