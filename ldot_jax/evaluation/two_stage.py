"""Two-stage evaluation: dot product (+ coarse-to-fine), then cross-encoder re-ranking.

For a split, with LightningDOT's definitions (recall.py): IR per caption (its image in the
top K), TR per image (any of its captions in the top K), R@1/5/10 and AR, in percent, for
  dot            the index over the other side (ScaNN by default), top max(M, 10);
  coarse-to-fine HiVLP: the `d_low`-dim prefix searched, `candidates` re-scored at full dim;
  + re-rank M    the cross-encoder re-scores each query's top M dot results (M ∈ {10, 20, 50,
                 100}); the re-ranked M come first, the rest keep their dot order;
  + fused M      `α·dot + cross` instead (α chosen on validation data, rerank.choose_alpha).
The cross-encoder only ever sees Q × M pairs, streamed in query chunks; the full
#captions × #images matrix is never formed for it.

Latency is per query, batched, each stage timed on its own after warm-up: encode (a batch of
queries through its tower), search (the index), re-rank (M pairs per query at the measured
pair rate of the fixed-shape re-ranker). The all-pairs cross-encoder baseline scores the whole
corpus for each query; it is timed on a subset of queries (every pair of theirs) and
extrapolated to the split, and labeled so. Speed-up = all-pairs ms / stage ms.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Sequence

import jax
import numpy as np
import tqdm

from ldot_jax.checkpoints import pretrained
from ldot_jax.core import fileutil, parallel
from ldot_jax.core import workdir as workdir_lib
from ldot_jax.data import pipeline
from ldot_jax.data.batching import prefix_mask
from ldot_jax.evaluation import recall
from ldot_jax.index import backends
from ldot_jax.index import health
from ldot_jax.index.base import VectorIndex
from ldot_jax.index.exact import ExactIndex
from ldot_jax.retrieval import encode
from ldot_jax.retrieval import extract, rerank
from ldot_jax.retrieval import index_build

log = logging.getLogger(__name__)

KS = recall.KS
MS = (10, 20, 50, 100)


# ---------------------------------------------------------------------------------------------
# Recall from ranked lists


def first_hit(hits: np.ndarray) -> np.ndarray:
    """bool[Q, k] (True where the listed item is a positive) → i64[Q]: the 0-based position
    of the first positive, k if none is listed."""
    hits = np.asarray(hits, bool)
    k = hits.shape[1]
    return np.where(hits.any(axis=1), np.argmax(hits, axis=1), k).astype(np.int64)


def text_to_image_ranks(ids: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """IR: ids i64[Q, k] ranked image ids per caption query (-1: empty), caption_image
    i64[Q] each query's image → i64[Q] rank of its image (k: not listed)."""
    return first_hit(ids == np.asarray(caption_image)[:, None])


def image_to_text_ranks(ids: np.ndarray, image: np.ndarray,
                        caption_image: np.ndarray) -> np.ndarray:
    """TR: ids i64[N, k] ranked caption ids per image query (-1: empty), image i64[N] the
    query images, caption_image i64[T] every caption's image → i64[N] the rank of the first
    caption of the query's image (k: none listed)."""
    ids = np.asarray(ids)
    owners = np.where(ids >= 0, np.asarray(caption_image)[np.maximum(ids, 0)], -1)
    return first_hit(owners == np.asarray(image)[:, None])


def metrics_from_ranks(ir: np.ndarray, tr: np.ndarray, list_length: int,
                       ks: Sequence[int] = KS) -> dict[str, float]:
    """{"ir_r1", …, "tr_r10", "ar"} in percent from ranks within lists of `list_length`."""
    if max(ks) > list_length:
        raise ValueError(f"recall@{max(ks)} needs ranked lists of ≥ {max(ks)} items, got "
                         f"{list_length}")
    out = {f"ir_r{k}": v for k, v in recall.recall_at_k(ir, ks).items()}
    out.update({f"tr_r{k}": v for k, v in recall.recall_at_k(tr, ks).items()})
    out["ar"] = float(np.mean([out[f"{d}_r{k}"] for d in ("ir", "tr") for k in ks]))
    return out


def rerank_lists(ids: np.ndarray, dot: np.ndarray, cross: np.ndarray, m: int,
                 alpha: float | None = None) -> np.ndarray:
    """ids i64[Q, k] in dot order, dot f32[Q, k], cross f32[Q, ≥m] the re-ranker's scores of
    the first m → i64[Q, k]: the first m re-ordered by `rerank.fuse(dot, cross, alpha)`
    (ties keep dot order; -1 ids last), the rest unchanged."""
    head = rerank.fuse(dot[:, :m], cross[:, :m], alpha)
    head = np.where(ids[:, :m] >= 0, head, -np.inf)
    order = np.argsort(-head, axis=1, kind="stable")
    return np.concatenate([np.take_along_axis(ids[:, :m], order, 1), ids[:, m:]], axis=1)


# ---------------------------------------------------------------------------------------------
# The pieces of an evaluation


@dataclasses.dataclass
class Split:
    """A split ready to evaluate: every image's and caption's dual vectors, the re-ranker's
    stores, and the ground truth (caption_image i64[T])."""

    image_vectors: np.ndarray
    text_vectors: np.ndarray
    caption_image: np.ndarray
    images: rerank.ImageStore
    captions: rerank.CaptionStore
    encode_ms: dict[str, float]  # per query, batched: {"text", "image"}


def _timed_encode(model, params, batch, side: str, mesh, repeat: int = 5) -> float:
    """ms per row of one evaluation batch through a tower (after a warm-up call)."""
    with jax.set_mesh(mesh):
        inputs = parallel.global_batch({k: batch[k] for k in (
            "input_ids", "attention_mask", "region_feat", "boxes", "region_mask")}, mesh)
        jax.block_until_ready(encode.encode_batch(model, params, inputs, side))
        start = time.perf_counter()
        for _ in range(repeat):
            jax.block_until_ready(encode.encode_batch(model, params, inputs, side))
    return 1e3 * (time.perf_counter() - start) / repeat / len(batch["valid"])


def prepare_split(dual, images, caption_index, config, mesh, progress: bool = False) -> Split:
    """Embeds every image and caption of a split with the dual encoder (model, params
    replicated on `mesh`) and builds the re-ranker's stores. images: the split's records;
    caption_index: its captions."""
    model, params = dual
    image_vectors, text_vectors, caption_image = extract.embed_split(
        model, params, images, caption_index, config, mesh, progress)
    per_process, text_buckets, region_buckets = extract.batch_layout(config)
    encode_ms = {
        "image": _timed_encode(model, params, next(iter(pipeline.eval_image_batches(
            images, per_process, region_buckets))), "image", mesh),
        "text": _timed_encode(model, params, next(iter(pipeline.eval_caption_batches(
            caption_index, per_process, text_buckets))), "text", mesh)}
    return Split(image_vectors, text_vectors, caption_image,
                 rerank.ImageStore.from_records(images, max(region_buckets)),
                 rerank.CaptionStore.from_index(caption_index), encode_ms)


def _search(index: VectorIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray,
                                                                      float]:
    """(ids i64[Q, k], scores f32[Q, k], ms per query), batched, after a warm-up query.
    k is capped at the corpus size (a tiny split has fewer than 100 images)."""
    k = min(k, len(index))
    index.search(queries[:1], k)
    start = time.perf_counter()
    hits = index.search(queries, k)
    return hits.ids, hits.scores, 1e3 * (time.perf_counter() - start) / max(len(queries), 1)


def _query_inputs(split: Split, direction: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    if direction == "text_to_image":
        return {"input_ids": split.captions.input_ids[rows],
                "attention_mask": prefix_mask(split.captions.lengths[rows],
                                              split.captions.input_ids.shape[1])}
    return {"region_feat": split.images.region_feat[rows], "boxes": split.images.boxes[rows],
            "region_mask": split.images.region_mask[rows]}


def cross_scores(reranker: rerank.CrossEncoderReranker, split: Split, direction: str,
                 queries: np.ndarray, ids: np.ndarray, dot: np.ndarray, chunk: int = 64,
                 desc: str | None = None) -> tuple[np.ndarray, float]:
    """The re-ranker's scores f32[Q, M] of each query's candidates ids i64[Q, M], streamed in
    chunks of `chunk` queries, and the ms per scored pair."""
    out = np.empty(ids.shape, np.float32)
    pairs, elapsed = 0, 0.0
    for start in tqdm.tqdm(range(0, len(queries), chunk), desc=desc, disable=desc is None,
                           leave=False, unit="chunk"):
        rows = slice(start, start + chunk)
        inputs = _query_inputs(split, direction, queries[rows])
        t0 = time.perf_counter()
        out[rows] = reranker(direction, inputs, ids[rows], dot[rows])
        elapsed += time.perf_counter() - t0
        pairs += int(np.sum(ids[rows] >= 0))
    return out, 1e3 * elapsed / max(pairs, 1)


def all_pairs_ms(reranker: rerank.CrossEncoderReranker, split: Split,
                 target_pairs: int = 4096) -> dict:
    """The all-pairs baseline, timed on a subset: the first few caption queries against every
    image (≈ target_pairs pairs), ms per pair, extrapolated to ms per query per direction."""
    num_images, num_captions = len(split.image_vectors), len(split.text_vectors)
    queries = max(1, min(num_captions, target_pairs // num_images))
    rows = np.arange(queries)
    ids = np.tile(np.arange(num_images, dtype=np.int64), (queries, 1))
    inputs = _query_inputs(split, "text_to_image", rows)
    reranker("text_to_image", {k: v[:1] for k, v in inputs.items()}, ids[:1, :8],
             np.zeros((1, 8), np.float32))  # warm-up
    start = time.perf_counter()
    reranker("text_to_image", inputs, ids, np.zeros(ids.shape, np.float32))
    ms_pair = 1e3 * (time.perf_counter() - start) / ids.size
    return {"ms_per_pair": ms_pair, "timed_pairs": int(ids.size), "timed_queries": queries,
            "t2i": ms_pair * num_images, "i2t": ms_pair * num_captions,
            "label": f"extrapolated from {ids.size:,} timed pairs ({queries} caption queries × "
                     f"{num_images:,} images)"}


# ---------------------------------------------------------------------------------------------
# The evaluation


@dataclasses.dataclass
class Report:
    """rows: one per stage {stage, m, metrics, ms {t2i, i2t}, speedup {t2i, i2t}};
    all_pairs: the baseline's timing; queries {t2i, i2t}: how many were evaluated;
    alpha_choice: how α was chosen {split, queries, m, ir_r1: {α: IR R@1}} (None: not)."""

    rows: list[dict]
    all_pairs: dict
    queries: dict
    corpus: dict
    alpha: float | None = None
    alpha_choice: dict | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, default=float)


def evaluate_split(split: Split, reranker: rerank.CrossEncoderReranker | None,
                   indexes: dict[str, VectorIndex], coarse: dict[str, VectorIndex] | None = None,
                   ms: Sequence[int] = MS, max_queries: int | None = None,
                   max_image_queries: int | None = None, alpha: float | None = None,
                   progress: bool = False) -> Report:
    """The table: dot stage, coarse-to-fine, + re-rank at each M (and + fused when alpha).

    indexes / coarse: {"image": index of image vectors (IR), "text": of caption vectors (TR)}.
    max_queries / max_image_queries: evaluate a seeded sample of the caption / image queries
    (the corpora stay whole).
    """
    ms = tuple(sorted(ms))
    k = max(max(KS), max(ms) if reranker is not None else 0)
    t2i_q = health.sample_rows(len(split.text_vectors), max_queries)
    i2t_q = health.sample_rows(len(split.image_vectors), max_image_queries)
    truth = split.caption_image[t2i_q]
    caption_image = split.caption_image

    def row(stage, m, ir_ids, tr_ids, ms_t2i, ms_i2t):
        ir = text_to_image_ranks(ir_ids, truth)
        tr = image_to_text_ranks(tr_ids, i2t_q, caption_image)
        return {"stage": stage, "m": m,
                "metrics": metrics_from_ranks(ir, tr, min(ir_ids.shape[1], tr_ids.shape[1])),
                "ms": {"t2i": ms_t2i, "i2t": ms_i2t}}

    enc = split.encode_ms
    ir_ids, ir_dot, ir_ms = _search(indexes["image"], split.text_vectors[t2i_q], k)
    tr_ids, tr_dot, tr_ms = _search(indexes["text"], split.image_vectors[i2t_q], k)
    rows = [row("dot", None, ir_ids, tr_ids, enc["text"] + ir_ms, enc["image"] + tr_ms)]
    if coarse:
        c_ir, _, c_ir_ms = _search(coarse["image"], split.text_vectors[t2i_q], max(KS))
        c_tr, _, c_tr_ms = _search(coarse["text"], split.image_vectors[i2t_q], max(KS))
        rows.append(row("coarse-to-fine", None, c_ir, c_tr, enc["text"] + c_ir_ms,
                        enc["image"] + c_tr_ms))
    all_pairs = {}
    if reranker is not None:
        top = max(ms)
        ir_cross, ir_pair_ms = cross_scores(reranker, split, "text_to_image", t2i_q,
                                            ir_ids[:, :top], ir_dot[:, :top],
                                            desc="re-rank t2i" if progress else None)
        tr_cross, tr_pair_ms = cross_scores(reranker, split, "image_to_text", i2t_q,
                                            tr_ids[:, :top], tr_dot[:, :top],
                                            desc="re-rank i2t" if progress else None)
        for fused in (None, alpha) if alpha is not None else (None,):
            stage = "+ re-rank" if fused is None else f"+ fused α={fused:g}"
            for m in ms:
                rows.append(row(stage, m, rerank_lists(ir_ids, ir_dot, ir_cross, m, fused),
                                rerank_lists(tr_ids, tr_dot, tr_cross, m, fused),
                                rows[0]["ms"]["t2i"] + m * ir_pair_ms,
                                rows[0]["ms"]["i2t"] + m * tr_pair_ms))
        all_pairs = all_pairs_ms(reranker, split)
        all_pairs["rerank_ms_per_pair"] = {"t2i": ir_pair_ms, "i2t": tr_pair_ms}
        for r in rows:
            r["speedup"] = {d: all_pairs[d] / r["ms"][d] for d in ("t2i", "i2t")}
    return Report(rows, all_pairs, {"t2i": int(len(t2i_q)), "i2t": int(len(i2t_q))},
                  {"images": int(len(split.image_vectors)),
                   "captions": int(len(split.text_vectors))}, alpha)


def rerank_recall(dual, cross, images, caption_index, config, mesh, top: int = 20,
                  progress: bool = False) -> dict[str, float]:
    """Recall after the cross-encoder (model, params) re-ranks the exact dot-product top `top`
    of the dual encoder (model, params): the cross-encoder's evaluation during training."""
    split = prepare_split(dual, images, caption_index, config, mesh, progress)
    reranker = rerank.CrossEncoderReranker(
        cross[0], cross[1], split.images, split.captions, mesh=mesh,
        text_buckets=tuple(config.pipeline.text_buckets))
    indexes = {}
    for side, vectors in (("image", split.image_vectors), ("text", split.text_vectors)):
        indexes[side] = ExactIndex(vectors.shape[1])
        indexes[side].add(vectors, np.arange(len(vectors)))
    report = evaluate_split(split, reranker, indexes, None, (top,), progress=progress)
    return {f"{k}": v for k, v in report.rows[-1]["metrics"].items()}


# ---------------------------------------------------------------------------------------------
# Output


def table(report: Report) -> str:
    """A Markdown table of the report."""
    head = ("| stage | M | IR R@1 | IR R@5 | IR R@10 | TR R@1 | TR R@5 | TR R@10 | AR | "
            "ms/query t→i | ms/query i→t | speed-up t→i | speed-up i→t |")
    lines = [head, "|" + "---|" * 13]
    for r in report.rows:
        m = r["metrics"]
        speed = r.get("speedup", {})
        lines.append("| " + " | ".join([
            r["stage"], str(r["m"] or "–"),
            *(f"{m[f'{d}_r{k}']:.1f}" for d in ("ir", "tr") for k in KS), f"{m['ar']:.1f}",
            f"{r['ms']['t2i']:.3f}", f"{r['ms']['i2t']:.3f}",
            *(f"{speed[d]:,.0f}×" if d in speed else "–" for d in ("t2i", "i2t"))]) + " |")
    if report.all_pairs:
        a = report.all_pairs
        lines.append(f"| all pairs (cross-encoder) | all | | | | | | | | {a['t2i']:.1f} | "
                     f"{a['i2t']:.1f} | 1× | 1× |")
        lines.append("")
        lines.append(f"All pairs: {a['label']}; {a['ms_per_pair']:.4f} ms per pair.")
    lines.append(f"Queries: {report.queries['t2i']:,} captions (IR), {report.queries['i2t']:,} "
                 f"images (TR) over {report.corpus['images']:,} images and "
                 f"{report.corpus['captions']:,} captions.")
    if report.alpha_choice:
        c = report.alpha_choice
        lines.append(f"α of the fused rows chosen on {c['split']} ({c['queries']:,} caption "
                     f"queries, IR R@1 at M={c['m']}): " + ", ".join(
                         f"α={a} {r:.1f}" for a, r in c["ir_r1"].items()) + ".")
    return "\n".join(lines)


def plot(report: Report, path: str) -> str | None:
    """Recall-versus-latency (IR R@1 and AR against ms per caption query, log scale)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install ldot_jax[bench])")
        return None
    # One panel per metric; each stage a series (the re-ranked ones joined over M), so the
    # re-ranker alone and fused are told apart at the same latency.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    stages = list(dict.fromkeys(r["stage"] for r in report.rows))
    markers = dict(zip(stages, "os^Dvp<>"))
    for ax, (metric, name) in zip(axes, (("ir_r1", "IR R@1"), ("ar", "AR"))):
        for stage in stages:
            rows = [r for r in report.rows if r["stage"] == stage]
            xs = [r["ms"]["t2i"] for r in rows]
            ys = [r["metrics"][metric] for r in rows]
            ax.plot(xs, ys, marker=markers[stage], linestyle="-" if len(rows) > 1 else "",
                    label=stage)
            for r, x, y in zip(rows, xs, ys):
                if r["m"] is not None:
                    ax.annotate(f"M={r['m']}", (x, y), textcoords="offset points",
                                xytext=(4, 3), fontsize=7)
        if report.all_pairs:
            ax.axvline(report.all_pairs["t2i"], color="gray", linestyle="--",
                       label="all pairs (extrapolated)")
        ax.set_xscale("log")
        ax.set_xlabel("ms per caption query (batched, CPU)")
        ax.set_ylabel(f"{name} (%)")
        ax.set_title(f"{name} vs latency")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Two-stage retrieval: {report.queries['t2i']:,} caption queries over "
                 f"{report.corpus['images']:,} images")
    fig.tight_layout()
    with fileutil.atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return path


def write(report: Report, out_dir: str) -> dict[str, str]:
    """report.json, report.md and recall_latency.png in out_dir (each written atomically)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "report.json"),
             "md": os.path.join(out_dir, "report.md")}
    fileutil.atomic_write_text(paths["json"], report.to_json())
    fileutil.atomic_write_text(paths["md"], table(report) + "\n")
    picture = plot(report, os.path.join(out_dir, "recall_latency.png"))
    if picture:
        paths["png"] = picture
    return paths


# ---------------------------------------------------------------------------------------------
# From a training workdir


def _open_split(config, dataset, split: str):
    return dataset.split(split), extract.eval_caption_index(
        dataset.caption_table(split), dataset.tokenizer, split, config)


def _indexes(workdir: str, split: Split, split_name: str, config, fingerprint: str,
             backend: str | None) -> tuple[dict, dict]:
    """(the dot-stage indexes, the coarse-to-fine ones): the saved ones of the workdir when
    they exist (the model fingerprint is checked), else built here from the split's vectors."""
    options = backends.index_options(config, split=split_name)
    backend = backend or options["backend"]
    matryoshka = tuple(config.loss.get("matryoshka_dims", ()) or ())
    normalized = bool(config.loss.get("normalize", False))
    vectors = {"image": split.image_vectors, "text": split.text_vectors}
    dot, coarse = {}, {}
    for side, v in vectors.items():
        saved = os.path.join(workdir, workdir_lib.INDEX_DIR, split_name, side)
        if backend == options["backend"] and os.path.isfile(os.path.join(saved, "index.json")):
            dot[side] = backends.load_index(saved, fingerprint)
            log.info("dot stage (%s): the saved index %s", side, saved)
        else:
            dot[side] = backends.make_index(backend, v.shape[1], options, matryoshka,
                                               normalized)
            dot[side].add(v, np.arange(len(v)))
        if matryoshka:
            coarse[side] = backends.make_index("hierarchical", v.shape[1], options,
                                                  matryoshka, normalized)
            coarse[side].add(v, np.arange(len(v)))
    if not matryoshka:
        log.warning("no coarse-to-fine row: the towers were not trained with loss."
                    "matryoshka_dims")
    return dot, coarse


def evaluate_workdir(workdir: str, reranker_dir: str | None = None, split: str = "test",
                     ms: Sequence[int] = MS, max_queries: int | None = None,
                     max_image_queries: int | None = None, alpha_split: str | None = None,
                     alpha_queries: int = 500, backend: str | None = None,
                     pairs_per_batch: int = 256, out_dir: str | None = None,
                     progress: bool = True) -> tuple[Report, dict[str, str]]:
    """Evaluates a training run's dual encoder (<workdir>/model, its saved indexes when
    present) with the re-ranker at `reranker_dir`, writes report.{json,md} and the plot to
    out_dir (default <workdir>/eval/<split>) and returns (report, paths).

    alpha_split: also report `α·dot + cross`, α chosen on that split (IR R@1 of
    `alpha_queries` captions at M = min(ms)); backend: the dot stage's index (default: the
    run's index.backend).
    """
    workdir = os.path.abspath(workdir)
    config = workdir_lib.load_config(workdir)
    mesh = parallel.make_mesh()
    loaded = pretrained.load_pretrained(os.path.join(workdir, workdir_lib.MODEL_DIR))
    dual = (pretrained.build_model(loaded.kind, loaded.config),
            parallel.replicate(jax.device_get(loaded.params), mesh))
    fingerprint = pretrained.fingerprint(loaded.kind, loaded.config, loaded.params)
    dataset = index_build.open_dataset(config)
    data = prepare_split(dual, *_open_split(config, dataset, split), config, mesh, progress)
    dot, coarse = _indexes(workdir, data, split, config, fingerprint, backend)
    reranker, alpha, alpha_choice = None, None, None
    if reranker_dir:
        cross, cross_params = pretrained.load_cross_encoder(reranker_dir)
        make = lambda s: rerank.CrossEncoderReranker(
            cross, cross_params, s.images, s.captions, mesh=mesh,
            pairs_per_batch=pairs_per_batch, text_buckets=tuple(config.pipeline.text_buckets))
        reranker = make(data)
        reranker.warmup()
        if alpha_split:
            val = prepare_split(dual, *_open_split(config, dataset, alpha_split), config, mesh)
            val_dot, _ = _indexes(workdir, val, alpha_split, config, fingerprint, "exact")
            rows = health.sample_rows(len(val.text_vectors), alpha_queries)
            m = min(ms)
            ids, dots, _ = _search(val_dot["image"], val.text_vectors[rows], m)
            scores, _ = cross_scores(make(val), val, "text_to_image", rows, ids, dots)
            alpha, by_alpha = rerank.choose_alpha(dots, scores,
                                                  ids == val.caption_image[rows][:, None])
            alpha_choice = {"split": alpha_split, "queries": int(len(rows)), "m": int(m),
                            "ir_r1": {f"{a:g}": round(float(r), 2)
                                      for a, r in by_alpha.items()}}
            log.info("α on %s (IR R@1 at M=%d, %d queries): %s → α=%g", alpha_split, m,
                     len(rows), alpha_choice["ir_r1"], alpha)
    report = evaluate_split(data, reranker, dot, coarse, ms, max_queries, max_image_queries,
                            alpha, progress)
    report = dataclasses.replace(report, alpha_choice=alpha_choice)
    paths = write(report, out_dir or os.path.join(workdir, "eval", split)) \
        if jax.process_index() == 0 else {}
    return report, paths
