"""Task cmr, cross-modal retrieval: the in-batch contrastive loss of (caption, image) pairs
(contrastive.py): LightningDOT's CMR / fine-tuning loss by default, with the options of
`ContrastiveConfig`, a learnable temperature and Matryoshka prefixes (HiVLP). Section `loss`
(common.LossConfig)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ldot_jax.core import numerics
from ldot_jax.training import contrastive
from ldot_jax.training.tasks import common
from ldot_jax.training.tasks.common import LossConfig


def loss(params, batch, rng, setup: common.TaskSetup):
    """The in-batch contrastive loss of the batch's (caption, image) pairs."""
    text, image = common.embed_pair(setup.model, params["model"], batch, rng)
    return loss_of_embeddings(params, batch, setup, text, image)


def loss_of_embeddings(params, batch, setup: common.TaskSetup, text, image):
    """The CMR loss and its metrics of given text f32[B, P] and image f32[B, P] vectors (the
    distill task adds its term to it)."""
    scale, bias = common.scale_bias(setup, params)
    cfg = setup.config("loss", LossConfig)
    weights = cfg.prefixes(text.shape[-1])
    terms = contrastive.matryoshka_terms(
        text, image, batch["image_index"], batch["valid"], setup.mesh, cfg.contrastive,
        tuple(weights), scale, bias, where="loss.matryoshka_dims (with the full size first)")
    full, *prefixes = terms
    metrics = {"cmr_loss": terms[full], "temperature": 1.0 / jnp.asarray(scale, jnp.float32)}
    metrics.update({f"cmr_loss_{d}d": terms[d] for d in prefixes})
    total = contrastive.weighted_sum(terms, weights)
    if cfg.words_weight:
        words = words_loss(params["words"], image, batch["text"], batch["valid"])
        metrics["words_loss"] = words
        total = total + cfg.words_weight * words
    return total, metrics


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
    valid = valid.astype(jnp.float32)
    return (per_pair * valid).sum() / jnp.maximum(valid.sum(), 1.0)


TASK = common.Task("cmr", loss, sections={"loss": LossConfig})
