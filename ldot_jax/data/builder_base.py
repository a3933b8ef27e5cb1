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
from ldot_jax.data import images, picture_files, region_files, schema

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
        skip = ({f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
                | set(getattr(self, "NOT_SETTINGS", ())))
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
    `features_dir` and / or whose pictures are image files (data/picture_files.py) in
    `images_dir`: each inside the manual_dir, or an absolute path. feat_dim > 0 reads the
    regions, image_size > 0 the pictures (decoded to uint8[image_size, image_size, 3] at
    preparation by `workers` processes, 0 = one per CPU); a picture that cannot be read fails
    the preparation naming every such file (bad_images="error") or is left out ("skip");
    pictures over max_pixels count as bad (decompression bombs)."""

    features_dir: str = "features"
    images_dir: str = "images"
    bad_images: str = "error"
    max_pixels: int = images.MAX_PIXELS
    workers: int = 0

    # How the data is made, not what it is: not compared on reuse.
    NOT_SETTINGS = ("workers",)


class FeatureFilesBuilder(RecordsBuilder):
    """Base of the builders that read captions from files in the TFDS `manual_dir`, regions
    from `<features_dir>/<image_id>.npz` and pictures from `<images_dir>/<file>`. Subclasses
    implement `split_images`."""

    def split_images(self, root: str
                     ) -> Mapping[str, Iterable[tuple[str, list[str], str | None]]]:
        """{split: iterable of (image_id, captions, picture file name or None)} from the files
        in `root`; None: the picture is `<image_id>.<ext>` (picture_files.find_picture)."""
        raise NotImplementedError

    def split_records(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        return {split: self._records(root, split, list(entries))
                for split, entries in self.split_images(root).items()}

    def _records(self, root: str, split: str, entries: list) -> Iterator[tuple[str, dict]]:
        config = self.builder_config
        spec = config.record_spec()
        features = os.path.join(root, config.features_dir)
        pictures = [picture_files.find_picture(os.path.join(root, config.images_dir),
                                               image_id, file_name)
                    for image_id, _, file_name in entries] if spec.image_size else []
        if spec.feat_dim:
            records = (region_files.image_record(features, image_id, captions, spec)
                       for image_id, captions, _ in entries)
        else:
            records = ((path, {"image_id": image_id, "captions": list(captions)})
                       for (image_id, captions, _), path in zip(entries, pictures))
        if spec.image_size:
            records = picture_files.with_pictures(
                records, [(e[0], path) for e, path in zip(entries, pictures)],
                spec.image_size, config.bad_images, config.max_pixels, config.workers, split)
        return records


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
        feat_dim=features["region_feat"].shape[1] if "region_feat" in features else 0,
        num_classes=features["soft_labels"].shape[1] if "soft_labels" in features else 0,
        image_size=features["image"].shape[0] if "image" in features else 0,
        pretokenized="caption_ids" in features)
