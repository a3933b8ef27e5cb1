"""Two-stage speed benchmark: per-query cost of dot product + re-ranking against scoring all
pairs with the cross-encoder, as the corpus grows.

    ldot bench two_stage [--sizes 1000,10000,100000] [--extrapolate 1000000]
        [--preset scenes_small] [--ms 10,20,50,100] [--queries 256] [--out runs/bench/two_stage]

For caption queries (text → image) over a corpus of N images with the `--preset` towers and
its re-ranker (random weights: timing does not depend on them; up to 16 regions per image read
on demand from a generated record source through `rerank.RecordImageStore`, captions in the
16-token bucket, float32), it times on this machine, batched, after warm-up:
  encode     the text tower on a batch of queries (ms per query);
  search     ScaNN over N image vectors (the size rule of index/scann_index.py; ms per query);
  re-rank M  the fixed-shape jitted cross-encoder on each query's M candidates;
  all pairs  the same cross-encoder on every (query, image) pair of a few queries (≥ 4,096
             pairs timed), i.e. N pairs per query.
Speed-up = all-pairs ms / (encode + search + re-rank M) ms. Sizes in `--extrapolate` are not
run: all pairs = N × the largest measured size's ms per pair, search = the largest measured
search time × (N / measured N) (an upper bound: ScaNN's tree search grows like √N), encode
and re-rank unchanged; they are labeled as extrapolated. Each measured size also reports the
process's peak RSS so far, the re-ranker store's resident bytes and the index vectors' size.
Writes two_stage.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

import jax
import numpy as np

from ldot_jax.core import fileutil


REGIONS, TEXT_LEN = 16, 14


def _models(preset: str):
    from ldot_jax.configs import models
    from ldot_jax.checkpoints import pretrained
    from ldot_jax.checkpoints import kinds
    dual_preset = models.get_config(preset)
    cross_preset = models.get_config(preset + "_uniter")
    dual_cfg = kinds.model_config(dual_preset.kind, dual_preset.model)
    cross_cfg = kinds.model_config(cross_preset.kind, cross_preset.model)
    key = jax.random.key(0)
    return ((pretrained.build_model("lightningdot", dual_cfg),
             pretrained.init_params("lightningdot", dual_cfg, key)),
            (pretrained.build_model("uniter_itm", cross_cfg),
             pretrained.init_params("uniter_itm", cross_cfg, key)), dual_cfg)


def _ms(fn, repeat: int = 3) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return 1e3 * (time.perf_counter() - start) / repeat


def run(sizes, extrapolate, preset: str, ms, queries: int) -> dict:
    from ldot_jax.core import parallel
    from ldot_jax.retrieval import rerank
    from ldot_jax.index.scann_index import ScannIndex
    (dual, dual_params), (cross, cross_params), cfg = _models(preset)
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(0)
    ids = rng.integers(5, cfg.text.vocab_size, (queries, TEXT_LEN)).astype(np.int32)
    ids[:, 0], ids[:, -1] = cfg.cls_token_id, 3
    text = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    encode = jax.jit(lambda p, t: dual.apply({"params": p}, t, method=dual.encode_text))
    encode_ms = _ms(lambda: jax.block_until_ready(encode(dual_params, text))) / queries
    rows, largest = [], None
    for n in sizes:
        # The corpus's regions are read on demand (as from a dataset's ArrayRecord source):
        # memory does not grow with N.
        images = rerank.RecordImageStore(GeneratedRecords(n, REGIONS, cfg.region.feat_dim),
                                         REGIONS)
        reranker = rerank.CrossEncoderReranker(cross, cross_params, images, mesh=mesh,
                                               text_buckets=(16,))
        reranker.warmup()
        vectors = rng.normal(size=(n, cfg.project_dim)).astype(np.float32)
        index = ScannIndex(cfg.project_dim)
        index.add(vectors, np.arange(n))
        query_vectors = rng.normal(size=(queries, cfg.project_dim)).astype(np.float32)
        search_ms = _ms(lambda: index.search(query_vectors, max(ms))) / queries
        rerank_ms = {}
        for m in ms:
            cand = rng.integers(0, n, (queries, m))
            rerank_ms[m] = _ms(lambda: reranker("text_to_image", text, cand,
                                                np.zeros(cand.shape, np.float32)), 1) / queries
        few = max(1, -(-4096 // n))  # all pairs of a few queries, ≥ 4,096 pairs
        every = np.tile(np.arange(n), (few, 1))
        pair_ms = _ms(lambda: reranker("text_to_image", {k: v[:few] for k, v in text.items()},
                                       every, np.zeros(every.shape, np.float32)), 1) / every.size
        largest = {"n": n, "search_ms": search_ms, "pair_ms": pair_ms, "rerank_ms": rerank_ms}
        rows.append(_row(n, encode_ms, search_ms, rerank_ms, pair_ms * n, False,
                         f"{every.size:,} pairs timed"))
        rows[-1]["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows[-1]["store_mb"] = images.resident_bytes / 2**20
        rows[-1]["index_mb"] = vectors.nbytes / 2**20
        del index, vectors, images
        print(_line(rows[-1]), flush=True)
    for n in extrapolate:
        scale = n / largest["n"]
        rows.append(_row(n, encode_ms, largest["search_ms"] * scale, largest["rerank_ms"],
                         largest["pair_ms"] * n, True,
                         f"extrapolated from N = {largest['n']:,}"))
        print(_line(rows[-1]), flush=True)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"jax {jax.__version__} {jax.default_backend()}")
    return {"preset": preset, "queries": queries, "regions": REGIONS, "text_len": TEXT_LEN,
            "devices": len(jax.devices()), "machine": machine, "rows": rows}


class GeneratedRecords:
    """A random-access source of `n` synthetic region records, each made from its index when
    read (like a dataset's ArrayRecord source, nothing of the corpus is held in memory):
    1 … `regions` regions of `feat_dim` float16 features, boxes in [0, 1]. Counts its reads."""

    def __init__(self, n: int, regions: int, feat_dim: int):
        self.n, self.regions, self.feat_dim, self.reads = n, regions, feat_dim, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(f"record {i} of {self.n}")
        self.reads += 1
        rng = np.random.default_rng(i)
        count = 1 + i % self.regions
        return {"region_feat": rng.normal(size=(count, self.feat_dim)).astype(np.float16),
                "boxes": rng.uniform(size=(count, 7)).astype(np.float32)}


def _row(n, encode_ms, search_ms, rerank_ms, all_pairs_ms, extrapolated, note):
    dot = encode_ms + search_ms
    return {"images": n, "encode_ms": encode_ms, "search_ms": search_ms,
            "all_pairs_ms": all_pairs_ms, "extrapolated": extrapolated, "note": note,
            "dot_speedup": all_pairs_ms / dot,
            "two_stage_ms": {m: dot + r for m, r in rerank_ms.items()},
            "speedup": {m: all_pairs_ms / (dot + r) for m, r in rerank_ms.items()}}


def _line(row) -> str:
    speed = ", ".join(f"M={m}: {s:,.0f}×" for m, s in row["speedup"].items())
    return (f"N={row['images']:>9,}{' (extrapolated)' if row['extrapolated'] else ''}: "
            f"all pairs {row['all_pairs_ms']:.1f} ms/query; dot {row['dot_speedup']:,.0f}×; "
            f"{speed}")


def markdown(result: dict) -> str:
    ms = list(result["rows"][0]["speedup"])
    lines = ["| images | encode ms | search ms | " + " | ".join(
        f"+ re-rank {m} ms" for m in ms) + " | all pairs ms | dot speed-up | " + " | ".join(
        f"speed-up M={m}" for m in ms) + " | |", "|" + "---|" * (5 + 2 * len(ms) + 1)]
    for r in result["rows"]:
        lines.append(f"| {r['images']:,} | {r['encode_ms']:.3f} | {r['search_ms']:.3f} | "
                     + " | ".join(f"{r['two_stage_ms'][m]:.2f}" for m in ms)
                     + f" | {r['all_pairs_ms']:,.1f} | {r['dot_speedup']:,.0f}× | "
                     + " | ".join(f"{r['speedup'][m]:,.0f}×" for m in ms)
                     + f" | {r['note']} |")
    measured = [r for r in result["rows"] if "peak_rss_mb" in r]
    if measured:
        lines += ["", "| images | peak RSS MB | re-ranker store MB | index vectors MB |",
                  "|---|---|---|---|"]
        lines += [f"| {r['images']:,} | {r['peak_rss_mb']:,.0f} | {r['store_mb']:.1f} | "
                  f"{r['index_mb']:.1f} |" for r in measured]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    rows = result["rows"]
    xs = [r["images"] for r in rows]
    ax.plot(xs, [r["dot_speedup"] for r in rows], marker="o", label="dot product only")
    for m in rows[0]["speedup"]:
        ax.plot(xs, [r["speedup"][m] for r in rows], marker="s", label=f"+ re-rank top {m}")
    ax.axhline(100, color="gray", linestyle=":", label="100×")
    measured = [r["images"] for r in rows if not r["extrapolated"]]
    ax.axvspan(max(measured), max(xs) * 1.5, color="0.92", label="extrapolated")
    ax.set(xscale="log", yscale="log", xlabel="images in the corpus",
           ylabel="speed-up per caption query vs all pairs",
           title="Two-stage retrieval vs scoring all pairs with the cross-encoder")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ldot bench two_stage",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--extrapolate", default="1000000")
    parser.add_argument("--preset", default="scenes_small")
    parser.add_argument("--ms", default="10,20,50,100")
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--out", default="runs/bench/two_stage")
    args = parser.parse_args(argv)
    ints = lambda s: tuple(int(x) for x in s.split(",") if x)
    result = run(ints(args.sizes), ints(args.extrapolate), args.preset, ints(args.ms),
                 args.queries)
    os.makedirs(args.out, exist_ok=True)
    fileutil.atomic_write_text(os.path.join(args.out, "two_stage.json"),
                               json.dumps(result, indent=1))
    fileutil.atomic_write_text(os.path.join(args.out, "two_stage.md"), markdown(result) + "\n")
    plot(result, os.path.join(args.out, "two_stage.png"))
    print(markdown(result))
    return 0
