"""Flickr30k / COCO in the Karpathy split, from the files users have (TFDS `manual_dir`).

manual_dir holds:
  dataset_flickr30k.json or dataset_coco.json   {"images": [{"filename", "split", "sentences":
                                                 [{"raw", ...}], ...}], ...}
  features/<image stem>.npz                     regions per image (see data/region_files.py),
                                                and / or (image_size > 0, feat_dim 0 for none)
  images/[<filepath>/]<filename>                the pictures (JPEG / PNG; data/picture_files.py)
Splits: train (with COCO's "restval" unless `restval_to_train` is False), val, test: the
splits LightningDOT and UNITER report on (Flickr30k test 1,000 images, COCO test 5,000).
"""

from __future__ import annotations

import dataclasses
import os

from ldot_jax.core import fileutil
from ldot_jax.data import region_files
from ldot_jax.data.builder_base import FeatureFilesBuilder, FeatureFilesConfig

SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class KarpathyConfig(FeatureFilesConfig):
    annotations: str = "dataset_flickr30k.json"  # file name inside manual_dir
    restval_to_train: bool = True


def read_karpathy(path: str, restval_to_train: bool = True) -> dict[str, list[dict]]:
    """{split: [{"filename", "captions"}]} from a Karpathy-split JSON, in file order."""
    data = fileutil.read_json(path, "Karpathy split file")
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(f"{path}: expected an object with an 'images' list")
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for i, image in enumerate(data["images"]):
        for key in ("filename", "split", "sentences"):
            if key not in image:
                raise ValueError(f"{path}: images[{i}] lacks {key!r} (has {sorted(image)})")
        split = image["split"]
        if split == "restval":
            split = "train" if restval_to_train else None
        elif split not in splits:
            raise ValueError(f"{path}: images[{i}] ({image['filename']}) has split {split!r}, "
                             f"expected one of train / val / test / restval")
        if split is None:
            continue
        captions = []
        for j, sentence in enumerate(image["sentences"]):
            if "raw" not in sentence:
                raise ValueError(f"{path}: images[{i}].sentences[{j}] lacks 'raw'")
            captions.append(sentence["raw"].strip())
        # COCO's entries name the folder too ("filepath": "val2014").
        name = os.path.join(image.get("filepath", ""), image["filename"])
        splits[split].append({"filename": name, "captions": captions})
    return splits


class Karpathy(FeatureFilesBuilder):
    """Flickr30k / COCO (Karpathy split) with precomputed region features."""

    name = "ldot_karpathy"
    BUILDER_CONFIGS = [
        KarpathyConfig(name="flickr30k", annotations="dataset_flickr30k.json"),
        KarpathyConfig(name="coco", annotations="dataset_coco.json"),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

    def split_images(self, root):
        config = self.builder_config
        splits = read_karpathy(os.path.join(root, config.annotations), config.restval_to_train)
        return {split: [(region_files.image_stem(image["filename"]), image["captions"],
                         image["filename"]) for image in images]
                for split, images in splits.items()}
