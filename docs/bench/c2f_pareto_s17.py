"""Coarse-to-fine against full-dimension ScaNN at equal recall (issue 18, session 17).

Each index is built twice over the 1M × 768 Matryoshka-like corpus (a tree of 1,000 leaves, the
size rule's, and one of 2,000; coarse-to-fine hashing with one dimension per block); on each
build the same grid of search settings is swept (ScaNN: leaves × reorder; coarse-to-fine:
leaves × candidates). Every point is measured on two disjoint query sets: the tuning queries
(recall only) choose the operating point for a target, the measured queries give the reported
recall@10 and batched QPS (best of three timed calls, k = 10). So "at equal recall" means: for
each target, the fastest setting of each index whose tuning recall meets it, measured on queries
it was not chosen on. Writes c2f_pareto_s17.json and c2f_pareto_s17.png next to this script.

Run from the repository root: .venv/bin/python docs/bench/c2f_pareto_s17.py (≈ 20 min here).
"""
import gc
import json
import os
import time

import numpy as np

from ldot_jax.bench import search as bs
from ldot_jax.index import ExactIndex, HierarchicalIndex, ScannIndex
from ldot_jax.index.health import overlap_recall

OUT = os.environ.get("C2F_OUT", os.path.dirname(os.path.abspath(__file__)))
K = 10
SIZE = int(os.environ.get("C2F_SIZE", 1_000_000))  # smaller: a smoke run
# The size rule's tree at 1M (√n leaves; "rule" in the recorded JSON) and one of 2√n, which
# became HierarchicalIndex's rule after this run (index/hierarchical.py).
BUILDS = ({"num_leaves": 1000}, {"num_leaves": 2000})
GRIDS = {
    "scann d=768": ("reorder", (1, 2, 3, 4, 6, 8, 12, 16),
                    (40, 50, 60, 80, 100, 125, 160, 200, 250, 320)),
    "c2f 128→768": ("candidates", (2, 3, 4, 6, 8, 12, 16, 24, 32),
                    (30, 40, 50, 60, 80, 100, 125, 160, 200, 250)),
}
# Another generator (C2F_CORPUS=isotropic / two_modality): each index with its own size rule
# only (ScaNN √n leaves, coarse-to-fine 2√n), written to c2f_pareto_s17_<corpus>.*.
CORPUS = os.environ.get("C2F_CORPUS", "matryoshka")
if CORPUS != "matryoshka":
    BUILDS = ({},)
    # Where the data is less clustered / the prefix carries less of the ranking: more leaves
    # and deeper lists.
    GRIDS = {name: (knob, tuple(sorted(set(leaves) | {32, 64, 128})), depths + (500, 800))
             for name, (knob, leaves, depths) in GRIDS.items()}
NAME = "c2f_pareto_s17" + ("" if CORPUS == "matryoshka" else f"_{CORPUS}")
TARGETS = (0.90, 0.93, 0.95, 0.96, 0.97, 0.98, 0.99)


def timed(search, queries):
    ids = search(queries)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        search(queries)
        best = min(best, time.perf_counter() - start)
    return ids, len(queries) / best


def sweep(name, index, measured, tuning, truth_m, truth_t):
    depth_name, leaves_grid, depth_grid = GRIDS[name]
    points = []
    for leaves in leaves_grid:
        for depth in depth_grid:
            options = {"leaves_to_search": leaves, depth_name: depth}
            run = lambda q: index.search(q, K, **options).ids  # noqa: E731
            tuning_recall = overlap_recall(run(tuning), truth_t, K)
            ids, qps = timed(run, measured)
            points.append({"leaves_to_search": leaves, depth_name: depth,
                           "tuning_recall": round(tuning_recall, 4),
                           "recall@10": round(overlap_recall(ids, truth_m, K), 4),
                           "qps_batched": round(qps, 1)})
            print(f"  {name} {options}: tuning {tuning_recall:.4f}  measured "
                  f"{points[-1]['recall@10']:.4f}  {qps:,.0f} q/s", flush=True)
    return points


def at_target(points, target):
    passing = [p for p in points if p["tuning_recall"] >= target]
    return max(passing, key=lambda p: p["qps_batched"]) if passing else None


def main():
    database, measured, tuning, _ = bs._corpus(CORPUS, SIZE, 768, 1000, None)
    n, dim = database.shape
    ids = np.arange(n)
    exact = ExactIndex(dim).add(database, ids)
    truth_m, truth_t = exact.search(measured, K).ids, exact.search(tuning, K).ids
    _, exact_qps = timed(lambda q: exact.search(q, K).ids, measured)
    del exact
    gc.collect()
    print(f"exact: {exact_qps:.1f} q/s", flush=True)
    out = {"corpus": f"{CORPUS} {SIZE:,} × 768", "k": K, "exact_qps": round(exact_qps, 1),
           "builds": {}, "points": {}}
    for name, make in (("scann d=768", lambda o: ScannIndex(dim, **o)),
                       ("c2f 128→768", lambda o: HierarchicalIndex(dim, 128, **o))):
        out["points"][name] = []
        for overrides in BUILDS:
            start = time.perf_counter()
            index = make(overrides).add(database, ids)
            build = f"{name} {overrides or 'rule'}"
            out["builds"][build] = {"build_s": round(time.perf_counter() - start, 1),
                                    "params": index.params()}
            print(f"built {build} in {out['builds'][build]['build_s']} s: {index.params()}",
                  flush=True)
            points = sweep(name, index, measured, tuning, truth_m, truth_t)
            out["points"][name] += [{**p, "build": overrides or "rule"} for p in points]
            del index
            gc.collect()
    table = []
    for target in TARGETS:
        s, c = (at_target(out["points"][n], target) for n in GRIDS)
        table.append({"target": target, "scann": s, "c2f": c,
                      "speedup": (round(c["qps_batched"] / s["qps_batched"], 2)
                                  if s and c else None)})
        print(f"target {target}: scann {s and (s['recall@10'], s['qps_batched'])}  c2f "
              f"{c and (c['recall@10'], c['qps_batched'])}  ×{table[-1]['speedup']}", flush=True)
    out["at_target"] = table
    with open(os.path.join(OUT, NAME + ".json"), "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
    plot(out, os.path.join(OUT, NAME + ".png"))


def pareto(points):
    front, best = [], -1.0
    for p in sorted(points, key=lambda p: -p["qps_batched"]):
        if p["recall@10"] > best:
            front.append(p)
            best = p["recall@10"]
    return front


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in out["points"].items():
        ax.scatter([p["recall@10"] for p in points], [p["qps_batched"] for p in points],
                   s=6, alpha=0.3)
        front = pareto(points)
        ax.plot([p["recall@10"] for p in front], [p["qps_batched"] for p in front],
                marker="o", ms=3, label=f"{name} (Pareto front)")
    ax.axhline(out["exact_qps"], color="grey", ls=":", label="exact")
    ax.set(xlabel="recall@10 (measured queries)", ylabel="batched queries / s", yscale="log",
           xlim=(0.85, 1.0), title=out["corpus"] + ", 2-core CPU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
