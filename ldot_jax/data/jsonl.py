"""The custom format, for users' own collections (TFDS `manual_dir`).

manual_dir holds, per split (any of train / val / test):
  {split}.jsonl          one JSON object per line: {"image_id": "...", "caption": "...",
                         "image": "<file name>" (optional)}; several lines may share an
                         image; a line without "caption" adds the image with no caption (a
                         gallery-only distractor)
  features/<image_id>.npz  regions per image (see data/region_files.py), and / or
  images/<file name>     the pictures (image_size > 0; JPEG / PNG / …; data/picture_files.py):
                         the line's "image", else <image_id>.jpg / .png / …
Images keep the order of their first line. Pictures only: feat_dim=0, image_size=S.
"""

from __future__ import annotations

import json
import os

from ldot_jax.data.builder_base import FeatureFilesBuilder, FeatureFilesConfig

SPLITS = ("train", "val", "test")


def read_jsonl(path: str) -> dict[str, dict]:
    """{image_id: {"captions": [str], "image": picture file name or None}} in order of first
    appearance."""
    images: dict[str, dict] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e})") from e
            if not isinstance(item, dict) or not isinstance(item.get("image_id"), str):
                raise ValueError(f"{path}:{number}: expected an object with a string "
                                 f"'image_id', got {line.strip()[:80]!r}")
            if item["image_id"] in ("", ".", "..") or "/" in item["image_id"]:
                raise ValueError(f"{path}:{number}: image_id {item['image_id']!r} cannot name a "
                                 f"feature file (features/<image_id>.npz)")
            entry = images.setdefault(item["image_id"], {"captions": [], "image": None})
            if "caption" in item:
                if not isinstance(item["caption"], str) or not item["caption"].strip():
                    raise ValueError(f"{path}:{number}: 'caption' must be a non-empty string, "
                                     f"got {item['caption']!r}")
                entry["captions"].append(item["caption"].strip())
            if "image" in item:
                _set_picture(entry, item["image"], item["image_id"], f"{path}:{number}")
    return images


def _set_picture(entry: dict, name, image_id: str, where: str) -> None:
    """Records a line's picture file name: relative, inside images/, the same on every line
    of the image."""
    if (not isinstance(name, str) or not name.strip() or os.path.isabs(name)
            or ".." in name.replace("\\", "/").split("/")):
        raise ValueError(f"{where}: 'image' must be a file name relative to images/ (no "
                         f"absolute path, no '..'), got {name!r}")
    if entry["image"] not in (None, name):
        raise ValueError(f"{where}: image {image_id!r} names picture {name!r}, an earlier "
                         f"line named {entry['image']!r}")
    entry["image"] = name


class Jsonl(FeatureFilesBuilder):
    """A user's collection in the JSONL custom format."""

    name = "ldot_jsonl"
    BUILDER_CONFIGS = [FeatureFilesConfig(name="default")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

    def split_images(self, root):
        present = [s for s in SPLITS if os.path.isfile(os.path.join(root, f"{s}.jsonl"))]
        if not present:
            raise FileNotFoundError(f"{root}: no train.jsonl, val.jsonl or test.jsonl")
        return {split: [(image_id, entry["captions"], entry["image"]) for image_id, entry
                        in read_jsonl(os.path.join(root, f"{split}.jsonl")).items()]
                for split in present}
