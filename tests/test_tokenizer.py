"""WordPiece tokenizer: BERT special ids, splitting, casing, length policy, save/load."""

import pytest

from ldot_jax.data.tokenizer import Tokenizer

# A BERT-layout vocabulary: [PAD] 0, [unusedN], [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103.
WORDS = ["a", "man", "riding", "horse", "un", "##aff", "##able", "Fahr", "##rad", "fährt",
         "fahrt", ",", "!", "Man", "A"]


def bert_vocab(tmp_path, words=WORDS, name="vocab.txt"):
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)]
    tokens += ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    path = tmp_path / name
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    return path, {t: i for i, t in enumerate(tokens)}


def test_bert_layout_and_wordpiece_splits(tmp_path):
    path, ids = bert_vocab(tmp_path)
    tok = Tokenizer.from_vocab_file(path)
    assert not tok.lowercase  # "Fahr", "Man", "A" are cased entries
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
    assert tok.random_token_range == (104, len(ids))
    got = tok.encode("A man riding unaffable Fahrrad, zebra!")
    want = [101, ids["A"], ids["man"], ids["riding"], ids["un"], ids["##aff"], ids["##able"],
            ids["Fahr"], ids["##rad"], ids[","], 100, ids["!"], 102]
    assert got == want
    # Wordpieces rejoin; [UNK] is a special token and is skipped.
    assert tok.decode(got) == "A man riding unaffable Fahrrad,!"


def test_uncased_lowercases_and_strips_accents(tmp_path):
    path, ids = bert_vocab(tmp_path, [w for w in WORDS if w.islower() or not w[0].isalpha()])
    tok = Tokenizer.from_vocab_file(path)
    assert tok.lowercase and tok.strip_accents
    assert tok.encode("A MAN fährt")[1:-1] == [ids["a"], ids["man"], ids["fahrt"]]
    cased = Tokenizer.from_vocab_file(path, lowercase=False, strip_accents=False)
    assert cased.encode("A MAN fährt")[1:-1] == [100, 100, ids["fährt"]]


def test_length_policy_counts_wordpieces_without_specials(tmp_path):
    tok = Tokenizer.from_vocab_file(bert_vocab(tmp_path)[0])
    text = "a man riding unaffable"  # 6 wordpieces
    assert len(tok.encode(text)) == 8
    assert tok.encode(text, max_length=6, policy="drop") == tok.encode(text)
    assert tok.encode(text, max_length=5, policy="drop") is None
    assert tok.encode(text, max_length=5, policy="truncate") == tok.encode(text)[:6] + [102]
    with pytest.raises(ValueError, match="length policy 'cut'"):
        tok.encode(text, 5, "cut")


def test_trained_vocabulary_round_trip(tmp_path):
    captions = ["a small red circle left of a blue square",
                "two green triangles above a star"] * 20
    tok = Tokenizer.train(captions, vocab_size=80, min_frequency=1)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.random_token_range[0] == 5
    encoded = tok.encode("Two green triangles above a small blue square")
    assert tok.unk_id not in encoded
    assert tok.decode(encoded) == "two green triangles above a small blue square"
    tok.save(tmp_path / "tok")
    again = Tokenizer.load(tmp_path / "tok")
    assert again.encode_batch(captions[:2]) == tok.encode_batch(captions[:2])
    assert again.lowercase


def test_bad_vocabularies(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.txt"):
        Tokenizer.from_vocab_file(tmp_path / "nothere.txt")
    path = tmp_path / "v.txt"
    path.write_text("[PAD]\n[UNK]\n[CLS]\nhello\n")
    with pytest.raises(ValueError, match=r"v.txt: the vocabulary lacks .*\['\[SEP\]', '\[MASK\]'\]"):
        Tokenizer.from_vocab_file(path)
    path.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhi\nhi\n")
    with pytest.raises(ValueError, match=r"token 'hi' appears twice \(lines 6 and 7\)"):
        Tokenizer.from_vocab_file(path)


def test_word_vocabulary_is_the_same_in_every_process(tmp_path):
    """The WordPiece trainer breaks ties by hash (different per process); the scenes
    vocabulary (`Tokenizer.from_words`) does not, so generated data trains reproducibly."""
    import subprocess
    import sys
    code = ("import sys; from ldot_jax.data.tokenizer import Tokenizer; "
            "texts = [f'{c} {s} {p} of the {c2} {s}' for c in ('red', 'blue', 'green') "
            "for c2 in ('pink', 'gray') for s in ('circle', 'square', 'star') "
            "for p in ('left', 'right', 'above')]; "
            "Tokenizer.from_words(texts * 2, 200).save(sys.argv[1])")
    for i in range(3):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / str(i))], check=True,
                       env={**__import__("os").environ, "PYTHONHASHSEED": str(i)})
    vocabs = [(tmp_path / str(i) / "vocab.txt").read_text() for i in range(3)]
    assert vocabs[0] == vocabs[1] == vocabs[2]


def test_word_vocabulary_tokenizes_seen_and_unseen_words():
    tok = Tokenizer.from_words(["A red circle.", "a red star", "blue star"], 100)
    assert tok.decode(tok.encode("a red star")[1:-1]) == "a red star"
    red, star = tok.token_to_id("red"), tok.token_to_id("star")
    assert tok.encode("red star") == [tok.cls_id, red, star, tok.sep_id]
    assert tok.unk_id not in tok.encode("bladder")  # unseen: spelled from characters
    with pytest.raises(ValueError, match="smaller than"):
        Tokenizer.from_words(["abcdefghij"], 10)
