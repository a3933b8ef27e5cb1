"""Padding examples into batches whose shapes come from a small fixed set (length buckets), so
jitted steps compile once per bucket, never per batch.

An example is a dict with `input_ids` (int list, `[CLS] … [SEP]`), `region_feat` f32[n, F],
`boxes` f32[n, 7], optional `soft_labels` f32[n, C], and ids `image_index` (int) and
`text_index` (int). A batch is a dict of NumPy arrays:
  input_ids i32[B, Lb], attention_mask i32[B, Lb], region_feat f32[B, Rb, F], boxes f32[B, Rb, 7],
  region_mask i32[B, Rb], (soft_labels f32[B, Rb, C]), image_index i32[B], text_index i32[B],
  valid bool[B] (False for rows that only pad the batch to its fixed size).
Lb / Rb are the smallest buckets that fit the longest caption / largest region set.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def bucket_size(n: int, buckets: Sequence[int], what: str = "length") -> int:
    """The smallest bucket ≥ n; an error naming n and the buckets if none fits."""
    for bucket in sorted(buckets):
        if n <= bucket:
            return bucket
    raise ValueError(f"{what} {n} exceeds the largest bucket {max(buckets)} (buckets "
                     f"{sorted(buckets)})")


def collate(examples: Sequence[Mapping], text_buckets: Sequence[int],
            region_buckets: Sequence[int], batch_size: int | None = None) -> dict[str, np.ndarray]:
    """Pads `examples` into one batch (see the module docstring for the layout).

    `batch_size` pads the batch with invalid rows up to a fixed size (evaluation's last batch).
    """
    if not examples:
        raise ValueError("collate: no examples")
    size = batch_size or len(examples)
    if len(examples) > size:
        raise ValueError(f"collate: {len(examples)} examples exceed batch_size={size}")
    text_len = bucket_size(max(len(e["input_ids"]) for e in examples), text_buckets,
                           "caption length (tokens with [CLS]/[SEP])")
    regions = bucket_size(max(len(e["region_feat"]) for e in examples), region_buckets,
                          "region count")
    feat_dim = examples[0]["region_feat"].shape[1]
    batch = {
        "input_ids": np.zeros((size, text_len), np.int32),
        "attention_mask": np.zeros((size, text_len), np.int32),
        "region_feat": np.zeros((size, regions, feat_dim), np.float32),
        "boxes": np.zeros((size, regions, 7), np.float32),
        "region_mask": np.zeros((size, regions), np.int32),
        "image_index": np.full((size,), -1, np.int32),
        "text_index": np.full((size,), -1, np.int32),
        "valid": np.zeros((size,), bool),
    }
    with_labels = "soft_labels" in examples[0]
    if with_labels:
        classes = examples[0]["soft_labels"].shape[1]
        batch["soft_labels"] = np.zeros((size, regions, classes), np.float32)
    for row, example in enumerate(examples):
        ids, n = example["input_ids"], len(example["region_feat"])
        if example["region_feat"].shape[1] != feat_dim:
            raise ValueError(f"collate: example {row} has region features of dim "
                             f"{example['region_feat'].shape[1]}, the batch has {feat_dim}")
        batch["input_ids"][row, :len(ids)] = ids
        batch["attention_mask"][row, :len(ids)] = 1
        batch["region_feat"][row, :n] = example["region_feat"]
        batch["boxes"][row, :n] = example["boxes"]
        batch["region_mask"][row, :n] = 1
        if with_labels:
            batch["soft_labels"][row, :n] = example["soft_labels"]
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
