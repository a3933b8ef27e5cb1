"""BERT WordPiece tokenization through the `tokenizers` library.

Loads a BERT `vocab.txt` (cased, uncased, multilingual) or trains a WordPiece vocabulary on a
caption corpus (the built-in dataset does), and turns captions into `[CLS] wordpieces [SEP]`
ids. The length policy follows the original: `max_length` counts wordpieces WITHOUT [CLS] and
[SEP] (the original's id2len); "drop" rejects longer captions (the original drops training
captions over 60), "truncate" cuts them.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import numpy as np
from tokenizers.implementations import BertWordPieceTokenizer
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer

from ldot_jax.core import fileutil, paths

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
POLICIES = ("truncate", "drop")
VOCAB_FILE = "vocab.txt"
SETTINGS_FILE = "tokenizer.json"


def out_of_vocabulary(sequences: Sequence, vocab_size: int | None) -> tuple[int, int] | None:
    """(index of the first sequence holding an id that is negative or not below
    `vocab_size`, that id), or None if every id is in range (vocab_size None: only negative
    ids count). The one check of pre-tokenized ids against a vocabulary."""
    high = vocab_size if vocab_size else np.iinfo(np.int64).max
    arrays = [np.asarray(s).reshape(-1) for s in sequences]
    flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    if not flat.size or (flat.min() >= 0 and flat.max() < high):  # the usual case: one pass
        return None
    for i, ids in enumerate(arrays):
        bad = ids[(ids < 0) | (ids >= high)]
        if bad.size:
            return i, int(bad[0])
    return None


class Tokenizer:
    """WordPiece tokenizer with BERT's special tokens.

    Attributes: vocab_size, pad_id, unk_id, cls_id, sep_id, mask_id, and `random_token_range`
    ([low, high): ids VMLM may draw as random replacements, i.e. past the special tokens; the
    original's `v_range` [106, vocab] for bert-base-cased).
    """

    def __init__(self, vocab: dict[str, int], lowercase: bool, strip_accents: bool | None = None,
                 source: str = "<vocab>"):
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"{source}: the vocabulary lacks the special token(s) {missing}")
        self.lowercase = lowercase
        self.strip_accents = lowercase if strip_accents is None else strip_accents
        self._vocab = dict(vocab)
        self._impl = BertWordPieceTokenizer(self._vocab, lowercase=lowercase,
                                            strip_accents=self.strip_accents)
        # Special tokens are added by `encode` itself: the length policy needs the bare count.
        self._impl.post_processor = None
        self.vocab_size = len(self._vocab)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            self._vocab[t] for t in SPECIAL_TOKENS)
        self.random_token_range = (_first_regular_id(self._vocab), self.vocab_size)

    @classmethod
    def from_vocab_file(cls, path: str | os.PathLike, lowercase: bool | None = None,
                        strip_accents: bool | None = None) -> "Tokenizer":
        """From a BERT vocab.txt (one token per line, id = line number).

        `lowercase` None: uncased if the vocabulary has no upper-case word (bert-base-uncased,
        multilingual-uncased), cased otherwise (bert-base-cased, multilingual-cased).
        """
        path = os.fspath(path)
        if not paths.is_file(path):
            raise FileNotFoundError(f"vocabulary file {path} does not exist")
        with paths.open_file(path) as f:
            tokens = [line.rstrip("\n") for line in f]
        vocab = {}
        for i, token in enumerate(tokens):
            if token in vocab:
                raise ValueError(f"{path}: token {token!r} appears twice (lines "
                                 f"{vocab[token] + 1} and {i + 1})")
            vocab[token] = i
        if lowercase is None:
            lowercase = not any(t[:1].isupper() for t in tokens if not t.startswith("["))
        return cls(vocab, lowercase, strip_accents, source=path)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        """From a directory written by `save` (vocab.txt + tokenizer.json settings)."""
        directory = os.fspath(directory)
        settings_path = paths.join(directory, SETTINGS_FILE)
        settings = {}
        if paths.is_file(settings_path):
            settings = json.loads(paths.read_text(settings_path))
        return cls.from_vocab_file(paths.join(directory, VOCAB_FILE),
                                   settings.get("lowercase"), settings.get("strip_accents"))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, lowercase: bool = True,
              min_frequency: int = 2) -> "Tokenizer":
        """Trains a WordPiece vocabulary of at most `vocab_size` tokens on `texts`.

        The special tokens come first: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4. The
        trainer numbers tokens of equal frequency in hash order, which changes from run to
        run; the other tokens are therefore renumbered canonically (word starts before
        "##" continuations, then by length and text), so the same texts always give the same
        ids. (Which tokens are learned can still differ between runs when merges tie; for
        a reproducible vocabulary of a small closed language use `from_words`.)
        """
        trainer = BertWordPieceTokenizer(lowercase=lowercase)
        trainer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                                    special_tokens=list(SPECIAL_TOKENS), show_progress=False)
        learned = [t for t in trainer.get_vocab() if t not in SPECIAL_TOKENS]
        learned.sort(key=lambda t: (t.startswith("##"), len(t), t))
        return cls({t: i for i, t in enumerate([*SPECIAL_TOKENS, *learned])}, lowercase)

    @classmethod
    def from_words(cls, texts: Iterable[str], vocab_size: int,
                   lowercase: bool = True) -> "Tokenizer":
        """A deterministic WordPiece vocabulary for a small closed language (the scenes
        captions): the special tokens, every character seen (alone and as a "##"
        continuation, so any word of those characters still tokenizes), then whole words
        (as BERT's pre-tokenizer splits them) by frequency, ties alphabetical, up to
        `vocab_size` tokens in all. The same texts give the same ids in every process.
        """
        normalizer = BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
        splitter = BertPreTokenizer()
        counts: dict[str, int] = {}
        for text in texts:
            for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)):
                counts[word] = counts.get(word, 0) + 1
        chars = sorted({c for word in counts for c in word})
        tokens = [*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]
        if len(tokens) > vocab_size:
            raise ValueError(f"vocab_size={vocab_size} is smaller than the {len(tokens)} "
                             f"special and character tokens")
        seen = set(tokens)
        words = sorted((w for w in counts if w not in seen), key=lambda w: (-counts[w], w))
        tokens += words[:vocab_size - len(tokens)]
        return cls({t: i for i, t in enumerate(tokens)}, lowercase)

    def save(self, directory: str | os.PathLike) -> None:
        """Writes vocab.txt (ids = line numbers) and tokenizer.json (casing) atomically."""
        paths.make_dirs(directory)
        tokens = sorted(self._vocab, key=self._vocab.get)
        fileutil.atomic_write_text(paths.join(directory, VOCAB_FILE),
                                   "".join(t + "\n" for t in tokens))
        fileutil.atomic_write_text(
            paths.join(directory, SETTINGS_FILE),
            json.dumps({"lowercase": self.lowercase, "strip_accents": self.strip_accents}))

    def wordpieces(self, texts: Sequence[str]) -> list[list[int]]:
        """Wordpiece ids of each text, without [CLS] / [SEP]."""
        return [e.ids for e in self._impl.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, text: str, max_length: int | None = None,
               policy: str = "truncate") -> list[int] | None:
        """`[CLS] wordpieces [SEP]` ids of one text; None if dropped by the policy."""
        return self.encode_batch([text], max_length, policy)[0]

    def encode_batch(self, texts: Sequence[str], max_length: int | None = None,
                     policy: str = "truncate") -> list[list[int] | None]:
        """`[CLS] wordpieces [SEP]` ids per text. With `max_length` (wordpieces, specials not
        counted), "truncate" keeps the first `max_length` wordpieces and "drop" returns None
        for a longer text."""
        return apply_length_policy(self.wordpieces(texts), max_length, policy, self.cls_id,
                                   self.sep_id)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids (special tokens removed, wordpieces joined)."""
        return self._impl.decode(list(ids), skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._vocab.get(token)


def apply_length_policy(pieces: Iterable[Sequence[int]], max_length: int | None, policy: str,
                        cls_id: int, sep_id: int) -> list[list[int] | None]:
    """`[CLS] wordpieces [SEP]` per wordpiece list; with `max_length` (specials not counted),
    "truncate" keeps the first `max_length` wordpieces and "drop" gives None for a longer one.
    Shared by `Tokenizer.encode_batch` and pre-tokenized datasets."""
    if policy not in POLICIES:
        raise ValueError(f"length policy {policy!r}: expected one of {POLICIES}")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length={max_length}: expected at least 1 wordpiece")
    out = []
    for ids in pieces:
        ids = [int(i) for i in ids]
        if max_length is not None and len(ids) > max_length:
            if policy == "drop":
                out.append(None)
                continue
            ids = ids[:max_length]
        out.append([cls_id, *ids, sep_id])
    return out


def _first_regular_id(vocab: dict[str, int]) -> int:
    """The first id after the leading block of special / unused tokens ([PAD], [unused0], …)."""
    tokens = sorted(vocab, key=vocab.get)
    for token in tokens:
        if not (token.startswith("[") and token.endswith("]")):
            return vocab[token]
    return len(tokens)
