"""Initializing a model to train from converted checkpoints, per tower.

    params = initialize.from_pretrained(params, kind, {"text": bert_dir, "image": uniter_dir})

Targets: "model" (the whole dual encoder, from a LightningDOT fine-tuned or pre-training
directory), "text" (the text tower) and "image" (the image tower). Sources are model
directories written by `ldot convert` (or by training):

  target  source kind              what is copied
  model   lightningdot(_pretrain)  both towers (+ the pre-training heads when both have them)
  model   lightningdot(_pretrain)  into a uniter_itm re-ranker: word embeddings from the text
                                   tower, region embeddings and layers from the image tower
  model   uniter_itm               a uniter_itm re-ranker (a converted UNITER checkpoint)
  model   uniter_pretrain          a uniter_itm re-ranker: trunk, pooler, ITM head (rank_output
                                   keeps its initialization)
  text    bert                     text_tower/bert          (LightningDOT: bert-base-cased)
  text    lightningdot(_pretrain)  text_tower
  text    uniter_itm / _pretrain   text_tower/bert embeddings + encoder (VLDeformer)
  image   uniter_pretrain          image_tower/uniter       (LightningDOT: uniter-base.pt)
  image   uniter_itm               image_tower/uniter
  image   bert                     image_tower/uniter embeddings + encoder
  image   lightningdot(_pretrain)  image_tower

Leaves present in both with equal shapes are copied; a shape mismatch is an error naming the
path; leaves the source lacks (e.g. encode_proj from a UNITER checkpoint) keep their fresh
initialization and are logged.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np

from ldot_jax.checkpoints import kinds, pretrained
from ldot_jax.checkpoints.checkpoint import CheckpointError

log = logging.getLogger(__name__)

TARGETS = ("model", "text", "image")


def _source_subtree(target: str, source_kind: str, source: dict, directory: str) -> dict:
    """The part of a source checkpoint that maps onto `target`, laid out like the target's
    subtree (the dual encoder for "model", the re-ranker for "cross", the tower for "text" /
    "image"): the source kind's registry entry says (kinds.ModelKind.warm_starts)."""
    warm_start = kinds.get(source_kind).warm_starts.get(target)
    if warm_start is None:
        valid = [name for name, kind in kinds.KINDS.items() if target in kind.warm_starts]
        raise CheckpointError(f"init.{target}: {directory} holds a {source_kind!r} model, "
                              f"which cannot initialize the {target} "
                              f"{'dual encoder' if target == 'model' else 'tower'}; the kinds "
                              f"that can are {valid}")
    return warm_start(source)


def _copy(dest: dict, source: dict, where: str) -> tuple[dict, list[str], list[str]]:
    """dest with every leaf that `source` has replaced: (tree, copied paths, kept paths)."""
    dest_leaves = pretrained.flatten_params(dest)
    source_leaves = pretrained.flatten_params(source)
    copied, kept = [], []
    out = {}
    for path, value in dest_leaves.items():
        if path in source_leaves:
            new = np.asarray(source_leaves[path])
            if new.shape != tuple(value.shape):
                raise CheckpointError(f"{where}: {path} has shape {new.shape} in the checkpoint "
                                      f"but {tuple(value.shape)} in the model")
            out[path] = new.astype(value.dtype)
            copied.append(path)
        else:
            out[path] = value
            kept.append(path)
    tree: dict = {}
    for path, value in out.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree, copied, kept


def from_pretrained(params: Mapping[str, Any], kind: str,
                    sources: Mapping[str, str | None]) -> dict:
    """`params` (host pytree of model `kind`) with `sources` {target: model directory}
    copied in. Raises CheckpointError when nothing maps or shapes disagree."""
    params = dict(params)
    for target, directory in sources.items():
        if not directory:
            continue
        if target not in TARGETS:
            raise ValueError(f"init.{target}: unknown target; valid targets are {TARGETS}")
        source = pretrained.load_pretrained(directory)
        subtree = None if (target, kind) == ("model", "uniter_itm") else _source_subtree(
            target, source.kind, source.params, str(directory))
        where = f"init.{target} ({directory})"
        if target == "model" and kind == "uniter_itm":
            params, copied, kept = _copy(params, _source_subtree(
                "cross", source.kind, source.params, str(directory)), where)
        elif target == "model":
            if not kinds.get(kind).dual_encoder:  # the towers are the whole params
                subtree = subtree["dual_encoder"]
            params, copied, kept = _copy(params, subtree, where)
        else:
            tower = f"{target}_tower"
            target_kind = kinds.get(kind)
            dual = target_kind.dual_encoder_params(params)
            new_tower, copied, kept = _copy(dual[tower], subtree, where)
            params = target_kind.replace_dual_encoder(params, {**dual, tower: new_tower})
        if not copied:
            raise CheckpointError(f"{where}: no parameter of the checkpoint matches the "
                                  f"{target}")
        log.info("%s: copied %d tensors, %d keep their initialization%s", where, len(copied),
                 len(kept), f" ({', '.join(kept[:6])}{', …' if len(kept) > 6 else ''})"
                 if kept else "")
    return params
