"""Task vmlm, visual-embedding MLM: masked-token prediction from the text states and the image
tower's raw [CLS] state (the pre-training model). Needs the pipeline's text masking."""

from __future__ import annotations

import jax.numpy as jnp

from ldot_jax.data import masking
from ldot_jax.models.pretraining import DualEncoderForPretraining
from ldot_jax.training import losses
from ldot_jax.training.tasks import common


def vmlm_positions(labels):
    """labels i32[B, L] (-1: not predicted) → (positions i32[B, M], labels i32[B, M]) of the
    masked tokens first, M = masking.max_predictions(L) (a static shape; -1 labels pad)."""
    count = masking.max_predictions(labels.shape[1])
    order = jnp.argsort(labels == -1, axis=1, stable=True)[:, :count]
    return order.astype(jnp.int32), jnp.take_along_axis(labels, order, axis=1)


def loss(params, batch, rng, setup: common.TaskSetup):
    """Cross-entropy over every masked token of the global batch."""
    model = common.pretraining_model(setup, "vmlm")
    positions, labels = vmlm_positions(batch["vmlm_labels"])
    labels = jnp.where(batch["valid"][:, None], labels, -1)
    logits = model.apply({"params": params["model"]}, batch["vmlm_text"], batch["image"],
                         positions, deterministic=False,
                         method=DualEncoderForPretraining.vmlm_logits, rngs={"dropout": rng})
    value = losses.masked_lm_loss(logits, labels)
    accuracy = jnp.sum((jnp.argmax(logits, -1) == labels) & (labels != -1)) / jnp.maximum(
        jnp.sum(labels != -1), 1)
    return value, {"vmlm_loss": value, "vmlm_accuracy": accuracy}


TASK = common.Task("vmlm", loss, pipeline=("mask_text",))
