"""The custom format, for users' own collections (TFDS `manual_dir`).

manual_dir holds, per split (any of train / val / test):
  {split}.jsonl          one JSON object per line: {"image_id": "...", "caption": "..."};
                         several lines may share an image; a line without "caption" adds the
                         image with no caption (a gallery-only distractor)
  features/<image_id>.npz  regions per image (see data/region_files.py)
Images keep the order of their first line.
"""

from __future__ import annotations

import json
import os

from ldot_jax.data.builder_base import FeatureFilesBuilder, FeatureFilesConfig

SPLITS = ("train", "val", "test")


def read_jsonl(path: str) -> dict[str, list[str]]:
    """{image_id: [captions]} in order of first appearance."""
    images: dict[str, list[str]] = {}
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
            captions = images.setdefault(item["image_id"], [])
            if "caption" in item:
                if not isinstance(item["caption"], str) or not item["caption"].strip():
                    raise ValueError(f"{path}:{number}: 'caption' must be a non-empty string, "
                                     f"got {item['caption']!r}")
                captions.append(item["caption"].strip())
    return images


class Jsonl(FeatureFilesBuilder):
    """A user's collection in the JSONL custom format."""

    name = "ldot_jsonl"
    BUILDER_CONFIGS = [FeatureFilesConfig(name="default")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

    def split_images(self, root):
        present = [s for s in SPLITS if os.path.isfile(os.path.join(root, f"{s}.jsonl"))]
        if not present:
            raise FileNotFoundError(f"{root}: no train.jsonl, val.jsonl or test.jsonl")
        return {split: list(read_jsonl(os.path.join(root, f"{split}.jsonl")).items())
                for split in present}
