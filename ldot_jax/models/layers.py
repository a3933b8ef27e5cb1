"""BERT building blocks, numerically faithful to transformers 2.3 / UNITER.

Post-LN blocks, exact-erf GELU, LayerNorm eps from the config (1e-12 in every original model),
additive attention bias (1 - mask) * -10000 (not -inf), position ids arange(L).

Shapes: B batch, L sequence, H hidden, N heads, D head dim.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ldot_jax.models.config import TransformerConfig

# The original masks with -10000, not -inf: padded keys still get exp(-10000) = 0 in float32,
# and the constant is part of what parity with converted checkpoints depends on.
MASK_VALUE = -10000.0


def gelu(x):
    """Exact (erf) GELU, as BERT and UNITER use."""
    return jax.nn.gelu(x, approximate=False)


def quick_gelu(x):
    """x · σ(1.702 x): OpenAI CLIP's GELU approximation (its checkpoints are trained with it)."""
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {"gelu": gelu, "quick_gelu": quick_gelu,
                "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


def activation(config: TransformerConfig):
    """The MLP activation a config names (TransformerConfig.activation)."""
    return _ACTIVATIONS[config.activation]


def attention_bias(mask, dtype=jnp.float32):
    """Additive attention bias from a key mask.

    Args:
      mask: [B, L] with 1 (or True) for real tokens.
    Returns:
      [B, 1, 1, L]: 0 for real keys, -10000 for padding.
    """
    return ((1.0 - mask.astype(dtype)) * MASK_VALUE)[:, None, None, :]


def max_over(x, axis: int):
    """x.max(axis), its gradient all on the first maximal element (a one-hot of the argmax,
    as PyTorch's max pooling). jnp.max's own gradient finds the maximal elements by equality
    with the max, and finds none (0 / 0 = NaN) when XLA recomputes the operand in another
    fusion with other rounding: seen on CPU at --xla_backend_optimization_level=0 (the tests'
    setting) for a max over the ViT's patch tokens and over the cnn stem's cells."""
    hot = jax.nn.one_hot(jnp.argmax(x, axis=axis), x.shape[axis], axis=axis, dtype=x.dtype)
    return (x * hot).sum(axis=axis)


def dense(config: TransformerConfig, features: int, name: str | None = None) -> nn.Dense:
    return nn.Dense(features, dtype=config.compute_dtype, param_dtype=config.params_dtype,
                    kernel_init=nn.initializers.normal(config.initializer_range), name=name)


def layer_norm(config: TransformerConfig, name: str | None = None) -> nn.LayerNorm:
    # Statistics in at least float32 even for bf16 inputs; two-pass variance as PyTorch (the
    # one-pass E[x²]−E[x]² loses precision when |mean| ≫ std).
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=config.compute_dtype,
                        param_dtype=config.params_dtype, use_fast_variance=False, name=name)


def take_rows(table, ids):
    """table[ids]: [V, H] x int[...] → [..., H], the rows sharded like `ids`.

    Under a mesh with Explicit axes, a gather of a replicated table by batch-sharded ids is
    ambiguous to JAX unless told the output follows the ids (B@data → [B@data, L, H]).
    An id ≥ V gives a row of NaN on every path (gather mode "fill", never a clamped, valid-
    looking row), so the vectors it reaches are NaN and the finiteness checks downstream
    (extraction, recall, the Retriever) name it; the host-side checks (tokenizer and caption
    ids against the vocabulary) catch such ids before they get here. Negative ids index from
    the end, as in NumPy: the host-side checks refuse them.
    """
    spec = jax.typeof(ids).sharding.spec
    if all(axis is None for axis in spec):
        return jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan)
    return table.at[ids].get(mode="fill", fill_value=jnp.nan, out_sharding=P(*spec, None))


class Embed(nn.Embed):
    """nn.Embed (same parameter, "embedding" [V, H]) with a sharding-aware lookup."""

    def __call__(self, inputs):
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(f"{self.name}: expected integer ids, got dtype {inputs.dtype}")
        table = jnp.asarray(self.embedding, self.dtype)
        return take_rows(table, inputs)


class Dropout(nn.Module):
    """nn.Dropout (inverted, rng stream "dropout") whose mask is drawn with the input's
    sharding: under a mesh with Explicit axes the mask of a [B@data, ...] activation is itself
    [B@data, ...] (each device draws its own rows of the global mask), where flax's mask
    would be replicated and rejected. No parameters, so checkpoints are unaffected."""

    rate: float

    @nn.compact
    def __call__(self, inputs, deterministic: bool = True):
        if deterministic or self.rate == 0.0:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        keep_prob = 1.0 - self.rate
        spec = jax.typeof(inputs).sharding.spec
        sharding = None if all(axis is None for axis in spec) else spec
        keep = jax.random.bernoulli(self.make_rng("dropout"), keep_prob, inputs.shape,
                                    out_sharding=sharding)
        return jnp.where(keep, inputs / keep_prob, jnp.zeros_like(inputs))


def embed(config: TransformerConfig, num: int, name: str | None = None) -> nn.Embed:
    return Embed(num, config.hidden_size, dtype=config.compute_dtype,
                    param_dtype=config.params_dtype,
                    embedding_init=nn.initializers.normal(config.initializer_range), name=name)


class TextEmbeddings(nn.Module):
    """word + position + token type, then LayerNorm and dropout (BertEmbeddings).

    The token-type table is also used for regions (type 1) by UNITER; `type_embedding` exposes it.
    """

    config: TransformerConfig

    def setup(self):
        c = self.config
        self.word_embeddings = embed(c, c.vocab_size)
        self.position_embeddings = embed(c, c.max_position_embeddings)
        self.token_type_embeddings = embed(c, c.type_vocab_size)
        self.layer_norm = layer_norm(c)
        self.dropout = Dropout(c.hidden_dropout)

    def __call__(self, input_ids, token_type_ids=None, deterministic: bool = True):
        """input_ids: i32[B, L] → [B, L, H]. Position ids are arange(L)."""
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(token_type_ids))
        return self.dropout(self.layer_norm(x), deterministic=deterministic)

    def type_embedding(self, token_type_ids):
        """i32[...] → [..., H]: rows of the shared token-type table."""
        return self.token_type_embeddings(token_type_ids)


class SelfAttention(nn.Module):
    """Multi-head self-attention: query/key/value projections, attention, output projection.

    The output projection's residual and LayerNorm live in `TransformerLayer` (post-LN).
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, hidden, bias, deterministic: bool = True):
        """hidden: [B, L, H]; bias: f32[B, 1, 1, L] additive → [B, L, H]."""
        c = self.config
        batch, length, _ = hidden.shape
        split = lambda x: x.reshape(batch, length, c.num_heads, c.head_dim)
        query = split(dense(c, c.hidden_size, "query")(hidden))
        key = split(dense(c, c.hidden_size, "key")(hidden))
        value = split(dense(c, c.hidden_size, "value")(hidden))
        context = attend(c, query, key, value, bias, deterministic)
        context = context.reshape(batch, length, c.hidden_size)
        return dense(c, c.hidden_size, "output")(context)


def attend(config: TransformerConfig, query, key, value, bias, deterministic: bool = True):
    """softmax(QKᵀ/√D + bias)V by `config.attention_impl`, inside a module's call (the
    attention dropout is a submodule of the caller).

    query, key, value: [B, L, N, D]; bias: f32 additive, broadcastable to [B, N, L, L]
    (BERT's [B, 1, 1, L] key bias, the pre-LN blocks' [B, 1, L, L]) → [B, L, N, D].
    """
    if config.attention_impl == "fused":
        if not deterministic and config.attention_dropout > 0:
            raise ValueError(f"attention_impl='fused' has no attention dropout; training "
                             f"with attention_dropout={config.attention_dropout} needs "
                             f"attention_impl='xla' or attention_dropout=0")
        return jax.nn.dot_product_attention(query, key, value, bias=bias.astype(query.dtype))
    # Logits and softmax in float32: bf16 softmax over -10000 biases loses the real keys.
    logits = jnp.einsum("bqnd,bknd->bnqk", query, key,
                        preferred_element_type=jnp.float32) / jnp.sqrt(config.head_dim)
    probs = jax.nn.softmax(logits + bias, axis=-1)
    probs = Dropout(config.attention_dropout)(probs, deterministic=deterministic)
    return jnp.einsum("bnqk,bknd->bqnd", probs.astype(value.dtype), value)


class TransformerLayer(nn.Module):
    """One post-LN BERT block: LN(x + Attn(x)), then LN(h + FFN(h))."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, hidden, bias, deterministic: bool = True):
        c = self.config
        dropout = functools.partial(Dropout(c.hidden_dropout), deterministic=deterministic)
        attended = SelfAttention(c, name="attention")(hidden, bias, deterministic)
        hidden = layer_norm(c, "attention_layer_norm")(hidden + dropout(attended))
        inner = activation(c)(dense(c, c.intermediate_size, "intermediate")(hidden))
        out = dense(c, c.hidden_size, "output")(inner)
        return layer_norm(c, "output_layer_norm")(hidden + dropout(out))


class TransformerEncoder(nn.Module):
    """A stack of `num_layers` TransformerLayers named layer_0 … layer_{n-1}."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, hidden, mask, deterministic: bool = True):
        """hidden: [B, L, H]; mask: [B, L] (1 = real) → last-layer states [B, L, H]."""
        c = self.config
        layer_cls = TransformerLayer
        if c.remat:
            # Recompute each block in the backward pass: activation memory O(1 block).
            layer_cls = nn.remat(TransformerLayer, static_argnums=(3,))
        bias = attention_bias(mask)
        for i in range(c.num_layers):
            hidden = layer_cls(c, name=f"layer_{i}")(hidden, bias, deterministic)
        return hidden
