"""The shared TFDS machinery of every ldot_jax dataset: array_record files of `schema` records.

A dataset is a `RecordsBuilder` subclass: it names its splits and yields `(source, record)`
pairs per split (`source` names the file / key / line a record came from, for errors); the base
validates each record, refuses duplicate image ids and empty splits, keeps the order of
generation (positions in a split are image indices), and stores the builder config's settings
in the dataset metadata so that a directory generated with other settings is never silently
reused (`check_settings`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Iterable, Iterator, Mapping

import tensorflow_datasets as tfds

from ldot_jax.core import fileutil
from ldot_jax.data import region_files, schema

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RecordsConfig(tfds.core.BuilderConfig):
    """A builder config that fixes the stored record layout (see `schema.RecordSpec`)."""

    feat_dim: int = 2048
    num_classes: int = 0
    image_size: int = 0
    pretokenized: bool = False

    def record_spec(self) -> schema.RecordSpec:
        return schema.RecordSpec(self.feat_dim, self.num_classes, self.image_size,
                                 self.pretokenized)

    def settings(self) -> dict:
        """Everything that shapes the generated data (compared on reuse), as JSON values."""
        skip = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
        return json.loads(json.dumps({f.name: getattr(self, f.name)
                                      for f in dataclasses.fields(self) if f.name not in skip}))


class RecordsBuilder(tfds.core.GeneratorBasedBuilder):
    """Base of the project's builders. Subclasses implement `split_records`."""

    VERSION = tfds.core.Version("1.0.0")

    def split_records(self, dl_manager) -> Mapping[str, Iterable[tuple[str, dict]]]:
        """{split name: iterable of (source, record)}."""
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=self.__doc__,
            # Positions in a split are the image indices, in source order.
            disable_shuffling=True,
            features=self.builder_config.record_spec().features(),
            metadata=tfds.core.MetadataDict(settings=self.builder_config.settings()))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split, records)
                for split, records in self.split_records(dl_manager).items()}

    def _generate_examples(self, split: str, records: Iterable[tuple[str, dict]]
                           ) -> Iterator[tuple[int, dict]]:
        spec = self.builder_config.record_spec()
        seen: dict[str, str] = {}
        count = 0
        for source, record in records:
            record = schema.check_record(record, spec, source)
            image_id = record["image_id"]
            if image_id in seen:
                raise ValueError(f"{source}: image id {image_id!r} appears twice in split "
                                 f"{split!r} (first in {seen[image_id]})")
            seen[image_id] = source
            yield count, record
            fileutil.pause_point("dataset_record")  # crash tests
            count += 1
        if not count:
            raise ValueError(f"{self.name}: split {split!r} is empty")
        log.info("%s: wrote %d images to split %r", self.name, count, split)


@dataclasses.dataclass
class FeatureFilesConfig(RecordsConfig):
    """For datasets whose regions are per-image .npz files (see data/region_files.py) in
    `features_dir`: inside the manual_dir, or an absolute path."""

    features_dir: str = "features"


class FeatureFilesBuilder(RecordsBuilder):
    """Base of the builders that read captions from files in the TFDS `manual_dir` and regions
    from `<features_dir>/<image_id>.npz`. Subclasses implement `split_images`."""

    def split_images(self, root: str) -> Mapping[str, Iterable[tuple[str, list[str]]]]:
        """{split: iterable of (image_id, captions)} from the files in `root`."""
        raise NotImplementedError

    def split_records(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        features = os.path.join(root, self.builder_config.features_dir)
        spec = self.builder_config.record_spec()
        return {split: (region_files.image_record(features, image_id, captions, spec)
                        for image_id, captions in images)
                for split, images in self.split_images(root).items()}


def check_settings(builder: tfds.core.DatasetBuilder) -> None:
    """Raises if a prepared dataset was generated with other settings than `builder`'s config
    (TFDS reuses a directory by config name and version alone)."""
    config = builder.builder_config
    if not isinstance(config, RecordsConfig):
        return
    stored = dict(builder.info.metadata or {}).get("settings")
    wanted = config.settings()
    if stored is not None and dict(stored) != wanted:
        diff = {k: (stored.get(k), wanted.get(k)) for k in set(stored) | set(wanted)
                if stored.get(k) != wanted.get(k)}
        raise ValueError(
            f"{builder.data_dir} was generated with other settings than config "
            f"{config.name!r} asks for ({{key: (stored, wanted)}}: {diff}); give the config "
            f"another name or remove the directory")


def record_spec_of(builder: tfds.core.DatasetBuilder) -> schema.RecordSpec:
    """The record layout of a prepared dataset, read from its features."""
    features = builder.info.features
    return schema.RecordSpec(
        feat_dim=features["region_feat"].shape[1],
        num_classes=features["soft_labels"].shape[1] if "soft_labels" in features else 0,
        image_size=features["image"].shape[0] if "image" in features else 0,
        pretokenized="caption_ids" in features)
