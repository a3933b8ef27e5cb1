"""Model directories: a model config (JSON) plus its parameters (Orbax), and the load API.

A directory written by `save_pretrained` (the converter writes them too) holds:
  ldot_config.json  {"format_version", "kind", "model": <config dict>, "metadata": {...}}
  params/           Orbax checkpoint of the Flax params pytree
It is written to a temporary sibling and renamed into place, so a reader never sees half of one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np

from ldot_jax.checkpoints import checkpoint, kinds
from ldot_jax.core import fileutil, paths
from ldot_jax.models import config as config_lib
from ldot_jax.models.cross_encoder import CrossEncoder
from ldot_jax.models.dual_encoder import DualEncoder
from ldot_jax.models.pretraining import DualEncoderForPretraining

CONFIG_FILE = "ldot_config.json"
PARAMS_DIR = "params"
# The tokenizer the model was trained with (vocab.txt + tokenizer.json), when known: what a
# query path needs besides the model (training exports write it).
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1
FORMAT = "ldot_jax.model"  # the manifest's format (core/fileutil.py)


def build_model(kind: str, config) -> nn.Module:
    """The Flax module of `kind` for `config`."""
    spec = kinds.get(kind)
    if not isinstance(config, spec.config_cls):
        raise ValueError(f"kind {kind!r} takes a {spec.config_cls.__name__}, got "
                         f"{type(config).__name__}")
    return spec.build(config)


def abstract_params(kind: str, config) -> Any:
    """Params pytree of jax.ShapeDtypeStruct for `kind` / `config` (nothing is allocated)."""
    model = build_model(kind, config)
    inputs = kinds.get(kind).dummy_inputs(config)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))
    return variables["params"]


def init_params(kind: str, config, rng) -> Any:
    """Freshly initialized params of `kind` / `config` (BERT init: normal(0.02), LN 1/0)."""
    model = build_model(kind, config)
    inputs = kinds.get(kind).dummy_inputs(config)
    return jax.jit(model.init)(rng, *inputs)["params"]


def save_pretrained(directory: str | os.PathLike, kind: str, config, params,
                    metadata: dict | None = None, tokenizer=None, inputs=()) -> str:
    """Writes a model directory atomically and returns its absolute path.

    Params must match `abstract_params(kind, config)` in structure and shapes. tokenizer: a
    tokenizer of data/text_tokenizers.py (WordPiece or CLIP BPE) saved beside the params
    (`load_tokenizer` reads it). An existing `directory` is replaced only if it is a model
    directory holding nothing else
    (fileutil.atomic_directory: a crash at any point leaves the old or the new model); inputs:
    files the caller read, refused inside `directory`.
    """
    _check_params(kind, config, params, where="params to save")
    body = {"format_version": FORMAT_VERSION, "kind": kind, "model": config_lib.to_dict(config),
            "metadata": metadata or {}}
    with fileutil.atomic_directory(directory, FORMAT, inputs) as tmp:
        checkpoint.save_tree(os.path.join(tmp, PARAMS_DIR), params)
        if tokenizer is not None:
            tokenizer.save(os.path.join(tmp, TOKENIZER_DIR))
        fileutil.atomic_write_text(os.path.join(tmp, CONFIG_FILE), json.dumps(body, indent=1))
    return fileutil.resolve_output(directory)


def verify(directory: str | os.PathLike, full: bool = False) -> None:
    """Checks a model directory's files against its manifest (sizes; SHA-256 with `full`);
    `checkpoint.CheckpointError` names a damaged file. Directories written before manifests
    existed pass unchecked."""
    try:
        fileutil.verify(directory, FORMAT, full)
    except fileutil.IntegrityError as e:
        raise checkpoint.CheckpointError(f"damaged model directory: {e}") from e


def readable(directory: str | os.PathLike) -> str:
    """The local directory to read model directory `directory` from: itself, or for a gs://
    one a copy in the cache, checked against its manifest (fileutil.local_directory)."""
    try:
        return fileutil.local_directory(directory, FORMAT if paths.is_remote(directory)
                                        else None)
    except FileNotFoundError:
        raise checkpoint.CheckpointError(f"model directory {directory} does not exist") from None
    except fileutil.IntegrityError as e:
        raise checkpoint.CheckpointError(f"not a usable model directory: {e}") from e


def load_tokenizer(directory: str | os.PathLike):
    """The Tokenizer saved in a model directory, or None when it holds none (converted
    checkpoints: pass the vocabulary the original was trained with)."""
    path = os.path.join(readable(directory), TOKENIZER_DIR)
    if not os.path.isdir(path):
        return None
    from ldot_jax.data import text_tokenizers
    return text_tokenizers.load(path)


class Pretrained(NamedTuple):
    kind: str
    config: Any
    params: Any
    metadata: dict


def read_config(directory: str | os.PathLike) -> tuple[str, Any, dict]:
    """(kind, config, metadata) of a model directory, without loading params."""
    directory = readable(directory)  # also finishes a replacement a crash interrupted
    if not os.path.isdir(directory):
        raise checkpoint.CheckpointError(f"model directory {directory} does not exist")
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise checkpoint.CheckpointError(
            f"{directory} is not a complete ldot_jax model directory: {CONFIG_FILE} is missing")
    try:
        with open(path) as f:
            body = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise checkpoint.CheckpointError(f"{path} is unreadable: {e}") from e
    for key in ("format_version", "kind", "model"):
        if key not in body:
            raise checkpoint.CheckpointError(f"{path}: key {key!r} is missing")
    if body["format_version"] != FORMAT_VERSION:
        raise checkpoint.CheckpointError(
            f"{path}: format_version {body['format_version']} is not supported "
            f"(this ldot_jax reads {FORMAT_VERSION})")
    spec = kinds.get(body["kind"])
    config = config_lib.from_dict(spec.config_cls, body["model"], where=f"{path}: model")
    return body["kind"], config, body.get("metadata", {})


def load_pretrained(directory: str | os.PathLike, sharding=None, **numerics) -> Pretrained:
    """Loads a model directory. `numerics` (see `config.NUMERICS`: dtype, attention_impl,
    remat, dropout rates) override the saved config's compute settings; parameters keep their
    stored dtype."""
    directory = readable(directory)
    kind, config, metadata = read_config(directory)
    if numerics:
        config = config_lib.replace_numerics(config, **numerics)
    params_path = os.path.join(directory, PARAMS_DIR)
    stored = checkpoint.tree_metadata(params_path)
    expected = abstract_params(kind, config)
    _compare_trees(expected, stored, where=params_path)
    verify(directory)  # every file's size against the manifest, before reading the params
    params = checkpoint.restore_tree(params_path, expected, sharding)
    return Pretrained(kind, config, params, metadata)


def load_dual_encoder(directory: str | os.PathLike, **numerics) -> tuple[DualEncoder, Any]:
    """(DualEncoder, params) from a converted LightningDOT checkpoint or a trained model.

    A pre-training directory (kind lightningdot_pretrain) gives its dual encoder (the heads
    are dropped). `numerics` override compute settings, e.g. `dtype="bfloat16"`.
    """
    loaded = load_pretrained(directory, **numerics)
    spec = kinds.get(loaded.kind)
    if not spec.is_dual_encoder:
        raise checkpoint.CheckpointError(
            f"{directory} holds a {loaded.kind!r} model, not a dual encoder "
            f"({' or '.join(kinds.dual_encoder_kinds())})")
    return DualEncoder(loaded.config), spec.dual_encoder_params(loaded.params)


def load_pretraining_model(directory: str | os.PathLike,
                           **numerics) -> tuple[DualEncoderForPretraining, Any]:
    """(DualEncoderForPretraining, params) from a lightningdot_pretrain directory."""
    loaded = load_pretrained(directory, **numerics)
    if loaded.kind != "lightningdot_pretrain":
        raise checkpoint.CheckpointError(
            f"{directory} holds a {loaded.kind!r} model, not lightningdot_pretrain")
    return DualEncoderForPretraining(loaded.config), loaded.params


def load_cross_encoder(directory: str | os.PathLike, **numerics) -> tuple[CrossEncoder, Any]:
    """(CrossEncoder, params) from a converted UNITER ITM checkpoint or a trained re-ranker."""
    loaded = load_pretrained(directory, **numerics)
    if loaded.kind != "uniter_itm":
        raise checkpoint.CheckpointError(
            f"{directory} holds a {loaded.kind!r} model, not a cross-encoder (uniter_itm)")
    return CrossEncoder(loaded.config), loaded.params


def fingerprint(kind: str, config, params) -> str:
    """A model's identity: "sha256:<hex>" over its kind, its config (JSON) and every parameter
    (path, dtype, shape and bytes). An index records the fingerprint of the towers that made
    its vectors, so vectors from another model are never mixed in silently."""
    h = hashlib.sha256()
    h.update(kind.encode())
    h.update(json.dumps(config_lib.to_dict(config), sort_keys=True).encode())
    for name, leaf in sorted(flatten_params(params).items()):
        array = np.ascontiguousarray(jax.device_get(leaf))
        h.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        h.update(array.tobytes())
    return "sha256:" + h.hexdigest()


def flatten_params(tree) -> dict[str, Any]:
    """{"a/b/kernel": leaf} for a nested params dict (NumPy, jax or abstract leaves)."""
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree.flatten_with_path(tree)[0]}


def _compare_trees(expected, actual, where: str) -> None:
    """Raises CheckpointError listing missing / unexpected leaves and shape mismatches."""
    want, have = flatten_params(expected), flatten_params(actual)
    problems = []
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    if missing:
        problems.append(f"missing {len(missing)} parameter(s): {missing[:20]}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} parameter(s): {unexpected[:20]}")
    for name in sorted(set(want) & set(have)):
        if tuple(want[name].shape) != tuple(have[name].shape):
            problems.append(f"{name}: stored shape {tuple(have[name].shape)}, model expects "
                            f"{tuple(want[name].shape)}")
    if problems:
        raise checkpoint.CheckpointError(f"{where} does not match the model: "
                                         + "; ".join(problems))


def _check_params(kind, config, params, where):
    _compare_trees(abstract_params(kind, config), params, where)


def describe(config) -> str:
    """One line: sizes of a config, for logs."""
    parts = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, config_lib.TransformerConfig):
            parts.append(f"{f.name}: {value.num_layers}L/{value.hidden_size}H/"
                         f"{value.num_heads}A vocab {value.vocab_size}")
        elif not dataclasses.is_dataclass(value):
            parts.append(f"{f.name}={value}")
    return ", ".join(parts)
