"""Task mrfr, masked region feature regression: the masked regions' features from the region
states and the text tower's [CLS] state (the pre-training model). Needs region masking."""

from __future__ import annotations

from ldot_jax.models.pretraining import DualEncoderForPretraining
from ldot_jax.training import losses
from ldot_jax.training.tasks import common


def loss(params, batch, rng, setup: common.TaskSetup):
    """MSE over every element of the masked regions of the global batch."""
    model = common.pretraining_model(setup, "mrfr")
    masked = common.masked_regions(batch)
    prediction = model.apply({"params": params["model"]}, batch["text"], batch["image"], masked,
                             deterministic=False,
                             method=DualEncoderForPretraining.mrfr_prediction,
                             rngs={"dropout": rng})
    # The regression target is the region input's own features (MRFR is a region-tower task).
    value = losses.mrfr_loss(prediction, batch["image"]["region_feat"], masked)
    return value, {"mrfr_loss": value}


TASK = common.Task("mrfr", loss, pipeline=("mask_regions",))
