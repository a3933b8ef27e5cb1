"""Retrieval metrics as LightningDOT defines them, and the dot-product evaluation of a split.

IR (text → image): per caption, a hit at K if its image ranks in the top K; R@K = hits /
#captions. TR (image → text): per image, a hit at K if ANY of its captions ranks in the top K;
R@K = hits / #images. AR = the mean of IR and TR at K ∈ {1, 5, 10}. All in percent.
Caption-true recall (where the data can tell which captions are true of which images, as
the scenes can: data/scenes_truth.py): a hit at K when the top K holds any image the caption
is true of (IR) / any caption true of the image (TR); "ct_" + the same names.
Ties are broken by index (a stable sort on −score): the tied item with the smaller index ranks
first, so results never depend on the sort's luck.

Scores are formed block by block (never the whole #captions × #images matrix at once).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ldot_jax.core import numerics


KS = (1, 5, 10)


def _rank_of(scores: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """0-based rank of `positions[i]` within row i of `scores` (f32[n, m]): items scoring
    higher, plus tied items at smaller positions."""
    true = scores[np.arange(len(scores)), positions][:, None]
    index = np.arange(scores.shape[1])[None, :]
    return (np.sum(scores > true, axis=1)
            + np.sum((scores == true) & (index < positions[:, None]), axis=1))


def text_to_image_ranks(text: np.ndarray, image: np.ndarray, caption_image: np.ndarray,
                        block: int = 1024) -> np.ndarray:
    """i64[T]: the rank of each caption's image among all images (text f32[T, D], image
    f32[N, D], caption_image i32[T])."""
    ranks = np.empty(len(text), np.int64)
    for start in range(0, len(text), block):
        stop = start + block
        scores = text[start:stop] @ image.T
        ranks[start:stop] = _rank_of(scores, caption_image[start:stop])
    return ranks


def image_to_text_ranks(text: np.ndarray, image: np.ndarray, caption_image: np.ndarray,
                        block: int = 256) -> np.ndarray:
    """i64[N]: per image, the best rank of any of its captions among all captions (images
    without captions get N·T, never a hit)."""
    num_images = len(image)
    best = np.full(num_images, np.iinfo(np.int64).max, np.int64)
    for start in range(0, num_images, block):
        stop = min(start + block, num_images)
        scores = (text @ image[start:stop].T).T  # [n, T]: each image's row over captions
        owners = np.nonzero((caption_image >= start) & (caption_image < stop))[0]
        if not len(owners):
            continue
        rows = caption_image[owners] - start
        ranks = _rank_of(scores[rows], owners)
        np.minimum.at(best, rows + start, ranks)
    return best


def first_hit(hits: np.ndarray) -> np.ndarray:
    """bool[Q, k] (True where the listed item is a positive) → i64[Q]: the 0-based position
    of the first positive, k if none is listed."""
    hits = np.asarray(hits, bool)
    k = hits.shape[1]
    return np.where(hits.any(axis=1), np.argmax(hits, axis=1), k).astype(np.int64)


def _top_ids(scores: np.ndarray, k: int) -> np.ndarray:
    """i64[n, k]: each row's k best columns, ties to the smaller index (the ranks' rule)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def caption_true_ranks(text: np.ndarray, image: np.ndarray, truth: np.ndarray, k: int,
                       block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(IR i64[T], TR i64[N]): per caption the rank of the first image in its top k that the
    caption is true of, per image the rank of the first caption in its top k true of it (k:
    none). truth: bool[T, N], caption t true of image n (e.g. scenes_truth.truth)."""
    truth = np.asarray(truth, bool)
    if truth.shape != (len(text), len(image)):
        raise ValueError(f"caption truth of shape {truth.shape}, expected "
                         f"({len(text)}, {len(image)}) (captions, images)")
    ir = np.empty(len(text), np.int64)
    for start in range(0, len(text), block):
        ids = _top_ids(text[start:start + block] @ image.T, k)
        rows = np.arange(start, start + len(ids))[:, None]
        ir[start:start + len(ids)] = first_hit(truth[rows, ids])
    tr = np.empty(len(image), np.int64)
    for start in range(0, len(image), block):
        ids = _top_ids(image[start:start + block] @ text.T, k)
        columns = np.arange(start, start + len(ids))[:, None]
        tr[start:start + len(ids)] = first_hit(truth[ids, columns])
    return ir, tr


def caption_true_metrics(ir: np.ndarray, tr: np.ndarray,
                         ks: Sequence[int] = KS) -> dict[str, float]:
    """{"ct_ir_r1", …, "ct_tr_r10", "ct_ar"} in percent: caption-true recall, a hit at K when
    the top K holds an image the caption is true of (IR) / a caption true of the image (TR),
    from the ranks of `caption_true_ranks` (or of ranked lists)."""
    out = {f"ct_ir_r{k}": v for k, v in recall_at_k(ir, ks).items()}
    out.update({f"ct_tr_r{k}": v for k, v in recall_at_k(tr, ks).items()})
    out["ct_ar"] = float(np.mean([out[f"ct_{d}_r{k}"] for d in ("ir", "tr") for k in ks]))
    return out


def caption_true_by_kind(ir: np.ndarray, kinds: np.ndarray, names: Sequence[str],
                         ks: Sequence[int] = KS) -> dict[str, float]:
    """{"ct_ir_r{K}_{kind}": percent} for every kind in `names` that some caption has: the
    caption-true IR recall of the captions of each kind (e.g. scenes_truth.kinds), from the
    IR ranks of `caption_true_ranks`; ir i64[T], kinds[T]. Shows what a model fails at (a
    pixel tower that knows colours but not shapes is strong on counts of colours, weak on
    single named objects)."""
    ir, kinds = np.asarray(ir), np.asarray(kinds)
    if ir.shape != kinds.shape:
        raise ValueError(f"{len(kinds)} caption kinds for {len(ir)} caption ranks")
    unknown = sorted(set(kinds.tolist()) - set(names))
    if unknown:
        raise ValueError(f"caption kinds {unknown} are not among {list(names)}")
    out = {}
    for name in names:
        chosen = kinds == name
        if chosen.any():
            out.update({f"ct_ir_r{k}_{name}": v for k, v in recall_at_k(ir[chosen], ks).items()})
    return out


def recall_at_k(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[int, float]:
    """{K: percent of ranks < K}."""
    return {k: 100.0 * float(np.mean(ranks < k)) for k in ks}


def retrieval_metrics(text: np.ndarray, image: np.ndarray, caption_image: np.ndarray,
                      ks: Sequence[int] = KS, truth: np.ndarray | None = None,
                      kinds: np.ndarray | None = None, kind_names: Sequence[str] = (),
                      ) -> dict[str, float]:
    """{"ir_r1", "ir_r5", "ir_r10", "tr_r1", …, "ar"} in percent, from the embeddings of every
    caption (f32[T, D]) and every image (f32[N, D]) of a split; caption_image i32[T] ∈ [0, N).
    With truth (bool[T, N], which captions are true of which images) also the caption-true
    recall ("ct_ir_r1", …, "ct_ar"; caption_true_metrics), and with kinds (str[T], each
    caption's, among kind_names) its IR R@1 per kind ("ct_ir_r1_<kind>";
    caption_true_by_kind)."""
    text = np.asarray(text, np.float32)
    image = np.asarray(image, np.float32)
    caption_image = np.asarray(caption_image)
    if text.shape[1] != image.shape[1]:
        raise ValueError(f"text vectors have dim {text.shape[1]}, image vectors {image.shape[1]}")
    if len(caption_image) != len(text):
        raise ValueError(f"{len(caption_image)} caption→image ids for {len(text)} captions")
    if len(caption_image) and (caption_image.min() < 0 or caption_image.max() >= len(image)):
        raise ValueError(f"caption→image ids outside [0, {len(image)})")
    # A NaN vector would rank first (or last) everywhere and give a good-looking recall.
    numerics.check_finite(text, "text vectors (caption, dim)")
    numerics.check_finite(image, "image vectors (image, dim)")
    if kinds is not None and truth is None:
        # Per-kind recall is caption-true recall: without truth there is none to split.
        raise ValueError("retrieval_metrics: kinds given without truth (the per-kind recall "
                         "is caption-true recall, which needs truth bool[T, N])")
    ir = recall_at_k(text_to_image_ranks(text, image, caption_image), ks)
    tr = recall_at_k(image_to_text_ranks(text, image, caption_image), ks)
    out = {f"ir_r{k}": v for k, v in ir.items()}
    out.update({f"tr_r{k}": v for k, v in tr.items()})
    out["ar"] = float(np.mean(list(ir.values()) + list(tr.values())))
    if truth is not None:
        ir_true, tr_true = caption_true_ranks(text, image, truth, max(ks))
        out.update(caption_true_metrics(ir_true, tr_true, ks))
        if kinds is not None:
            out.update(caption_true_by_kind(ir_true, kinds, kind_names, ks=(1,)))
    return out
