"""The tokenizer kinds, and loading a saved tokenizer directory of any kind.

A saved tokenizer is a directory with `tokenizer.json`, whose "kind" names its class here
("wordpiece" when absent: the BERT WordPiece tokenizer's vocab.txt + casing, data/tokenizer.py;
"clip_bpe": CLIP's byte-level BPE, data/clip_tokenizer.py). Each class has the same interface:
vocab_size, pad_id, cls_id, sep_id, encode_batch(texts, max_length, policy), save, load.
"""

from __future__ import annotations

import json
import os

from ldot_jax.core import paths
from ldot_jax.data.clip_tokenizer import ClipTokenizer
from ldot_jax.data.tokenizer import SETTINGS_FILE, VOCAB_FILE, Tokenizer

TOKENIZERS: dict[str, type] = {"wordpiece": Tokenizer, "clip_bpe": ClipTokenizer}


def kind_of(directory: str | os.PathLike) -> str | None:
    """The kind of the tokenizer saved in `directory`, None if it holds none."""
    directory = os.fspath(directory)
    settings_path = paths.join(directory, SETTINGS_FILE)
    if paths.is_file(settings_path):
        try:
            settings = json.loads(paths.read_text(settings_path))
        except ValueError as e:
            raise ValueError(f"{settings_path}: not valid JSON: {e}") from e
        kind = settings.get("kind", "wordpiece") if isinstance(settings, dict) else None
        if kind not in TOKENIZERS:
            raise ValueError(f"{settings_path}: tokenizer kind {kind!r}; the kinds are "
                             f"{list(TOKENIZERS)}")
        return kind
    return "wordpiece" if paths.is_file(paths.join(directory, VOCAB_FILE)) else None


def load(directory: str | os.PathLike):
    """The tokenizer saved in `directory` (a FileNotFoundError if it holds none)."""
    kind = kind_of(directory)
    if kind is None:
        raise FileNotFoundError(f"{os.fspath(directory)} holds no tokenizer ({SETTINGS_FILE} "
                                f"or {VOCAB_FILE})")
    return TOKENIZERS[kind].load(directory)
