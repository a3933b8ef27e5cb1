"""HierarchicalIndex (HiVLP's coarse-to-fine search over Matryoshka prefixes).

Coarse: ScaNN over the first `d_low` dimensions of every vector (optionally L2-normalized, as
the prefix loss scored them when training normalized embeddings) returns `candidates` rows per
query. Fine: those rows are re-scored exactly at full dimension and the best k returned.
The coarse stage is cheaper because ScaNN's hashing and partition scoring cost grows with the
dimension; the fine stage touches only queries × candidates × D numbers.
"""

from __future__ import annotations

import os

import numpy as np

from ldot_jax import evaluate
from ldot_jax.index import base, scann_index

VECTORS_FILE = "vectors.npy"
# Queries re-scored at once (memory: block × candidates × D × 4 bytes).
RESCORE_BLOCK = 256


@base.register
class HierarchicalIndex(scann_index.ScannIndex):
    """d_low: the coarse prefix dimension (one of the Matryoshka dims the towers were trained
    with). candidates: coarse results re-scored at full dimension (≥ k is enforced).
    normalize_prefix: L2-normalize prefixes (database and queries) for the coarse stage.
    params / overrides: the coarse ScaNN's (the rule is applied at dimension d_low)."""

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
        self._vectors = np.zeros((0, dim), np.float32)

    def params(self) -> dict:
        return {"d_low": self.d_low, "candidates": self.candidates,
                "normalize_prefix": self.normalize_prefix, "scann": super().params()}

    def _coarse(self, vectors):
        prefix = np.ascontiguousarray(vectors[:, :self.d_low])
        return evaluate.l2_normalize(prefix) if self.normalize_prefix else prefix

    # Full vectors kept in ScaNN's row order (appended last; a deleted row replaced by the
    # last), so a coarse row number indexes them directly.
    def _add(self, vectors, ids):
        super()._add(vectors, ids)
        self._vectors = np.concatenate([self._vectors, vectors])

    def _delete_positions(self, positions):
        vectors = self._vectors
        rows = list(range(len(vectors)))
        by_id = {int(i): r for r, i in enumerate(self._ids)}
        for target in [int(i) for i in self._ids[positions]]:
            r = by_id.pop(target)
            last = rows.pop()
            if r != len(rows):
                rows[r] = last
                by_id[int(self._ids[last])] = r
        super()._delete_positions(positions)
        self._vectors = vectors[rows]

    def _search(self, queries, k, leaves_to_search=None, reorder=None, candidates=None):
        """options: candidates (coarse results re-scored), leaves_to_search, reorder."""
        c = min(max(int(candidates or self.candidates), k), len(self))
        rows, _ = self._search_rows(self._coarse(queries), c, leaves_to_search, reorder)
        out_rows = np.full((len(queries), k), -1, np.int64)
        out_scores = np.full((len(queries), k), -np.inf, np.float32)
        for start in range(0, len(queries), RESCORE_BLOCK):
            block = slice(start, start + RESCORE_BLOCK)
            r = rows[block]
            gathered = self._vectors[np.maximum(r, 0)]  # [q, c, D]
            scores = np.einsum("qcd,qd->qc", gathered, queries[block])
            scores[r < 0] = -np.inf
            # Stable on −score: ties go to the earlier coarse candidate.
            best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            out_rows[block] = np.take_along_axis(r, best, axis=1)
            out_scores[block] = np.take_along_axis(scores, best, axis=1)
        return out_rows, out_scores

    def _save_files(self, directory):
        super()._save_files(directory)
        np.save(os.path.join(directory, VECTORS_FILE), self._vectors)

    @classmethod
    def _load_files(cls, directory, dim, ids, params):
        scann = params.pop("scann")
        index = cls(dim, params=scann_index.ScannParams(**scann), **params)
        index._searcher = scann_index._load_searcher(os.path.join(directory,
                                                                  scann_index.SCANN_DIR))
        index._ids = ids
        vectors = np.load(os.path.join(directory, VECTORS_FILE))
        if vectors.shape != (len(ids), dim) or index._searcher.size() != len(ids):
            raise base.IndexFormatError(
                f"{directory}: {VECTORS_FILE} has shape {vectors.shape} and ScaNN holds "
                f"{index._searcher.size()} vectors; expected {(len(ids), dim)}")
        index._vectors = vectors.astype(np.float32)
        return index
