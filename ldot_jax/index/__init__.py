"""The fast stage: indexes of embedding vectors searched by inner product.

  ExactIndex         jitted chunked matmul + top-k on the accelerator (the ground truth)
  ScannIndex         ScaNN: partitioning + anisotropic hashing + exact reorder
  HierarchicalIndex  HiVLP coarse-to-fine: ScaNN on low-dim prefixes, exact full-dim rescoring
  load_index(path, fingerprint=None, force=False)   any of them, from disk
  BACKENDS / make_index(name, dim, options)           the one table of backends (backends.py)
  tune(make, vectors, ids, queries, target, k)        recall-targeted settings (tuning.py)
"""

from ldot_jax.index.backends import BACKENDS, load_index, make_index
from ldot_jax.index.base import (FingerprintMismatchError, IndexFormatError, SearchResult,
                                 VectorIndex, VectorIndexError, read_metadata)
from ldot_jax.index.exact import ExactIndex, numpy_top_k
from ldot_jax.index.hierarchical import HierarchicalIndex
from ldot_jax.index.health import recall_against_exact
from ldot_jax.index.scann_index import ScannIndex, ScannParams, scann_params
from ldot_jax.index.tuning import Tuning, tune

__all__ = ["BACKENDS", "ExactIndex", "FingerprintMismatchError", "HierarchicalIndex",
           "IndexFormatError", "ScannIndex", "ScannParams", "SearchResult", "VectorIndex",
           "VectorIndexError", "load_index", "make_index", "numpy_top_k", "read_metadata",
           "recall_against_exact", "scann_params", "Tuning", "tune"]
