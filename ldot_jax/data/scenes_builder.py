"""The scenes dataset as a TFDS builder (array_record), generated in parallel processes.

Splits follow the Flickr30k protocol: `test` and `val` 1,000 images × 5 captions each, `train`
configurable (default 30,000 images). A WordPiece vocabulary trained on the train captions is
saved next to the data (`vocab.txt`): `ensure_vocabulary` writes it after generation.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import tensorflow_datasets as tfds

from ldot_jax.data import scenes, workers
from ldot_jax.data import tokenizer as tokenizer_lib
from ldot_jax.data.builder_base import RecordsBuilder, RecordsConfig
from ldot_jax.data.tokenizer import Tokenizer

VOCAB_SIZE = 1000
_CHUNK = 64
# The stored picture's side: the render size, so a ViT reads the objects at the resolution
# they were drawn (the pixel demo's 16-px patches span one small object each; 8-px patches
# see an object's part), not averaged together.
IMAGE_SIZE = 64


@dataclasses.dataclass
class ScenesBuilderConfig(RecordsConfig):
    """Scenes generation settings. Features are computed on a `render_size` picture; the
    stored picture (`image_size`, 0 for none) is an average-pooled copy."""

    seed: int = 0
    train_size: int = 30_000
    val_size: int = 1_000
    test_size: int = 1_000
    render_size: int = 64
    captions_per_image: int = 5
    max_objects: int = 4
    hard_fraction: float = 0.25
    feature_noise: float = 0.05
    projection_seed: int = 1234

    def scenes_config(self) -> scenes.ScenesConfig:
        return scenes.ScenesConfig(
            image_size=self.render_size, feat_dim=self.feat_dim,
            captions_per_image=self.captions_per_image, max_objects=self.max_objects,
            hard_fraction=self.hard_fraction, feature_noise=self.feature_noise,
            projection_seed=self.projection_seed)

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.train_size, "val": self.val_size, "test": self.test_size}


def scenes_config(name: str = "default", **overrides) -> ScenesBuilderConfig:
    """A builder config; `overrides` change any field (e.g. train_size=2000)."""
    return ScenesBuilderConfig(name=name, feat_dim=256, num_classes=scenes.NUM_CLASSES,
                               image_size=overrides.pop("image_size", IMAGE_SIZE), **overrides)


class Scenes(RecordsBuilder):
    """Procedural captioned scenes with detector-like region features (see data/scenes.py)."""

    name = "ldot_scenes"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "pictures stored at 64 × 64 (the render size; was 32 × 32)"}
    BUILDER_CONFIGS = [scenes_config("default"),
                       scenes_config("small", train_size=2_000, val_size=200, test_size=200)]

    def split_records(self, dl_manager):
        config = self.builder_config
        return {split: _generate(config, split, size)
                for split, size in config.split_sizes().items() if size}


def _generate(config: ScenesBuilderConfig, split: str, size: int) -> Iterator[tuple[str, dict]]:
    if config.image_size and config.render_size % config.image_size:
        raise ValueError(f"scenes config {config.name!r}: image_size={config.image_size} must "
                         f"divide render_size={config.render_size}")
    settings = config.scenes_config()
    jobs = [(config.seed, split, start, min(start + _CHUNK, size), settings, config.image_size)
            for start in range(0, size, _CHUNK)]
    count = int(os.environ.get("LDOT_DATA_WORKERS", "0"))  # 0: one per CPU
    for chunk in workers.ordered_map("ldot_jax.data.scenes:generate_chunk", jobs, count):
        for record in chunk:
            yield f"scenes {split} {record['image_id']}", record


def has_vocabulary(builder: tfds.core.DatasetBuilder) -> bool:
    """Whether both files of the saved tokenizer are there (each is written atomically; a
    kill can come between them)."""
    directory = os.fspath(builder.data_dir)
    return all(os.path.isfile(os.path.join(directory, name))
               for name in (tokenizer_lib.VOCAB_FILE, tokenizer_lib.SETTINGS_FILE))


def ensure_vocabulary(builder: tfds.core.DatasetBuilder) -> str:
    """Builds (once) the vocabulary of the train captions (`Tokenizer.from_words`: whole
    words, deterministic); returns its directory."""
    directory = os.fspath(builder.data_dir)
    if has_vocabulary(builder):
        return directory
    config = builder.builder_config
    settings = config.scenes_config()
    texts = (caption for index in range(config.train_size)
             for caption in scenes.scene_captions(config.seed, "train", index, settings))
    Tokenizer.from_words(texts, VOCAB_SIZE).save(directory)
    return directory
