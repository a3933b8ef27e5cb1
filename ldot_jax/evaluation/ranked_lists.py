"""Recall from ranked id lists: what a search (and a re-ranked search) returns, scored with
LightningDOT's definitions (recall.py).

    ir = ranked_lists.list_ranks_text_to_image(image_ids, caption_image[queries])
    tr = ranked_lists.list_ranks_image_to_text(caption_ids, image_queries, caption_image)
    metrics = ranked_lists.metrics_from_ranks(ir, tr, list_length=k)

recall.py ranks every item from the embeddings; here a rank is the position within a list of
k ids (k: the item is not listed), so recall@K needs lists of at least K ids.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ldot_jax.evaluation import recall
from ldot_jax.retrieval import rerank

KS = recall.KS


first_hit = recall.first_hit


def caption_true_list_ranks(ir_ids: np.ndarray, captions: np.ndarray, tr_ids: np.ndarray,
                            images: np.ndarray, truth: np.ndarray
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Caption-true ranks from ranked lists: ir_ids i64[Q, k] image ids per caption query
    (rows `captions` i64[Q] of truth), tr_ids i64[N, k] caption ids per image query (columns
    `images` i64[N]), truth bool[T, N] → (IR i64[Q], TR i64[N]): the position of the first
    listed item the query's caption is true of / true of the query's image (k: none; -1 ids
    never hit)."""
    truth = np.asarray(truth, bool)
    ir_ids, tr_ids = np.asarray(ir_ids), np.asarray(tr_ids)
    ir = (ir_ids >= 0) & truth[np.asarray(captions)[:, None], np.maximum(ir_ids, 0)]
    tr = (tr_ids >= 0) & truth[np.maximum(tr_ids, 0), np.asarray(images)[:, None]]
    return first_hit(ir), first_hit(tr)


def list_ranks_text_to_image(ids: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """IR: ids i64[Q, k] ranked image ids per caption query (-1: empty), caption_image
    i64[Q] each query's image → i64[Q] rank of its image (k: not listed)."""
    return first_hit(ids == np.asarray(caption_image)[:, None])


def list_ranks_image_to_text(ids: np.ndarray, image: np.ndarray,
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
