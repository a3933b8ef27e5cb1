"""Per-image picture files for dataset preparation: `<images_dir>/<file name>` (JPEG, PNG, …).

A dataset names each image's file (Karpathy's "filename", a JSONL line's "image"), or the file
is `<image_id>.<ext>` for one of EXTENSIONS. Preparation decodes and preprocesses every file
once (data/images.py: shortest side → S bicubic, center crop, RGB; uint8[S, S, 3] stored), in
parallel worker processes, so training reads ready pixels and never meets a bad file mid-run:
every file that cannot be read is collected and reported together, naming each, before the
dataset exists (or, with bad_images="skip", left out with a warning that names them).
"""

from __future__ import annotations

import logging
import os
from typing import Iterable, Iterator, Sequence

import numpy as np

from ldot_jax.data import images, workers

log = logging.getLogger(__name__)

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
BAD_IMAGE_POLICIES = ("error", "skip")
# Images per worker job: large enough that pickling the results dominates nothing.
CHUNK = 32
# How many bad files an error lists by name (the count is always given).
LISTED = 20


def find_picture(images_dir: str, image_id: str, file_name: str | None = None) -> str:
    """The path of an image's picture: images_dir/file_name when named (then also
    images_dir/<its base name>, as Karpathy's COCO names carry a folder), else
    images_dir/<image_id><ext> for the first of EXTENSIONS (either case) that exists.
    When none exists, returns a name that says what was looked for (images_dir/<image_id>
    .{jpg,jpeg,…}), which decoding reports as missing."""
    if file_name:
        candidates = [os.path.join(images_dir, file_name),
                      os.path.join(images_dir, os.path.basename(file_name))]
    else:
        candidates = [os.path.join(images_dir, image_id + ext)
                      for ext in EXTENSIONS + tuple(e.upper() for e in EXTENSIONS)]
    for path in candidates:
        if os.path.isfile(path):
            return path
    if file_name:
        return candidates[0]
    return os.path.join(images_dir, image_id + ".{" + ",".join(e[1:] for e in EXTENSIONS)
                        + "} (either case)")


def decode_chunk(job: tuple[Sequence[str], int, int]) -> list:
    """Worker function: (paths, size, max_pixels) → per path uint8[size, size, 3], or the
    BadImageError's message (a string) for a file that cannot be read."""
    paths, size, max_pixels = job
    out = []
    for path in paths:
        try:
            out.append(images.load_pixels(path, size, max_pixels))
        except images.BadImageError as e:
            out.append(str(e))
    return out


def decode_all(paths: Sequence[str], size: int, max_pixels: int = images.MAX_PIXELS,
               num_workers: int = 0) -> Iterator[np.ndarray | str]:
    """Per path, in order: its pixels uint8[size, size, 3] or its error message. Decoded by
    `num_workers` processes (0: one per CPU; 1: this process)."""
    jobs = [(list(paths[i:i + CHUNK]), size, max_pixels) for i in range(0, len(paths), CHUNK)]
    for chunk in workers.ordered_map("ldot_jax.data.picture_files:decode_chunk", jobs,
                                     num_workers):
        yield from chunk


def with_pictures(records: Iterable[tuple[str, dict]], entries: Sequence[tuple[str, str]],
                  size: int, bad_images: str = "error", max_pixels: int = images.MAX_PIXELS,
                  num_workers: int = 0, split: str = "split") -> Iterator[tuple[str, dict]]:
    """Adds "image" uint8[size, size, 3] to each (source, record); entries[i] = (image_id,
    picture path) of record i. Bad files: bad_images="error" raises one BadImageError naming
    them all after the split was read (so one run finds every bad file); "skip" drops those
    images (with their captions) and logs a warning naming them."""
    if bad_images not in BAD_IMAGE_POLICIES:
        raise ValueError(f"bad_images={bad_images!r}: expected one of {BAD_IMAGE_POLICIES}")
    bad: list[str] = []
    pixels = decode_all([path for _, path in entries], size, max_pixels, num_workers)
    for (source, record), (image_id, path), decoded in zip(records, entries, pixels):
        if record["image_id"] != image_id:
            raise AssertionError(f"{source}: records and pictures out of step "
                                 f"({record['image_id']!r} vs {image_id!r})")
        if isinstance(decoded, str):
            bad.append(f"image {image_id!r}: {decoded}")
            continue
        if bad and bad_images == "error":
            continue  # the split fails at its end: only collect the other bad files
        yield source, {**record, "image": decoded}
    if bad:
        listed = "\n  ".join(bad[:LISTED]) + (f"\n  … and {len(bad) - LISTED} more"
                                              if len(bad) > LISTED else "")
        message = (f"{split}: {len(bad)} of {len(entries)} pictures cannot be read:\n  "
                   f"{listed}")
        if bad_images == "error":
            raise images.BadImageError(message + "\n(fix or remove them, or prepare with "
                                                 "bad_images='skip' to leave them out)")
        log.warning("%s\nleft out (bad_images='skip')", message)
