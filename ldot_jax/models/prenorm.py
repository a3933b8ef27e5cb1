"""Pre-LN transformer blocks, as CLIP / open_clip / ViT build them.

x + Attn(LN₁(x)), then x + MLP(LN₂(x)); the attention's query/key/value projection is one
fused Dense ("in_proj", [W, 3W], as PyTorch's nn.MultiheadAttention.in_proj_weight), so a
converted open_clip checkpoint maps one tensor to one parameter. Masks are a key mask (padding)
and optionally causal (CLIP's text tower), as one additive bias of a large finite negative
(never −inf, so a row with no visible key gives a finite average, not NaN).

Parameter names follow open_clip: transformer/resblocks_{n}/{ln_1, attn/{in_proj, out_proj},
ln_2, mlp/{c_fc, c_proj}}.

Shapes: B batch, L sequence, W width, N heads, D head dim.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from ldot_jax.models.config import TransformerConfig
from ldot_jax.models.layers import Dropout, activation, attend, dense, layer_norm

# Far below any real logit, finite: masked keys get exp(−1e9 − max) = 0 in float32.
MASKED_LOGIT = -1e9


def key_bias(mask, causal: bool):
    """f32[B, 1, L, L] (query, key): 0 for the keys each query attends to, MASKED_LOGIT for
    the others.

    mask: [B, L] key mask (1 = real); causal: also hide the keys after the query.
    """
    visible = mask.astype(bool)[:, None, None, :]
    if causal:
        order = jnp.arange(mask.shape[1])
        visible = visible & (order[None, :] <= order[:, None])[None, None]
    return jnp.where(visible, 0.0, MASKED_LOGIT).astype(jnp.float32)


class FusedSelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection and an output projection."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, hidden, bias, deterministic: bool = True):
        """hidden: [B, L, W]; bias: f32[B, 1, L, L] additive (`key_bias`) → [B, L, W]."""
        c = self.config
        batch, length, width = hidden.shape
        qkv = dense(c, 3 * width, "in_proj")(hidden)
        split = lambda x: x.reshape(batch, length, c.num_heads, c.head_dim)
        query, key, value = (split(x) for x in jnp.split(qkv, 3, axis=-1))
        context = attend(c, query, key, value, bias, deterministic)
        return dense(c, width, "out_proj")(context.reshape(batch, length, width))


class Mlp(nn.Module):
    """c_fc → activation (config.activation) → c_proj."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, hidden):
        c = self.config
        inner = activation(c)(dense(c, c.intermediate_size, "c_fc")(hidden))
        return dense(c, c.hidden_size, "c_proj")(inner)


class PreLNBlock(nn.Module):
    """x + Attn(LN₁(x)); x + MLP(LN₂(x)) (open_clip's ResidualAttentionBlock)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, hidden, bias, deterministic: bool = True):
        c = self.config
        dropout = functools.partial(Dropout(c.hidden_dropout), deterministic=deterministic)
        attended = FusedSelfAttention(c, name="attn")(layer_norm(c, "ln_1")(hidden), bias,
                                                      deterministic)
        hidden = hidden + dropout(attended)
        return hidden + dropout(Mlp(c, name="mlp")(layer_norm(c, "ln_2")(hidden)))


class PreLNEncoder(nn.Module):
    """`num_layers` PreLNBlocks named resblocks_0 … (no final LayerNorm: the towers own it)."""

    config: TransformerConfig
    causal: bool = False

    @nn.compact
    def __call__(self, hidden, mask, deterministic: bool = True):
        """hidden: [B, L, W]; mask: [B, L] (1 = real) → [B, L, W]."""
        c = self.config
        block = PreLNBlock
        if c.remat:
            # Recompute each block in the backward pass: activation memory O(1 block).
            block = nn.remat(PreLNBlock, static_argnums=(3,))
        bias = key_bias(mask, self.causal)
        for i in range(c.num_layers):
            hidden = block(c, name=f"resblocks_{i}")(hidden, bias, deterministic)
        return hidden
