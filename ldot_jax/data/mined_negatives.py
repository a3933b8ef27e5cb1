"""Hard negatives mined from an index over a whole training split, and the batches built
from them.

In-batch mining (ldot_jax/hard_negatives.py) can only draw negatives that happen to share a
batch with the positive; at a batch of 32 out of 30,000 images they are seldom hard. ANCE
(Xiong et al. 2021) and UNITER's hard-negative fine-tuning draw them from the whole corpus
instead. Here the dual encoder's index over the training split gives every image the images
that its captions retrieve (ldot_jax/mine.py writes the file), and the training pipeline puts
them into the batch: each anchor caption is followed by captions of `per_anchor` of its mined
images. The in-batch sampler (gathered across devices) then finds them, so everything after
the pipeline (losses, sharding, checkpoints of the data order) is unchanged.

The file: an .npz with
  negatives i32[N, K]  row i: the K images ranked highest for image i's captions (best score
                       over its captions; image i itself never), best first; -1 pads rows
                       with fewer than K;
  num_images i64[]     N, checked against the split the pipeline reads;
  meta                 a JSON string: the split, the dual encoder's fingerprint, K.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ldot_jax.core import fileutil


def write(path: str | os.PathLike, negatives: np.ndarray, meta: dict) -> str:
    """Writes the mined negatives i32[N, K] atomically (a temporary file, then a rename)."""
    negatives = np.asarray(negatives)
    if negatives.ndim != 2 or not np.issubdtype(negatives.dtype, np.integer):
        raise ValueError(f"mined negatives must be an integer array [num_images, K], got "
                         f"{negatives.dtype} {negatives.shape}")
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with fileutil.atomic_file(path, "wb") as f:
        np.savez(f, negatives=negatives.astype(np.int32),
                 num_images=np.int64(len(negatives)), meta=json.dumps(meta))
    return os.fspath(path)


def read(path: str | os.PathLike, num_images: int) -> tuple[np.ndarray, dict]:
    """(negatives i32[num_images, K], meta) from `path`; errors name the file and what is
    wrong (missing, not ours, another split's size, ids out of range, an image its own
    negative)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pipeline.mined_negatives: {path} does not exist (write it "
                                f"with `ldot mine`)")
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"pipeline.mined_negatives: {path} is not a readable .npz ({e})") from e
    missing = {"negatives", "num_images", "meta"} - set(arrays)
    if missing:
        raise ValueError(f"pipeline.mined_negatives: {path} lacks {sorted(missing)}: not a "
                         f"file written by ldot_jax.mine")
    negatives = arrays["negatives"]
    if negatives.ndim != 2 or int(arrays["num_images"]) != len(negatives):
        raise ValueError(f"pipeline.mined_negatives: {path} holds negatives of shape "
                         f"{negatives.shape} for {int(arrays['num_images'])} images")
    if len(negatives) != num_images:
        raise ValueError(f"pipeline.mined_negatives: {path} was mined for {len(negatives)} "
                         f"images, the training split has {num_images}")
    if negatives.size and (negatives.min() < -1 or negatives.max() >= num_images):
        raise ValueError(f"pipeline.mined_negatives: {path} has image ids in "
                         f"[{negatives.min()}, {negatives.max()}], expected -1 or "
                         f"[0, {num_images})")
    own = negatives == np.arange(num_images)[:, None]
    if own.any():
        row = int(np.argwhere(own)[0, 0])
        raise ValueError(f"pipeline.mined_negatives: {path} lists image {row} as its own "
                         f"negative")
    return negatives.astype(np.int32), json.loads(str(arrays["meta"]))


def from_ranked(caption_image: np.ndarray, ranked: np.ndarray, scores: np.ndarray,
                num_images: int, k: int) -> np.ndarray:
    """Per image, the k best other images over its captions' ranked lists.

    caption_image i[T]: the image of each caption; ranked i[T, M]: the images each caption
    retrieved, best first (-1: none); scores f[T, M]: their scores. An image's candidates
    are those of all its captions, each at its best score, itself excluded; ties go to the
    smaller image id. Returns i32[num_images, k], -1 where fewer than k were found.
    """
    caption_image = np.asarray(caption_image, np.int64)
    ranked, scores = np.asarray(ranked, np.int64), np.asarray(scores, np.float64)
    if ranked.shape != scores.shape or ranked.shape[:1] != caption_image.shape:
        raise ValueError(f"from_ranked: ranked {ranked.shape}, scores {scores.shape} and "
                         f"caption_image {caption_image.shape} disagree")
    owner = np.repeat(caption_image, ranked.shape[1])
    candidate, score = ranked.ravel(), scores.ravel()
    keep = (candidate >= 0) & (candidate != owner)
    owner, candidate, score = owner[keep], candidate[keep], score[keep]
    # Sort by (owner, -score, candidate): each (owner, candidate) pair's first row is its best
    # score; then each owner's first k distinct candidates are its best k.
    order = np.lexsort((candidate, -score, owner))
    owner, candidate = owner[order], candidate[order]
    pair = owner * num_images + candidate
    _, first = np.unique(pair, return_index=True)
    first = np.sort(first)
    owner, candidate = owner[first], candidate[first]
    start = np.searchsorted(owner, np.arange(num_images))
    position = np.arange(len(owner)) - start[owner]
    out = np.full((num_images, k), -1, np.int32)
    take = position < k
    out[owner[take], position[take]] = candidate[take]
    return out


class BatchComposer:
    """Global batches of anchors followed by captions of their mined images.

    caption_image i[T]: the image of each training caption (TokenizedCaptions.image); negatives
    i32[N, K]; per_anchor: mined images per anchor. `__call__(anchors i[m], rng)` → caption
    ids i64[m · (1 + per_anchor)]: anchor 0, per_anchor captions of its mined images, anchor
    1, …. A mined image is drawn uniformly among the anchor's K (without replacement when
    there are enough), its caption uniformly among its captions; an image without mined
    negatives (or whose mined images have no caption left) gets random other images.
    """

    def __init__(self, caption_image: np.ndarray, negatives: np.ndarray, per_anchor: int):
        if per_anchor < 1:
            raise ValueError(f"pipeline.mined_per_anchor={per_anchor}: expected ≥ 1")
        self.caption_image = np.asarray(caption_image, np.int64)
        self.per_anchor = per_anchor
        num_images = len(negatives)
        order = np.argsort(self.caption_image, kind="stable")
        self.by_image = order  # caption ids grouped by image
        self.counts = np.bincount(self.caption_image, minlength=num_images)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        with_captions = self.counts > 0
        valid = (negatives >= 0) & with_captions[np.maximum(negatives, 0)]
        # Valid mined images first, in their original order, so row i's choices are
        # negatives[i, :num_valid[i]].
        rank = np.argsort(~valid, axis=1, kind="stable")
        self.negatives = np.take_along_axis(np.where(valid, negatives, -1), rank, axis=1)
        self.num_valid = valid.sum(axis=1)
        self.images_with_captions = np.flatnonzero(with_captions)

    def __call__(self, anchors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        anchors = np.asarray(anchors, np.int64)
        n = self.per_anchor
        images = self.caption_image[anchors]
        picked = np.empty((len(anchors), n), np.int64)
        for row, image in enumerate(images):
            count = int(self.num_valid[image])
            if count:
                slots = rng.choice(count, size=n, replace=count < n)
                picked[row] = self.negatives[image, slots]
            else:  # nothing mined: random other images with captions
                pool = self.images_with_captions[self.images_with_captions != image]
                picked[row] = rng.choice(pool, size=n, replace=len(pool) < n)
        which = np.floor(rng.random(picked.shape) * self.counts[picked]).astype(np.int64)
        captions = self.by_image[self.starts[picked] + which]
        return np.concatenate([anchors[:, None], captions], axis=1).ravel()
