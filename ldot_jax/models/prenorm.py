"""Pre-LN transformer blocks, as CLIP / open_clip / ViT build them.

x + Attn(LN₁(x)), then x + MLP(LN₂(x)); the attention's query/key/value projection is one
fused Dense ("in_proj", [W, 3W], as PyTorch's nn.MultiheadAttention.in_proj_weight), so a
converted open_clip checkpoint maps one tensor to one parameter. Masks are a key mask (padding)
and optionally causal (CLIP's text tower); masked logits are set to a large finite negative
(never −inf, so a row with no visible key gives a uniform average, not NaN).

Parameter names follow open_clip: transformer/resblocks_{n}/{ln_1, attn/{in_proj, out_proj},
ln_2, mlp/{c_fc, c_proj}}.

Shapes: B batch, L sequence, W width, N heads, D head dim.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldot_jax.models.config import TransformerConfig
from ldot_jax.models.layers import Dropout, activation, dense, layer_norm

# Far below any real logit, finite: masked keys get exp(−1e9 − max) = 0 in float32.
MASKED_LOGIT = -1e9


def visible_keys(mask, causal: bool):
    """bool[B, 1, L, L] (query, key): the keys each query attends to.

    mask: [B, L] key mask (1 = real); causal: also hide the keys after the query.
    """
    keys = mask.astype(bool)[:, None, None, :]
    if not causal:
        return keys
    length = mask.shape[1]
    order = jnp.arange(length)
    return keys & (order[None, :] <= order[:, None])[None, None]


class FusedSelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection and an output projection."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, hidden, visible, deterministic: bool = True):
        """hidden: [B, L, W]; visible: bool[B, 1, L, L] → [B, L, W]."""
        c = self.config
        batch, length, width = hidden.shape
        qkv = dense(c, 3 * width, "in_proj")(hidden)
        split = lambda x: x.reshape(batch, length, c.num_heads, c.head_dim)
        query, key, value = (split(x) for x in jnp.split(qkv, 3, axis=-1))
        if c.attention_impl == "fused":
            if not deterministic and c.attention_dropout > 0:
                raise ValueError(f"attention_impl='fused' has no attention dropout; training "
                                 f"with attention_dropout={c.attention_dropout} needs "
                                 f"attention_impl='xla' or attention_dropout=0")
            context = jax.nn.dot_product_attention(query, key, value, mask=visible)
        else:
            # Logits and softmax in float32 (bf16 softmax loses small probabilities).
            logits = jnp.einsum("bqnd,bknd->bnqk", query, key,
                                preferred_element_type=jnp.float32) / jnp.sqrt(c.head_dim)
            probs = jax.nn.softmax(jnp.where(visible, logits, MASKED_LOGIT), axis=-1)
            probs = Dropout(c.attention_dropout)(probs, deterministic=deterministic)
            context = jnp.einsum("bnqk,bknd->bqnd", probs.astype(value.dtype), value)
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
    def __call__(self, hidden, visible, deterministic: bool = True):
        c = self.config
        dropout = functools.partial(Dropout(c.hidden_dropout), deterministic=deterministic)
        attended = FusedSelfAttention(c, name="attn")(layer_norm(c, "ln_1")(hidden), visible,
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
        visible = visible_keys(mask, self.causal)
        for i in range(c.num_layers):
            hidden = block(c, name=f"resblocks_{i}")(hidden, visible, deterministic)
        return hidden
