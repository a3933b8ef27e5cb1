"""Padding examples into batches whose shapes come from a small fixed set (length buckets), so
jitted steps compile once per bucket, never per batch.

An example is a dict with `input_ids` (int list, `[CLS] … [SEP]`; absent in image-only
examples), `image` (the per-image input; regions: {"region_feat": f32[n, F], "boxes":
f32[n, 7]}; absent in text-only examples), optional `soft_labels` f32[n, C], and ids
`image_index` (int) and `text_index` (int). A batch is a dict of NumPy arrays with one pytree
per side:
  text  {"input_ids": i32[B, Lb], "attention_mask": i32[B, Lb]}          (collate_text)
  image {"region_feat": f32[B, Rb, F], "boxes": f32[B, Rb, 7], "region_mask": i32[B, Rb]}
        (the image input's collate: regions), or {"pixels": uint8[B, S, S, 3]} (pixels)
  (soft_labels f32[B, Rb, C]), image_index i32[B], text_index i32[B], valid bool[B] (False for
  rows that only pad the batch to its fixed size).
Lb / Rb are the smallest buckets that fit the longest caption / largest region set. The
collates are the only code above the models that reads the inputs' fields; the kinds of image
input (one per image tower input, `models/towers.TowerSpec.collate`) are `IMAGE_INPUTS`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

from ldot_jax.core import numerics


def bucket_size(n: int, buckets: Sequence[int], what: str = "length") -> int:
    """The smallest bucket ≥ n; an error naming n and the buckets if none fits."""
    for bucket in sorted(buckets):
        if n <= bucket:
            return bucket
    raise ValueError(f"{what} {n} exceeds the largest bucket {max(buckets)} (buckets "
                     f"{sorted(buckets)})")


# Normalized boxes may overshoot [0, 1] by a rounding error; pixel boxes overshoot by far more.
BOX_TOLERANCE = 1e-3


def check_boxes(boxes, what: str = "boxes") -> None:
    """ValueError if normalized boxes f[n, 7] (x1, y1, x2, y2, w, h, area) leave [0, 1] by
    more than BOX_TOLERANCE: such boxes are most likely pixel coordinates."""
    boxes = np.asarray(boxes)
    if not boxes.size:
        return
    low, high = float(boxes.min()), float(boxes.max())
    if low < -BOX_TOLERANCE or high > 1 + BOX_TOLERANCE:
        row = int(np.argwhere((boxes < -BOX_TOLERANCE) | (boxes > 1 + BOX_TOLERANCE))[0, 0])
        raise ValueError(f"{what} outside [0, 1] (min {low:g}, max {high:g}; row {row}: "
                         f"{np.round(boxes[row], 3).tolist()}): boxes are normalized by the "
                         f"image width and height; these look like pixel coordinates")


def collate_text(token_ids: Sequence[Sequence[int]], text_buckets: Sequence[int],
                 batch_size: int | None = None, stub_rows: bool = False) -> dict[str, np.ndarray]:
    """The text input of a batch: {"input_ids": i32[B, Lb], "attention_mask": i32[B, Lb]}
    from token id lists (`[CLS] … [SEP]`). Rows past len(token_ids) (up to `batch_size`) are
    padding: empty, or with `stub_rows` a 2-token stub so no row is all padding."""
    size = batch_size or len(token_ids)
    length = bucket_size(max(len(ids) for ids in token_ids), text_buckets,
                         "caption length (tokens with [CLS]/[SEP])")
    input_ids = np.zeros((size, length), np.int32)
    mask = np.zeros((size, length), np.int32)
    for row, ids in enumerate(token_ids):
        input_ids[row, :len(ids)] = ids
        mask[row, :len(ids)] = 1
    if stub_rows:
        mask[len(token_ids):, :2] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def collate_regions(images: Sequence[Mapping], region_buckets: Sequence[int],
                    batch_size: int | None = None, stub_rows: bool = False,
                    ) -> dict[str, np.ndarray]:
    """The region image input of a batch: {"region_feat": f32[B, Rb, F], "boxes":
    f32[B, Rb, 7], "region_mask": i32[B, Rb]} from per-image {"region_feat": [n, F], "boxes":
    [n, 7]}. Rows past len(images) are padding: empty, or with `stub_rows` one zero region."""
    size = batch_size or len(images)
    regions = bucket_size(max(len(e["region_feat"]) for e in images), region_buckets,
                          "region count")
    feat_dim, box_dim = np.shape(images[0]["region_feat"])[-1], np.shape(images[0]["boxes"])[-1]
    out = {"region_feat": np.zeros((size, regions, feat_dim), np.float32),
           "boxes": np.zeros((size, regions, box_dim), np.float32),
           "region_mask": np.zeros((size, regions), np.int32)}
    for row, example in enumerate(images):
        feat, boxes = np.asarray(example["region_feat"]), np.asarray(example["boxes"])
        if feat.ndim != 2:
            raise ValueError(f"collate: example {row} has region features of shape "
                             f"{feat.shape}, expected [n, {feat_dim}]")
        if feat.shape[1] != feat_dim:
            raise ValueError(f"collate: example {row} has region features of dim "
                             f"{feat.shape[1]}, the batch has {feat_dim}")
        if boxes.shape != (len(feat), box_dim) or not len(feat):
            raise ValueError(f"collate: example {row} has {len(feat)} region features and "
                             f"boxes of shape {boxes.shape}; expected the same non-zero count "
                             f"and [n, {box_dim}]")
        numerics.check_finite(feat, f"collate: example {row}'s region features (region, dim)")
        numerics.check_finite(boxes, f"collate: example {row}'s boxes (region, coordinate)")
        check_boxes(boxes, f"collate: example {row}'s boxes")
        out["region_feat"][row, :len(feat)] = feat
        out["boxes"][row, :len(feat)] = boxes
        out["region_mask"][row, :len(feat)] = 1
    if stub_rows:
        out["region_mask"][len(images):, 0] = 1
    return out


def split_regions(image: Mapping) -> list[dict]:
    """Per-image region inputs [{"region_feat": [n, F], "boxes": [n, 7]}] from a padded
    region batch {"region_feat": [B, R, F], "boxes": [B, R, 7], ("region_mask": [B, R]: all
    regions when absent)}; `collate_regions` is its inverse."""
    for key in ("region_feat", "boxes"):
        if key not in image:
            raise ValueError(f"image input: {key!r} is missing (has {sorted(image)})")
    feat, boxes = np.asarray(image["region_feat"]), np.asarray(image["boxes"])
    if feat.ndim != 3 or boxes.shape[:2] != feat.shape[:2]:
        raise ValueError(f"image input: region_feat {feat.shape} and boxes {boxes.shape}: "
                         f"expected [B, R, F] and [B, R, 7]")
    mask = np.asarray(image.get("region_mask", np.ones(feat.shape[:2], np.int32)))
    if mask.shape != feat.shape[:2]:
        raise ValueError(f"image input: region_mask {mask.shape}, expected {feat.shape[:2]}")
    keep = mask.astype(bool)
    return [{"region_feat": f[m], "boxes": b[m]} for f, b, m in zip(feat, boxes, keep)]


def collate_pixels(images: Sequence[Mapping], buckets: Sequence[int] = (),
                   batch_size: int | None = None, stub_rows: bool = False,
                   ) -> dict[str, np.ndarray]:
    """The pixel image input of a batch: {"pixels": uint8[B, S, S, 3]} from per-image
    {"pixels": uint8[S, S, 3]} (data/images.py makes them). Every picture has the tower's one
    shape, so there are no buckets (`buckets` is ignored); rows past len(images) are black
    pictures (valid inputs, so `stub_rows` changes nothing)."""
    size = batch_size or len(images)
    first = np.asarray(images[0]["pixels"])
    if first.ndim != 3 or first.shape[-1] != 3 or first.shape[0] != first.shape[1]:
        raise ValueError(f"collate: example 0 has pixels of shape {first.shape}, expected "
                         f"[S, S, 3] (square RGB)")
    out = np.zeros((size,) + first.shape, np.uint8)
    for row, example in enumerate(images):
        pixels = np.asarray(example["pixels"])
        if pixels.shape != first.shape:
            raise ValueError(f"collate: example {row} has pixels of shape {pixels.shape}, "
                             f"the batch has {first.shape}")
        if pixels.dtype != np.uint8:
            raise ValueError(f"collate: example {row} has pixels of dtype {pixels.dtype}, "
                             f"expected uint8 RGB (data/images.load_pixels makes them)")
        out[row] = pixels
    return {"pixels": out}


def split_pixels(image: Mapping) -> list[dict]:
    """Per-image pixel inputs [{"pixels": uint8[S, S, 3]}] from a batch {"pixels":
    uint8[B, S, S, 3]}; `collate_pixels` is its inverse."""
    if "pixels" not in image:
        raise ValueError(f"image input: 'pixels' is missing (has {sorted(image)})")
    pixels = np.asarray(image["pixels"])
    if pixels.ndim != 4:
        raise ValueError(f"image input: pixels {pixels.shape}, expected [B, S, S, 3]")
    return [{"pixels": p} for p in pixels]


def _record_pixels(record: Mapping) -> dict:
    """A stored record's picture ("image", schema) as the pixel input."""
    if "image" not in record:
        raise ValueError(f"record {record.get('image_id', '')!r} has no picture ('image'; "
                         f"has {sorted(record)}): prepare the dataset with image_size > 0")
    return {"pixels": np.asarray(record["image"])}


def _record_regions(record: Mapping) -> dict:
    return {"region_feat": np.asarray(record["region_feat"], np.float32),
            "boxes": np.asarray(record["boxes"], np.float32)}


def _record_region_count(record: Mapping) -> int | None:
    if "num_regions" in record:  # a caption table row
        return int(record["num_regions"])
    return len(record["region_feat"]) if "region_feat" in record else None


@dataclasses.dataclass(frozen=True)
class ImageInput:
    """One kind of image input: how a dataset record's image becomes the per-image input, how
    per-image inputs are padded into the batch pytree, and back.

    from_record: a record → the per-image input (regions: {"region_feat", "boxes"}).
    record_size: a record or caption-table row → the size its input is bucketed by (regions:
      the region count), None if the row does not say.
    collate: (per-image inputs, buckets, batch_size, stub_rows) → the batch pytree; rows past
      the inputs are padding (with stub_rows, a smallest valid input, so no row is empty).
    split: the batch pytree → the per-image inputs (collate's inverse).
    """

    from_record: Callable[[Mapping], dict]
    record_size: Callable[[Mapping], int | None]
    collate: Callable[..., dict]
    split: Callable[[Mapping], list[dict]]


# Keyed by the image towers' input names (models/towers.py: TowerSpec.collate).
IMAGE_INPUTS: dict[str, ImageInput] = {
    "regions": ImageInput(_record_regions, _record_region_count, collate_regions,
                          split_regions),
    # Pictures all have one shape: one bucket (size 0) for every record.
    "pixels": ImageInput(_record_pixels, lambda record: 0, collate_pixels, split_pixels),
}


def image_input(name: str) -> ImageInput:
    if name not in IMAGE_INPUTS:
        raise ValueError(f"unknown image input {name!r}; the image inputs are "
                         f"{list(IMAGE_INPUTS)}")
    return IMAGE_INPUTS[name]


def collate(examples: Sequence[Mapping], text_buckets: Sequence[int],
            image_buckets: Sequence[int], batch_size: int | None = None,
            image_kind: str = "regions") -> dict:
    """Pads `examples` into one batch (see the module docstring for the layout); "text" /
    "image" are present when the examples have them. image_kind: the examples' image input
    (`IMAGE_INPUTS`); image_buckets its buckets (regions: region counts).

    `batch_size` pads the batch with invalid rows up to a fixed size (evaluation's last batch).
    """
    if not examples:
        raise ValueError("collate: no examples")
    size = batch_size or len(examples)
    if len(examples) > size:
        raise ValueError(f"collate: {len(examples)} examples exceed batch_size={size}")
    batch = {"image_index": np.full((size,), -1, np.int32),
             "text_index": np.full((size,), -1, np.int32),
             "valid": np.zeros((size,), bool)}
    if "input_ids" in examples[0]:
        batch["text"] = collate_text([e["input_ids"] for e in examples], text_buckets, size)
    if "image" in examples[0]:
        batch["image"] = image_input(image_kind).collate([e["image"] for e in examples],
                                                         image_buckets, size)
    if "soft_labels" in examples[0]:  # MRC-kl's targets, per region
        regions = batch["image"]["region_mask"].shape[1]
        classes = examples[0]["soft_labels"].shape[1]
        batch["soft_labels"] = np.zeros((size, regions, classes), np.float32)
        for row, example in enumerate(examples):
            batch["soft_labels"][row, :len(example["soft_labels"])] = example["soft_labels"]
    for row, example in enumerate(examples):
        batch["image_index"][row] = example["image_index"]
        batch["text_index"][row] = example["text_index"]
        batch["valid"][row] = True
    return batch


def prefix_mask(lengths, width: int) -> np.ndarray:
    """int32[B, width]: 1 for the first lengths[i] positions of row i, 0 after."""
    return (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)


def same_image(image_index) -> np.ndarray:
    """bool[B, B]: True where captions i and j describe the same image (the positives when all
    captions of an image count as positives; invalid rows (-1) match nothing)."""
    image_index = np.asarray(image_index)
    return (image_index[:, None] == image_index[None, :]) & (image_index[:, None] >= 0)
