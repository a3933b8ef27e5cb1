"""The index backends: one table. `load_index`, the build defaults (`index_options`), the
`index` config section and the command lines' choices all derive from `BACKENDS`.

Adding a backend: a module with a `VectorIndex` subclass (its `type` is the saved name) and
one entry here.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from typing import Callable, Mapping, Sequence

import ml_collections
import numpy as np

from ldot_jax.core import workdir as workdir_lib
from ldot_jax.index import base

log = logging.getLogger(__name__)


def _exact(cls, dim: int, options: Mapping, matryoshka_dims, normalized):
    return cls(dim, **dict(options.get("exact", {})))


def _scann(cls, dim: int, options: Mapping, matryoshka_dims, normalized):
    return cls(dim, **dict(options.get("scann", {})))


def _hierarchical(cls, dim: int, options: Mapping, matryoshka_dims, normalized):
    d_low = options.get("d_low")
    if d_low is None:
        smaller = [d for d in matryoshka_dims if d < dim]
        if smaller:
            d_low = min(smaller)
        else:
            d_low = max(1, dim // 4)
            log.warning("index.d_low not set and the towers were not trained with Matryoshka "
                        "prefixes: using d_low=%d, whose coarse stage may miss many true "
                        "neighbours (check the health recall)", d_low)
    return cls(dim, int(d_low), int(options.get("candidates", 100)),
               normalize_prefix=normalized, **dict(options.get("scann", {})))


@dataclasses.dataclass(frozen=True)
class Backend:
    """name: the saved `type` and the config / command-line name; where: "module:Class"
    (imported on first use); make: (class, dim, options, matryoshka_dims, normalized) → an
    empty index; summary: one line for --help; exact: it is exact search itself (its health
    check against exact search is skipped)."""

    name: str
    where: str
    make: Callable
    summary: str
    exact: bool = False

    def index_class(self) -> type[base.VectorIndex]:
        module, _, cls = self.where.partition(":")
        return getattr(importlib.import_module(module), cls)


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("scann", "ldot_jax.index.scann_index:ScannIndex", _scann,
            "ScaNN: partitioning + anisotropic hashing + exact reorder (the default)"),
    Backend("hierarchical", "ldot_jax.index.hierarchical:HierarchicalIndex", _hierarchical,
            "HiVLP coarse-to-fine: ScaNN on low-dim prefixes, exact full-dim rescoring"),
    Backend("exact", "ldot_jax.index.exact:ExactIndex", _exact,
            "jitted chunked matmul + top-k on the accelerator (the ground truth)", exact=True),
)}
NAMES = tuple(BACKENDS)


def backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown index backend {name!r}; the backends are {list(BACKENDS)}")
    return BACKENDS[name]


def make_index(name: str, dim: int, options: Mapping, matryoshka_dims: Sequence[int] = (),
               normalized: bool = False) -> base.VectorIndex:
    """An empty index of backend `name` for vectors of `dim` (options: see `index_options`)."""
    entry = backend(name)
    return entry.make(entry.index_class(), dim, options, tuple(matryoshka_dims), normalized)


def index_options(config: ml_collections.ConfigDict | None, **overrides) -> dict:
    """The `index` section of a run config (defaults for runs saved without one), with
    `overrides` (command-line flags; None means not given) applied."""
    section = (config.get("index") if config is not None else None) or ml_collections.ConfigDict()
    out = {"split": "test", "backend": "scann", "sides": workdir_lib.SIDES,
           "shard_size": 4096, "d_low": None, "candidates": 100, "health_queries": 1000,
           "target_recall": None, "target_k": 10, "scann": {}, "exact": {}}
    for key in out:
        if key in section:
            value = section[key]
            out[key] = value.to_dict() if hasattr(value, "to_dict") else value
    out["scann"] = {k: v for k, v in dict(out["scann"]).items() if v is not None}
    out.update({k: v for k, v in overrides.items() if v is not None})
    if out["backend"] not in BACKENDS:
        raise ValueError(f"index.backend={out['backend']!r}: expected one of {NAMES}")
    out["sides"] = tuple(out["sides"])
    bad = set(out["sides"]) - set(workdir_lib.SIDES)
    if bad or not out["sides"]:
        raise ValueError(f"index.sides={out['sides']}: expected a subset of {workdir_lib.SIDES}")
    return out


def load_index(path: str | os.PathLike, fingerprint: str | None = None,
               force: bool = False) -> base.VectorIndex:
    """Reads an index saved by any backend.

    fingerprint: the querying model's (`pretrained.fingerprint`); if the index records a
    different one, a FingerprintMismatchError names both, unless `force` (e.g. a model
    re-exported with identical weights but another config layout).
    """
    path = base.readable(path)  # a gs:// index: its local copy
    meta = base.read_metadata(path)
    if meta["type"] not in BACKENDS:
        raise base.IndexFormatError(f"{path}: unknown index type {meta['type']!r}; known: "
                                    f"{sorted(BACKENDS)}")
    saved = meta.get("info", {}).get("model_fingerprint")
    if fingerprint is not None and saved != fingerprint and not force:
        raise base.FingerprintMismatchError(
            f"{path} was built from model {saved} but the query model is {fingerprint}: its "
            f"vectors are not comparable (rebuild the index, or pass force=True / --force)")
    ids = np.load(os.path.join(path, base.IDS_FILE))
    if ids.shape != (meta["count"],):
        raise base.IndexFormatError(f"{path}: {base.IDS_FILE} holds {ids.shape} ids, "
                                    f"index.json says {meta['count']}")
    cls = BACKENDS[meta["type"]].index_class()
    index = cls._load_files(os.path.abspath(path), int(meta["dim"]), ids.astype(np.int64),
                            dict(meta["params"]))
    index.info = dict(meta.get("info", {}))
    return index
