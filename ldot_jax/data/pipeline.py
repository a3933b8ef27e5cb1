"""grain input pipelines (no TensorFlow): training batches of (caption, image) pairs with
VMLM / SMRM masks, and evaluation batches that hold every image and every caption once.

Training: captions are the examples. `tokenize_captions` tokenizes a split once
(`TokenizedCaptions`), applying the length policy (skips are counted and logged). Then, with grain:
  shuffle(seed) → this process's shard → batch + pad to buckets → repeat(epochs) → masks
Each epoch is a new permutation; processes take disjoint strided shards of it, all of the same
length, so every process runs the same number of steps. The iterator's state
(`iterator.get_state()`, a small dict) goes into training checkpoints; `set_state` on a fresh
iterator of the same pipeline continues the same data order, masks included (masks are drawn
from the seed and the batch position).

A training batch (per process, B = global batch / process count) is `batching.collate`'s dict
(one `text` and one `image` input pytree, ids, validity) plus:
  vmlm_text: the text input with [MASK]s in its input_ids, vmlm_labels i32[B, L] (-1 where
    nothing is predicted; at most `masking.max_predictions(L)` per row, so the loss gathers a
    fixed number of positions),
  region_masked bool[B, R]  (SMRM over the region input; only with `mask_regions`).
All captions of one image are positives of each other: `batching.same_image(image_index)`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterator, Sequence

import grain
import numpy as np

from ldot_jax.data import batching, masking, mined_negatives, schema
from ldot_jax.data import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Batching and masking settings.

    batch_size: global batch (split evenly over processes).
    text_buckets: padded caption lengths, counting [CLS] and [SEP].
    region_buckets: padded region counts.
    max_text_len / length_policy: wordpieces (without [CLS]/[SEP]); the original drops
      training captions over 60 wordpieces and keeps all at evaluation.
    mined_negatives: an .npz of hard negatives mined from an index over the whole split
      (`ldot mine`; data/mined_negatives.py); with it each global batch holds
      batch_size / (1 + mined_per_anchor) anchor captions, each followed by captions of
      mined_per_anchor of its mined images (an epoch is one pass over the anchors).
    """

    batch_size: int = 128
    text_buckets: tuple[int, ...] = (16, 24, 32, 48, 64)
    region_buckets: tuple[int, ...] = (16, 36, 64, 100)
    max_text_len: int | None = 60
    length_policy: str = "drop"
    seed: int = 0
    num_epochs: int | None = None  # None: repeat forever
    mask_text: bool = True
    mask_regions: bool = True
    num_threads: int = 4
    prefetch: int = 4  # batches
    # The records' image input (data/batching.IMAGE_INPUTS; the image tower's TowerSpec.collate):
    # region_buckets are its buckets.
    image_input: str = "regions"
    mined_negatives: str | None = None
    mined_per_anchor: int = 1

    def __post_init__(self):
        batching.image_input(self.image_input)  # an unknown name lists the known ones
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: expected ≥ 1")
        if self.mined_per_anchor < 1:
            raise ValueError(f"pipeline.mined_per_anchor={self.mined_per_anchor}: expected ≥ 1")
        if self.mined_negatives and self.batch_size % (1 + self.mined_per_anchor):
            raise ValueError(f"pipeline.batch_size={self.batch_size} is not a multiple of 1 + "
                             f"pipeline.mined_per_anchor={self.mined_per_anchor}: each anchor "
                             f"brings {self.mined_per_anchor} mined captions")
        if self.max_text_len is not None and self.max_text_len + 2 > max(self.text_buckets):
            raise ValueError(f"max_text_len={self.max_text_len} (+2 for [CLS]/[SEP]) exceeds "
                             f"the largest text bucket {max(self.text_buckets)}")


# ---------------------------------------------------------------------------------------------
# A split's captions, tokenized


@dataclasses.dataclass(frozen=True)
class TokenizedCaptions:
    """Every kept caption of a split: caption t belongs to image `image[t]` (a position in the
    split) and has ids `token_ids[t]` = [CLS] wordpieces [SEP]. `skipped` counts captions the
    length policy dropped."""

    image: np.ndarray  # i32[T]
    token_ids: list[np.ndarray]
    skipped: int
    num_images: int
    # i32[num_images]: each image input's bucketed size (regions: the region count), so every
    # process can pad a global batch to one bucket without reading the other processes'
    # records (None if not known).
    image_sizes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.image)


def tokenize_captions(images: Sequence[dict], tokenizer, max_text_len: int | None,
                      policy: str, split: str = "split",
                      image_input: str = "regions") -> TokenizedCaptions:
    """Tokenizes every caption once and applies the length policy.

    `images`: per image, a record or any dict with its "captions" (and "caption_ids" /
    "caption_lengths" if pre-tokenized), e.g. `RetrievalDataset.caption_table(split)`, which
    is much faster to read than the records.
    """
    record_size = batching.image_input(image_input).record_size
    owners, texts, pieces, sizes = [], [], [], []
    pretokenized = None
    for i in range(len(images)):
        record = images[i]
        size = record_size(record)
        if size is not None:
            sizes.append(size)
        if pretokenized is None:
            pretokenized = "caption_ids" in record
        if pretokenized:
            pieces += schema.split_caption_ids(record)
            owners += [i] * len(record["caption_lengths"])
        else:
            captions = schema.caption_texts(record)
            texts += captions
            owners += [i] * len(captions)
    if not owners:
        raise ValueError(f"{split}: no captions in {len(images)} images")
    if pretokenized:
        _check_token_ids(pieces, owners, getattr(tokenizer, "vocab_size", None), split)
        ids = tokenizer_lib.apply_length_policy(pieces, max_text_len, policy,
                                                tokenizer.cls_id, tokenizer.sep_id)
    else:
        if tokenizer is None:
            raise ValueError(f"{split}: captions need a tokenizer (load the dataset with "
                             f"vocab=...)")
        ids = tokenizer.encode_batch(texts, max_text_len, policy)
    keep = [t for t, x in enumerate(ids) if x is not None]
    skipped = len(ids) - len(keep)
    if skipped:
        log.warning("%s: %d of %d captions skipped (longer than %d wordpieces, policy %r)",
                    split, skipped, len(ids), max_text_len, policy)
    if not keep:
        raise ValueError(f"{split}: every caption was dropped by max_text_len={max_text_len}")
    return TokenizedCaptions(image=np.asarray(owners, np.int32)[keep],
                             token_ids=[np.asarray(ids[t], np.int32) for t in keep],
                             skipped=skipped, num_images=len(images),
                             image_sizes=np.asarray(sizes, np.int32)
                             if len(sizes) == len(images) else None)


def _check_token_ids(pieces: list, owners: list, vocab_size: int | None, split: str) -> None:
    """ValueError naming the caption, its image and the id if a pre-tokenized id is negative
    or not below the tokenizer's vocabulary size."""
    found = tokenizer_lib.out_of_vocabulary(pieces, vocab_size)
    if found:
        t, bad = found
        raise ValueError(f"{split}: caption {t} (image {owners[t]}) has token id {bad} "
                         f"outside the vocabulary [0, {vocab_size})")


def _image_example(record: dict, image_input: str) -> dict:
    """A record's image as an example's fields: its input (and the regions' MRC-kl targets)."""
    out = {"image": batching.image_input(image_input).from_record(record)}
    if "soft_labels" in record and image_input == "regions":  # per region: MRC-kl's
        out["soft_labels"] = np.asarray(record["soft_labels"], np.float32)
    return out


class CaptionSource:
    """Random access over (caption, image) examples: the grain source of training."""

    def __init__(self, images: Sequence[dict], captions: TokenizedCaptions,
                 image_input: str = "regions"):
        self._images, self._captions, self._image_input = images, captions, image_input

    def __len__(self) -> int:
        return len(self._captions)

    def __getitem__(self, t: int) -> dict:
        image = int(self._captions.image[t])
        return {"input_ids": self._captions.token_ids[t], "image_index": image,
                "text_index": int(t), **_image_example(self._images[image], self._image_input)}


# ---------------------------------------------------------------------------------------------
# Training


def shard_bounds(length: int, process_index: int, process_count: int) -> slice:
    """The strided slice of a shuffled epoch that one process reads: disjoint across
    processes and of equal length (the remainder of length / process_count is left out)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} outside [0, {process_count})")
    usable = length // process_count * process_count
    if not usable:
        raise ValueError(f"{length} examples cannot be split over {process_count} processes")
    return slice(process_index, usable, process_count)


def training_dataset(images: Sequence[dict], captions: TokenizedCaptions, tokenizer,
                     config: PipelineConfig, process_index: int = 0,
                     process_count: int = 1) -> grain.IterDataset:
    """Batches for training (see the module docstring); iterate with `iter(...)`.

    Global batch k is the block [k·B, (k+1)·B) of the shuffled epoch; process p takes its rows
    p, p + P, … (the strided `shard_bounds` shard) and reads only their records. All processes
    pad to the buckets of the whole global batch, so their arrays have equal shapes (required
    to assemble global arrays) and the padded shapes do not depend on the process count.
    With `config.mined_negatives`, block k holds B / (1 + n) anchors of the shuffled epoch,
    each followed by n captions of its mined images (`mined_negatives.BatchComposer`, drawn
    from the seed and the batch position, so every process builds the same global batch).
    """
    usable = _check_shards(captions, config, process_index, process_count)
    composer = None
    if config.mined_negatives:
        negatives, _ = mined_negatives.read(config.mined_negatives, captions.num_images)
        composer = mined_negatives.BatchComposer(captions.image, negatives,
                                                 config.mined_per_anchor)
        anchors = config.batch_size // (1 + config.mined_per_anchor)
        usable = len(captions) // anchors * anchors
    ds = grain.MapDataset.range(len(captions)).shuffle(seed=config.seed)[:usable]
    load_rows = _row_loader(images, captions, config, process_index, process_count)

    # Batch, then repeat: a batch never mixes two epochs, each epoch drops its own remainder.
    if composer is None:
        ds = ds.batch(config.batch_size, drop_remainder=True, batch_fn=np.asarray)
        ds = ds.map(load_rows).repeat(config.num_epochs)
    else:  # repeat before composing, so each epoch draws new mined captions
        ds = ds.batch(anchors, drop_remainder=True, batch_fn=np.asarray)
        ds = ds.repeat(config.num_epochs).random_map(composer, seed=config.seed + 1)
        ds = ds.map(load_rows)
    if config.mask_text or config.mask_regions:
        ds = ds.random_map(_masker(tokenizer, config, process_index, process_count),
                           seed=config.seed)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=config.num_threads,
                                                prefetch_buffer_size=config.prefetch))


def _check_shards(captions: TokenizedCaptions, config: PipelineConfig, process_index: int,
                  process_count: int) -> int:
    """The number of shuffled captions the epochs use (whole global batches), after checking
    that the global batch splits over the processes and fits the split."""
    if config.batch_size % process_count:
        raise ValueError(f"batch_size={config.batch_size} is not divisible by the "
                         f"{process_count} processes")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} outside [0, {process_count})")
    if process_count > 1 and captions.image_sizes is None:
        raise ValueError("multi-process training needs the input size of every image (the "
                         "region count) in the tokenized captions (build them from records or "
                         "a caption table with 'num_regions')")
    usable = shard_bounds(len(captions), process_index, process_count).stop
    if usable < config.batch_size:
        raise ValueError(f"{len(captions)} captions are fewer than one batch of "
                         f"{config.batch_size} (the global batch)")
    return usable


def _row_loader(images: Sequence[dict], captions: TokenizedCaptions, config: PipelineConfig,
                process_index: int, process_count: int):
    """fn(global batch's caption ids i[B]) → this process's collated rows, padded to the
    buckets of the whole global batch (so every process's arrays have the same shapes)."""
    local_batch = config.batch_size // process_count
    source = CaptionSource(images, captions, config.image_input)
    lengths = np.asarray([len(t) for t in captions.token_ids])

    def load_rows(batch: np.ndarray) -> dict:
        batch = np.asarray(batch)
        mine = batch[process_index::process_count]
        text_len = batching.bucket_size(int(lengths[batch].max()), config.text_buckets,
                                        "caption length (tokens with [CLS]/[SEP])")
        if captions.image_sizes is not None:
            most = int(captions.image_sizes[captions.image[batch]].max())
            image_buckets = (batching.bucket_size(most, config.region_buckets,
                                                  "image input size (region count)"),)
        else:
            image_buckets = config.region_buckets
        return batching.collate([source[int(t)] for t in mine], (text_len,), image_buckets,
                                local_batch, config.image_input)
    return load_rows


def _masker(tokenizer, config: PipelineConfig, process_index: int, process_count: int):
    """Masks drawn per row from (seed, batch, global row), so a row gets the same masks
    whatever the number of processes (multi-host runs equal single-host runs)."""
    def add_masks(batch: dict, rng: np.random.Generator) -> dict:
        batch = dict(batch)
        base = int(rng.integers(2**63))  # the same on every process: rng depends on k only
        rows = len(batch["valid"])
        row_rngs = [np.random.default_rng([base, process_index + process_count * j])
                    for j in range(rows)]
        if config.mask_text:
            text = batch["text"]
            cap = masking.max_predictions(text["input_ids"].shape[1])
            pairs = [masking.mask_text(text["input_ids"][j:j + 1],
                                       text["attention_mask"][j:j + 1], row_rngs[j],
                                       tokenizer.mask_id, tokenizer.random_token_range,
                                       max_predictions=cap) for j in range(rows)]
            batch["vmlm_text"] = {**text, "input_ids": np.concatenate([p[0] for p in pairs])}
            batch["vmlm_labels"] = np.concatenate([p[1] for p in pairs])
        if config.mask_regions:
            batch["region_masked"] = np.concatenate(
                [masking.mask_regions(batch["image"]["region_mask"][j:j + 1], row_rngs[j])
                 for j in range(rows)])
        return batch
    return add_masks


def steps_per_epoch(captions: TokenizedCaptions, config: PipelineConfig,
                    process_count: int = 1) -> int:
    if config.mined_negatives:  # an epoch is one pass over the anchors
        return len(captions) // (config.batch_size // (1 + config.mined_per_anchor))
    return len(captions) // process_count // (config.batch_size // process_count)


# ---------------------------------------------------------------------------------------------
# Evaluation


def _plan(n: int, batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    """i32[num_batches, batch_size] item positions for this process (-1 = padding). Items are
    split into contiguous per-process ranges; every process gets the same number of batches."""
    per_process = -(-n // process_count)
    num_batches = max(1, -(-per_process // batch_size))
    plan = np.full((process_count, num_batches * batch_size), -1, np.int32)
    for p in range(process_count):
        items = np.arange(p * per_process, min(n, (p + 1) * per_process))
        plan[p, :len(items)] = items
    return plan[process_index].reshape(num_batches, batch_size)


def _padded(examples: list[dict], rows: int, template, text_buckets, image_buckets,
            image_input: str):
    """collate with fixed `rows`; an all-padding batch (a process past the end of the data) is
    built from `template()` and marked invalid."""
    if examples:
        return batching.collate(examples, text_buckets, image_buckets, rows, image_input)
    batch = batching.collate([template()], text_buckets, image_buckets, rows, image_input)
    batch["valid"][:] = False
    batch["image_index"][:] = -1
    batch["text_index"][:] = -1
    return batch


def eval_image_batches(images: Sequence[dict], batch_size: int, image_buckets,
                       process_index: int = 0, process_count: int = 1,
                       image_input: str = "regions") -> Iterator[dict]:
    """Every image of a split once (across processes), padded to full batches: the image
    input, image_index i32[B] (-1 for padding), valid bool[B]."""
    def example(i: int) -> dict:
        return {"image": batching.image_input(image_input).from_record(images[i]),
                "image_index": i, "text_index": -1}
    for rows in _plan(len(images), batch_size, process_index, process_count):
        examples = [example(int(i)) for i in rows if i >= 0]
        yield _padded(examples, batch_size, lambda: example(0), (), image_buckets, image_input)


def eval_caption_batches(captions: TokenizedCaptions, batch_size: int, text_buckets,
                         process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
    """Every caption once (across processes), padded to full batches: the text input,
    text_index i32[B], image_index i32[B] (the caption's image: the ground truth), valid
    bool[B]."""
    def example(t: int) -> dict:
        return {"input_ids": captions.token_ids[t], "image_index": int(captions.image[t]),
                "text_index": t}
    for rows in _plan(len(captions), batch_size, process_index, process_count):
        examples = [example(int(t)) for t in rows if t >= 0]
        yield _padded(examples, batch_size, lambda: example(0), text_buckets, (), "regions")
