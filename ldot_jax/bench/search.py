"""Search benchmark: exact, ScaNN and coarse-to-fine (HiVLP) side by side, with FAISS flat and
HNSW when `faiss-cpu` is installed (the `[bench]` extra).

    ldot bench search [--sizes 10000,100000,1000000] [--dim 768] [--d_low 128]
        [--corpora matryoshka,isotropic,two_modality] [--targets 0.9,0.95,0.99]
        [--queries 1000] [--single 200] [--embeddings DIR] [--out runs/bench/search]

Corpora: the synthetic generators of `ldot_jax/bench/vectors.py` (matryoshka: clustered, with
per-dimension variance falling like Matryoshka / PCA-ordered embeddings, queries from a shifted
"other modality"; isotropic: clusters of unit vectors, queries perturbed corpus points;
two_modality: unit vectors of two modalities with a gap between them), or the vectors of an
extraction (`--embeddings <workdir>/embeddings/<split>`: images as the corpus, captions as
queries) for the sizes it can fill. Recall-targeted rows (ScaNN at each of --targets, and
coarse-to-fine at the middle one) are tuned on another set of queries than the measured ones.
For each size it reports, per method: build time, index size, batched QPS (all queries in one call), single-query latency p50 / p99,
and recall@1/10/100 against exact search at full dimension, plus sweeps of ScaNN's
leaves_to_search and the coarse-to-fine candidate count for the recall-versus-latency plot.
Timings are of searches at k = 10 (the first stage's usual depth before re-ranking); recall@100
comes from a separate untimed search at k = 100. Writes <out>/search.json and search.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

from ldot_jax.core import fileutil


K_RECALL = (1, 10, 100)


def _faiss():
    try:
        import faiss
        return faiss
    except ImportError:
        return None


def _dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
               for f in files)


def _timed_search(search, queries: np.ndarray, k: int, single: int) -> dict:
    """Batched QPS (one call with every query) and single-query latencies, all at k = 10;
    the ids of an untimed search at k (for recall@100)."""
    deep = search(queries, k)
    k = min(10, k)
    for warm in (queries[:1], queries):  # warm-up: compilation of both shapes, caches
        search(warm, k)
    start = time.perf_counter()
    ids = search(queries, k)
    batched = time.perf_counter() - start
    latencies = []
    for q in queries[:single]:
        start = time.perf_counter()
        search(q[None], k)
        latencies.append(1000 * (time.perf_counter() - start))
    out = {"ids": ids, "deep_ids": deep, "qps_batched": len(queries) / batched,
           "qps_single": float("nan"), "latency_p50_ms": float("nan"),
           "latency_p99_ms": float("nan")}
    if latencies:
        out.update(qps_single=1000 / float(np.mean(latencies)),
                   latency_p50_ms=float(np.percentile(latencies, 50)),
                   latency_p99_ms=float(np.percentile(latencies, 99)))
    return out


def _recalls(timing: dict, truth: np.ndarray) -> dict:
    """recall@1 and @10 of the timed (k = 10) search, recall@100 of the deep one."""
    from ldot_jax.index.health import overlap_recall
    out = {}
    for k in K_RECALL:
        found = timing["ids"] if k <= timing["ids"].shape[1] else timing["deep_ids"]
        if k <= truth.shape[1]:
            out[f"recall@{k}"] = round(overlap_recall(found, truth, k), 4)
    return out


def _row(method: str, build_s: float, size_bytes: int, timing: dict, truth, extra=None) -> dict:
    row = {"method": method, "build_s": round(build_s, 2), "index_mb": round(size_bytes / 2**20, 1),
           "qps_batched": round(timing["qps_batched"], 1),
           "qps_single": round(timing["qps_single"], 1),
           "latency_p50_ms": round(timing["latency_p50_ms"], 3),
           "latency_p99_ms": round(timing["latency_p99_ms"], 3)}
    row.update(_recalls(timing, truth))
    row.update(extra or {})
    print(f"  {method:<34} build {row['build_s']:>7.1f}s  {row['index_mb']:>7.1f} MB  "
          f"{row['qps_batched']:>9.1f} q/s batched  {row['qps_single']:>8.1f} q/s single  "
          f"p50 {row['latency_p50_ms']:>8.3f} ms  p99 {row['latency_p99_ms']:>8.3f} ms  "
          + "  ".join(f"R@{k} {row.get(f'recall@{k}', float('nan')):.3f}" for k in K_RECALL),
          flush=True)
    return row


def _saved_size(index) -> int:
    tmp = tempfile.mkdtemp()
    try:
        return _dir_size(index.save(os.path.join(tmp, "index")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_size(database: np.ndarray, queries: np.ndarray, d_low: int, single: int,
               sweeps: bool = True, tuning_queries: np.ndarray | None = None,
               targets=(0.9, 0.95, 0.99)) -> list[dict]:
    """The rows of one corpus size: exact search (the ground truth), ScaNN at full and prefix
    dimension, coarse-to-fine, recall-targeted ScaNN / coarse-to-fine (tuned on
    `tuning_queries`), and FAISS flat / HNSW when installed."""
    k = min(max(K_RECALL), len(database))
    rows, truth = _bench_exact(database, queries, k, single)
    for d in (database.shape[1], d_low):
        rows += _bench_scann(database, queries, d, k, single, truth, sweeps)
    rows += _bench_hierarchical(database, queries, d_low, k, single, truth, sweeps)
    if tuning_queries is not None and len(tuning_queries) and targets:
        rows += _bench_targeted(database, queries, tuning_queries, d_low, k, single, truth,
                                targets)
    rows += _bench_faiss(database, queries, k, single, truth)
    return rows


def _bench_targeted(database, queries, tuning_queries, d_low: int, k: int, single: int, truth,
                    targets) -> list[dict]:
    """ScaNN tuned to each recall@10 target, and coarse-to-fine to the middle one (index/
    tuning.py, on the tuning queries; measured on the others). Build time: the tuning's."""
    from ldot_jax.index import ExactIndex, HierarchicalIndex, ScannIndex, tuning
    n, dim = database.shape
    ids = np.arange(n)
    exact = ExactIndex(dim).add(database, ids)
    rows, built = [], {}
    middle = sorted(targets)[len(targets) // 2]
    plans = [("scann", t, lambda o: ScannIndex(dim, **o)) for t in targets]
    plans.append(("coarse-to-fine", middle, lambda o: HierarchicalIndex(dim, d_low, **o)))
    for name, target, make in plans:
        cache = built.setdefault(name, {})
        start = time.perf_counter()
        index, report = tuning.tune(make, database, ids, tuning_queries, target, 10,
                                    tuning.build_ladder(n, {}), exact=exact, built=cache)
        spent = time.perf_counter() - start
        print(f"  tuned {name} to {target}: {report.summary()}", flush=True)
        timing = _timed_search(_index_search(index), queries, k, single)
        c = report.chosen
        rows.append(_row(f"{name} target={target}", spent, 0, timing, truth,
                         {"target": target, "met_on_tuning_queries": report.met,
                          "tuned": {"leaves_to_search": c.leaves_to_search,
                                    report.depth_name: c.depth,
                                    "build_overrides": report.builds[c.build]}}))
    del exact, built
    gc.collect()
    return rows


def _index_search(index):
    return lambda q, kk: index.search(q, kk).ids


def _bench_exact(database, queries, k: int, single: int) -> tuple[list[dict], np.ndarray]:
    """(its row, the exact top-k ids i64[Q, k]: the ground truth of the other rows)."""
    from ldot_jax.index import ExactIndex
    n, dim = database.shape
    exact = ExactIndex(dim).add(database, np.arange(n))
    start = time.perf_counter()
    exact.search(queries[:1], 1)  # the device copy is part of the build
    build = time.perf_counter() - start
    timing = _timed_search(_index_search(exact), queries, k, min(single, 50))
    truth = timing["deep_ids"]
    row = _row(f"exact d={dim}", build, database.nbytes, timing, truth)
    del exact
    gc.collect()
    return [row], truth


def _bench_scann(database, queries, d: int, k: int, single: int, truth,
                 sweeps: bool) -> list[dict]:
    """ScaNN over the first d dimensions with the default rule (and a leaves sweep)."""
    from ldot_jax.index import ScannIndex
    db = np.ascontiguousarray(database[:, :d])
    q = np.ascontiguousarray(queries[:, :d])
    start = time.perf_counter()
    index = ScannIndex(d).add(db, np.arange(len(db)))
    build = time.perf_counter() - start
    p = index.scann_params
    timing = _timed_search(_index_search(index), q, k, single)
    rows = [_row(f"scann d={d}", build, _saved_size(index), timing, truth,
                 {"params": {"num_leaves": p.num_leaves, "leaves_to_search": p.leaves_to_search,
                             "hashing": p.hashing}})]
    if sweeps and p.num_leaves:
        for leaves in sorted({max(1, p.leaves_to_search // 2), p.leaves_to_search * 2,
                              p.leaves_to_search * 4}):
            search = lambda qq, kk, _l=leaves: index.search(qq, kk, leaves_to_search=_l).ids
            t = _timed_search(search, q, k, 0 if leaves != p.leaves_to_search else single)
            rows.append(_row(f"scann d={d} leaves={leaves}", 0, 0, t, truth,
                             {"sweep": "scann", "dim": d}))
    del index
    gc.collect()
    return rows


def _bench_hierarchical(database, queries, d_low: int, k: int, single: int, truth,
                        sweeps: bool) -> list[dict]:
    """Coarse-to-fine: ScaNN on the d_low prefix, 100 candidates re-scored (and a sweep)."""
    from ldot_jax.index import HierarchicalIndex
    dim = database.shape[1]
    start = time.perf_counter()
    hier = HierarchicalIndex(dim, d_low, candidates=100).add(database, np.arange(len(database)))
    build = time.perf_counter() - start
    timing = _timed_search(_index_search(hier), queries, k, single)
    p = hier.scann_params
    rows = [_row(f"coarse-to-fine {d_low}→{dim} c=100", build, _saved_size(hier), timing,
                 truth, {"params": {"num_leaves": p.num_leaves,
                                    "leaves_to_search": p.leaves_to_search,
                                    "hashing": p.hashing, "candidates": 100}})]
    if sweeps:
        for c in (30, 50, 200, 400):
            search = lambda qq, kk, _c=c: hier.search(qq, kk, candidates=_c).ids
            t = _timed_search(search, queries, k, 0)
            rows.append(_row(f"coarse-to-fine {d_low}→{dim} c={c}", 0, 0, t, truth,
                             {"sweep": "coarse-to-fine"}))
    del hier
    gc.collect()
    return rows


def _bench_faiss(database, queries, k: int, single: int, truth) -> list[dict]:
    """FAISS flat and HNSW (M 32, efSearch 64 / 128 / 256) when faiss is installed."""
    faiss = _faiss()
    if faiss is None:
        return []
    dim = database.shape[1]
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    flat.add(database)
    build = time.perf_counter() - start
    timing = _timed_search(lambda q, kk: flat.search(q, kk)[1], queries, k, min(single, 50))
    rows = [_row(f"faiss flat d={dim}", build, database.nbytes, timing, truth)]
    del flat
    start = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 80
    hnsw.add(database)
    build = time.perf_counter() - start
    for ef in (64, 128, 256):
        hnsw.hnsw.efSearch = ef
        timing = _timed_search(lambda q, kk: hnsw.search(q, kk)[1], queries, k,
                               single if ef == 128 else 0)
        rows.append(_row(f"faiss hnsw M=32 ef={ef}", build if ef == 64 else 0, 0, timing,
                         truth, {"sweep": "hnsw"}))
    del hnsw
    gc.collect()
    return rows


def plot(results: dict, path: str) -> None:
    """Recall@10 against batched ms per query: one panel per corpus and size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = list(results["sizes"])
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4.4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        entry = results["sizes"][run]
        rows = entry["rows"]
        groups = {}
        for r in rows:
            name = r["method"].split(" leaves=")[0].split(" c=")[0].split(" ef=")[0]
            name = name.split(" target=")[0] + (" targeted" if "target=" in name else "")
            groups.setdefault(name, []).append(r)
        for name, rs in groups.items():
            rs = sorted(rs, key=lambda r: r.get("recall@10", 0))  # along each sweep
            x = [1000 / r["qps_batched"] for r in rs]
            y = [r.get("recall@10", np.nan) for r in rs]
            ax.plot(x, y, marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("ms per query (batched)")
        ax.set_ylabel("recall@10 vs exact (d=full)")
        ax.set_title(f"{entry.get('corpus', entry['source'])}: {int(entry['size']):,} vectors",
                     fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Search: recall vs latency ({results['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(results: dict) -> str:
    """The results as Markdown tables (one per corpus size), for BENCHMARKS.md."""
    lines = []
    # Sweep rows re-use the index built for the row above them (HNSW: its first row).
    sweep = lambda r: ("leaves=" in r["method"] or ("c=" in r["method"]
                                                    and "c=100" not in r["method"])
                       or ("ef=" in r["method"] and "ef=64" not in r["method"]))
    fmt = lambda v, spec: "–" if v is None or (isinstance(v, float) and np.isnan(v)) else \
        format(v, spec)
    for entry in results["sizes"].values():
        lines += [f"**{int(entry['size']):,} vectors** ({entry['source']}, {results['queries']} "
                  f"queries, k = 10)", "",
                  "| method | build s | index MB | QPS batched | QPS single | p50 ms | p99 ms "
                  "| R@1 | R@10 | R@100 |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in entry["rows"]:
            lines.append(
                f"| {r['method']} | {fmt(None if sweep(r) else r['build_s'], '.2f')} | "
                f"{fmt(None if sweep(r) or not r['index_mb'] else r['index_mb'], '.0f')} | {fmt(r['qps_batched'], ',.0f')} | "
                f"{fmt(r['qps_single'], ',.0f')} | {fmt(r['latency_p50_ms'], '.3f')} | "
                f"{fmt(r['latency_p99_ms'], '.3f')} | {fmt(r.get('recall@1'), '.3f')} | "
                f"{fmt(r.get('recall@10'), '.3f')} | {fmt(r.get('recall@100'), '.3f')} |")
        lines.append("")
    return "\n".join(lines)


def _corpus(corpus: str, size: int, dim: int, num_queries: int, embeddings: str | None):
    """(database, measured queries, tuning queries, description)."""
    from ldot_jax.bench import vectors
    if embeddings:
        from ldot_jax.retrieval import extract
        images = extract.read_embeddings(os.path.join(embeddings, "image"))
        captions = extract.read_embeddings(os.path.join(embeddings, "text"))
        if len(images.vectors) < size or len(captions.vectors) < 2 * num_queries:
            raise ValueError(f"{embeddings}: {len(images.vectors):,} image and "
                             f"{len(captions.vectors):,} caption vectors; --sizes {size:,} "
                             f"needs that many images and --queries {num_queries:,} twice "
                             f"as many captions (measured + tuning)")
        return (images.vectors[:size], captions.vectors[:num_queries],
                captions.vectors[num_queries:2 * num_queries], "trained model")
    database, queries = vectors.GENERATORS[corpus](size, dim, 2 * num_queries, seed=size)
    return database, queries[:num_queries], queries[num_queries:], f"{corpus} synthetic"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ldot bench search")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--d_low", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=200, help="single-query timings")
    parser.add_argument("--corpora", default="matryoshka,isotropic,two_modality",
                        help="synthetic generators (ldot_jax/bench/vectors.py GENERATORS)")
    parser.add_argument("--targets", default="0.9,0.95,0.99",
                        help="recall@10 targets of the tuned rows ('' for none)")
    parser.add_argument("--embeddings", help="<workdir>/embeddings/<split> of a trained model "
                                             "(instead of the synthetic corpora)")
    parser.add_argument("--no_sweeps", action="store_true")
    parser.add_argument("--out", default="runs/bench/search")
    args = parser.parse_args(argv)
    import jax
    os.makedirs(args.out, exist_ok=True)
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                          f"{jax.devices()[0].device_kind}, Python {platform.python_version()}",
               "faiss": getattr(_faiss(), "__version__", None), "dim": args.dim,
               "d_low": args.d_low, "queries": args.queries, "sizes": {}}
    from ldot_jax.bench import vectors
    corpora = ["embeddings"] if args.embeddings else args.corpora.split(",")
    unknown = set(corpora) - set(vectors.GENERATORS) - {"embeddings"}
    if unknown:
        parser.error(f"unknown corpora {sorted(unknown)}; known: {sorted(vectors.GENERATORS)}")
    targets = tuple(float(t) for t in args.targets.split(",") if t)
    for corpus in corpora:
        for size in (int(s) for s in args.sizes.split(",")):
            database, queries, tuning_q, source = _corpus(corpus, size, args.dim, args.queries,
                                                          args.embeddings)
            print(f"{size:,} vectors × {database.shape[1]} ({source}), {len(queries)} queries",
                  flush=True)
            rows = bench_size(database, queries, args.d_low, args.single, not args.no_sweeps,
                              tuning_q, targets)
            results["sizes"][f"{corpus}:{size}"] = {"corpus": corpus, "size": size,
                                                    "source": source, "rows": rows}
            del database
            gc.collect()
            _write(results, args.out)
    print(f"wrote {args.out}/search.json, search.md and search.png")
    return 0


def _write(results: dict, out: str) -> None:
    """search.json, search.md and search.png, rewritten after every corpus size."""
    fileutil.atomic_write_text(os.path.join(out, "search.json"),
                               json.dumps(results, indent=1))
    plot(results, os.path.join(out, "search.png"))
    fileutil.atomic_write_text(os.path.join(out, "search.md"), markdown(results))


if __name__ == "__main__":
    sys.exit(main())
