"""Running a tower over batches: the jitted encoders of the serving path, extraction and the
evaluations (data parallel; every process gets every vector)."""

from __future__ import annotations

import functools
from typing import Iterable

import jax
import numpy as np
import tqdm

from ldot_jax.core import parallel


def fit_buckets(buckets, positions: int) -> tuple[int, ...]:
    """The padded text lengths a position table of `positions` can read: those within it, or
    its own length."""
    return tuple(b for b in buckets if b <= positions) or (positions,)


def fitting_text_buckets(model_config, buckets) -> tuple[int, ...]:
    """The text buckets (padded lengths) a model's text tower can read: those within its
    position table (CLIP's context of 77, a small model's 16), or that table's length."""
    text = getattr(model_config, "text", None)
    if text is None:  # no text tower of its own to bound the length
        return tuple(buckets)
    return fit_buckets(buckets, text.max_position_embeddings)


@functools.partial(jax.jit, static_argnames=("model", "side"))
def encode_batch(model, params, inputs, side: str):
    """f32[B, P]: one tower (`side` "text" or "image") over its input pytree (batch["text"] /
    batch["image"]; jitted; the model may be a DualEncoder or the pre-training model, whose
    towers are its dual_encoder)."""
    def fn(module):
        dual = getattr(module, "dual_encoder", module)
        return dual.encode_text(inputs) if side == "text" else dual.encode_image(inputs)
    return model.apply({"params": params}, method=fn)


def embed_batches(model, params, batches: Iterable[dict], mesh, side: str, index_key: str,
                  total: int | None = None, desc: str | None = None) -> tuple[np.ndarray,
                                                                             np.ndarray]:
    """Runs one tower over evaluation batches (pipeline.eval_*_batches, this process's share)
    and returns (vectors f32[n, P], ids i64[n]) of every valid row of every process, sorted
    by id. `params` are the tower owner's params (DualEncoder or pre-training model)."""
    vectors, ids = [], []
    show = desc is not None and jax.process_index() == 0
    for batch in tqdm.tqdm(batches, total=total, desc=desc, disable=not show, leave=False,
                           unit="batch"):
        keep = {k: batch[k] for k in (side, "valid", index_key)}
        with jax.set_mesh(mesh):
            global_batch = parallel.global_batch(keep, mesh)
            out = encode_batch(model, params, global_batch[side], side)
        vectors.append(parallel.gather_rows(out))
        ids.append(parallel.gather_rows(global_batch[index_key]))
        ids[-1] = np.where(parallel.gather_rows(global_batch["valid"]), ids[-1], -1)
    vectors, ids = np.concatenate(vectors), np.concatenate(ids)
    keep = ids >= 0
    order = np.argsort(ids[keep], kind="stable")
    return vectors[keep][order].astype(np.float32), ids[keep][order]
