"""In-batch contrastive losses sharded over a mesh's data axis (global negatives), chunked.

Each device holds a shard of the global batch: text f32[b, D], image f32[b, D] (pair i is
caption i with its image), `group` i32[b] and `valid` bool[b]. Inside `jax.shard_map` the
other side's embeddings are all-gathered (`tiled`), so every device scores its b rows against
all B = b × devices columns; the gradient of the gather is a reduce-scatter, so each device
gets exactly its rows' gradient. Options beside the faithful default (`ContrastiveConfig()`):
  negatives "local": each device's own b × b scores, averaged over devices (the original code,
    which ran one loss per GPU);
  same_image_positives: all captions of one image are positives (targets spread evenly over
    them, as ALBEF); `group` holds the image ids. Off: only the pair itself (the original);
  normalize + scale: L2-normalized embeddings and a temperature (scale = 1 / temperature;
    pass a parameter to learn it); the original uses raw dot products (scale 1);
  chunk_size: the columns are processed in chunks under `jax.checkpoint` inside a scan, so the
    score memory is O(b × chunk) instead of O(b × B), in the forward and the backward pass;
  kind "sigmoid": SigLIP's pairwise sigmoid loss, sum over columns, mean over rows.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from ldot_jax.core import numerics

KINDS = ("softmax", "sigmoid")
NEGATIVES = ("global", "local")


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
    kind: str = "softmax"
    negatives: str = "global"
    same_image_positives: bool = False
    normalize: bool = False
    chunk_size: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"contrastive kind {self.kind!r}: expected one of {KINDS}")
        if self.negatives not in NEGATIVES:
            raise ValueError(f"negatives {self.negatives!r}: expected one of {NEGATIVES}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size}: expected ≥ 1 or None")


def _scores(queries, keys, scale):
    return scale * jnp.einsum("qd,kd->qk", queries, keys, preferred_element_type=jnp.float32)


def _softmax_terms(queries, keys, query_group, key_group, key_valid, scale):
    """Per query row, over one block of keys: (max, sum of exp(s - max), sum of positive
    scores, number of positives). Combined over blocks by `_merge`."""
    s = _scores(queries, keys, scale)
    live = key_valid[None, :]
    positive = (query_group[:, None] == key_group[None, :]) & live
    top = jnp.max(jnp.where(live, s, -jnp.inf), axis=1)
    top = jnp.maximum(top, -1e30)  # a block with no valid key: finite, contributes 0
    total = jnp.sum(jnp.where(live, jnp.exp(s - top[:, None]), 0.0), axis=1)
    return (top, total, jnp.sum(jnp.where(positive, s, 0.0), axis=1),
            jnp.sum(positive, axis=1).astype(jnp.float32))


def _merge(a, b):
    top = jnp.maximum(a[0], b[0])
    total = a[1] * jnp.exp(a[0] - top) + b[1] * jnp.exp(b[0] - top)
    return top, total, a[2] + b[2], a[3] + b[3]


def _sigmoid_terms(queries, keys, query_group, key_group, key_valid, scale, bias):
    s = _scores(queries, keys, scale) + bias
    sign = jnp.where(query_group[:, None] == key_group[None, :], 1.0, -1.0)
    return (jnp.sum(jnp.where(key_valid[None, :], -jax.nn.log_sigmoid(sign * s), 0.0), axis=1),)


def _over_keys(terms_fn, merge, queries, keys, query_group, key_group, key_valid, chunk_size):
    """terms_fn over all keys at once, or chunk by chunk in a checkpointed scan."""
    if chunk_size is None or chunk_size >= keys.shape[0]:
        return terms_fn(queries, keys, query_group, key_group, key_valid)
    count = keys.shape[0]
    if count % chunk_size:
        raise ValueError(f"chunk_size={chunk_size} does not divide the {count} columns")
    n = count // chunk_size

    @jax.checkpoint
    def block(k, g, v):
        return terms_fn(queries, k, query_group, g, v)

    first = block(keys[:chunk_size], key_group[:chunk_size], key_valid[:chunk_size])

    def step(carry, chunk):
        return merge(carry, block(*chunk)), None

    rest = (keys[chunk_size:].reshape(n - 1, chunk_size, -1),
            key_group[chunk_size:].reshape(n - 1, chunk_size),
            key_valid[chunk_size:].reshape(n - 1, chunk_size))
    out, _ = jax.lax.scan(step, first, rest)
    return out


def _row_losses(config, queries, keys, query_group, key_group, key_valid, scale, bias):
    """f32[b]: each query row's loss against all keys."""
    if config.kind == "sigmoid":
        fn = functools.partial(_sigmoid_terms, scale=scale, bias=bias)
        (loss,) = _over_keys(fn, lambda a, b: (a[0] + b[0],), queries, keys, query_group,
                             key_group, key_valid, config.chunk_size)
        return loss
    fn = functools.partial(_softmax_terms, scale=scale)
    top, total, positive_sum, positives = _over_keys(fn, _merge, queries, keys, query_group,
                                                     key_group, key_valid, config.chunk_size)
    # -Σ_j target_j log softmax_j with targets spread evenly over the positives.
    return top + jnp.log(jnp.maximum(total, 1e-30)) - positive_sum / jnp.maximum(positives, 1.0)


def local_contrastive_loss(text, image, group, valid, scale, bias, *, config: ContrastiveConfig,
                           axis_name: str | None):
    """The per-device loss: call inside `jax.shard_map` over `axis_name` (None: one device).

    Args:
      text, image: f[b, D] this device's rows; group: i32[b] image ids (used with
        same_image_positives); valid: bool[b] (False for padding rows); scale, bias: f32[].
    Returns: f32[], the same on every device.
    """
    if config.normalize:
        text, image = numerics.l2_normalize(text), numerics.l2_normalize(image)
    rows = text.shape[0]
    gather = config.negatives == "global" and axis_name is not None
    offset = jax.lax.axis_index(axis_name) * rows if gather else 0
    if not config.same_image_positives:
        group = offset + jnp.arange(rows, dtype=jnp.int32)  # only the pair itself
    if gather:
        all_text, all_image, all_group, all_valid = (
            jax.lax.all_gather(x, axis_name, tiled=True) for x in (text, image, group, valid))
    else:
        all_text, all_image, all_group, all_valid = text, image, group, valid
    loss = _row_losses(config, text, all_image, group, all_group, all_valid, scale, bias)
    if config.kind == "softmax":
        image_rows = _row_losses(config, image, all_text, group, all_group, all_valid, scale,
                                 bias)
        loss = 0.5 * loss + 0.5 * image_rows
    weights = valid.astype(jnp.float32)
    total, count = jnp.sum(loss * weights), jnp.sum(weights)
    if axis_name is None:
        return total / jnp.maximum(count, 1.0)
    if gather:
        return jax.lax.psum(total, axis_name) / jnp.maximum(jax.lax.psum(count, axis_name), 1.0)
    return jax.lax.pmean(total / jnp.maximum(count, 1.0), axis_name)


def contrastive_loss(text, image, group, valid, mesh: jax.sharding.Mesh | None,
                     config: ContrastiveConfig = ContrastiveConfig(), scale=1.0, bias=0.0,
                     axis_name: str = "data"):
    """The in-batch contrastive loss of a global batch sharded over `mesh`'s `axis_name`.

    Args:
      text, image: f[B, D] sharded B@data; group: i32[B] image ids; valid: bool[B].
      scale: f32[] (1 / temperature; a parameter to learn it), bias: f32[] (sigmoid only).
    Returns: f32[] replicated.
    """
    scale = jnp.asarray(scale, jnp.float32)
    bias = jnp.asarray(bias, jnp.float32)
    if mesh is None:
        return local_contrastive_loss(text, image, group, valid, scale, bias, config=config,
                                      axis_name=None)
    fn = functools.partial(local_contrastive_loss, config=config, axis_name=axis_name)
    row = NamedSharding(mesh, P(axis_name))
    # A no-op for inputs already sharded B@data (the train step's); others are moved.
    args = [jax.reshard(x, row) for x in (text, image, group, valid)]
    return jax.shard_map(fn, mesh=mesh, in_specs=(P(axis_name),) * 4 + (P(), P()),
                         out_specs=P())(*args, scale, bias)


def matryoshka_terms(text, image, group, valid, mesh, config: ContrastiveConfig,
                     dims: tuple[int, ...], scale=1.0, bias=0.0, axis_name: str = "data",
                     where: str = "prefix dims") -> dict[int, jax.Array]:
    """HiVLP / Matryoshka: {d: the contrastive loss on the first d embedding components} for
    each d of `dims`, in that order (each prefix normalized on its own when config.normalize).
    `where` names the dims in the error (a config key)."""
    if max(dims) > text.shape[-1]:
        raise ValueError(f"{where} {dims} exceed the embedding size {text.shape[-1]}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"{where} {dims}: a dimension is listed twice")
    return {d: contrastive_loss(text[:, :d], image[:, :d], group, valid, mesh, config, scale,
                                bias, axis_name) for d in dims}


def matryoshka_loss(text, image, group, valid, mesh, config: ContrastiveConfig,
                    dims: tuple[int, ...], weights: tuple[float, ...] | None = None, scale=1.0,
                    bias=0.0, axis_name: str = "data"):
    """Σ_k w_k · loss on the first dims[k] embedding components (`matryoshka_terms`).
    weights default to 1 each."""
    weights = weights or (1.0,) * len(dims)
    if len(weights) != len(dims):
        raise ValueError(f"{len(weights)} weights for {len(dims)} prefix dims {dims}")
    terms = matryoshka_terms(text, image, group, valid, mesh, config, dims, scale, bias,
                             axis_name)
    return weighted_sum(terms, dict(zip(dims, weights)))


def weighted_sum(terms: dict[int, jax.Array], weights: dict[int, float]) -> jax.Array:
    """Σ_d weights[d] · terms[d], in the order of `terms`."""
    return sum(weights[d] * term for d, term in terms.items())
