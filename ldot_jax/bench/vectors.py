"""Synthetic embedding sets of different difficulty, for index tests and the search benchmark
where a trained model's embeddings are too few (`GENERATORS`: matryoshka, isotropic,
two_modality).

matryoshka (`clustered`), the easiest for partitions and prefixes:
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


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def isotropic(count: int, dim: int, num_queries: int = 1000, num_clusters: int = 2000,
              noise: float = 1.0, query_noise: float = 0.5,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Isotropic Gaussian clusters of unit vectors (no dimension carries more than another,
    so prefixes and partitions get no help): x = unit(c_j + noise·ε/√dim) for unit centres c_j;
    queries are perturbed corpus points, q = unit(x_i + query_noise·ε'/√dim)."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((num_clusters, dim), np.float32))
    database = np.empty((count, dim), np.float32)
    block = 65536
    for start in range(0, count, block):
        n = min(block, count - start)
        owner = rng.integers(0, num_clusters, n)
        database[start:start + n] = _unit(
            centres[owner] + noise / np.sqrt(dim) * rng.standard_normal((n, dim), np.float32))
    picked = database[rng.integers(0, count, num_queries)]
    queries = _unit(picked + query_noise / np.sqrt(dim)
                    * rng.standard_normal((num_queries, dim), np.float32))
    return database, queries


def two_modality(count: int, dim: int, num_queries: int = 1000, num_clusters: int | None = None,
                 noise: float = 0.8, gap: float = 1.0,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two modalities with a gap, as CLIP-style image and text embeddings: shared unit
    concepts c_j; the corpus (images) unit(c_j + g_img + noise·ε/√dim), the queries (captions)
    unit(c_j + g_txt + noise·ε'/√dim), with fixed offsets g_img, g_txt of norm `gap` each: the
    queries lie in another region of the sphere than the corpus an index was trained on."""
    rng = np.random.default_rng(seed)
    k = num_clusters or max(2, int(round(np.sqrt(count))))
    concepts = _unit(rng.standard_normal((k, dim), np.float32))
    g_img, g_txt = gap * _unit(rng.standard_normal((2, dim), np.float32))
    database = np.empty((count, dim), np.float32)
    block = 65536
    for start in range(0, count, block):
        n = min(block, count - start)
        owner = rng.integers(0, k, n)
        database[start:start + n] = _unit(concepts[owner] + g_img + noise / np.sqrt(dim)
                                          * rng.standard_normal((n, dim), np.float32))
    owner = rng.integers(0, k, num_queries)
    queries = _unit(concepts[owner] + g_txt + noise / np.sqrt(dim)
                    * rng.standard_normal((num_queries, dim), np.float32))
    return database, queries


# The corpus generators of `ldot bench search --corpus` and the index tests.
GENERATORS = {"matryoshka": clustered, "isotropic": isotropic, "two_modality": two_modality}
