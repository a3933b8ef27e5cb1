"""Task mrckl, masked region classification: KL divergence of the masked regions' predicted
class distribution to the detector's soft labels (the pre-training model). Needs region
masking and `soft_labels` in the data."""

from __future__ import annotations

from ldot_jax.models.pretraining import DualEncoderForPretraining
from ldot_jax.training import losses
from ldot_jax.training.tasks import common


def loss(params, batch, rng, setup: common.TaskSetup):
    """KL(soft labels ‖ prediction) over every masked region of the global batch."""
    model = common.pretraining_model(setup, "mrckl")
    if "soft_labels" not in batch:
        raise ValueError("task 'mrckl' needs soft_labels f32[B, R, C] in the batch: a dataset "
                         "with region class distributions (scenes has them; convert UNITER "
                         "LMDBs with soft_labels=True)")
    masked = common.masked_regions(batch)
    logits = model.apply({"params": params["model"]}, batch["text"], batch["image"], masked,
                         deterministic=False, method=DualEncoderForPretraining.mrc_logits,
                         rngs={"dropout": rng})
    if logits.shape[-1] != batch["soft_labels"].shape[-1]:
        raise ValueError(f"mrckl: the model predicts {logits.shape[-1]} classes, the data's "
                         f"soft_labels have {batch['soft_labels'].shape[-1]}")
    value = losses.mrc_kl_loss(logits, batch["soft_labels"], masked)
    return value, {"mrckl_loss": value}


TASK = common.Task("mrckl", loss, pipeline=("mask_regions",))
