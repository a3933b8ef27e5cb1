"""The index interface, its checks, and the on-disk format every backend shares.

An index maps int64 ids to vectors f32[N, D] and answers top-k inner-product queries. Backends
implement `_add`, `_delete_positions`, `_search`, `params`, `_save_files` and `_load_files`; this
module does the rest: argument checks with clear errors, the id map, k clamping, and saving.

Directory format (written to a temporary sibling, then renamed into place):
  index.json   {"format_version", "type", "dim", "count", "params", "info", "files"}
               info: model_fingerprint, build_time_s, health, … (free-form, JSON)
               files: {relative path: size in bytes} of every other file, checked on load,
               so a truncated or missing file is an error instead of wrong results.
  ids.npy      i64[N]: the id of each stored row (row order is the backend's)
  …            the backend's own files
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
import time
import warnings
from typing import Any, ClassVar

import numpy as np

from ldot_jax.core import fileutil, paths

FORMAT_VERSION = 1
FORMAT = "ldot_jax.index"  # the manifest's format (core/fileutil.py)
META_FILE = "index.json"
IDS_FILE = "ids.npy"


class VectorIndexError(ValueError):
    """Base class of index errors (bad files, mismatched models or shapes)."""


class IndexFormatError(VectorIndexError):
    """A missing, partial or unreadable index directory."""


class FingerprintMismatchError(VectorIndexError):
    """The index was built from another model than the one querying it."""


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """ids i64[Q, k] and scores f32[Q, k], best first. When a backend finds fewer than k
    results for a query (an approximate index searching too few partitions), the missing
    slots hold id -1 and score -inf."""

    ids: np.ndarray
    scores: np.ndarray


def as_vectors(x, dim: int | None, what: str) -> np.ndarray:
    """x as f32[n, D] (a single vector becomes one row); errors name `what` and the shape."""
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a [n, D] array, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{what} have dimension {x.shape[1]} but the index has dimension {dim}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{what}: expected floating-point vectors, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} contain NaN or infinite values")
    return x


def clamp_k(k: int, count: int) -> int:
    """k, or the corpus size with a warning when k is larger (documented behaviour)."""
    if int(k) != k or k < 1:
        raise ValueError(f"k={k}: expected a positive integer")
    if k > count:
        warnings.warn(f"k={k} is larger than the index ({count} vectors): returning {count}",
                      stacklevel=3)
        return count
    return int(k)


class VectorIndex(abc.ABC):
    """add / delete / search / save; `load_index` reads any backend back."""

    type: ClassVar[str]

    def __init__(self, dim: int):
        if int(dim) != dim or dim < 1:
            raise ValueError(f"index dimension {dim}: expected a positive integer")
        self.dim = int(dim)
        self._ids = np.zeros(0, np.int64)
        # Free-form facts about the index, saved with it: the model fingerprint, build time,
        # health (recall against exact search), what the vectors are.
        self.info: dict[str, Any] = {}

    # -- ids ----------------------------------------------------------------------------------

    @property
    def ids(self) -> np.ndarray:
        """i64[N]: the ids of the stored vectors, in the backend's row order (read-only)."""
        view = self._ids.view()
        view.flags.writeable = False
        return view

    def __len__(self) -> int:
        return len(self._ids)

    def _check_new_ids(self, ids, n: int) -> np.ndarray:
        if ids is None:
            start = int(self._ids.max()) + 1 if len(self._ids) else 0
            return np.arange(start, start + n, dtype=np.int64)
        ids = np.asarray(ids)
        if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids: expected {n} integers (one per vector), got shape "
                             f"{ids.shape} dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        if ids.min(initial=0) < 0:
            raise ValueError(f"ids must be ≥ 0 (-1 marks an empty result), got {ids.min()}")
        unique, counts = np.unique(ids, return_counts=True)
        if np.any(counts > 1):
            raise ValueError(f"ids repeat: {unique[counts > 1][:10].tolist()}")
        clash = np.intersect1d(ids, self._ids)
        if len(clash):
            raise ValueError(f"ids already in the index: {clash[:10].tolist()} (delete them "
                             f"first to replace their vectors)")
        return ids

    def positions_of(self, ids) -> np.ndarray:
        """i64[n]: the rows holding `ids`; a KeyError names ids that are not in the index."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        order = np.argsort(self._ids, kind="stable")
        slot = np.searchsorted(self._ids, ids, sorter=order)
        rows = order[np.minimum(slot, len(order) - 1)] if len(order) else slot
        found = (slot < len(order)) & (self._ids[rows] == ids if len(order) else False)
        if not np.all(found):
            raise KeyError(f"ids not in the index: {ids[~found][:10].tolist()}")
        return rows.astype(np.int64)

    def vectors_of(self, ids) -> np.ndarray | None:
        """f32[n, D]: the stored vectors of `ids` (a KeyError names ids not in the index), or
        None when the backend does not keep its vectors (ScaNN without keep_vectors). The
        filters' exact search of a small allowed subset reads them."""
        table = self._vector_table()
        if table is None:
            return None
        return np.asarray(table[self.positions_of(ids)], np.float32)

    def _vector_table(self) -> np.ndarray | None:
        """The stored vectors [N, D] in row order (`ids`' order), or None."""
        return None

    # -- the interface ------------------------------------------------------------------------

    def add(self, vectors, ids=None) -> "VectorIndex":
        """Adds vectors f32[n, D] under `ids` i64[n] (default: after the largest id)."""
        vectors = as_vectors(vectors, self.dim, "vectors")
        ids = self._check_new_ids(ids, len(vectors))
        if len(ids):
            self._add(vectors, ids)
        return self

    def delete(self, ids) -> "VectorIndex":
        """Removes the vectors of `ids` (a KeyError if one is not in the index)."""
        ids = np.unique(np.asarray(ids, np.int64).reshape(-1))
        if len(ids):
            self._delete_positions(self.positions_of(ids))
        return self

    def search(self, queries, k: int, **options) -> SearchResult:
        """Top-k by inner product for queries f32[Q, D] (or one f32[D]). k larger than the
        index is clamped to its size, with a warning. `options`: the backend's search-time
        settings (e.g. leaves_to_search)."""
        queries = as_vectors(queries, self.dim, "queries")
        if not len(self):
            raise ValueError(f"the {self.type} index is empty: add vectors before searching")
        k = clamp_k(k, len(self))
        positions, scores = self._search(queries, k, **options)
        valid = (positions >= 0) & (positions < len(self._ids))
        ids = np.where(valid, self._ids[np.where(valid, positions, 0)], -1)
        return SearchResult(ids.astype(np.int64),
                            np.where(valid, scores, -np.inf).astype(np.float32))

    @abc.abstractmethod
    def params(self) -> dict:
        """The backend's settings (JSON), saved with the index and given back to `_load_files`."""

    @abc.abstractmethod
    def _add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Stores checked vectors and appends/places their ids in `self._ids`."""

    @abc.abstractmethod
    def _delete_positions(self, positions: np.ndarray) -> None:
        """Removes rows (and their entries of `self._ids`)."""

    @abc.abstractmethod
    def _search(self, queries: np.ndarray, k: int, **options) -> tuple[np.ndarray, np.ndarray]:
        """(rows i64[Q, k], scores f32[Q, k]) for checked queries and 1 ≤ k ≤ N."""

    @abc.abstractmethod
    def _save_files(self, directory: str) -> None:
        """Writes the backend's files into `directory` (a fresh temporary directory)."""

    @classmethod
    @abc.abstractmethod
    def _load_files(cls, directory: str, dim: int, ids: np.ndarray, params: dict) -> "VectorIndex":
        """The index saved in `directory` (files already checked against the manifest)."""

    # -- saving -------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, extras: dict[str, str] | None = None) -> str:
        """Writes the index to `path` atomically (a previous index there is replaced only once
        the new one is complete) and returns the absolute path. extras: {file name: text}
        saved with it (e.g. the catalog names.json), under its manifest."""
        with fileutil.atomic_directory(path, FORMAT) as tmp:
            np.save(os.path.join(tmp, IDS_FILE), self._ids)
            self._save_files(tmp)
            for name, text in (extras or {}).items():
                fileutil.atomic_write_text(fileutil.confined(tmp, name, "index extras"), text)
            meta = {"format_version": FORMAT_VERSION, "type": self.type, "dim": self.dim,
                    "count": len(self), "params": self.params(), "info": self.info,
                    "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": _sizes(tmp)}
            fileutil.atomic_write_text(os.path.join(tmp, META_FILE),
                                       json.dumps(meta, indent=1, default=_json_default))
        return paths.absolute(path)


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def _sizes(directory: str) -> dict[str, int]:
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, directory)] = os.path.getsize(full)
    return dict(sorted(out.items()))


def is_index_dir(path: str | os.PathLike) -> bool:
    if paths.is_remote(path):  # its files are in the generation its manifest names
        try:
            manifest = fileutil.read_manifest(path)
        except fileutil.IntegrityError:
            return False
        return manifest is not None and manifest["format"] == FORMAT
    return os.path.isfile(os.path.join(path, META_FILE))


def readable(path: str | os.PathLike) -> str:
    """The local directory to read index directory `path` from: itself, or for a gs:// one a
    copy in the cache, checked against its manifest (fileutil.local_directory)."""
    try:
        return fileutil.local_directory(path, FORMAT if paths.is_remote(path) else None)
    except FileNotFoundError:
        raise IndexFormatError(f"index directory {path} does not exist") from None
    except fileutil.IntegrityError as e:
        raise IndexFormatError(f"not a usable index: {e}") from e


def read_metadata(path: str | os.PathLike, full: bool = False) -> dict:
    """The index.json of an index directory, checked: format version, every listed file
    present with its recorded size, and the directory's manifest (sizes; hashes with
    `full`)."""
    path = readable(path)  # also finishes a replacement a crash interrupted
    if not os.path.isdir(path):
        raise IndexFormatError(f"index directory {path} does not exist")
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise IndexFormatError(f"{path} is not a complete index: {META_FILE} is missing (an "
                               f"interrupted save never leaves one; rebuild the index)")
    try:
        meta = fileutil.read_json(meta_path, "index metadata")
    except ValueError as e:
        raise IndexFormatError(str(e)) from e
    for key in ("format_version", "type", "dim", "count", "params", "files"):
        if key not in meta:
            raise IndexFormatError(f"{meta_path}: key {key!r} is missing")
    if meta["format_version"] != FORMAT_VERSION:
        raise IndexFormatError(f"{meta_path}: format_version {meta['format_version']} is not "
                               f"supported (this ldot_jax reads {FORMAT_VERSION})")
    for name, size in meta["files"].items():
        try:
            fileutil.confined(path, name, meta_path)
        except fileutil.IntegrityError as e:
            raise IndexFormatError(str(e)) from e
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            raise IndexFormatError(f"{path}: file {name} is missing")
        if os.path.getsize(file_path) != size:
            raise IndexFormatError(f"{path}: file {name} has {os.path.getsize(file_path)} bytes, "
                                   f"the index was saved with {size} (partial or modified)")
    verify(path, full=full)
    return meta


def verify(path: str | os.PathLike, full: bool = False) -> None:
    """Checks an index directory's files against its manifest (sizes; SHA-256 with `full`);
    IndexFormatError names a damaged file."""
    try:
        fileutil.verify(path, FORMAT, full)
    except fileutil.IntegrityError as e:
        raise IndexFormatError(f"damaged index: {e}") from e
