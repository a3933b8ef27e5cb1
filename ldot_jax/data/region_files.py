"""Per-image region-feature files: `<features_dir>/<image stem>.npz`.

Each .npz holds `features` f[n, feat_dim] (or `region_feat`), `boxes` f[n, 4 | 6 | 7] (or
UNITER's `norm_bb` [n, 6]; see `schema.boxes_from_corners`) and, if the dataset keeps detector
classes, `soft_labels` f[n, num_classes]. Any float dtype is accepted (float16 is stored as is).
"""

from __future__ import annotations

import os

import numpy as np

from ldot_jax.data import schema

FEATURE_KEYS = ("features", "region_feat")
BOX_KEYS = ("boxes", "norm_bb")


def image_stem(file_name: str) -> str:
    """"1000092795.jpg" → "1000092795": the feature file's name and the stored image id."""
    return os.path.splitext(os.path.basename(file_name))[0]


def _first(archive, keys, path):
    for key in keys:
        if key in archive.files:
            return archive[key]
    raise ValueError(f"{path}: no {' or '.join(repr(k) for k in keys)} array (has "
                     f"{archive.files})")


def read_regions(path: str, spec: schema.RecordSpec, image_name: str) -> dict:
    """{region_feat, boxes[, soft_labels]} of one image's .npz, checked against `spec`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {image_name!r}: region-feature file {path} does not "
                                f"exist")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npz archive ({e})") from e
    with archive:
        out = {"region_feat": _first(archive, FEATURE_KEYS, path),
               "boxes": _first(archive, BOX_KEYS, path)}
        if spec.num_classes:
            out["soft_labels"] = _first(archive, ("soft_labels",), path)
    feat = out["region_feat"]
    if feat.ndim != 2 or feat.shape[1] != spec.feat_dim:
        raise ValueError(f"{path}: features of shape {feat.shape}, the dataset config expects "
                         f"[n, {spec.feat_dim}] (set feat_dim in the builder config)")
    return out


def image_record(features_dir: str, image_id: str, captions,
                 spec: schema.RecordSpec) -> tuple[str, dict]:
    """(source, record) for an image whose regions are `features_dir/<image_id>.npz`."""
    path = os.path.join(features_dir, image_id + ".npz")
    return path, {"image_id": image_id, "captions": list(captions),
                  **read_regions(path, spec, image_id)}
