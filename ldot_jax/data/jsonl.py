"""The custom format, for users' own collections (TFDS `manual_dir`).

manual_dir holds, per split (any of train / val / test):
  {split}.jsonl          one JSON object per line: {"image_id": "...", "caption": "..."};
                         several lines may share an image; a line without "caption" adds the
                         image with no caption (a gallery-only distractor)
  features/<image_id>.npz  regions per image (see data/region_files.py)
Images keep the order of their first line.
"""

from __future__ import annotations

import dataclasses
import json
import os

from ldot_jax.data import region_files
from ldot_jax.data.builder_base import RecordsBuilder, RecordsConfig

SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class JsonlConfig(RecordsConfig):
    features_dir: str = "features"


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
            captions = images.setdefault(item["image_id"], [])
            if "caption" in item:
                if not isinstance(item["caption"], str) or not item["caption"].strip():
                    raise ValueError(f"{path}:{number}: 'caption' must be a non-empty string, "
                                     f"got {item['caption']!r}")
                captions.append(item["caption"].strip())
    return images


class Jsonl(RecordsBuilder):
    """A user's collection in the JSONL custom format."""

    name = "ldot_jsonl"
    BUILDER_CONFIGS = [JsonlConfig(name="default")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

    def split_records(self, dl_manager):
        config = self.builder_config
        root = os.fspath(dl_manager.manual_dir)
        features = os.path.join(root, config.features_dir)
        spec = config.record_spec()
        present = [s for s in SPLITS if os.path.isfile(os.path.join(root, f"{s}.jsonl"))]
        if not present:
            raise FileNotFoundError(f"{root}: no train.jsonl, val.jsonl or test.jsonl")
        return {split: (region_files.image_record(features, image_id, captions, spec)
                        for image_id, captions in read_jsonl(
                            os.path.join(root, f"{split}.jsonl")).items())
                for split in present}
