"""A clustered synthetic embedding set, for index tests and the search benchmark where a
trained model's embeddings are too few.

Database vectors: x = c_j + σ·ε with cluster centres c_j, ε standard normal, and every
coordinate scaled by s_i = (1 + i / 16)^(-1/2), i the dimension index: variance falls along the
dimensions, as in PCA-ordered or Matryoshka-trained embeddings, so a prefix keeps most of a
vector's structure (what HiVLP's coarse stage relies on).
Queries (the other modality): q = c_j + g + σ_q·ε', with g a fixed "modality gap" vector (as
between CLIP-style image and text embeddings) and noise σ_q, scaled the same way.
"""

from __future__ import annotations

import numpy as np


def dimension_scale(dim: int) -> np.ndarray:
    """f32[dim]: s_i = (1 + i / 16)^(-1/2)."""
    return (1.0 + np.arange(dim) / 16.0) ** -0.5


def clustered(count: int, dim: int, num_queries: int = 1000, num_clusters: int | None = None,
              noise: float = 0.6, query_noise: float = 0.6, gap: float = 0.3,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(database f32[count, dim], queries f32[num_queries, dim]), deterministic in `seed`.
    num_clusters defaults to ≈ √count."""
    rng = np.random.default_rng(seed)
    k = num_clusters or max(2, int(round(np.sqrt(count))))
    scale = dimension_scale(dim).astype(np.float32)
    centres = rng.standard_normal((k, dim), np.float32)
    gap_vector = gap * rng.standard_normal(dim).astype(np.float32)
    database = np.empty((count, dim), np.float32)
    block = 65536  # bounded temporaries at 1M × 768
    for start in range(0, count, block):
        n = min(block, count - start)
        owner = rng.integers(0, k, n)
        database[start:start + n] = (centres[owner]
                                     + noise * rng.standard_normal((n, dim), np.float32)) * scale
    owner = rng.integers(0, k, num_queries)
    queries = ((centres[owner] + gap_vector
                + query_noise * rng.standard_normal((num_queries, dim), np.float32)) * scale)
    return database, queries.astype(np.float32)
