"""The measurement behind ScannIndex's size rule (index/scann_index.scann_params): for each
corpus generator, trees trained on several sample sizes, each searched over leaves × reorder.

    ldot bench scann_rule [--size 1000000] [--dim 768] [--corpora isotropic,two_modality]
        [--samples 100000,250000,500000] [--queries 1000] [--out runs/bench/scann_rule]

Prints and writes <out>/scann_rule.json and scann_rule.md: per corpus, the build time of each
sample size and recall@10 / batched QPS of every (leaves_to_search, reorder) point, against
exact search over the same vectors.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import numpy as np

from ldot_jax.core import fileutil


def measure(database: np.ndarray, queries: np.ndarray, samples, leaf_factors=(1, 2, 4),
            reorders=(100, 250, 500)) -> list[dict]:
    """Rows {sample, leaves, reorder, recall, qps, build_s} for one corpus."""
    from ldot_jax.index import ExactIndex, ScannIndex
    from ldot_jax.index.health import overlap_recall
    n, dim = database.shape
    exact = ExactIndex(dim).add(database, np.arange(n))
    truth = exact.search(queries, 10).ids
    del exact
    gc.collect()
    rows = []
    for sample in samples:
        start = time.perf_counter()
        index = ScannIndex(dim, training_sample_size=min(sample, n)).add(database, np.arange(n))
        build = time.perf_counter() - start
        p = index.scann_params
        grid = ([min(p.num_leaves, f * p.leaves_to_search) for f in leaf_factors]
                if p.num_leaves else [None])  # None: no tree (below the rule's tree size)
        for leaves in grid:
            for reorder in reorders:
                index.search(queries[:10], 10, leaves_to_search=leaves, reorder=reorder)
                start = time.perf_counter()
                ids = index.search(queries, 10, leaves_to_search=leaves, reorder=reorder).ids
                qps = len(queries) / (time.perf_counter() - start)
                rows.append({"sample": sample, "num_leaves": p.num_leaves, "leaves": leaves,
                             "reorder": reorder, "recall@10": round(overlap_recall(ids, truth,
                                                                                   10), 4),
                             "qps": round(qps, 1), "build_s": round(build, 1)})
                print(f"  sample {sample:>7} L={str(leaves):<4} R={reorder:<4} R@10 "
                      f"{rows[-1]['recall@10']:.3f}  {qps:8.0f} q/s  (build {build:.0f} s)",
                      flush=True)
        del index
        gc.collect()
    return rows


def markdown(results: dict) -> str:
    lines = []
    for corpus, rows in results["corpora"].items():
        lines += [f"**{corpus}** ({results['size']:,} × {results['dim']}, "
                  f"{results['queries']} queries, recall@10 / batched QPS)", "",
                  "| training sample | build s | leaves searched | reorder 100 | reorder 250 "
                  "| reorder 500 |", "|---|---|---|---|---|---|"]
        keys = sorted({(r["sample"], r["leaves"]) for r in rows},
                      key=lambda key: (key[0], key[1] or 0))
        for sample, leaves in keys:
            cells = {r["reorder"]: f"{r['recall@10']:.3f} / {r['qps']:,.0f}" for r in rows
                     if r["sample"] == sample and r["leaves"] == leaves}
            build = next(r["build_s"] for r in rows if r["sample"] == sample)
            lines.append(f"| {sample:,} | {build:.0f} | {leaves} | {cells.get(100, '–')} | "
                         f"{cells.get(250, '–')} | {cells.get(500, '–')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ldot bench scann_rule")
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--corpora", default="isotropic,two_modality")
    parser.add_argument("--samples", default="100000,250000,500000")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--out", default="runs/bench/scann_rule")
    args = parser.parse_args(argv)
    from ldot_jax.bench import vectors
    os.makedirs(args.out, exist_ok=True)
    results = {"size": args.size, "dim": args.dim, "queries": args.queries,
               "machine": f"{os.cpu_count()} CPUs", "corpora": {}}
    for corpus in args.corpora.split(","):
        print(f"{corpus}: {args.size:,} × {args.dim}", flush=True)
        database, queries = vectors.GENERATORS[corpus](args.size, args.dim, args.queries,
                                                       seed=args.size)
        results["corpora"][corpus] = measure(database, queries,
                                             [int(s) for s in args.samples.split(",")])
        del database
        gc.collect()
        fileutil.atomic_write_text(os.path.join(args.out, "scann_rule.json"),
                                   json.dumps(results, indent=1))
        fileutil.atomic_write_text(os.path.join(args.out, "scann_rule.md"), markdown(results))
    print(f"wrote {args.out}/scann_rule.json and scann_rule.md")
    return 0
