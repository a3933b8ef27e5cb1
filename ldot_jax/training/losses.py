"""Pure loss functions, as the original LightningDOT computes them.

All take static shapes with weights/masks instead of boolean indexing, so they jit without
recompiling: a "weights" array selects which rows count (1) and which are padding (0).
Shapes: Q text queries, N images, B batch, M positions, V vocab, F features, C classes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ldot_jax.core import numerics


def weighted_mean(values, weights):
    """Sum(values * weights) / max(sum(weights), 1): the mean over the rows that count."""
    weights = weights.astype(values.dtype)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def contrastive_loss_per_example(text_embeddings, image_embeddings):
    """LightningDOT's CMR / fine-tuning loss per pair, in-batch, positives on the diagonal.

    Args:
      text_embeddings: f32[B, P]; image_embeddings: f32[B, P] (pair i is caption i, image i).
    Returns:
      f32[B]: 0.5 * CE(text i → images) + 0.5 * CE(image i → texts). Raw dot products: no
      temperature, no normalization, other captions of the same image count as negatives.
    """
    scores = jnp.einsum("qp,np->qn", text_embeddings, image_embeddings,
                        preferred_element_type=jnp.float32)
    text_to_image = -jnp.diagonal(jax.nn.log_softmax(scores, axis=1))
    image_to_text = -jnp.diagonal(jax.nn.log_softmax(scores, axis=0))
    return 0.5 * text_to_image + 0.5 * image_to_text


def reference_contrastive_loss(text_embeddings, image_embeddings):
    """Mean of `contrastive_loss_per_example` over the batch: f32[] (the faithful reference of
    the sharded `contrastive.contrastive_loss`)."""
    return jnp.mean(contrastive_loss_per_example(text_embeddings, image_embeddings))


def masked_lm_loss(logits, labels, ignore_index: int = -1):
    """VMLM: cross-entropy averaged over the masked tokens.

    Args:
      logits: f32[..., V]; labels: int[...] with `ignore_index` where nothing is predicted.
    Returns: f32[].
    """
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    return weighted_mean(nll, valid)


def mrfr_loss(prediction, target, weights):
    """SMRM feature regression: MSE averaged over every element of the masked regions.

    Args:
      prediction, target: f32[..., F]; weights: [...] 1 for masked regions, 0 otherwise.
    Returns: f32[] = sum over masked regions of ||pred - target||² / (n_masked · F).
    """
    squared = jnp.sum(jnp.square(prediction.astype(jnp.float32) - target), axis=-1)
    return weighted_mean(squared, weights) / prediction.shape[-1]


def mrc_kl_loss(logits, soft_labels, weights):
    """SMRM region classification (MRC-kl): KL(soft_labels ‖ softmax(logits)) averaged over
    every element of the masked regions (as torch's kl_div(reduction='none').mean()).

    Args:
      logits, soft_labels: f32[..., C]; weights: [...] 1 for masked regions.
    Returns: f32[].
    """
    log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    # p·(log p − log q), with 0·log 0 = 0 as torch's xlogy.
    kl = jax.scipy.special.xlogy(soft_labels, soft_labels) - soft_labels * log_q
    return weighted_mean(jnp.sum(kl, axis=-1), weights) / logits.shape[-1]


def distillation_loss_per_row(student, teacher, mask, temperature: float):
    """Thinking Fast and Slow: KL(softmax(teacher / T) ‖ softmax(student / T)) · T² per row.

    Args:
      student: f32[Q, K] dual-encoder scores of each query's K candidates; teacher: f32[Q, K]
      cross-encoder scores of the same pairs (no gradient flows into it); mask: bool[Q, K]
      (False: not a candidate, e.g. a missing draw); temperature T > 0.
    Returns:
      f32[Q]; 0 for rows with fewer than two candidates (no distribution to match).
    """
    neg = jnp.asarray(-1e9, jnp.float32)
    t = jnp.where(mask, jax.lax.stop_gradient(teacher).astype(jnp.float32) / temperature, neg)
    s = jnp.where(mask, student.astype(jnp.float32) / temperature, neg)
    log_p, log_q = jax.nn.log_softmax(t, axis=-1), jax.nn.log_softmax(s, axis=-1)
    kl = jnp.sum(jnp.where(mask, jnp.exp(log_p) * (log_p - log_q), 0.0), axis=-1)
    return jnp.where(jnp.sum(mask, axis=-1) > 1, kl * temperature ** 2, 0.0)


def itm_loss(logits, labels, weights):
    """UNITER / ALBEF image-text matching: 2-way cross-entropy averaged over weighted pairs.

    Args:
      logits: f32[N, 2] (class 1 = match); labels: int[N] ∈ {0, 1}; weights: [N] (0: ignore).
    Returns: f32[].
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return weighted_mean(nll, weights)


def rank_hinge_loss(positive, negative, weights, margin: float):
    """UNITER's ranking loss (its hard-negative ITM fine-tuning): mean over weighted pairs of
    max(0, margin − σ(s_pos) + σ(s_neg)), on the sigmoid of the rank logits as the original.

    Args:
      positive: f32[N] rank logits of the matching pairs; negative: f32[N, k] (or [N]) of
      their k negatives; weights: same shape as negative (0: no negative drawn); margin: 0.2.
    Returns: f32[].
    """
    positive = jax.nn.sigmoid(positive.astype(jnp.float32))
    negative = jax.nn.sigmoid(negative.astype(jnp.float32))
    if negative.ndim == 2:
        positive = positive[:, None]
    hinge = jax.nn.relu(margin - positive + negative)
    return weighted_mean(hinge, weights)


def listwise_rank_loss(positive, negative, found, valid):
    """Localized contrastive estimation (Gao et al. 2021): cross-entropy of the positive
    among itself and its k retriever-mined negatives, on the rank logits.

    Args:
      positive: f32[N]; negative: f32[N, k]; found: bool[N, k] (False: no negative drawn,
      left out of the softmax); valid: bool[N] (rows that count).
    Returns: f32[], the mean over valid rows with at least one negative.
    """
    logits = jnp.concatenate([positive[:, None], negative], axis=1).astype(jnp.float32)
    keep = jnp.concatenate([jnp.ones_like(found[:, :1]), found], axis=1)
    logits = jnp.where(keep, logits, -jnp.inf)
    nll = -jax.nn.log_softmax(logits, axis=-1)[:, 0]
    rows = valid.astype(bool) & jnp.any(found, axis=1)
    return weighted_mean(jnp.where(rows, nll, 0.0), rows)


def words_loss(head, image, text, valid):
    """Caption words from the image vector: the sigmoid cross-entropy of the head's logits
    u @ kernel + bias (f32[B, V]; u the image vector scaled to norm √P) against which
    vocabulary ids the paired caption holds (each id once, padding not), summed over the
    vocabulary, averaged over the valid pairs.

    head: {"kernel" f32[P, V], "bias" f32[V]}; image f32[B, P]; text {"input_ids" i32[B, L],
    "attention_mask" [B, L]}; valid bool[B]. Why: the in-batch contrastive loss separates a
    batch's pictures by whatever differs most (on the scenes, colours) and teaches what
    differs less (shapes) slowly; naming every word of the caption asks for all of it. Why
    norm √P: the head reads the direction the retrieval compares, with entries of order 1,
    so Adam's steps of order lr on the zero-initialized kernel move the logits in tens of
    steps (on a unit vector, the head would take thousands to leave its prior).
    """
    unit = numerics.l2_normalize(image) * jnp.sqrt(jnp.float32(image.shape[-1]))
    logits = unit @ head["kernel"] + head["bias"]
    ids, real = text["input_ids"], text["attention_mask"] > 0
    length = ids.shape[1]
    earlier = jnp.arange(length)[None, :] < jnp.arange(length)[:, None]  # [j, k]: k before j
    repeated = ((ids[:, :, None] == ids[:, None, :]) & earlier[None] & real[:, None, :]).any(2)
    present = real & ~repeated  # each id of the caption once
    at_ids = jnp.take_along_axis(logits, ids, axis=1)  # [B, L]
    # BCE(z, y) = softplus(z) - y z, the y = 1 terms read at the caption's ids.
    per_pair = jax.nn.softplus(logits).sum(1) - jnp.where(present, at_ids, 0.0).sum(1)
    return weighted_mean(per_pair, valid)
