"""The layout of a run directory, and reading the config a run saved there.

    <workdir>/config.json                    the resolved run config (written by training)
    <workdir>/checkpoints/<step>/            Orbax training checkpoints
    <workdir>/model/                         the exported model directory
    <workdir>/embeddings/<split>/<side>/     extraction shards (side: image | text)
    <workdir>/index/<split>/<side>/          saved indexes (image: searched by captions)

Everything that reads or writes a run directory (training, extraction, the index build, the
Retriever, the evaluations, mining) takes these names from here, so the serving and
evaluation paths never import the trainer.
"""

from __future__ import annotations

import os

import ml_collections

from ldot_jax.core import fileutil

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"
EMBEDDINGS_DIR = "embeddings"
INDEX_DIR = "index"
# The two modalities a corpus (and an index) can hold, and which one queries the other.
SIDES = ("image", "text")
QUERY_SIDE = {"image": "text", "text": "image"}
# The two search directions (of the Retriever and of the `retrieval.Reranker` protocol): a
# caption query searches the image side, an image query the text side.
DIRECTIONS = ("text_to_image", "image_to_text")


def config_path(workdir: str) -> str:
    return os.path.join(workdir, CONFIG_FILE)


def checkpoints_dir(workdir: str) -> str:
    return os.path.join(workdir, CHECKPOINTS)


def model_dir(workdir: str) -> str:
    return os.path.join(workdir, MODEL_DIR)


def embeddings_dir(workdir: str, split: str, side: str) -> str:
    return os.path.join(workdir, EMBEDDINGS_DIR, split, side)


def index_dir(workdir: str, split: str) -> str:
    """The directory holding a split's indexes (one subdirectory per side)."""
    return os.path.join(workdir, INDEX_DIR, split)


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes <workdir>/config.json atomically (call on one process)."""
    os.makedirs(workdir, exist_ok=True)
    fileutil.atomic_write_text(config_path(workdir), config.to_json(indent=1))


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run saved in its workdir."""
    return ml_collections.ConfigDict(fileutil.read_json(config_path(workdir), "run config"))
