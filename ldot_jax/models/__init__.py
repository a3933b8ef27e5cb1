"""Flax Linen models: towers, dual encoder, cross-encoder, pre-training heads."""

from ldot_jax.models.config import (BertConfig, CrossEncoderConfig, DualEncoderConfig,
                                    RegionConfig, TransformerConfig)
from ldot_jax.models.cross_encoder import CrossEncoder, CrossEncoderOutput
from ldot_jax.models.dual_encoder import DualEncoder, dot_scores
from ldot_jax.models.pretraining import DualEncoderForPretraining
from ldot_jax.models.towers import (IMAGE_TOWERS, TEXT_TOWERS, BertTrunk, RegionTower, TextTower,
                                    TowerOutput)

__all__ = [
    "BertConfig", "BertTrunk", "CrossEncoder", "CrossEncoderConfig", "CrossEncoderOutput",
    "DualEncoder", "DualEncoderConfig", "DualEncoderForPretraining", "IMAGE_TOWERS",
    "RegionConfig", "RegionTower", "TEXT_TOWERS", "TextTower", "TowerOutput",
    "TransformerConfig", "dot_scores",
]
