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
import logging
import time
from typing import Sequence

import jax
import numpy as np
import tqdm

from ldot_jax.checkpoints import pretrained
from ldot_jax.core import parallel, paths
from ldot_jax.core import workdir as workdir_lib
from ldot_jax.data import pipeline
from ldot_jax.data.batching import prefix_mask
from ldot_jax.evaluation import ranked_lists, recall
from ldot_jax.evaluation import report as report_lib
from ldot_jax.index import backends
from ldot_jax.index import base as index_base
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
# The pieces of an evaluation


@dataclasses.dataclass
class Split:
    """A split ready to evaluate: every image's and caption's dual vectors, the re-ranker's
    stores, and the ground truth (caption_image i64[T])."""

    image_vectors: np.ndarray
    text_vectors: np.ndarray
    caption_image: np.ndarray
    # Read on demand: memory does not grow with the split. None: the records have no regions.
    images: rerank.RecordImageStore | None
    captions: rerank.CaptionStore
    encode_ms: dict[str, float]  # per query, batched: {"text", "image"}
    # bool[T, N]: caption t true of image n, where the data can tell (the scenes): adds the
    # caption-true recall (ct_*) to every row.
    truth: np.ndarray | None = None
    records: Sequence[dict] | None = None  # the split's records (a patch re-ranker's pixels)

    def image_store(self, cross, cross_params):
        """The image side re-ranker `cross` (a CrossEncoder, its params) reads: its own
        patches of the records' pictures (PatchImageStore) or the records' regions."""
        if cross.config.image_tower == "vit":
            return rerank.PatchImageStore(self.records, cross, cross_params)
        if self.images is None:
            raise ValueError("a region re-ranker needs records with regions; this split's "
                             "records have none (pictures only: train a patch re-ranker)")
        return self.images


def _timed_encode(model, params, batch, side: str, mesh, repeat: int = 5) -> float:
    """ms per row of one evaluation batch through a tower (after a warm-up call)."""
    with jax.set_mesh(mesh):
        inputs = parallel.global_batch(batch[side], mesh)
        jax.block_until_ready(encode.encode_batch(model, params, inputs, side))
        start = time.perf_counter()
        for _ in range(repeat):
            jax.block_until_ready(encode.encode_batch(model, params, inputs, side))
    return 1e3 * (time.perf_counter() - start) / repeat / len(batch["valid"])


def prepare_split(dual, images, captions, config, mesh, progress: bool = False) -> Split:
    """Embeds every image and caption of a split with the dual encoder (model, params
    replicated on `mesh`) and builds the re-ranker's stores. images: the split's records;
    captions: its captions."""
    model, params = dual
    image_vectors, text_vectors, caption_image = extract.embed_split(
        model, params, images, captions, config, mesh, progress)
    layout = extract.batch_layout(config)
    encode_ms = {
        "image": _timed_encode(model, params, next(iter(pipeline.eval_image_batches(
            images, layout.per_process, layout.image_buckets,
            image_input=layout.image_input))), "image", mesh),
        "text": _timed_encode(model, params, next(iter(pipeline.eval_caption_batches(
            captions, layout.per_process, layout.text_buckets))), "text", mesh)}
    # The region re-ranker's store, when the records have regions (a pixel dual encoder on
    # the scenes can be re-ranked by a region cross-encoder too).
    store = (rerank.RecordImageStore(images, max(layout.image_buckets))
             if "region_feat" in images[0] else None)
    return Split(image_vectors, text_vectors, caption_image, store,
                 rerank.CaptionStore.from_captions(captions), encode_ms, records=images)


def _search(index: VectorIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray,
                                                                      float]:
    """(ids i64[Q, k], scores f32[Q, k], ms per query), batched, after a warm-up query.
    k is capped at the corpus size (a tiny split has fewer than 100 images)."""
    k = min(k, len(index))
    index.search(queries[:1], k)
    start = time.perf_counter()
    hits = index.search(queries, k)
    return hits.ids, hits.scores, 1e3 * (time.perf_counter() - start) / max(len(queries), 1)


def _query_inputs(split: Split, direction: str, rows: np.ndarray,
                  reranker: rerank.CrossEncoderReranker) -> dict[str, np.ndarray]:
    """The queries' input pytree: captions' text input, or images' image input as the
    re-ranker reads them (its image store)."""
    if direction == "text_to_image":
        return {"input_ids": split.captions.input_ids[rows],
                "attention_mask": prefix_mask(split.captions.lengths[rows],
                                              split.captions.input_ids.shape[1])}
    return reranker.images.rows(rows)


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
        inputs = _query_inputs(split, direction, queries[rows], reranker)
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
    inputs = _query_inputs(split, "text_to_image", rows, reranker)
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


def _row(split: Split, queries: dict[str, np.ndarray], stage: str, m: int | None,
         ir_ids: np.ndarray, tr_ids: np.ndarray, ms_t2i: float, ms_i2t: float) -> dict:
    """One row of the report: the recall of the ranked lists of the caption queries
    (ir_ids i64[Q, k], image ids) and of the image queries (tr_ids i64[N, k], caption ids),
    and the stage's ms per query. queries: {"t2i": caption rows i64[Q], "i2t": image rows
    i64[N]} of the split."""
    ir = ranked_lists.list_ranks_text_to_image(ir_ids, split.caption_image[queries["t2i"]])
    tr = ranked_lists.list_ranks_image_to_text(tr_ids, queries["i2t"], split.caption_image)
    metrics = ranked_lists.metrics_from_ranks(ir, tr, min(ir_ids.shape[1], tr_ids.shape[1]))
    if split.truth is not None:
        metrics.update(recall.caption_true_metrics(*ranked_lists.caption_true_list_ranks(
            ir_ids, queries["t2i"], tr_ids, queries["i2t"], split.truth)))
    return {"stage": stage, "m": m, "metrics": metrics, "ms": {"t2i": ms_t2i, "i2t": ms_i2t}}


def _reranked_rows(reranker: rerank.CrossEncoderReranker, split: Split,
                   queries: dict[str, np.ndarray], lists: dict[str, tuple], dot_ms: dict,
                   ms: Sequence[int], alpha: float | None, progress: bool,
                   ) -> tuple[list[dict], dict[str, float]]:
    """The "+ re-rank" rows at each M (and the "+ fused α" rows when alpha is set), and the
    re-ranker's ms per pair {t2i, i2t}.

    lists: the dot stage's {"t2i" | "i2t": (ids i64[Q, k], dot f32[Q, k])}; the re-ranker
    scores the first max(ms) of each list once, every M re-orders a prefix of them. dot_ms:
    the dot stage's ms per query {t2i, i2t}, to which a row adds the time of M pairs.
    """
    top = max(ms)
    cross, pair_ms = {}, {}
    for d, direction in (("t2i", "text_to_image"), ("i2t", "image_to_text")):
        ids, dot = lists[d]
        cross[d], pair_ms[d] = cross_scores(reranker, split, direction, queries[d],
                                            ids[:, :top], dot[:, :top],
                                            desc=f"re-rank {d}" if progress else None)
    rows = []
    for fused in (None, alpha) if alpha is not None else (None,):
        stage = "+ re-rank" if fused is None else f"+ fused α={fused:g}"
        for m in ms:
            reordered = {d: ranked_lists.rerank_lists(*lists[d], cross[d], m, fused)
                         for d in lists}
            rows.append(_row(split, queries, stage, m, reordered["t2i"], reordered["i2t"],
                             dot_ms["t2i"] + m * pair_ms["t2i"],
                             dot_ms["i2t"] + m * pair_ms["i2t"]))
    return rows, pair_ms


def evaluate_split(split: Split, reranker: rerank.CrossEncoderReranker | None,
                   indexes: dict[str, VectorIndex], coarse: dict[str, VectorIndex] | None = None,
                   ms: Sequence[int] = MS, max_queries: int | None = None,
                   max_image_queries: int | None = None, alpha: float | None = None,
                   progress: bool = False) -> report_lib.Report:
    """The table: dot stage, coarse-to-fine, + re-rank at each M (and + fused when alpha).

    indexes / coarse: {"image": index of image vectors (IR), "text": of caption vectors (TR)}.
    max_queries / max_image_queries: evaluate a seeded sample of the caption / image queries
    (the corpora stay whole).
    """
    ms = tuple(sorted(ms))
    k = max(max(KS), max(ms) if reranker is not None else 0)
    queries = {"t2i": health.sample_rows(len(split.text_vectors), max_queries),
               "i2t": health.sample_rows(len(split.image_vectors), max_image_queries)}
    text_queries = split.text_vectors[queries["t2i"]]
    image_queries = split.image_vectors[queries["i2t"]]
    enc = split.encode_ms
    ir_ids, ir_dot, ir_ms = _search(indexes["image"], text_queries, k)
    tr_ids, tr_dot, tr_ms = _search(indexes["text"], image_queries, k)
    rows = [_row(split, queries, "dot", None, ir_ids, tr_ids, enc["text"] + ir_ms,
                 enc["image"] + tr_ms)]
    if coarse:
        c_ir, _, c_ir_ms = _search(coarse["image"], text_queries, max(KS))
        c_tr, _, c_tr_ms = _search(coarse["text"], image_queries, max(KS))
        rows.append(_row(split, queries, "coarse-to-fine", None, c_ir, c_tr,
                         enc["text"] + c_ir_ms, enc["image"] + c_tr_ms))
    all_pairs = {}
    if reranker is not None:
        lists = {"t2i": (ir_ids, ir_dot), "i2t": (tr_ids, tr_dot)}
        reranked, pair_ms = _reranked_rows(reranker, split, queries, lists, rows[0]["ms"], ms,
                                           alpha, progress)
        rows += reranked
        all_pairs = all_pairs_ms(reranker, split)
        all_pairs["rerank_ms_per_pair"] = pair_ms
        for r in rows:
            r["speedup"] = {d: all_pairs[d] / r["ms"][d] for d in ("t2i", "i2t")}
    return report_lib.Report(rows, all_pairs, {d: int(len(q)) for d, q in queries.items()},
                             {"images": int(len(split.image_vectors)),
                              "captions": int(len(split.text_vectors))}, alpha)


def rerank_recall(dual, cross, images, captions, config, mesh, top: int = 20,
                  progress: bool = False) -> dict[str, float]:
    """Recall after the cross-encoder (model, params) re-ranks the exact dot-product top `top`
    of the dual encoder (model, params): the cross-encoder's evaluation during training."""
    split = prepare_split(dual, images, captions, config, mesh, progress)
    reranker = rerank.CrossEncoderReranker(
        cross[0], cross[1], split.image_store(*cross), split.captions, mesh=mesh,
        text_buckets=tuple(config.pipeline.text_buckets))
    indexes = {}
    for side, vectors in (("image", split.image_vectors), ("text", split.text_vectors)):
        indexes[side] = ExactIndex(vectors.shape[1])
        indexes[side].add(vectors, np.arange(len(vectors)))
    report = evaluate_split(split, reranker, indexes, None, (top,), progress=progress)
    return {f"{k}": v for k, v in report.rows[-1]["metrics"].items()}


# ---------------------------------------------------------------------------------------------
# From a training workdir


def _open_split(config, dataset, split: str):
    return dataset.split(split), extract.eval_captions(
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
        saved = paths.join(workdir_lib.index_dir(workdir, split_name), side)
        if backend == options["backend"] and index_base.is_index_dir(saved):
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


def _load_dual(workdir: str, mesh) -> tuple[tuple, str]:
    """((model, params replicated on `mesh`), model fingerprint) of <workdir>/model."""
    loaded = pretrained.load_pretrained(workdir_lib.model_dir(workdir))
    dual = (pretrained.build_model(loaded.kind, loaded.config),
            parallel.replicate(jax.device_get(loaded.params), mesh))
    return dual, pretrained.fingerprint(loaded.kind, loaded.config, loaded.params)


def _reranker_factory(reranker_dir: str, config, mesh, pairs_per_batch: int):
    """Split → a CrossEncoderReranker over that split's stores (the cross-encoder at
    reranker_dir is loaded once, here)."""
    cross, cross_params = pretrained.load_cross_encoder(reranker_dir)

    def make(split: Split) -> rerank.CrossEncoderReranker:
        return rerank.CrossEncoderReranker(
            cross, cross_params, split.image_store(cross, cross_params), split.captions,
            mesh=mesh,
            pairs_per_batch=pairs_per_batch, text_buckets=tuple(config.pipeline.text_buckets))
    return make


def _choose_alpha(make_reranker, val: Split, val_index: VectorIndex, split_name: str,
                  num_queries: int, m: int) -> tuple[float, dict]:
    """(α, the record of its choice for the report): the fusion weight with the best IR R@1
    when the exact top m of `num_queries` sampled captions of the split `val` are re-ranked.
    val_index: the exact index of val's image vectors."""
    rows = health.sample_rows(len(val.text_vectors), num_queries)
    ids, dots, _ = _search(val_index, val.text_vectors[rows], m)
    scores, _ = cross_scores(make_reranker(val), val, "text_to_image", rows, ids, dots)
    alpha, by_alpha = rerank.choose_alpha(dots, scores, ids == val.caption_image[rows][:, None])
    choice = {"split": split_name, "queries": int(len(rows)), "m": int(m),
              "ir_r1": {f"{a:g}": round(float(r), 2) for a, r in by_alpha.items()}}
    log.info("α on %s (IR R@1 at M=%d, %d queries): %s → α=%g", split_name, m, len(rows),
             choice["ir_r1"], alpha)
    return alpha, choice


def evaluate_workdir(workdir: str, reranker_dir: str | None = None, split: str = "test",
                     ms: Sequence[int] = MS, max_queries: int | None = None,
                     max_image_queries: int | None = None, alpha_split: str | None = None,
                     alpha_queries: int = 500, backend: str | None = None,
                     pairs_per_batch: int = 256, out_dir: str | None = None,
                     progress: bool = True) -> tuple[report_lib.Report, dict[str, str]]:
    """Evaluates a training run's dual encoder (<workdir>/model, its saved indexes when
    present) with the re-ranker at `reranker_dir`, writes report.{json,md} and the plot to
    out_dir (default <workdir>/eval/<split>) and returns (report, paths).

    alpha_split: also report `α·dot + cross`, α chosen on that split (IR R@1 of
    `alpha_queries` captions at M = min(ms)); backend: the dot stage's index (default: the
    run's index.backend).
    """
    workdir = paths.absolute(workdir)
    config = workdir_lib.load_config(workdir)
    mesh = parallel.make_mesh()
    dual, fingerprint = _load_dual(workdir, mesh)
    dataset = index_build.open_dataset(config)
    data = prepare_split(dual, *_open_split(config, dataset, split), config, mesh, progress)
    data.truth = dataset.caption_truth(split)
    dot, coarse = _indexes(workdir, data, split, config, fingerprint, backend)
    reranker, alpha, alpha_choice = None, None, None
    if reranker_dir:
        make_reranker = _reranker_factory(reranker_dir, config, mesh, pairs_per_batch)
        reranker = make_reranker(data)
        reranker.warmup()
        if alpha_split:
            val = prepare_split(dual, *_open_split(config, dataset, alpha_split), config, mesh)
            val_dot, _ = _indexes(workdir, val, alpha_split, config, fingerprint, "exact")
            alpha, alpha_choice = _choose_alpha(make_reranker, val, val_dot["image"],
                                                alpha_split, alpha_queries, min(ms))
    report = evaluate_split(data, reranker, dot, coarse, ms, max_queries, max_image_queries,
                            alpha, progress)
    report = dataclasses.replace(report, alpha_choice=alpha_choice)
    written = report_lib.write(report, out_dir or paths.join(workdir, "eval", split)) \
        if jax.process_index() == 0 else {}
    return report, written
