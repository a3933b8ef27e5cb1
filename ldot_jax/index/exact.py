"""ExactIndex: brute-force inner-product top-k on the accelerator, the ground truth.

The corpus is split into row blocks over the devices of a 1-D mesh; each device scans its rows
in chunks, keeping a running top-k, so no device ever holds more than a [queries, chunk] block
of scores (chunk from a memory budget) (a 10M-vector corpus never forms the dense
query × corpus matrix). A chunk's top-k is selected among the best blocks of columns only
(`chunk_top_k`), which makes the scan as fast as its matrix product on CPUs (where a full
top-k over the chunk cost more than the product). The per-device top-k lists are then
all-gathered and merged.
Ties go to the smaller row (the merge keeps earlier rows first), as in `evaluate`.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from ldot_jax.index import base

AXIS = "corpus"
VECTORS_FILE = "vectors.npy"
PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "default": jax.lax.Precision.DEFAULT}


def corpus_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh over this process's devices (an index is host-local)."""
    devices = list(jax.local_devices() if devices is None else devices)
    return jax.make_mesh((len(devices),), (AXIS,), axis_types=(AxisType.Explicit,),
                         devices=devices)


# Rows per block of the two-level selection below.
BLOCK = 128


def block_width(chunk: int, k: int) -> int | None:
    """The block width of `chunk_top_k` for a chunk of `chunk` rows, or None where plain top-k
    is as cheap (the k best blocks would hold over a quarter of the chunk)."""
    width = BLOCK
    while width > 8 and k * width * 4 > chunk:
        width //= 2
    return width if chunk % width == 0 and k * width * 4 <= chunk else None


def chunk_top_k(scores, k: int):
    """Exact top-k of each row of scores f32[Q, C] → (f32[Q, k], i32[Q, k] column), ties to the
    smaller column, as `jax.lax.top_k` of the whole row but without selecting over all of it.

    The columns are cut into blocks of `block_width` and only the k blocks with the largest
    maxima are searched: a block outside them has k blocks before it whose maxima are at least
    its own (earlier blocks first among equal maxima), so none of its entries can enter the
    top-k, ties included. Selection then costs one max-reduction over the chunk plus top-k over
    C / width maxima and k · width candidates, instead of a top-k over C (which dominated the
    scan on CPUs, where it is not vectorized)."""
    q, c = scores.shape
    width = block_width(c, k)
    if width is None:
        return jax.lax.top_k(scores, k)
    blocks = scores.reshape(q, c // width, width)
    _, chosen = jax.lax.top_k(blocks.max(axis=2), k)
    # In column order, so that top-k's own tie rule (lower index first) is the column order.
    chosen = jnp.sort(chosen, axis=1)
    candidates = jnp.take_along_axis(blocks, chosen[:, :, None], axis=1).reshape(q, k * width)
    top, pick = jax.lax.top_k(candidates, k)
    return top, jnp.take_along_axis(chosen, pick // width, axis=1) * width + pick % width


def _local_top_k(queries, corpus, offset, count, k: int, chunk: int, precision):
    """Running top-k over one device's rows. queries f32[Q, D]; corpus [n, D] (n ≥ chunk);
    rows at global position ≥ count are padding. → (f32[Q, k], i32[Q, k] global rows).

    The last chunk is aligned to end at row n and its rows already scored are masked, so the
    corpus never needs padding to a multiple of the chunk (no copy of a large corpus)."""
    q, n = queries.shape[0], corpus.shape[0]
    num_chunks = -(-n // chunk)
    kept = min(k, chunk)

    def body(c, carry):
        best_scores, best_rows = carry
        start = jnp.minimum(c * chunk, n - chunk)
        block = jax.lax.dynamic_slice_in_dim(corpus, start, chunk)
        scores = jnp.einsum("qd,cd->qc", queries.astype(block.dtype), block,
                            precision=precision, preferred_element_type=jnp.float32)
        local = start + jnp.arange(chunk, dtype=jnp.int32)
        fresh = (local >= c * chunk) & (offset + local < count)
        top, pick = chunk_top_k(jnp.where(fresh[None, :], scores, -jnp.inf), kept)
        # Earlier rows first, so ties keep the smaller row.
        scores = jnp.concatenate([best_scores, top], axis=1)
        rows = jnp.concatenate([best_rows, offset + start + pick], axis=1)
        top, pick = jax.lax.top_k(scores, k)
        return top, jnp.take_along_axis(rows, pick, axis=1)

    init = (jnp.full((q, k), -jnp.inf, jnp.float32), jnp.full((q, k), -1, jnp.int32))
    # Inside shard_map the carry differs per device (it follows the device's rows).
    init = jax.lax.pcast(init, (AXIS,), to="varying")
    return jax.lax.fori_loop(0, num_chunks, body, init)


@functools.partial(jax.jit, static_argnames=("k", "chunk", "precision", "mesh"))
def sharded_top_k(queries, corpus, count, *, k: int, chunk: int, precision: str, mesh):
    """queries f32[Q, D] (replicated), corpus [N_pad, D] (rows sharded over the mesh; N_pad a
    multiple of the device count, each device's share ≥ chunk), count: valid rows →
    (scores f32[Q, k], rows i32[Q, k]), replicated."""
    devices = mesh.shape[AXIS]
    per_device = corpus.shape[0] // devices

    def fn(q, c, n):
        offset = jax.lax.axis_index(AXIS).astype(jnp.int32) * per_device
        return _local_top_k(q, c, offset, n, k, chunk, PRECISIONS[precision])

    # Each device's top-k side by side: [Q, devices × k], then merged. Device d's rows all
    # come before device d + 1's, so the merge also keeps ties on the smaller row.
    scores, rows = jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(AXIS), P()),
                                 out_specs=(P(None, AXIS), P(None, AXIS)))(queries, corpus, count)
    if devices > 1:
        scores = jax.sharding.reshard(scores, NamedSharding(mesh, P()))
        rows = jax.sharding.reshard(rows, NamedSharding(mesh, P()))
        scores, pick = jax.lax.top_k(scores, k)
        rows = jnp.take_along_axis(rows, pick, axis=1)
    return scores, rows


class ExactIndex(base.VectorIndex):
    """Exact top-k by inner product, jitted and sharded over this process's devices.

    score_block_mb: the memory of one block of scores (queries × corpus rows × 4 B) per device;
      the rows scored at once follow from it (all of a device's rows for a single query).
    chunk_size: a fixed number of rows scored at once instead (None: from score_block_mb).
    query_batch: queries per device call (query counts are padded to powers of two up to it,
      so a new query count rarely recompiles); larger batches read the corpus fewer times
      (1M × 768 on 2 CPU cores: 151 QPS at 256, 192 at 1024).
    dtype: how the corpus is held on the devices ("float32", or "bfloat16" to halve memory).
    precision: "highest" (true f32 products: the ground truth) or "default" (faster on GPUs
      and TPUs, which then use TF32 / bf16 passes).
    """

    type = "exact"

    def __init__(self, dim: int, score_block_mb: float = 256, chunk_size: int | None = None,
                 query_batch: int = 1024, dtype: str = "float32", precision: str = "highest",
                 devices=None):
        super().__init__(dim)
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"ExactIndex dtype={dtype!r}: expected 'float32' or 'bfloat16'")
        if precision not in PRECISIONS:
            raise ValueError(f"ExactIndex precision={precision!r}: expected one of "
                             f"{sorted(PRECISIONS)}")
        for name, value in (("score_block_mb", score_block_mb), ("chunk_size", chunk_size or 1),
                            ("query_batch", query_batch)):
            if value <= 0:
                raise ValueError(f"ExactIndex {name}={value}: expected > 0")
        self.score_block_mb = float(score_block_mb)
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.query_batch = int(query_batch)
        self.dtype, self.precision = dtype, precision
        self.mesh = corpus_mesh(devices)
        self._vectors = np.zeros((0, self.dim), np.float32)
        self._device = None  # (corpus on the devices, chunk), rebuilt after add / delete

    def params(self) -> dict:
        return {"score_block_mb": self.score_block_mb, "chunk_size": self.chunk_size,
                "query_batch": self.query_batch,
                "dtype": self.dtype, "precision": self.precision}

    @property
    def vectors(self) -> np.ndarray:
        """f32[N, D], rows in the order of `ids` (read-only)."""
        view = self._vectors.view()
        view.flags.writeable = False
        return view

    def _vector_table(self):
        return self._vectors

    def _add(self, vectors, ids):
        self._vectors = np.concatenate([self._vectors, vectors])
        self._ids = np.concatenate([self._ids, ids])
        self._device = None

    def _delete_positions(self, positions):
        keep = np.ones(len(self._ids), bool)
        keep[positions] = False
        self._vectors, self._ids = self._vectors[keep], self._ids[keep]
        self._device = None

    def _on_device(self):
        """The corpus on the devices: rows padded only to a multiple of the device count."""
        if self._device is None:
            devices = self.mesh.shape[AXIS]
            per_device = max(1, -(-len(self._vectors) // devices))
            padded = np.zeros((per_device * devices, self.dim), np.float32)
            padded[:len(self._vectors)] = self._vectors
            self._device = jax.device_put(padded.astype(jnp.dtype(self.dtype)),
                                          NamedSharding(self.mesh, P(AXIS)))
        return self._device

    def _chunk(self, queries: int) -> int:
        per_device = self._device.shape[0] // self.mesh.shape[AXIS]
        if self.chunk_size is not None:
            return min(self.chunk_size, per_device)
        rows = int(self.score_block_mb * 2**20 // (4 * queries))
        # A power of two (≥ 1024): few distinct programs across corpus sizes.
        rows = 1 << max(10, rows.bit_length() - 1)
        return min(rows, per_device)

    def _search(self, queries, k, **options):
        if options:
            raise TypeError(f"ExactIndex.search takes no options, got {sorted(options)}")
        corpus = self._on_device()
        count = jnp.int32(len(self._ids))
        scores, rows = [], []
        for start in range(0, len(queries), self.query_batch):
            block = queries[start:start + self.query_batch]
            size = min(self.query_batch, 1 << max(0, (len(block) - 1).bit_length()))
            padded = np.zeros((size, self.dim), np.float32)
            padded[:len(block)] = block
            # The index's own corpus mesh, whatever mesh the caller works under (training).
            with jax.set_mesh(self.mesh):
                s, r = sharded_top_k(jax.device_put(padded, NamedSharding(self.mesh, P())),
                                     corpus, count, k=k, chunk=self._chunk(size),
                                     precision=self.precision, mesh=self.mesh)
            scores.append(np.asarray(s)[:len(block)])
            rows.append(np.asarray(r)[:len(block)])
        return np.concatenate(rows).astype(np.int64), np.concatenate(scores)

    def _save_files(self, directory):
        np.save(os.path.join(directory, VECTORS_FILE), self._vectors)

    @classmethod
    def _load_files(cls, directory, dim, ids, params):
        index = cls(dim, **params)
        vectors = np.load(os.path.join(directory, VECTORS_FILE))
        if vectors.shape != (len(ids), dim):
            raise base.IndexFormatError(f"{directory}: {VECTORS_FILE} has shape {vectors.shape}, "
                                        f"expected {(len(ids), dim)}")
        index._vectors, index._ids = vectors.astype(np.float32), ids
        return index


def numpy_top_k(queries: np.ndarray, corpus: np.ndarray, k: int) -> tuple[np.ndarray,
                                                                         np.ndarray]:
    """The NumPy reference: (rows i64[Q, k], scores f32[Q, k]), ties to the smaller row."""
    scores = queries.astype(np.float64) @ corpus.astype(np.float64).T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return rows, np.take_along_axis(scores, rows, axis=1).astype(np.float32)
