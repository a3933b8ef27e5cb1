"""Task cmr, cross-modal retrieval: the in-batch contrastive loss of (caption, image) pairs
(contrastive.py): LightningDOT's CMR / fine-tuning loss by default, with the options of
`ContrastiveConfig`, a learnable temperature and Matryoshka prefixes (HiVLP). Section `loss`
(common.LossConfig)."""

from __future__ import annotations

import jax.numpy as jnp

from ldot_jax.training import contrastive, losses
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
        words = losses.words_loss(params["words"], image, batch["text"], batch["valid"])
        metrics["words_loss"] = words
        total = total + cfg.words_weight * words
    return total, metrics


TASK = common.Task("cmr", loss, sections={"loss": LossConfig})
