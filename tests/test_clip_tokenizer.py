"""CLIP's BPE tokenizer (data/clip_tokenizer.py) against open_clip's own ids, and its save /
load through the tokenizer kinds (data/text_tokenizers.py)."""

import pathlib

import numpy as np
import pytest

from ldot_jax.data import text_tokenizers
from ldot_jax.data.clip_tokenizer import ClipTokenizer

FIXTURE = pathlib.Path(__file__).parent / "data" / "open_clip" / "tokenizer_ids.npz"


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer()


def test_ids_equal_open_clip(tokenizer):
    data = np.load(FIXTURE)
    texts = [str(t) for t in data["texts"]]
    ours = tokenizer.tokenize(texts)
    assert ours.shape == data["ids"].shape == (len(texts), 77)
    for text, mine, theirs in zip(texts, ours, data["ids"]):
        assert mine.tolist() == theirs.tolist(), text
    # The over-long texts were truncated to <sot> + 75 tokens + <eot>, as open_clip does.
    assert (ours[:, -1][ours[:, -1] != 0] == tokenizer.sep_id).all()
    assert (ours[:, 0] == tokenizer.cls_id).all()


def test_special_ids_and_length_policy(tokenizer):
    assert tokenizer.vocab_size == 49408
    assert (tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id) == (49406, 49407, 0)
    long = " ".join(["cat"] * 100)
    assert tokenizer.encode(long, max_length=10, policy="drop") is None
    ids = tokenizer.encode(long, max_length=10)
    assert len(ids) == 12 and ids[0] == 49406 and ids[-1] == 49407
    assert len(tokenizer.encode(long)) == 77  # the context's limit applies by default
    assert tokenizer.decode(tokenizer.encode("A photo of two dogs")) == "a photo of two dogs"


def test_save_load_through_the_kinds(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tok")
    assert text_tokenizers.kind_of(tmp_path / "tok") == "clip_bpe"
    loaded = text_tokenizers.load(tmp_path / "tok")
    assert isinstance(loaded, ClipTokenizer)
    texts = ["a red cube left of a blue ball", "naïve café"]
    assert loaded.encode_batch(texts) == tokenizer.encode_batch(texts)
    (tmp_path / "empty").mkdir()
    assert text_tokenizers.kind_of(tmp_path / "empty") is None
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        text_tokenizers.load(tmp_path / "empty")


def test_bad_vocabulary_file_is_named(tmp_path):
    bad = tmp_path / "bpe.txt.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="bpe.txt.gz"):
        ClipTokenizer(bad)
