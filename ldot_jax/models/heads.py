"""Pre-training heads of LightningDOT (UNITER's, with the same weight tying).

Each head is dense → GELU → LayerNorm, then its output layer. Shapes: [..., H] in.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ldot_jax.models.config import TransformerConfig
from ldot_jax.models.layers import dense, gelu, layer_norm


def _transform(config: TransformerConfig, hidden):
    return layer_norm(config, "layer_norm")(
        gelu(dense(config, config.hidden_size, "transform")(hidden)))


class MLMHead(nn.Module):
    """VMLM: logits over the vocabulary; the decoder is the IMAGE tower's word-embedding table
    (tied), with its own bias."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, hidden, word_embeddings):
        """hidden: [..., H]; word_embeddings: [V, H] → f32[..., V]."""
        bias = self.param("bias", nn.initializers.zeros, (word_embeddings.shape[0],),
                          self.config.params_dtype)
        hidden = _transform(self.config, hidden)
        logits = jnp.einsum("...h,vh->...v", hidden, word_embeddings.astype(hidden.dtype),
                            preferred_element_type=jnp.float32)
        return logits + bias


class MRFRHead(nn.Module):
    """SMRM feature regression: output weight = img_linear's (tied, used transposed), own
    bias."""

    config: TransformerConfig
    feat_dim: int

    @nn.compact
    def __call__(self, hidden, img_linear_kernel):
        """hidden: [..., H]; img_linear_kernel: [F, H] → f32[..., F]."""
        bias = self.param("bias", nn.initializers.zeros, (self.feat_dim,),
                          self.config.params_dtype)
        hidden = _transform(self.config, hidden)
        out = jnp.einsum("...h,fh->...f", hidden, img_linear_kernel.astype(hidden.dtype),
                         preferred_element_type=jnp.float32)
        return out + bias


class MRCHead(nn.Module):
    """SMRM region classification: logits over the detector's classes."""

    config: TransformerConfig
    num_classes: int

    @nn.compact
    def __call__(self, hidden):
        """hidden: [..., H] → f32[..., C]."""
        hidden = _transform(self.config, hidden)
        return dense(self.config, self.num_classes, "classifier")(hidden).astype(jnp.float32)
