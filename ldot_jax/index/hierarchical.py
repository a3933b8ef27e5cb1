"""HierarchicalIndex (HiVLP's coarse-to-fine search over Matryoshka prefixes).

Coarse: ScaNN's partitioning and anisotropic hashing over the first `d_low` dimensions of every
vector give `candidates` rows per query. Fine: those rows are re-scored exactly at full
dimension and the best k returned. The coarse stage is the expensive part of ScaNN search and
its cost grows with the dimension, so it gets cheaper by about dim / d_low.

Both stages run inside ScaNN (its TRUNCATE projection, made for Matryoshka embeddings: the
tree and the hashing see the prefix, the exact reorder sees the full vector). With
`normalize_prefix` (towers trained on L2-normalized prefixes) the coarse stage must score
normalized prefixes, which ScaNN's projection cannot do: ScaNN then indexes the normalized
prefixes and the full-dimension rescoring runs here in NumPy.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from ldot_jax.core import numerics
from ldot_jax.index import base, scann_index

VECTORS_FILE = "vectors.npy"
# The coarse stage hashes with one dimension per block (ScaNN advises two, as ScannIndex
# uses): over a 128-d prefix that is 128 codebooks, still cheaper than the full-dimension
# index's 384, and the coarse ranking is so much closer to the exact prefix ranking that far
# fewer candidates need the full-dimension rescoring, which is what a coarse-to-fine search
# spends its time on. At 1M × 768 (Matryoshka-like, d_low 128, 2-core CPU, session 17) recall@10
# 0.954 took 60 candidates at 38.6k queries/s with one dimension per block, 100 at 24.3k (and
# 8 leaves instead of 2) with two (BENCHMARKS.md, issue 18).
COARSE_DIMS_PER_BLOCK = 1
# And twice the size rule's leaves (2√n): a tree over the prefix is cheap to train and search,
# and smaller partitions mean fewer prefixes hashed per query. At 1M (as above) the fastest
# setting reaching recall@10 0.95 ran at 41.8k queries/s with 2,000 leaves, 37.6k with 1,000;
# at 0.99, 28.6k against 18.3k.
COARSE_LEAVES_FACTOR = 2


class HierarchicalIndex(scann_index.ScannIndex):
    """d_low: the coarse prefix dimension (one of the Matryoshka dims the towers were trained
    with). candidates: coarse results re-scored at full dimension (at least k).
    normalize_prefix: L2-normalize prefixes (database and queries) for the coarse stage.
    params / overrides: the coarse ScaNN's (the size rule at dimension d_low, always with
    hashing, one dimension per block and a tree of 2√n leaves unless overridden: the coarse
    stage is approximate by design)."""

    type = "hierarchical"

    def __init__(self, dim: int, d_low: int, candidates: int = 100,
                 normalize_prefix: bool = False,
                 params: scann_index.ScannParams | None = None, **overrides):
        super().__init__(dim, params, **overrides)
        if not 1 <= d_low <= dim:
            raise ValueError(f"HierarchicalIndex d_low={d_low}: expected 1 ≤ d_low ≤ dim={dim}")
        if candidates < 1:
            raise ValueError(f"HierarchicalIndex candidates={candidates}: expected ≥ 1")
        self.d_low, self.candidates = int(d_low), int(candidates)
        self.normalize_prefix = bool(normalize_prefix)
        # Only for normalize_prefix: full vectors in ScaNN's row order (appended last; a
        # deleted row replaced by the last), so a coarse row indexes them directly.
        self._vectors = np.zeros((0, dim), np.float32) if normalize_prefix else None

    def _vector_table(self):
        return self._vectors if self._vectors is not None else super()._vector_table()

    def params(self) -> dict:
        return {"d_low": self.d_low, "candidates": self.candidates,
                "normalize_prefix": self.normalize_prefix, "scann": super().params()}

    def set_search_defaults(self, leaves_to_search: int | None = None,
                            depth: int | None = None) -> None:
        """As ScannIndex's; depth is `candidates` (coarse results re-scored at full
        dimension)."""
        super().set_search_defaults(leaves_to_search)
        if depth is not None:
            if depth < 1:
                raise ValueError(f"HierarchicalIndex candidates={depth}: expected ≥ 1")
            self.candidates = int(depth)

    def _resolve_params(self, count, dim):
        rule = scann_index.scann_params(count, self.d_low, **self._overrides)
        rule = dataclasses.replace(rule, hashing=True)
        if "dims_per_block" not in self._overrides:
            rule = dataclasses.replace(rule, dims_per_block=COARSE_DIMS_PER_BLOCK)
        if rule.num_leaves and "num_leaves" not in self._overrides:
            leaves = COARSE_LEAVES_FACTOR * rule.num_leaves
            searched = (rule.leaves_to_search if "leaves_to_search" in self._overrides
                        else scann_index.tree_leaves_to_search(leaves))
            rule = dataclasses.replace(rule, num_leaves=leaves, leaves_to_search=searched)
        if not rule.num_leaves and not self.normalize_prefix:
            # ScaNN applies its projection through the tree: below the rule's tree size, a
            # two-leaf tree searched whole (no partitioning in effect).
            rule = dataclasses.replace(rule, num_leaves=2, leaves_to_search=2)
        return rule

    def _coarse(self, vectors):
        if not self.normalize_prefix:
            return vectors  # ScaNN truncates
        return numerics.l2_normalize(np.ascontiguousarray(vectors[:, :self.d_low]))

    def _builder(self, db, p):
        builder = super()._builder(db, p)
        if not self.normalize_prefix and self.d_low < self.dim:
            builder = builder.truncate(self.d_low)
        return builder

    def _add(self, vectors, ids):
        super()._add(vectors, ids)
        if self._vectors is not None:
            self._vectors = np.concatenate([self._vectors, vectors])

    def _delete_positions(self, positions):
        order = super()._delete_positions(positions)
        if self._vectors is not None:
            self._vectors = self._vectors[order]
        return order

    def _search(self, queries, k, leaves_to_search=None, reorder=None, candidates=None):
        """options: candidates (coarse results re-scored at full dimension),
        leaves_to_search."""
        if reorder is not None:
            raise TypeError("HierarchicalIndex.search: use candidates=, not reorder=")
        c = min(max(int(candidates or self.candidates), k), len(self))
        if self._vectors is None:  # both stages in ScaNN: its reorder is the fine stage
            return self._search_rows(queries, k, leaves_to_search, c)
        rows, _ = self._search_rows(self._coarse(queries), c, leaves_to_search,
                                    max(self._params.reorder, c))
        scores = np.empty(rows.shape, np.float32)
        # One small matrix-vector product per query: much faster than a batched einsum, whose
        # [Q, candidates, D] gather is memory-bound.
        for q, (r, query) in enumerate(zip(rows, queries)):
            scores[q] = self._vectors[np.maximum(r, 0)] @ query
        scores[rows < 0] = -np.inf
        # Stable on −score: ties go to the earlier coarse candidate.
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(rows, best, axis=1), np.take_along_axis(scores, best, axis=1)

    def _save_files(self, directory):
        super()._save_files(directory)
        if self._vectors is not None:
            np.save(os.path.join(directory, VECTORS_FILE), self._vectors)

    @classmethod
    def _load_files(cls, directory, dim, ids, params):
        params = dict(params)
        scann = params.pop("scann")
        index = cls(dim, params=scann_index.ScannParams(**scann), **params)
        index._attach(directory, ids)
        if index.normalize_prefix:
            vectors = np.load(os.path.join(directory, VECTORS_FILE))
            if vectors.shape != (len(ids), dim):
                raise base.IndexFormatError(f"{directory}: {VECTORS_FILE} has shape "
                                            f"{vectors.shape}, expected {(len(ids), dim)}")
            index._vectors = vectors.astype(np.float32)
        return index
