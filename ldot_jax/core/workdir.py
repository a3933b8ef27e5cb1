"""The layout of a run directory, and reading the config a run saved there.

    <workdir>/config.json                    the resolved run config (written by training)
    <workdir>/config_changes.jsonl           allowed changes of it by restarts
    <workdir>/checkpoints/<step>/            Orbax training checkpoints
    <workdir>/tokenizer/                     the tokenizer the run trained with
    <workdir>/model/                         the exported model directory
    <workdir>/embeddings/<split>/<side>/     extraction shards (side: image | text)
    <workdir>/index/<split>/<side>/          saved indexes (image: searched by captions)

A workdir may be local or on an object store (`gs://bucket/run`, core/paths.py).
Everything that reads or writes a run directory (training, extraction, the index build, the
Retriever, the evaluations, mining) takes these names from here, so the serving and
evaluation paths never import the trainer.
"""

from __future__ import annotations

import json
import time

import ml_collections

from ldot_jax.core import fileutil, paths

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"
TOKENIZER_DIR = "tokenizer"
EMBEDDINGS_DIR = "embeddings"
INDEX_DIR = "index"
# The two modalities a corpus (and an index) can hold, and which one queries the other.
SIDES = ("image", "text")
QUERY_SIDE = {"image": "text", "text": "image"}
# The two search directions (of the Retriever and of the `retrieval.Reranker` protocol): a
# caption query searches the image side, an image query the text side.
DIRECTIONS = ("text_to_image", "image_to_text")


def config_path(workdir: str) -> str:
    return paths.join(workdir, CONFIG_FILE)


def checkpoints_dir(workdir: str) -> str:
    return paths.join(workdir, CHECKPOINTS)


def model_dir(workdir: str) -> str:
    return paths.join(workdir, MODEL_DIR)


def tokenizer_dir(workdir: str) -> str:
    return paths.join(workdir, TOKENIZER_DIR)


def embeddings_dir(workdir: str, split: str, side: str) -> str:
    return paths.join(workdir, EMBEDDINGS_DIR, split, side)


def index_dir(workdir: str, split: str) -> str:
    """The directory holding a split's indexes (one subdirectory per side)."""
    return paths.join(workdir, INDEX_DIR, split)


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes <workdir>/config.json atomically (call on one process)."""
    paths.make_dirs(workdir)
    fileutil.atomic_write_text(config_path(workdir), config.to_json(indent=1))


CHANGES_FILE = "config_changes.jsonl"
# What a run directory holds (training, extraction, indexes, evaluations write these).
RUN_ENTRIES = (CONFIG_FILE, CHANGES_FILE, "metrics.jsonl", "tensorboard", CHECKPOINTS,
               TOKENIZER_DIR, MODEL_DIR, EMBEDDINGS_DIR, INDEX_DIR, "eval", "mined")
# What a restart may change without `train.allow_config_change`: when to stop, log, evaluate
# and save, and how fast the input is read; none changes what the run computes.
MUTABLE_KEYS = ("train.stop_at", "train.log_every", "train.progress_bar", "train.tensorboard",
                "train.eval_every", "train.eval_batch_size", "train.checkpoint_every",
                "train.keep_checkpoints", "train.async_checkpoints", "train.export",
                "train.allow_config_change", "pipeline.num_threads", "pipeline.prefetch",
                "evals.*.every", "index.*")


class ConfigChangedError(ValueError):
    """A restarted run's config differs from the one its workdir recorded."""


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: list(value) if isinstance(value, tuple) else value}


def _mutable(key: str) -> bool:
    for pattern in MUTABLE_KEYS:
        parts, names = pattern.split("."), key.split(".")
        if len(names) >= len(parts) and all(p in ("*", n) for p, n in zip(parts, names)) and (
                len(names) == len(parts) or parts[-1] == "*"):
            return True
    return False


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
    """{flattened key: (old value, new value)} for every key that differs."""
    a, b = _flatten(old), _flatten(new)
    return {k: (a.get(k, "<absent>"), b.get(k, "<absent>"))
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")}


def record_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes config.json for a new run (into a new or empty directory, or one holding only
    run files). For a restart (config.json exists) the configs must
    agree except in MUTABLE_KEYS, unless train.allow_config_change: otherwise
    ConfigChangedError lists the differing keys. Changes that are made are appended to
    config_changes.jsonl (with the time) before config.json is replaced. Call on one
    process."""
    path = config_path(workdir)
    new = json.loads(config.to_json())
    exists = paths.is_file(path)
    if not exists and paths.is_dir(workdir):
        foreign = sorted(n for n in paths.list_dir(workdir)
                         if n not in RUN_ENTRIES and not n.startswith("."))
        if foreign:
            raise fileutil.OwnershipError(
                f"workdir {workdir} holds files that are not a run's "
                f"({', '.join(foreign[:8])}{', …' if len(foreign) > 8 else ''}) and no "
                f"{CONFIG_FILE}: choose a new or empty directory")
    if exists:
        changes = config_changes(fileutil.read_json(path, "run config"), new)
        fixed = {k: v for k, v in changes.items() if not _mutable(k)}
        if fixed and not config.get("train", {}).get("allow_config_change", False):
            listed = "; ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in list(fixed.items())[:12])
            raise ConfigChangedError(
                f"{workdir} holds a run with another config ({len(fixed)} key(s) differ: "
                f"{listed}). Use another workdir, or pass "
                f"--config.train.allow_config_change=True to continue this run with the new "
                f"config (the change is recorded in {CHANGES_FILE})")
        if not changes:
            return
        row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "changes": {k: {"old": a, "new": b} for k, (a, b) in changes.items()}}
        fileutil.append_text(paths.join(workdir, CHANGES_FILE), json.dumps(row) + "\n")
    save_config(config, workdir)


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run saved in its workdir."""
    return ml_collections.ConfigDict(fileutil.read_json(config_path(workdir), "run config"))
