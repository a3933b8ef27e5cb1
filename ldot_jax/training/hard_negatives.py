"""Hard negatives drawn from the dual encoder's scores, within the global batch (`draw`).

ALBEF / BLIP sampling: each query draws its negatives from the keys of the WHOLE global batch
(all-gathered across devices), with probability ∝ softmax(score / temperature) over the keys
of other images; keys of the query's own image (its other captions, or the same image in
another row) are never drawn. `k` draws per query are without replacement (Gumbel top-k:
perturb the logits with Gumbel noise and keep the k largest, which is sampling k items
without replacement from the softmax).

Noise for global row r comes from `fold_in(key, r)`, so a batch draws the same negatives on
any number of devices.

Shapes: B global rows sharded B@data, b = B / devices rows per device, D vector size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

DATA = "data"


def sample(scores, query_group, key_group, key_valid, noise, temperature: float, k: int):
    """Draws k keys per query row, without replacement, ∝ softmax(scores / temperature) over
    the allowed keys (another group than the query's, and valid).

    Args:
      scores: f32[b, N] query × key scores; query_group: i32[b]; key_group: i32[N];
      key_valid: bool[N]; noise: f32[b, N] standard Gumbel; temperature > 0 (None: uniform
      over the allowed keys); k ≤ N.
    Returns:
      (index i32[b, k] positions in [0, N), found bool[b, k]); found is False where a row has
      fewer than k allowed keys (its index is then arbitrary and must be ignored).
    """
    allowed = (query_group[:, None] != key_group[None, :]) & key_valid[None, :]
    logits = noise if temperature is None else scores.astype(jnp.float32) / temperature + noise
    logits = jnp.where(allowed, logits, -jnp.inf)
    values, index = jax.lax.top_k(logits, k)
    return index.astype(jnp.int32), jnp.isfinite(values)


def _row_noise(key_data, rows, columns: int):
    """f32[len(rows), columns] Gumbel noise; row r from fold_in(key, r)."""
    key = jax.random.wrap_key_data(key_data)
    return jax.vmap(lambda r: jax.random.gumbel(jax.random.fold_in(key, r), (columns,)))(rows)


def _local_draw(queries, keys, group, valid, key_data, *, temperature, k, axis_name):
    rows = queries.shape[0]
    if axis_name is not None:
        offset = jax.lax.axis_index(axis_name) * rows
        keys, key_group, key_valid = (jax.lax.all_gather(x, axis_name, tiled=True)
                                      for x in (keys, group, valid))
    else:
        offset, key_group, key_valid = 0, group, valid
    scores = jnp.einsum("qd,nd->qn", queries, keys, preferred_element_type=jnp.float32)
    noise = _row_noise(key_data, offset + jnp.arange(rows), keys.shape[0])
    index, found = sample(jax.lax.stop_gradient(scores), group, key_group, key_valid, noise,
                          temperature, k)
    return index, found & valid[:, None]


def draw(mesh, queries, keys, group, valid, key, temperature: float | None, k: int,
         axis_name: str = DATA):
    """k negatives per query row among the batch's keys (see `sample`).

    Args:
      queries, keys: f[B, D] B@data (row i of both belongs to image group[i]); group: i32[B];
      valid: bool[B]; key: a PRNG key; mesh: None for a single device.
    Returns:
      (index i32[B, k] global rows of `keys`, found bool[B, k]), both B@data. Never a row of
      the query's own group; found is False for invalid queries and missing draws.
    """
    key_data = jax.random.key_data(key)
    fn = functools.partial(_local_draw, temperature=temperature, k=k,
                           axis_name=None if mesh is None else axis_name)
    if k > queries.shape[0]:
        raise ValueError(f"{k} negatives per query from a batch of {queries.shape[0]} rows")
    if mesh is None:
        return fn(queries, keys, group, valid, key_data)
    row = NamedSharding(mesh, P(axis_name))
    args = [jax.reshard(x, row) for x in (queries, keys, group, valid)]
    return jax.shard_map(fn, mesh=mesh, in_specs=(P(axis_name),) * 4 + (P(),),
                         out_specs=(P(axis_name), P(axis_name)))(*args, key_data)


def row_ids(mesh, rows: int, axis_name: str = DATA):
    """i32[B] = 0 … B − 1, sharded B@data like the batch (None mesh: one device)."""
    ids = jnp.arange(rows, dtype=jnp.int32)
    return ids if mesh is None else jax.reshard(ids, NamedSharding(mesh, P(axis_name)))


def _local_gather(x, index, *, axis_name):
    if axis_name is not None:
        x = jax.lax.all_gather(x, axis_name, tiled=True)
    return jnp.take(x, index, axis=0)


def gather(mesh, x, index, axis_name: str = DATA):
    """x[index] across devices: x f[B, ...] B@data, index i32[B, k] B@data (global rows) →
    f[B, k, ...] B@data. Differentiable in x (the gather's transpose is a reduce-scatter)."""
    if mesh is None:
        return _local_gather(x, index, axis_name=None)
    row = NamedSharding(mesh, P(axis_name))
    fn = functools.partial(_local_gather, axis_name=axis_name)
    return jax.shard_map(fn, mesh=mesh, in_specs=(P(axis_name), P(axis_name)),
                         out_specs=P(axis_name))(jax.reshard(x, row), jax.reshard(index, row))



def candidate_scores(mesh, queries, keys, index, axis_name: str = DATA):
    """f32[B, k]: queries[b] · keys[index[b, j]], the dot product of each query with its
    candidates (index i32[B, k]: global rows, as `draw` returns; keys gathered across
    devices). queries f[B, D] and keys f[B, D] B@data; differentiable in both."""
    return jnp.einsum("bd,bkd->bk", queries, gather(mesh, keys, index, axis_name),
                      preferred_element_type=jnp.float32)