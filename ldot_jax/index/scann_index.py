"""ScannIndex: ScaNN (partitioning tree + anisotropic hashing + exact reorder) on the host.

Parameters come from the corpus size and dimension by the rule in `scann_params` (ScaNN's own
guidance, see its docs/algorithms.md), and any of them can be overridden. Vectors can be added
and deleted after the build (ScaNN's upsert / delete; the partitioning and codebooks stay those
of the build, so after large changes rebuild for the best recall).

ScaNN keeps rows in its own order: an added row goes last and a deleted row is replaced by the
last one. `self._ids` mirrors that order, so a ScaNN row number maps straight to an id.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from ldot_jax.index import base

SCANN_DIR = "scann"
ASSETS = "scann_assets.pbtxt"
KEPT_VECTORS = "vectors.npy"  # keep_vectors: the full vectors in ScaNN's row order
# Below this many vectors ScaNN recommends brute force; below AH_TREE_MIN, hashing without
# partitioning (docs/algorithms.md).
BRUTE_FORCE_MAX = 20_000
TREE_MIN = 100_000
TREE_SAMPLE = 250_000  # vectors the tree is trained on (at least; all below this)
TREE_REORDER = 250  # candidates re-scored exactly with a tree


@dataclasses.dataclass(frozen=True)
class ScannParams:
    """num_leaves: partitions of the tree (0: no partitioning).
    leaves_to_search: partitions scored per query (the main recall / speed knob).
    training_sample_size: vectors used to train the tree and the hash codebooks.
    hashing: score with anisotropic hashing (else exact float scoring of every candidate).
    dims_per_block, anisotropic_threshold: the hashing (2 and 0.2, as ScaNN advises).
    reorder: candidates re-scored exactly after hashing (at search time, at least 4k).
    num_threads: search threads for batched queries (0: every core).
    keep_vectors: also keep the vectors as given (saved as vectors.npy, read memory-mapped),
    so filtered searches can score a small allowed subset exactly (`vectors_of`)."""

    num_leaves: int = 0
    leaves_to_search: int = 0
    training_sample_size: int = 100_000
    hashing: bool = False
    dims_per_block: int = 2
    anisotropic_threshold: float = 0.2
    reorder: int = 100
    num_threads: int = 0
    keep_vectors: bool = False

    def __post_init__(self):
        if self.num_leaves < 0 or (self.num_leaves and not
                                   1 <= self.leaves_to_search <= self.num_leaves):
            raise ValueError(f"ScaNN num_leaves={self.num_leaves}, leaves_to_search="
                             f"{self.leaves_to_search}: expected 1 ≤ leaves_to_search ≤ "
                             f"num_leaves (or num_leaves=0 for no partitioning)")
        for name in ("training_sample_size", "dims_per_block", "reorder"):
            if getattr(self, name) < 1:
                raise ValueError(f"ScaNN {name}={getattr(self, name)}: expected ≥ 1")


def tree_leaves_to_search(num_leaves: int) -> int:
    """The size rule's partitions searched per query for a tree of `num_leaves`: 5%, at
    least 8."""
    return max(8, int(round(0.05 * num_leaves)))


def scann_params(count: int, dim: int, **overrides) -> ScannParams:
    """The rule (ScaNN's guidance, tuned on `ldot bench search` over three corpus generators):
      count < 20k:        brute force (exact scoring of every vector, SIMD).
      20k ≤ count < 100k: anisotropic hashing (2 dims per block, threshold 0.2), reorder 100.
      count ≥ 100k:       also a tree of √count leaves, searching 5% of them (at least 8),
                          trained on min(count, max(250k, 40 × leaves)) vectors, reorder 250.
    At 1M × 768 (isotropic clusters / two modalities, 2-core CPU) training the tree on 250k
    instead of 100k vectors raised recall@10 from 0.935 to 0.946 / kept 0.98 for 1.5× the
    build time (500k: no better, 2.3×), and reorder 250 instead of 100 added 0.7–2 points for
    ~8% of the QPS; the leaves searched are left to `--target_recall` (index/tuning.py).
    Hashing's cost falls with the dimension, which HiVLP's low-dimensional prefixes exploit.
    `overrides`: any ScannParams field (a config's index.scann section)."""
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ScannParams)}
    if unknown:
        raise ValueError(f"unknown ScaNN parameter(s) {sorted(unknown)}; valid: "
                         f"{[f.name for f in dataclasses.fields(ScannParams)]}")
    rule: dict = {"hashing": count >= BRUTE_FORCE_MAX}
    if count >= TREE_MIN:
        leaves = int(round(math.sqrt(count)))
        rule.update(num_leaves=leaves, leaves_to_search=tree_leaves_to_search(leaves),
                    training_sample_size=min(count, max(TREE_SAMPLE, 40 * leaves)),
                    reorder=TREE_REORDER)
    rule.update({k: v for k, v in overrides.items() if v is not None})
    if rule.get("num_leaves") and "leaves_to_search" not in rule:
        rule["leaves_to_search"] = max(1, int(round(0.05 * rule["num_leaves"])))
    return ScannParams(**rule)


def swap_delete(count: int, positions) -> tuple[list[int], np.ndarray]:
    """ScaNN's deletion order: each deleted row is replaced by the current last row. Returns
    the rows to pass to ScaNN's delete (one by one, as they are at that moment) and
    i64[count - len(positions)]: the old row now at each position."""
    order = list(range(count))
    where = {r: r for r in order}  # old row → current position
    rows = []
    for old in (int(p) for p in positions):
        row = where.pop(old)
        rows.append(row)
        last = order.pop()
        if row != len(order):
            order[row] = last
            where[last] = row
    return rows, np.asarray(order, np.int64)


def _scann():
    # Imported on first use: ScaNN prints its own logs when loaded.
    from scann.scann_ops.py import scann_ops_pybind
    return scann_ops_pybind


class ScannIndex(base.VectorIndex):
    """ScaNN over the vectors as given (inner product). `params`: a ScannParams, or None to
    apply `scann_params` to the first batch of vectors added (the build)."""

    type = "scann"

    def __init__(self, dim: int, params: ScannParams | None = None, **overrides):
        super().__init__(dim)
        if params is not None and overrides:
            raise ValueError("give ScannIndex either params or overrides, not both")
        self._params = params
        self._overrides = overrides
        self._searcher = None
        self._kept = None  # keep_vectors: f32[N, D] in ScaNN's row order

    def _vector_table(self):
        return self._kept

    def params(self) -> dict:
        return dataclasses.asdict(self._params) if self._params else dict(self._overrides)

    @property
    def scann_params(self) -> ScannParams | None:
        return self._params

    # The vectors ScaNN indexes (the identity here; HierarchicalIndex indexes prefixes).
    def _coarse(self, vectors: np.ndarray) -> np.ndarray:
        return vectors

    def _resolve_params(self, count: int, dim: int) -> ScannParams:
        return scann_params(count, dim, **self._overrides)

    def _builder(self, db: np.ndarray, p: ScannParams):
        """ScaNN's builder, up to the partitioning (subclasses add a projection)."""
        # num_neighbors is only the default k; searches always pass their own.
        return _scann().builder(db, 10, "dot_product")

    def _build(self, vectors, ids):
        db = self._coarse(vectors)
        if self._params is None:
            self._params = self._resolve_params(len(db), vectors.shape[1])
        p = self._params
        builder = self._builder(db, p)
        if p.num_leaves:
            builder = builder.tree(num_leaves=min(p.num_leaves, len(db)),
                                   num_leaves_to_search=min(p.leaves_to_search, len(db)),
                                   training_sample_size=min(p.training_sample_size, len(db)))
        if p.hashing:
            builder = builder.score_ah(p.dims_per_block,
                                       anisotropic_quantization_threshold=p.anisotropic_threshold,
                                       training_sample_size=min(p.training_sample_size, len(db)))
            builder = builder.reorder(p.reorder)
        else:
            builder = builder.score_brute_force()
        self._searcher = builder.build().searcher  # the pybind object; we keep our own ids
        self._ids = ids.copy()
        if p.keep_vectors:
            self._kept = vectors.copy()

    def _add(self, vectors, ids):
        if self._searcher is None:
            self._build(vectors, ids)
            return
        # upsert with no row number appends.
        self._searcher.upsert([None] * len(ids), self._coarse(vectors), 1)
        self._ids = np.concatenate([self._ids, ids])
        if self._kept is not None:
            self._kept = np.concatenate([self._kept, vectors])

    def _delete_positions(self, positions):
        rows, order = swap_delete(len(self._ids), positions)
        self._searcher.delete(rows)
        self._ids = self._ids[order]
        if self._kept is not None:
            self._kept = self._kept[order]
        return order

    def set_search_defaults(self, leaves_to_search: int | None = None,
                            depth: int | None = None) -> None:
        """Makes these the settings searches use when they pass none (saved with the index):
        leaves_to_search (with a tree) and depth, the reorder depth (with hashing)."""
        if self._params is None:
            raise ValueError(f"the {self.type} index is empty: build it before setting its "
                             f"search defaults")
        changes = {}
        if leaves_to_search is not None:
            changes["leaves_to_search"] = int(leaves_to_search)
        if depth is not None:
            changes["reorder"] = int(depth)
        self._params = dataclasses.replace(self._params, **changes)

    def _search_rows(self, queries, k, leaves_to_search=None, pre_reorder=-1):
        """ScaNN rows and scores; leaves_to_search None: the index's own (its params, which
        tuning may have changed since the build), -1 for pre_reorder: none."""
        p = self._params
        if leaves_to_search is None:
            leaves_to_search = min(p.leaves_to_search, len(self)) if p.num_leaves else -1
        leaves = int(leaves_to_search)
        threads = p.num_threads or os.cpu_count() or 1
        parallel = len(queries) > 1 and threads > 1
        if parallel:
            self._searcher.set_num_threads(threads)
        rows, scores = self._searcher.search_batched(queries, k, int(pre_reorder), leaves,
                                                     parallel, 64)
        rows = rows.astype(np.int64)
        # ScaNN fills slots it could not fill (too few partitions searched) with an out-of-
        # range row or a NaN score.
        missing = (rows >= len(self._ids)) | ~np.isfinite(scores)
        rows[missing] = -1
        return rows, scores.astype(np.float32)

    def _search(self, queries, k, leaves_to_search=None, reorder=None):
        """options: leaves_to_search (partitions scored), reorder (candidates re-scored
        exactly; at least 4k, so that recall@k does not hit the reorder cap)."""
        pre = max(int(reorder or self._params.reorder), 4 * k) if self._params.hashing else -1
        return self._search_rows(self._coarse(queries), k, leaves_to_search, pre)

    def _save_files(self, directory):
        if self._searcher is None:
            raise ValueError(f"the {self.type} index is empty: add vectors before saving")
        path = os.path.join(directory, SCANN_DIR)
        os.makedirs(path)
        # Relative asset paths: the directory is renamed into place after saving.
        self._searcher.serialize(path, True)
        if self._kept is not None:
            np.save(os.path.join(directory, KEPT_VECTORS), self._kept)

    @classmethod
    def _load_files(cls, directory, dim, ids, params):
        index = cls(dim, ScannParams(**params))
        index._attach(directory, ids)
        return index

    def _attach(self, directory: str, ids: np.ndarray) -> None:
        """Takes the saved ScaNN searcher of `directory` and its ids (sizes must agree)."""
        path = os.path.join(directory, SCANN_DIR)
        self._searcher = _load_searcher(path)
        self._ids = ids
        if self._searcher.size() != len(ids):
            raise base.IndexFormatError(f"{path}: ScaNN holds {self._searcher.size()} vectors, "
                                        f"ids.npy {len(ids)}")
        if self._params.keep_vectors:
            kept = os.path.join(directory, KEPT_VECTORS)
            if not os.path.isfile(kept):
                raise base.IndexFormatError(f"{directory}: {KEPT_VECTORS} is missing (the "
                                            f"index keeps its vectors)")
            self._kept = np.load(kept, mmap_mode="r")  # read only where a filter needs rows
            if self._kept.shape != (len(ids), self.dim) or self._kept.dtype != np.float32:
                raise base.IndexFormatError(f"{kept}: {self._kept.dtype}{list(self._kept.shape)},"
                                            f" expected float32{[len(ids), self.dim]}")


def _load_searcher(path: str):
    assets = os.path.join(path, ASSETS)
    if not os.path.isfile(assets):
        raise base.IndexFormatError(f"{path}: {ASSETS} is missing")
    with open(assets) as f:
        return _scann().scann_pybind.ScannNumpy(path, f.read())
