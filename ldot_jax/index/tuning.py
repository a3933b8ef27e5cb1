"""Recall-targeted settings for the approximate indexes (ScannIndex, HierarchicalIndex): the
cheapest settings whose recall@k against exact search, on held-out queries, meets a target.

The search is small and bounded. For each build (the size rule first; then, while the target
is unmet, a tree trained on more vectors: `build_ladder`), the search-time knobs are probed:
  leaves_to_search  partitions scored per query (when there is a tree), on a doubling grid from
                    the rule's value up to every leaf;
  depth             `reorder` (ScannIndex: candidates re-scored exactly after hashing) or
                    `candidates` (HierarchicalIndex: coarse results re-scored at full dimension),
                    on a doubling grid.
First the shallowest depth meeting the target with every leaf searched (none: the build cannot
reach it); then, at that depth and the next two, the fewest leaves meeting it (recall grows with
both knobs): a binary search over the leaf grid, refined by bisection. Every probe is one
batched search of all the queries, timed on this machine (best of two). The chosen point is
the one meeting the target with the highest QPS; if none does, the one with the highest recall,
and the report says the target was not met.

The index keeps the chosen settings as its search defaults (saved in index.json's params), and
`Tuning.to_json()` (target, k, chosen point, every probe) goes into its info["tuning"], so that
a reloaded index searches with them and reproduces the recall.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Callable, Sequence

import numpy as np

from ldot_jax.index import base, health, scann_index

log = logging.getLogger(__name__)

MAX_DEPTH = 4096  # deepest reorder / candidates probed


@dataclasses.dataclass(frozen=True)
class Probe:
    """One measured setting: build (the build overrides), leaves_to_search (None: no tree),
    depth (reorder or candidates; None: nothing to set), recall@k and batched QPS."""

    build: int
    leaves_to_search: int | None
    depth: int | None
    recall: float
    qps: float

    def to_json(self) -> dict:
        return {"build": self.build, "leaves_to_search": self.leaves_to_search,
                "depth": self.depth, "recall": round(self.recall, 4),
                "qps": round(self.qps, 1)}


@dataclasses.dataclass(frozen=True)
class Tuning:
    """target: the recall@k asked for; met: whether `chosen` reaches it; builds: the build
    overrides tried, in order (a probe's `build` indexes them); depth_name: "reorder" or
    "candidates"; probes: every measured point."""

    target: float
    k: int
    queries: int
    met: bool
    chosen: Probe
    builds: list[dict]
    depth_name: str
    probes: list[Probe]

    def to_json(self) -> dict:
        return {"target_recall": self.target, "k": self.k, "queries": self.queries,
                "met": self.met, "depth_name": self.depth_name,
                "chosen": {**self.chosen.to_json(),
                           "build_overrides": self.builds[self.chosen.build]},
                "builds": self.builds, "probes": [p.to_json() for p in self.probes]}

    def summary(self) -> str:
        c = self.chosen
        knobs = ", ".join(f"{n}={v}" for n, v in (("leaves_to_search", c.leaves_to_search),
                                                  (self.depth_name, c.depth)) if v is not None)
        verdict = "meets" if self.met else "does NOT meet"
        return (f"recall@{self.k} {c.recall:.4f} at {c.qps:.0f} queries/s ({knobs or 'no knobs'}"
                f"; build {self.builds[c.build] or 'the size rule'}) {verdict} the target "
                f"{self.target} ({len(self.probes)} probes, {len(self.builds)} build(s))")


def build_ladder(count: int, overrides: dict) -> list[dict]:
    """The builds tried in turn while the target is unmet: the size rule (with the user's
    overrides), then — when the rule trained the tree on a sample — a tree trained on every
    vector up to 500k (a sample can cap recall on data whose clusters it under-represents;
    at 1M × 768 the rule's 250k already reached what 500k does, so this step is a last
    resort, taken only for a target the first build cannot meet)."""
    builds = [{}]
    if "training_sample_size" not in overrides:
        rule = scann_index.scann_params(count, 1, **overrides)
        bigger = min(count, 500_000)
        if rule.num_leaves and bigger > rule.training_sample_size:
            builds.append({"training_sample_size": bigger})
    return builds


def _doubling(start: int, stop: int) -> list[int]:
    values, v = [], max(1, start)
    while v < stop:
        values.append(v)
        v *= 2
    return values + [stop]


def _timed(search: Callable, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """(ids i64[Q, k], batched queries per second: best of two timed calls after a warm-up)."""
    ids = search(queries, k)
    best = math.inf
    for _ in range(2):
        start = time.perf_counter()
        search(queries, k)
        best = min(best, time.perf_counter() - start)
    return ids, len(queries) / max(best, 1e-9)


def _knobs(index) -> tuple[str, int | None, int | None, int]:
    """(depth name, tree leaves or None, the rule's leaves_to_search, the rule's depth) of a
    built ScannIndex / HierarchicalIndex."""
    p = index.scann_params
    hierarchical = hasattr(index, "candidates")
    name = "candidates" if hierarchical else "reorder"
    depth = index.candidates if hierarchical else (p.reorder if p.hashing else None)
    leaves = min(p.num_leaves, len(index)) or None
    return name, leaves, (min(p.leaves_to_search, len(index)) or None), depth


def _probe_build(index, b: int, queries: np.ndarray, truth: np.ndarray, k: int, target: float,
                 max_probes: int) -> list[Probe]:
    name, leaves, rule_leaves, rule_depth = _knobs(index)
    cache: dict[tuple, Probe] = {}

    def probe(l, d) -> Probe:
        if (l, d) not in cache:
            options = {}
            if l is not None:
                options["leaves_to_search"] = l
            if d is not None:
                options[name] = d
            ids, qps = _timed(lambda q, kk: index.search(q, kk, **options).ids, queries, k)
            cache[(l, d)] = Probe(b, l, d, health.overlap_recall(ids, truth, k), qps)
        return cache[(l, d)]

    if rule_depth is None:  # brute force: nothing to choose
        return [probe(None, None)]
    depths = _doubling(max(rule_depth // 2, 4 * k), max(MAX_DEPTH, rule_depth))

    # 1. The shallowest depth meeting the target when every leaf is searched (the most any
    #    depth can reach); none: the target is out of reach of this build.
    shallowest = None
    for i, d in enumerate(depths):
        if probe(leaves, d).recall >= target:
            shallowest = i
            break
        if len(cache) >= max_probes:
            break
    if leaves is None or shallowest is None:
        return list(cache.values())
    grid = _doubling(max(1, rule_leaves // 2), leaves)

    def fewest_leaves(d) -> int:
        """The fewest leaves meeting the target at depth d (every leaf does): a binary
        search over the doubling grid, then bisection below the first passing value."""
        lo, hi = -1, len(grid) - 1  # grid[hi] passes; grid[lo] fails (−1: below the grid)
        while hi - lo > 1 and len(cache) < max_probes:
            mid = (lo + hi) // 2
            if probe(grid[mid], d).recall >= target:
                hi = mid
            else:
                lo = mid
        below, passing = (grid[lo] if lo >= 0 else 0), grid[hi]
        while passing - below > max(1, passing // 8) and len(cache) < max_probes:
            mid = (below + passing) // 2  # refinement: fewer leaves may still meet it
            if probe(mid, d).recall >= target:
                passing = mid
            else:
                below = mid
        return passing

    # 2. At that depth and the next two (deeper scoring may let fewer leaves do), the
    #    fewest leaves; the fastest of these points is chosen by the caller.
    previous = None
    for d in depths[shallowest:shallowest + 3]:
        fewest = fewest_leaves(d)
        if len(cache) >= max_probes or fewest <= 1 or (previous is not None
                                                       and fewest >= previous):
            break  # a deeper depth would cost more and save no leaves
        previous = fewest
    return list(cache.values())


def choose(probes: Sequence[Probe], target: float) -> tuple[Probe, bool]:
    """(the fastest probe meeting the target, True), else (the highest-recall one, False)."""
    passing = [p for p in probes if p.recall >= target]
    if passing:
        return max(passing, key=lambda p: (p.qps, p.recall)), True
    return max(probes, key=lambda p: (p.recall, p.qps)), False


def tune(make: Callable[[dict], base.VectorIndex], vectors: np.ndarray, ids: np.ndarray,
         queries: np.ndarray, target: float, k: int = 10, builds: Sequence[dict] = ({},),
         max_probes: int = 40, exact=None,
         built: dict | None = None) -> tuple[base.VectorIndex, Tuning]:
    """The index built over vectors f32[N, D] (ids i64[N]) whose settings meet recall@k ≥
    `target` on queries f32[Q, D] at the highest QPS found, and the report.

    make(build overrides) → an empty ScannIndex / HierarchicalIndex; builds: the overrides
    tried in turn while the target is unmet (`build_ladder`); max_probes: searches per build;
    exact: an ExactIndex over the same vectors (else one is made) for the true top-k; built:
    a dict kept by the caller across calls over the same vectors (e.g. several targets), in
    which each build is kept and reused. The returned index searches with the chosen
    settings by default.
    """
    if not 0 < target <= 1:
        raise ValueError(f"target recall {target}: expected a number in (0, 1]")
    if len(queries) == 0:
        raise ValueError("tuning needs held-out queries: none were given")
    k = min(int(k), len(vectors))
    if exact is None:
        from ldot_jax.index.exact import ExactIndex
        exact = ExactIndex(vectors.shape[1]).add(vectors, ids)
    truth = exact.search(queries, k).ids
    probes: list[Probe] = []
    indexes, tried = [], []
    for b, overrides in enumerate(builds):
        tried.append(dict(overrides))
        key = repr(sorted(overrides.items()))
        if built is not None and key in built:
            index = built[key]
        else:
            index = make(dict(overrides)).add(vectors, ids)
            if built is not None:
                built[key] = index
        indexes.append(index)
        found = _probe_build(index, b, queries, truth, k, target, max_probes)
        probes += found
        best, met = choose(found, target)
        log.info("tuning build %d %s: best recall@%d %.4f at %.0f q/s (%s)", b,
                 overrides or "(the size rule)", k, best.recall, best.qps,
                 "meets" if met else "misses")
        if met:
            break
    chosen, met = choose(probes, target)
    index = indexes[chosen.build]
    name, *_ = _knobs(index)
    index.set_search_defaults(chosen.leaves_to_search, chosen.depth)
    report = Tuning(float(target), k, int(len(queries)), met, chosen, tried, name, probes)
    if not met:
        log.warning("target recall@%d ≥ %s not met within the budget: best %s", k, target,
                    report.summary())
    return index, report
