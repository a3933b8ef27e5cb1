"""ldot_jax: LightningDOT-style real-time image–text retrieval in JAX/Flax.

The public API:
  convert_checkpoint(kind, input, output)   PyTorch LightningDOT / UNITER / BERT → model dir
  load_dual_encoder(dir) → (DualEncoder, params)
  load_cross_encoder(dir) → (CrossEncoder, params)
  load_pretraining_model(dir) → (DualEncoderForPretraining, params)
  load_pretrained(dir) → Pretrained(kind, config, params, metadata)
  save_pretrained(dir, kind, config, params)
"""

from ldot_jax.convert import convert_checkpoint
from ldot_jax.models import (CrossEncoder, CrossEncoderConfig, DualEncoder, DualEncoderConfig,
                             DualEncoderForPretraining, RegionConfig, TransformerConfig,
                             dot_scores)
from ldot_jax.pretrained import (load_cross_encoder, load_dual_encoder, load_pretrained,
                                 load_pretraining_model, save_pretrained)

__version__ = "0.1.0"

__all__ = [
    "CrossEncoder", "CrossEncoderConfig", "DualEncoder", "DualEncoderConfig",
    "DualEncoderForPretraining", "RegionConfig", "TransformerConfig", "convert_checkpoint",
    "dot_scores", "load_cross_encoder", "load_dual_encoder", "load_pretrained",
    "load_pretraining_model", "save_pretrained",
]
