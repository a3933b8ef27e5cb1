"""CLIP's byte-level BPE tokenizer through the `tokenizers` library, with open_clip's ids.

open_clip's `SimpleTokenizer` (OpenAI CLIP's): the text is cleaned (ftfy.fix_text, HTML
entities unescaped twice, whitespace collapsed, lower-cased: done here in Python with the same
functions, so the cleaning is identical), split by CLIP's regex, mapped byte → unicode as GPT-2
does, and merged by the 48,894 BPE merges of `bpe_simple_vocab_16e6.txt.gz` (shipped in
ldot_jax/data/vocab/, MIT, from OpenAI CLIP via open_clip), words ending in "</w>". Ids: the
256 byte symbols, the same with "</w>", the merges in order, then <start_of_text> (49406) and
<end_of_text> (49407); 49,408 in all. A caption becomes `<sot> tokens <eot>`; open_clip's
77-token context truncates to `<sot>` + 75 tokens + `<eot>` (max_length 75 here), pads with 0.
"""

from __future__ import annotations

import gzip
import html
import json
import os
import shutil
from typing import Sequence

import ftfy
import numpy as np
from tokenizers import Regex
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from ldot_jax.core import fileutil, paths
from ldot_jax.data.tokenizer import SETTINGS_FILE, apply_length_policy

KIND = "clip_bpe"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
DEFAULT_BPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vocab", BPE_FILE)
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
CONTEXT_LENGTH = 77
# The merges open_clip reads: lines 1 … 48,894 of the file (49152 − 256 − 2 of them).
NUM_MERGES = 49152 - 256 - 2
# CLIP's word pattern (open_clip's, case-insensitive), the special tokens first.
PATTERN = (r"(?i)<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"
           r"|[^\s\p{L}\p{N}]+")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map of the 256 byte values to printable characters."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clean(text: str) -> str:
    """open_clip's "lower" cleaning: ftfy, HTML unescape (twice), whitespace collapsed,
    lower-cased."""
    # split / join also strips the ends, as open_clip's two strip() calls do.
    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()


def read_merges(path: str) -> list[tuple[str, str]]:
    """The BPE merges of a CLIP vocabulary file (gzip text, one "a b" pair per line after a
    header line); a ValueError names the file and line of a malformed one."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable gzip CLIP BPE vocabulary: {e}") from e
    lines = lines[1:NUM_MERGES + 1]
    if len(lines) < NUM_MERGES:
        raise ValueError(f"{path}: {len(lines)} merges, expected {NUM_MERGES} (a CLIP "
                         f"bpe_simple_vocab_16e6 file)")
    merges = []
    for number, line in enumerate(lines, start=2):
        pair = tuple(line.split())
        if len(pair) != 2:
            raise ValueError(f"{path}: line {number} is {line!r}, expected two symbols")
        merges.append(pair)
    return merges


def clip_vocabulary(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Token → id, in open_clip's order: bytes, bytes + "</w>", merges, special tokens."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += list(SPECIAL_TOKENS)
    return {token: i for i, token in enumerate(tokens)}


class ClipTokenizer:
    """CLIP's BPE tokenizer with the interface of data/tokenizer.Tokenizer.

    Attributes: vocab_size (49408), pad_id 0 (open_clip pads with 0; the attention mask hides
    it), cls_id = <start_of_text>, sep_id = <end_of_text>, unk_id / mask_id None (every byte
    has a token; CLIP has no mask token), random_token_range (the non-special ids),
    context_length (77: the text tower's positions).
    """

    kind = KIND

    def __init__(self, bpe_path: str | os.PathLike = DEFAULT_BPE,
                 context_length: int = CONTEXT_LENGTH):
        self.bpe_path = os.fspath(bpe_path)
        if not os.path.isfile(self.bpe_path):
            raise FileNotFoundError(f"CLIP BPE vocabulary {self.bpe_path} does not exist")
        if context_length < 3:
            raise ValueError(f"context_length={context_length}: expected at least 3 (<sot>, a "
                             f"token, <eot>)")
        self.context_length = int(context_length)
        merges = read_merges(self.bpe_path)
        self._vocab = clip_vocabulary(merges)
        impl = _HFTokenizer(models.BPE(self._vocab, merges, end_of_word_suffix="</w>"))
        impl.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        impl.decoder = decoders.BPEDecoder(suffix="</w>")
        # Written in a caption, the special tokens are themselves (open_clip's cache).
        impl.add_special_tokens(list(SPECIAL_TOKENS))
        self._impl = impl
        self.vocab_size = len(self._vocab)
        self.pad_id, self.unk_id, self.mask_id = 0, None, None
        self.cls_id, self.sep_id = (self._vocab[t] for t in SPECIAL_TOKENS)
        self.random_token_range = (0, self.cls_id)

    @property
    def max_length(self) -> int:
        """Tokens between <sot> and <eot> that fit the context (75 for CLIP's 77)."""
        return self.context_length - 2

    def wordpieces(self, texts: Sequence[str]) -> list[list[int]]:
        """BPE ids of each text, without <sot> / <eot>."""
        cleaned = [clean(t) for t in texts]
        return [e.ids for e in self._impl.encode_batch(cleaned, add_special_tokens=False)]

    def encode(self, text: str, max_length: int | None = None,
               policy: str = "truncate") -> list[int] | None:
        """`<sot> tokens <eot>` ids of one text; None if dropped by the policy."""
        return self.encode_batch([text], max_length, policy)[0]

    def encode_batch(self, texts: Sequence[str], max_length: int | None = None,
                     policy: str = "truncate") -> list[list[int] | None]:
        """`<sot> tokens <eot>` per text; `max_length` (tokens, specials not counted; default
        the context's 75) with "truncate" keeps the first ones (open_clip's truncation) and
        "drop" gives None for a longer text."""
        limit = self.max_length if max_length is None else min(max_length, self.max_length)
        return apply_length_policy(self.wordpieces(texts), limit, policy, self.cls_id,
                                   self.sep_id)

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """i64[N, context_length]: open_clip's `tokenize(texts)` (truncated, 0-padded)."""
        out = np.zeros((len(texts), self.context_length), np.int64)
        for row, ids in enumerate(self.encode_batch(texts)):
            out[row, :len(ids)] = ids
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids (special tokens and padding after <eot> removed)."""
        ids = [int(i) for i in ids]
        if self.sep_id in ids:
            ids = ids[:ids.index(self.sep_id)]
        return self._impl.decode([i for i in ids if i != self.cls_id],
                                 skip_special_tokens=True).strip()

    def token_to_id(self, token: str) -> int | None:
        return self._vocab.get(token)

    def save(self, directory: str | os.PathLike) -> None:
        """Writes the BPE vocabulary file and tokenizer.json ({"kind": "clip_bpe", …})."""
        directory = os.fspath(directory)
        paths.make_dirs(directory)
        target = paths.join(directory, BPE_FILE)
        if os.path.abspath(target) != os.path.abspath(self.bpe_path):
            with open(self.bpe_path, "rb") as src, fileutil.atomic_file(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
        fileutil.atomic_write_text(
            paths.join(directory, SETTINGS_FILE),
            json.dumps({"kind": KIND, "vocabulary": BPE_FILE,
                        "context_length": self.context_length}))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ClipTokenizer":
        """From a directory written by `save`."""
        directory = os.fspath(directory)
        settings = json.loads(paths.read_text(os.path.join(directory, SETTINGS_FILE)))
        return cls(os.path.join(directory, settings.get("vocabulary", BPE_FILE)),
                   int(settings.get("context_length", CONTEXT_LENGTH)))
