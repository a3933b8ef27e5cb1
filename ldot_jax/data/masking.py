"""Pre-training masks, as UNITER / LightningDOT draw them.

VMLM: each wordpiece is selected with probability 0.15 ([CLS] and [SEP] never); a selected
token becomes [MASK] with probability 0.8, a random token from the vocabulary's regular range
with 0.1, and stays with 0.1; its label is the original id (-1 elsewhere). At least one token
per caption is selected (the original forces the first wordpiece; here a random one, so the
first word is not over-trained).
SMRM: each real region is masked with probability 0.15, at least one per image.

Functions take padded batches and a NumPy Generator, so pipelines can draw reproducibly from a
seed per record or per batch.
"""

from __future__ import annotations

import numpy as np

MASK_PROB = 0.15


def max_predictions(length: int) -> int:
    """The most VMLM positions a row of padded length L may have: L // 2. The loss gathers this
    many positions (a static shape) instead of scoring the vocabulary at all L; at 15% a row
    exceeds it with probability < 1e-4 (then a random subset of that size is kept)."""
    return max(1, length // 2)


def _ensure_one(selected, candidates, rng):
    """Rows of `selected` with no True get one random candidate position."""
    empty = ~selected.any(axis=1) & candidates.any(axis=1)
    for row in np.nonzero(empty)[0]:
        selected[row, rng.choice(np.nonzero(candidates[row])[0])] = True
    return selected


def mask_text(input_ids, attention_mask, rng: np.random.Generator, mask_id: int,
              random_token_range: tuple[int, int], mask_prob: float = MASK_PROB,
              max_predictions: int | None = None):
    """VMLM masking of `[CLS] wordpieces [SEP]` rows.

    Args:
      input_ids: int[B, L], 0-padded; attention_mask: [B, L] prefix mask.
      random_token_range: [low, high) ids for random replacements (the tokenizer's).
      max_predictions: at most this many selected tokens per row (a random subset is kept).
    Returns:
      (masked_ids int32[B, L], labels int32[B, L] with -1 where nothing is predicted).
    """
    input_ids = np.asarray(input_ids)
    real = np.asarray(attention_mask).astype(bool)
    lengths = real.sum(axis=1)
    positions = np.arange(input_ids.shape[1])[None, :]
    # Wordpieces only: skip [CLS] at 0 and [SEP] at length - 1.
    candidates = real & (positions > 0) & (positions < lengths[:, None] - 1)
    selected = candidates & (rng.random(input_ids.shape) < mask_prob)
    selected = _ensure_one(selected, candidates, rng)
    if max_predictions is not None:
        for row in np.nonzero(selected.sum(axis=1) > max_predictions)[0]:
            keep = rng.choice(np.nonzero(selected[row])[0], max_predictions, replace=False)
            selected[row] = False
            selected[row, keep] = True
    action = rng.random(input_ids.shape)
    random_ids = rng.integers(*random_token_range, size=input_ids.shape)
    masked = np.where(selected & (action < 0.8), mask_id, input_ids)
    masked = np.where(selected & (action >= 0.8) & (action < 0.9), random_ids, masked)
    labels = np.where(selected, input_ids, -1)
    return masked.astype(np.int32), labels.astype(np.int32)


def mask_regions(region_mask, rng: np.random.Generator, mask_prob: float = MASK_PROB):
    """SMRM masking: bool[B, R], True for masked regions (only real ones; ≥ 1 per image)."""
    real = np.asarray(region_mask).astype(bool)
    selected = real & (rng.random(real.shape) < mask_prob)
    return _ensure_one(selected, real, rng)
