"""Hard negatives from the index over a whole training split, for the training pipeline.

    ldot mine --workdir runs/demo/finetune --out runs/demo/mined_train.npz
    ldot train --config=ldot_jax/configs/demo.py:rerank ... \\
        --config.pipeline.mined_negatives=runs/demo/mined_train.npz

The dual encoder of a training run (<workdir>/model) embeds every image and caption of the
split; an exact index of the image vectors (ldot_jax.index, sharded over the devices) returns
each caption's top images; each image keeps the `k` best other images over its captions
(`data.mined_negatives.from_ranked`). The file format and how batches use it:
ldot_jax/data/mined_negatives.py.
"""

from __future__ import annotations

import logging
import os
import time

import jax
import numpy as np

from ldot_jax.checkpoints import pretrained
from ldot_jax.core import parallel
from ldot_jax.core import workdir as workdir_lib
from ldot_jax.data import mined_negatives
from ldot_jax.index.exact import ExactIndex
from ldot_jax.retrieval import extract
from ldot_jax.retrieval import index_build

log = logging.getLogger(__name__)


def mine_negatives(image_vectors: np.ndarray, text_vectors: np.ndarray, caption_image: np.ndarray,
         k: int, per_caption: int | None = None) -> np.ndarray:
    """i32[N, k]: per image, the k other images that its captions rank highest.

    image_vectors f32[N, D], text_vectors f32[T, D], caption_image i[T]; per_caption: how
    many images each caption retrieves (default k + 1, enough to skip its own image).
    """
    if k < 1:
        raise ValueError(f"mine_negatives: k={k}, expected ≥ 1")
    num_images = len(image_vectors)
    if num_images < 2:
        raise ValueError(f"mine_negatives: {num_images} image(s): no other image to mine")
    per_caption = min(per_caption or k + 1, num_images)
    index = ExactIndex(image_vectors.shape[1]).add(image_vectors)
    hits = index.search(text_vectors, per_caption)
    return mined_negatives.from_ranked(caption_image, hits.ids, hits.scores, num_images, k)


def mine_workdir(workdir: str, out: str, split: str = "train", k: int = 20,
                 progress: bool = True) -> dict:
    """Mines `split` with the dual encoder of the training run at `workdir`; writes `out`.
    Returns {path, images, k, short (images with fewer than k), seconds}."""
    workdir = os.path.abspath(workdir)
    config = workdir_lib.load_config(workdir)
    loaded = pretrained.load_pretrained(os.path.join(workdir, workdir_lib.MODEL_DIR))
    mesh = parallel.make_mesh()
    model = pretrained.build_model(loaded.kind, loaded.config)
    params = parallel.replicate(jax.device_get(loaded.params), mesh)
    dataset = index_build.open_dataset(config)
    images = dataset.split(split)
    # An image's negatives come from all of its captions.
    captions = extract.eval_captions(dataset.caption_table(split), dataset.tokenizer, split,
                                     config)
    start = time.perf_counter()
    image_vectors, text_vectors, caption_image = extract.embed_split(
        model, params, images, captions, config, mesh, progress)
    negatives = mine_negatives(image_vectors, text_vectors, caption_image, k)
    seconds = time.perf_counter() - start
    meta = {"split": split, "k": k, "workdir": workdir,
            "fingerprint": pretrained.fingerprint(loaded.kind, loaded.config, loaded.params),
            "normalized": bool(config.loss.get("normalize", False))}
    if jax.process_index() == 0:
        mined_negatives.write(out, negatives, meta)
    short = int(((negatives >= 0).sum(axis=1) < k).sum())
    log.info("mined %d negatives for each of %d %s images (%d with fewer) in %.0f s → %s", k,
             len(negatives), split, short, seconds, out)
    return {"path": out, "images": len(negatives), "k": k, "short": short,
            "seconds": round(seconds, 1)}
