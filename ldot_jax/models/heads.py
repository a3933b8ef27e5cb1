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


class TiedOutputHead(nn.Module):
    """An output layer whose weight belongs to another module (tied), with its own bias.

    VMLM: the weight is the IMAGE tower's word-embedding table [V, H] (logits over the
    vocabulary). MRFR: it is `img_linear`'s kernel [F, H], used transposed (regressed features).
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, hidden, tied_weight):
        """hidden: [..., H]; tied_weight: [O, H] → f32[..., O]."""
        bias = self.param("bias", nn.initializers.zeros, (tied_weight.shape[0],),
                          self.config.params_dtype)
        hidden = _transform(self.config, hidden)
        out = jnp.einsum("...h,oh->...o", hidden, tied_weight.astype(hidden.dtype),
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
