"""Filtered search: the top-k among the items whose metadata matches `where`.

    where = {"source": "flickr"}                 equality (a list field, e.g. tags, matches
                                                 when it holds the value)
    where = {"tags": ["sea", "sky"]}             set membership: any of the values
    where = {"source": "flickr", "tags": "sea"}  several fields: all of them
    where = {"id": [3, 17, 42]}                  an allow-list of index ids
    where = {"key": ["beach-01", "r-7"]}         an allow-list of gallery ids (items.json)

Two ways to search, chosen per call by the size of the allowed set:
  "subset"     the allowed set is small (≤ subset_limit) and the index keeps its vectors
               (ExactIndex; ScaNN with keep_vectors, which gallery builds set): inner products
               with exactly those vectors, so the result is the exact top-k among them.
  "overfetch"  the index is searched for `fetch` results (2k × N / allowed, at least 4k) and
               the allowed ones kept; a query with fewer than k is searched again for 4× as
               many, up to max_fetch (at most the index size). The result is the top-k among
               the allowed items as far as the backend's recall allows; a query can come back
               with fewer than k (ids -1, scores -inf) when its allowed items rank below
               max_fetch.
`FilterInfo` says which ran, how many items were allowed and how many results were fetched.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping

import numpy as np

from ldot_jax.index import base

ALLOW_LISTS = ("id", "key")
SUBSET_LIMIT = 4096
MAX_FETCH = 16384


def _token(value: Any, where: str):
    """A field value as a hashable token that keeps True apart from 1 and 1 apart from "1"."""
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if math.isfinite(number) and abs(number) < 2 ** 63:
            return ("n", number)
    if isinstance(value, str):
        return ("s", value)
    raise ValueError(f"{where}: {value!r:.80} is not a string, a finite number (|x| < 2^63) "
                     f"or a bool")


def check_value(value: Any, where: str) -> None:
    """ValueError unless `value` can be a metadata field: a string, a finite number, a bool
    or a list of strings."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return
    if isinstance(value, list):
        raise ValueError(f"{where}: {value!r}: a list field holds strings")
    _token(value, where)


class FieldTable:
    """The items' metadata fields as posting lists: (field, value) → the ids holding it.

    items: {id: {field: value or list of strings}}; ids i64 of the index's items."""

    def __init__(self, items: Mapping[int, Mapping[str, Any]] | None = None):
        self._postings: dict[str, dict[Any, set[int]]] = {}
        self._values: dict[int, dict] = {}
        for i, fields in (items or {}).items():
            self.add(int(i), fields)

    @property
    def fields(self) -> list[str]:
        return sorted(self._postings)

    def add(self, item_id: int, fields: Mapping[str, Any]) -> None:
        """Records an item's fields (replacing any it had)."""
        self.remove(item_id)
        self._values[item_id] = dict(fields)
        for field, value in fields.items():
            values = value if isinstance(value, list) else [value]
            postings = self._postings.setdefault(field, {})
            for v in values:
                postings.setdefault(_token(v, f"item {item_id} field {field!r}"),
                                    set()).add(item_id)

    def remove(self, item_id: int) -> None:
        for field, value in self._values.pop(item_id, {}).items():
            for v in (value if isinstance(value, list) else [value]):
                ids = self._postings[field].get(_token(v, field))
                if ids is not None:
                    ids.discard(item_id)

    def fields_of(self, item_id: int) -> dict:
        return dict(self._values.get(int(item_id), {}))

    def matching(self, field: str, values: Iterable) -> set[int]:
        """The ids whose `field` equals (or, for a list field, holds) any of `values`."""
        if field not in self._postings:
            raise ValueError(f"where: unknown field {field!r}; the items' fields are "
                             f"{self.fields or 'none (this index stores no metadata)'}")
        postings = self._postings[field]
        out: set[int] = set()
        for v in values:
            out |= postings.get(_token(v, f"where[{field!r}]"), set())
        return out


@dataclasses.dataclass(frozen=True)
class FilterInfo:
    """mode: "subset" or "overfetch"; allowed: items matching; fetched: results asked of
    the index (overfetch; the largest over the queries' rounds), 0 for subset."""

    mode: str
    allowed: int
    fetched: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def allowed_ids(where: Mapping[str, Any], index_ids: np.ndarray, table: FieldTable,
                keys: Mapping[str, int] | None = None) -> np.ndarray:
    """i64[n] sorted: the ids of `index_ids` that `where` allows. Errors name the field, or
    the allow-listed ids / keys the index does not hold."""
    if not isinstance(where, Mapping) or not where:
        raise ValueError(f"where: expected a non-empty object of field → value(s), got "
                         f"{where!r}")
    present = np.asarray(index_ids, np.int64)
    allowed = None
    for field, wanted in where.items():
        values = list(wanted) if isinstance(wanted, (list, tuple, set)) else [wanted]
        if not values:
            raise ValueError(f"where[{field!r}]: an empty list allows nothing")
        if field == "id":
            bad = [v for v in values if isinstance(v, bool)
                   or not isinstance(v, (int, np.integer)) or not 0 <= int(v) < 2 ** 63]
            if bad:
                raise ValueError(f"where['id']: expected integer ids ≥ 0, got "
                                 f"{bad[:5]!r:.120}")
            ids = np.asarray([int(v) for v in values], np.int64)
            missing = np.setdiff1d(ids, present)
            if len(missing):
                raise ValueError(f"where['id']: ids not in the index: {missing[:10].tolist()}")
            chosen = set(ids.tolist())
        elif field == "key":
            if keys is None:
                raise ValueError("where['key']: this index has no gallery keys (items.json)")
            if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
                raise ValueError(f"where['key']: expected gallery keys (strings), got "
                                 f"{values[:5]!r:.120}")
            unknown = [v for v in values if str(v) not in keys]
            if unknown:
                raise ValueError(f"where['key']: keys not in the gallery: {unknown[:10]!r}")
            chosen = {int(keys[str(v)]) for v in values}
        else:
            chosen = table.matching(str(field), values)
        allowed = chosen if allowed is None else allowed & chosen
    out = np.asarray(sorted(allowed), np.int64)
    return out[np.isin(out, present)]


def search(index: base.VectorIndex, queries: np.ndarray, k: int, allowed: np.ndarray,
           subset_limit: int = SUBSET_LIMIT, max_fetch: int = MAX_FETCH,
           **search_options) -> tuple[base.SearchResult, FilterInfo]:
    """The top-k of queries f32[Q, D] among the `allowed` ids (i64[n], held by the index):
    ids i64[Q, k'] / scores f32[Q, k'] with k' = min(k, n), best first, -1 / -inf where
    overfetch found fewer. See the module docstring for the two modes."""
    queries = base.as_vectors(queries, index.dim, "queries")
    allowed = np.unique(np.asarray(allowed, np.int64))
    if not len(allowed):
        width = 0
        empty = base.SearchResult(np.full((len(queries), width), -1, np.int64),
                                  np.full((len(queries), width), -np.inf, np.float32))
        return empty, FilterInfo("subset", 0)
    k = min(int(k), len(allowed))
    if len(allowed) <= subset_limit:
        vectors = index.vectors_of(allowed)
        if vectors is not None:
            return _exact(queries, vectors, allowed, k), FilterInfo("subset", len(allowed))
    total = len(index)
    bound = min(total, max(int(max_fetch), k))
    fetch = min(bound, max(4 * k, -(-2 * k * total // len(allowed))))
    ids = np.full((len(queries), k), -1, np.int64)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    pending = np.arange(len(queries))
    fetched = 0
    while len(pending):
        fetched = max(fetched, fetch)
        hits = index.search(queries[pending], fetch, **search_options)
        keep = np.isin(hits.ids, allowed) & (hits.ids >= 0)
        short = []
        for row, q in enumerate(pending):
            found = hits.ids[row][keep[row]][:k]
            ids[q], scores[q] = -1, -np.inf  # this round's answer replaces the last one's
            ids[q, :len(found)] = found
            scores[q, :len(found)] = hits.scores[row][keep[row]][:k]
            if len(found) < k:
                short.append(q)
        if fetch >= bound:
            break
        pending, fetch = np.asarray(short, np.int64), min(bound, 4 * fetch)
    return base.SearchResult(ids, scores), FilterInfo("overfetch", len(allowed), fetched)


def _exact(queries: np.ndarray, vectors: np.ndarray, allowed: np.ndarray,
           k: int) -> base.SearchResult:
    """Exact top-k over the allowed vectors (ties to the smaller id, as ExactIndex)."""
    scores = queries @ vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return base.SearchResult(allowed[order], np.take_along_axis(scores, order, 1))
