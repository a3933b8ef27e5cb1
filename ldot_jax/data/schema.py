"""The project's stored record: one image with its regions and captions.

Every dataset (the built-in scenes, Karpathy-split Flickr30k / COCO, Multi30K, UNITER feature
databases, the JSONL custom format) is written as TFDS array_record files of these records:
  image_id     str
  region_feat  f16[n, feat_dim]      detector region features (float16 as UNITER stores them);
  boxes        f32[n, 7]             [x1, y1, x2, y2, w, h, w*h], normalized to [0, 1]
                                     (both only if feat_dim > 0)
  soft_labels  f16[n, num_classes]   detector class distributions (only if num_classes > 0)
  captions     str[k]                raw captions (k ≥ 0; k = 0 for gallery-only images)
  caption_ids  i32[sum of lengths]   only for datasets that come pre-tokenized (UNITER txt_db):
  caption_lengths i32[k]             the captions' wordpieces (without [CLS] / [SEP]),
                                     concatenated (TFDS without TensorFlow has no ragged tensors)
  image        u8[S, S, 3]           only if image_size > 0: the picture (the scenes' rendering,
                                     or an image file as data/images.py preprocesses it)
A dataset stores regions, pictures or both (feat_dim = 0: pictures only).
`check_record` validates a record before it is written, naming its source on error.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np
import tensorflow_datasets as tfds

from ldot_jax.core import numerics
from ldot_jax.data import batching

BOX_DIM = 7


@dataclasses.dataclass(frozen=True)
class RecordSpec:
    """What a dataset's records hold: region feature dimension (0 = no regions), detector
    classes (0 = no soft labels), stored picture side (0 = none), whether captions come as
    wordpiece ids too."""

    feat_dim: int
    num_classes: int = 0
    image_size: int = 0
    pretokenized: bool = False

    def __post_init__(self):
        if self.feat_dim < 0 or self.image_size < 0:
            raise ValueError(f"feat_dim={self.feat_dim}, image_size={self.image_size}: "
                             f"expected ≥ 0")
        if not self.feat_dim and not self.image_size:
            raise ValueError("a dataset stores regions (feat_dim > 0), pictures "
                             "(image_size > 0) or both; both are 0")
        if self.num_classes and not self.feat_dim:
            raise ValueError(f"num_classes={self.num_classes} needs regions (feat_dim > 0)")

    def features(self) -> tfds.features.FeaturesDict:
        # Arrays are stored as raw bytes: TFDS's default (proto value lists) widens float16 to
        # float32 and costs ~10× more time to write and read.
        raw = tfds.features.Encoding.BYTES
        spec = {"image_id": tfds.features.Text(),
                "captions": tfds.features.Sequence(tfds.features.Text())}
        if self.feat_dim:
            spec["region_feat"] = tfds.features.Tensor(shape=(None, self.feat_dim),
                                                       dtype=np.float16, encoding=raw)
            spec["boxes"] = tfds.features.Tensor(shape=(None, BOX_DIM), dtype=np.float32,
                                                 encoding=raw)
        if self.num_classes:
            spec["soft_labels"] = tfds.features.Tensor(shape=(None, self.num_classes),
                                                       dtype=np.float16, encoding=raw)
        if self.pretokenized:
            spec["caption_ids"] = tfds.features.Tensor(shape=(None,), dtype=np.int32)
            spec["caption_lengths"] = tfds.features.Tensor(shape=(None,), dtype=np.int32)
        if self.image_size:
            spec["image"] = tfds.features.Tensor(shape=(self.image_size, self.image_size, 3),
                                                 dtype=np.uint8, encoding=raw)
        return tfds.features.FeaturesDict(spec)


def boxes_from_corners(corners) -> np.ndarray:
    """f32[n, 7] `[x1, y1, x2, y2, w, h, w*h]` from f[n, 4] corners or f[n, 6] (UNITER's
    norm_bb, which already holds w and h)."""
    corners = np.asarray(corners, np.float32)
    if corners.ndim != 2 or corners.shape[1] not in (4, 6, 7):
        raise ValueError(f"boxes of shape {corners.shape}: expected [n, 4] corners, [n, 6] "
                         f"(x1, y1, x2, y2, w, h) or [n, 7]")
    if corners.shape[1] == 7:
        return corners
    w = corners[:, 4] if corners.shape[1] == 6 else corners[:, 2] - corners[:, 0]
    h = corners[:, 5] if corners.shape[1] == 6 else corners[:, 3] - corners[:, 1]
    return np.concatenate([corners[:, :4], w[:, None], h[:, None], (w * h)[:, None]], axis=1)


def check_record(record: Mapping, spec: RecordSpec, source: str) -> dict:
    """Validates one record against `spec`; returns it with arrays in the stored dtypes.

    `source` names where it came from (a file, an LMDB key) for the error message.
    """
    def fail(what):
        raise ValueError(f"{source}: {what}")

    required = ("image_id", "captions") + (("region_feat", "boxes") if spec.feat_dim else ())
    for key in required + (("image",) if spec.image_size else ()):
        if key not in record:
            fail(f"record lacks {key!r} (has {sorted(record)})")
    out = {"image_id": str(record["image_id"]), "captions": [str(c) for c in record["captions"]]}
    if spec.feat_dim:
        out.update(_check_regions(record, spec, fail))
    if spec.pretokenized:
        ids = record.get("caption_ids")
        if ids is None or len(ids) != len(out["captions"]):
            fail(f"{0 if ids is None else len(ids)} caption id lists for "
                 f"{len(out['captions'])} captions")
        ids = [np.asarray(i, np.int32).reshape(-1) for i in ids]
        out["caption_ids"] = np.concatenate(ids) if ids else np.zeros((0,), np.int32)
        out["caption_lengths"] = np.array([len(i) for i in ids], np.int32)
    if spec.image_size:
        image = np.asarray(record["image"])
        if image.shape != (spec.image_size, spec.image_size, 3):
            fail(f"image of shape {image.shape}, expected "
                 f"({spec.image_size}, {spec.image_size}, 3)")
        if image.dtype != np.uint8:
            fail(f"image of dtype {image.dtype}, expected uint8 RGB")
        out["image"] = image
    return out


def _check_regions(record: Mapping, spec: RecordSpec, fail) -> dict:
    """A record's regions (and soft labels) checked and in the stored dtypes."""
    feat = np.asarray(record["region_feat"])
    if feat.ndim != 2 or feat.shape[1] != spec.feat_dim:
        fail(f"region features of shape {feat.shape}, expected [n, {spec.feat_dim}]")
    if feat.shape[0] == 0:
        fail("no regions")
    n = feat.shape[0]
    boxes = boxes_from_corners(record["boxes"])
    if boxes.shape[0] != n:
        fail(f"{boxes.shape[0]} boxes for {n} regions")
    if not (np.isfinite(feat).all() and np.isfinite(boxes).all()):
        fail("non-finite region features or boxes")
    try:
        numerics.check_fits(feat, np.float16, "region features")  # stored as float16
        batching.check_boxes(boxes, "boxes")
    except ValueError as e:
        fail(str(e))
    out = {"region_feat": feat.astype(np.float16), "boxes": boxes}
    if spec.num_classes:
        if "soft_labels" not in record:
            fail(f"record lacks 'soft_labels' (the dataset stores {spec.num_classes} classes)")
        labels = np.asarray(record["soft_labels"])
        if labels.shape != (n, spec.num_classes):
            fail(f"soft labels of shape {labels.shape}, expected ({n}, {spec.num_classes})")
        if not np.isfinite(labels).all():
            fail("non-finite soft labels")
        out["soft_labels"] = labels.astype(np.float16)
    return out


def as_str(value) -> str:
    """A text field as str (TFDS data sources return bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def caption_texts(record: Mapping) -> list[str]:
    """A record's captions as str (TFDS data sources return bytes)."""
    return [as_str(c) for c in record["captions"]]


def split_caption_ids(record: Mapping) -> list[np.ndarray]:
    """The per-caption wordpiece arrays of a pre-tokenized record."""
    lengths = np.asarray(record["caption_lengths"])
    if not len(lengths):
        return []
    return np.split(np.asarray(record["caption_ids"]), np.cumsum(lengths)[:-1])
