"""Multi30K: German, French and Czech captions of Flickr30k images (TFDS `manual_dir`).

manual_dir is a copy of the multi30k/dataset repository's `data/` folder (files may be gzipped)
plus the Flickr30k region features:
  image_splits/{train,val,test_2016_flickr}.txt   image file names, one per line
  task1/raw/{split}.{lang}                        one caption per line, aligned with the images
                                                  (task 1: translations; en, de, fr, cs)
  task2/raw/{split}.{1..5}.{lang}                 five independent captions (task 2: en, de)
  features/<image stem>.npz                       regions (see data/region_files.py), and / or
  images/<file name>                              the Flickr30k pictures (image_size > 0)
Splits: train, val, test (= test_2016_flickr). Use a multilingual vocabulary
(bert-base-multilingual-cased's vocab.txt) with `Tokenizer.from_vocab_file`.
"""

from __future__ import annotations

import dataclasses
import gzip
import os

from ldot_jax.data import region_files
from ldot_jax.data.builder_base import FeatureFilesBuilder, FeatureFilesConfig

SPLIT_FILES = {"train": "train", "val": "val", "test": "test_2016_flickr"}
LANGUAGES = ("en", "de", "fr", "cs")


@dataclasses.dataclass
class Multi30kConfig(FeatureFilesConfig):
    language: str = "de"
    task: int = 1


def _read_lines(path: str) -> list[str]:
    for candidate in (path, path + ".gz"):
        if os.path.isfile(candidate):
            opener = gzip.open if candidate.endswith(".gz") else open
            with opener(candidate, "rt", encoding="utf-8") as f:
                return [line.rstrip("\n") for line in f]
    raise FileNotFoundError(f"Multi30K file {path} (or {path}.gz) does not exist")


def read_multi30k(root: str, split: str, language: str, task: int) -> list[dict]:
    """[{"filename", "captions"}] for one split, checking that the files align line by line."""
    if language not in LANGUAGES:
        raise ValueError(f"Multi30K language {language!r}: expected one of {LANGUAGES}")
    if task not in (1, 2) or (task == 2 and language not in ("en", "de")):
        raise ValueError(f"Multi30K task {task} with language {language!r}: task 1 has "
                         f"{LANGUAGES}, task 2 has en and de")
    name = SPLIT_FILES[split]
    images = [x for x in _read_lines(os.path.join(root, "image_splits", f"{name}.txt")) if x]
    if task == 1:
        caption_files = [os.path.join(root, "task1", "raw", f"{name}.{language}")]
    else:
        caption_files = [os.path.join(root, "task2", "raw", f"{name}.{k}.{language}")
                         for k in range(1, 6)]
    columns = []
    for path in caption_files:
        lines = _read_lines(path)
        while lines and not lines[-1]:
            lines.pop()
        if len(lines) != len(images):
            raise ValueError(f"{path}: {len(lines)} captions for {len(images)} images in "
                             f"image_splits/{name}.txt (the files must align line by line)")
        columns.append(lines)
    return [{"filename": image, "captions": [c[i].strip() for c in columns if c[i].strip()]}
            for i, image in enumerate(images)]


class Multi30k(FeatureFilesBuilder):
    """Multi30K captions (one language per config) with Flickr30k region features."""

    name = "ldot_multi30k"
    BUILDER_CONFIGS = [Multi30kConfig(name=lang, language=lang) for lang in ("de", "fr", "cs")] + [
        Multi30kConfig(name="de_task2", language="de", task=2)]
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

    def split_images(self, root):
        config = self.builder_config
        return {split: [(region_files.image_stem(image["filename"]), image["captions"],
                         image["filename"])
                        for image in read_multi30k(root, split, config.language, config.task)]
                for split in SPLIT_FILES}
