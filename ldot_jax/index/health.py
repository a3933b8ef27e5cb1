"""Index health: how much of the exact top-k an approximate index finds.

recall@k = |approximate top-k ∩ exact top-k| / k, averaged over queries. Measure it with
queries of the modality that will really query the index (captions for an image index, images
for a caption index): quantization trained on one modality can hurt the other far more.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ldot_jax.index.base import VectorIndex


def overlap_recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean over rows of |found[:, :k] ∩ truth[:, :k]| / k (ids i64[Q, ≥k]; -1 never counts)."""
    hits = [len(np.intersect1d(f[:k][f[:k] >= 0], t[:k])) for f, t in zip(found, truth)]
    return float(np.mean(hits)) / k


def recall_against_exact(index: VectorIndex, exact: VectorIndex, queries: np.ndarray,
                         ks: Sequence[int] = (1, 10, 100), **search_options) -> dict:
    """{"queries": Q, "recall@1": …, …} of `index` against `exact` (same vectors) for
    queries f32[Q, D]; ks larger than the index are dropped."""
    ks = [k for k in ks if k <= len(exact)]
    if not ks:
        return {"queries": int(len(queries))}
    top = max(ks)
    truth = exact.search(queries, top).ids
    found = index.search(queries, top, **search_options).ids
    out = {"queries": int(len(queries))}
    out.update({f"recall@{k}": round(overlap_recall(found, truth, k), 4) for k in ks})
    return out


def sample_rows(n: int, count: int | None, seed: int = 0) -> np.ndarray:
    """i64[min(n, count)]: sorted row numbers of [0, n) drawn without replacement (fixed
    seed); every row when count is None or ≥ n."""
    if count is None or n <= count:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, count, replace=False))


def sample_queries(vectors: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Up to `count` rows of vectors f32[n, D], drawn without replacement (fixed seed)."""
    if len(vectors) <= count:
        return vectors
    return vectors[sample_rows(len(vectors), count, seed)]
