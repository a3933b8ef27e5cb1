"""Offline embedding of a corpus: every image (and caption) of a split through a trained tower.

Jitted, batched and sharded like evaluation (each process embeds its rows of every global
batch; `encode.embed_batches` gathers them), and written in shards of `shard_size` rows:

  <out>/manifest.json     {"side", "split", "count", "shard_size", "fingerprint", "normalized"}
  <out>/shard-00000.npz   vectors f32[n, D], ids i64[n], names str[n] (image ids, or caption
                          texts), owners i64[n] (a caption's image; -1 for images)

Each shard is written to a temporary file and renamed, so an interrupted extraction leaves only
whole shards, and running it again computes just the missing ones. A manifest from another
model (fingerprint), split size or shard size is an error unless `overwrite`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import re
from typing import NamedTuple, Sequence

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from ldot_jax.core import fileutil, parallel, paths
from ldot_jax.core import numerics
from ldot_jax.core import workdir as workdir_lib
from ldot_jax.data import pipeline, schema
from ldot_jax.models import towers
from ldot_jax.retrieval import encode

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_LEGACY_TMP = re.compile(r"shard-\d{5}\.npz\.tmp-[0-9a-f]{8}")


@dataclasses.dataclass(frozen=True)
class Embeddings:
    """vectors f32[n, D] and ids i64[n] (positions in the split: images, or captions in
    caption-index order), names (image ids or caption texts), owners i64[n] (a caption's
    image position; -1 for images), and the manifest they came with."""

    vectors: np.ndarray
    ids: np.ndarray
    names: list[str]
    owners: np.ndarray
    manifest: dict


@dataclasses.dataclass(frozen=True)
class Corpus:
    """What one side of a split is: `count` items, their names and owners, and a function
    giving the evaluation batches of items [start, stop) for this process."""

    side: str
    split: str
    count: int
    names: Sequence[str]
    owners: np.ndarray
    batches: object  # (start, stop) → iterator of batches with ids relative to `start`
    index_key: str
    # How the items are padded and truncated (vectors depend on the truncation).
    padding: dict = dataclasses.field(default_factory=dict)
    content: str | None = None  # a digest of the items where known (captions: their ids)


class _Rows:
    """records[start:stop] without reading them (TFDS sources index one record at a time)."""

    def __init__(self, records, start, stop):
        self.records, self.start, self.stop = records, start, stop

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.records[self.start + i]


def eval_captions(table: Sequence[dict], tokenizer, split: str,
                  config) -> pipeline.TokenizedCaptions:
    """Every caption of a split (`RetrievalDataset.caption_table`), truncated to the largest
    text bucket: evaluation, extraction and mining keep every caption (as the original's
    evaluation), whatever the training length policy drops."""
    return pipeline.tokenize_captions(table, tokenizer, max(config.pipeline.text_buckets) - 2,
                                      "truncate", split)


class BatchLayout(NamedTuple):
    """How a run's evaluation batches are padded: rows per process, the text buckets, the
    image input's buckets (regions: region counts) and its kind (data/batching.IMAGE_INPUTS)."""

    per_process: int
    text_buckets: tuple[int, ...]
    image_buckets: tuple[int, ...]
    image_input: str


def batch_layout(config) -> BatchLayout:
    """The evaluation batches of `config`. Several processes must agree on shapes, so they pad
    to the largest bucket."""
    per_process = config.train.eval_batch_size // jax.process_count()
    text, images = tuple(config.pipeline.text_buckets), tuple(config.pipeline.region_buckets)
    if jax.process_count() > 1:
        text, images = (max(text),), (max(images),)
    return BatchLayout(per_process, text, images, towers.image_input_name(config.model))


def _padding(config, side: str) -> dict:
    layout = batch_layout(config)
    if side == "text":  # captions are truncated to the largest bucket (eval_captions)
        return {"text_buckets": list(layout.text_buckets),
                "max_text_len": max(config.pipeline.text_buckets) - 2}
    return {"image_buckets": list(layout.image_buckets), "image_input": layout.image_input}


def embed_split(model, params, images: Sequence[dict], captions: pipeline.TokenizedCaptions,
                config, mesh, progress: bool = False) -> tuple[np.ndarray, np.ndarray,
                                                               np.ndarray]:
    """Every image and caption of a split through the towers (params replicated on `mesh`),
    as training's evaluation and the two-stage evaluation need them: (image vectors f32[N, D],
    caption vectors f32[T, D], caption_image i64[T]), L2-normalized when the towers were
    trained with loss.normalize (ranked as their index would)."""
    layout = batch_layout(config)
    image_batches = pipeline.eval_image_batches(images, layout.per_process, layout.image_buckets,
                                                jax.process_index(), jax.process_count(),
                                                layout.image_input)
    image_vectors, image_ids = encode.embed_batches(
        model, params, image_batches, mesh, "image", "image_index",
        desc="embed images" if progress else None)
    caption_batches = pipeline.eval_caption_batches(captions, layout.per_process,
                                                    layout.text_buckets,
                                                    jax.process_index(), jax.process_count())
    text_vectors, text_ids = encode.embed_batches(
        model, params, caption_batches, mesh, "text", "text_index",
        desc="embed captions" if progress else None)
    if len(image_ids) != captions.num_images or len(text_ids) != len(captions):
        raise RuntimeError(f"embedding saw {len(image_ids)} images / {len(text_ids)} captions, "
                           f"expected {captions.num_images} / {len(captions)}")
    if config.loss.get("normalize", False):
        image_vectors = numerics.l2_normalize(image_vectors)
        text_vectors = numerics.l2_normalize(text_vectors)
    return image_vectors, text_vectors, captions.image[text_ids].astype(np.int64)


def image_corpus(images: Sequence[dict], split: str, config, names=None) -> Corpus:
    """Every image of a split. names: the image ids (read from the records if not given)."""
    layout = batch_layout(config)

    def batches(start, stop):
        return pipeline.eval_image_batches(_Rows(images, start, stop), layout.per_process,
                                           layout.image_buckets, jax.process_index(),
                                           jax.process_count(), layout.image_input)
    if names is None:
        names = _LazyNames(images)
    return Corpus("image", split, len(images), names, np.full(len(images), -1, np.int64),
                  batches, "image_index", _padding(config, "image"))


class _LazyNames:
    def __init__(self, images):
        self.images = images

    def __getitem__(self, i):
        return schema.as_str(self.images[i]["image_id"])


def caption_corpus(table: Sequence[dict], tokenizer, split: str, config) -> Corpus:
    """Every caption of a split (`RetrievalDataset.caption_table`), truncated to the largest
    text bucket as in evaluation, in caption-index order."""
    layout = batch_layout(config)
    captions = eval_captions(table, tokenizer, split, config)
    texts = [t for row in table for t in schema.caption_texts(row)]
    if len(texts) != len(captions):
        texts = [f"caption {t}" for t in range(len(captions))]  # pre-tokenized without text

    def batches(start, stop):
        sub = dataclasses.replace(captions, image=captions.image[start:stop],
                                  token_ids=captions.token_ids[start:stop])
        return pipeline.eval_caption_batches(sub, layout.per_process, layout.text_buckets,
                                             jax.process_index(), jax.process_count())
    content = hashlib.sha256(np.asarray(captions.image, np.int64).tobytes())
    for ids in captions.token_ids:
        content.update(np.asarray(ids, np.int32).tobytes() + b"|")
    return Corpus("text", split, len(captions), texts, captions.image.astype(np.int64), batches,
                  "text_index", _padding(config, "text"), content.hexdigest())


def _shard_path(out_dir: str, shard: int) -> str:
    return paths.join(out_dir, f"shard-{shard:05d}.npz")


def _read_shard(path: str, start: int, stop: int) -> dict | None:
    """A shard's arrays if it is whole and holds rows [start, stop); None otherwise."""
    try:
        with paths.open_file(path, "rb") as f, np.load(f) as z:
            shard = {k: z[k] for k in ("vectors", "ids", "names", "owners")}
    except Exception as e:  # a torn or foreign file: recompute it
        log.warning("%s is unreadable (%s): recomputing it", path, e)
        return None
    if (not np.array_equal(shard["ids"], np.arange(start, stop))
            or shard["vectors"].shape[0] != stop - start
            or not np.all(np.isfinite(shard["vectors"]))):
        log.warning("%s does not hold rows [%d, %d): recomputing it", path, start, stop)
        return None
    return shard


def _write_shard(path: str, arrays: dict) -> None:
    with fileutil.atomic_file(path, "wb", point="shard_before_rename") as f:
        np.savez(f, **arrays)


def _check_manifest(out_dir: str, manifest: dict, overwrite: bool) -> dict:
    """The manifest to use: `manifest`, or the one already in `out_dir` if it describes the
    same extraction (an earlier shard size is kept, so its shards are reused)."""
    path = paths.join(out_dir, MANIFEST)
    # Its manifest, its shards, and temporaries of shards (older versions named them
    # shard-NNNNN.npz.tmp-XXXXXXXX; those are removed below).
    ours = lambda name: name == MANIFEST or re.fullmatch(r"shard-\d{5}\.npz", name) or (
        name.startswith(".shard-") and ".tmp-" in name) or _LEGACY_TMP.fullmatch(name)
    present = paths.list_dir(out_dir)
    foreign = [n for n in present if not ours(n)]
    manifested = paths.is_file(path)
    if foreign or (present and not manifested):
        raise fileutil.OwnershipError(
            f"refusing to extract into {out_dir}: it holds files an extraction did not write "
            f"({', '.join((foreign or present)[:8])}" + (", …" if len(foreign or present) > 8
                                                         else "")
            + "; choose another output directory)")
    for name in present:
        if _LEGACY_TMP.fullmatch(name):  # a torn shard of an older version's crash
            paths.remove(paths.join(out_dir, name))
    if not manifested:
        return manifest
    old = fileutil.read_json(path, "extraction manifest")
    differs = {k: (old.get(k), v) for k, v in manifest.items()
               if old.get(k) != v and k != "shard_size"}
    if not differs:
        if old.get("shard_size") != manifest["shard_size"]:
            log.info("%s: continuing with its shard size %s", out_dir, old.get("shard_size"))
        return {**manifest, "shard_size": int(old["shard_size"])}
    if not overwrite:
        raise ValueError(f"{out_dir} holds an extraction with other settings "
                         + ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in
                                     differs.items())
                         + " (use another output directory, or overwrite=True / --overwrite)")
    for name in paths.list_dir(out_dir):
        if name.startswith("shard-") or name == MANIFEST:
            paths.remove(paths.join(out_dir, name))
    return manifest


def extract(model, params, corpus: Corpus, out_dir: str, mesh, fingerprint: str,
            shard_size: int = 4096, normalize: bool = False, overwrite: bool = False,
            progress: bool = True, data_digest: str | None = None) -> Embeddings:
    """Embeds every item of `corpus` with `model`'s tower for `corpus.side` (params: the
    DualEncoder's, or the pre-training model's) into shards under `out_dir`, skipping shards
    already there, and returns all the embeddings. normalize: L2-normalize the vectors (for
    towers trained with normalized embeddings). data_digest: what the split holds
    (`datasets.split_digest`); with the corpus's padding it goes into the manifest, so shards
    of other data or another padding are never reused. Every process calls it; process 0
    writes, and holds the directory's lock while it does (a second extraction into it is
    refused)."""
    lock = (fileutil.exclusive(out_dir, "extraction") if jax.process_index() == 0
            else contextlib.nullcontext())
    with lock:
        return _extract(model, params, corpus, out_dir, mesh, fingerprint, shard_size,
                        normalize, overwrite, progress, data_digest)


def _extract(model, params, corpus: Corpus, out_dir: str, mesh, fingerprint: str,
             shard_size: int, normalize: bool, overwrite: bool, progress: bool,
             data_digest: str | None) -> Embeddings:
    if corpus.side not in workdir_lib.SIDES:
        raise ValueError(f"side {corpus.side!r}: expected one of {workdir_lib.SIDES}")
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size}: expected ≥ 1")
    out_dir = paths.absolute(out_dir)
    manifest = {"side": corpus.side, "split": corpus.split, "count": int(corpus.count),
                "shard_size": int(shard_size), "fingerprint": fingerprint,
                "normalized": bool(normalize), "data": data_digest, "padding": corpus.padding,
                "content": corpus.content}
    writer = jax.process_index() == 0
    if writer:
        paths.make_dirs(out_dir)
        manifest = _check_manifest(out_dir, manifest, overwrite)
        fileutil.atomic_write_text(paths.join(out_dir, MANIFEST), json.dumps(manifest, indent=1))
    shard_size = int(manifest["shard_size"])
    if jax.process_count() > 1:  # every process must use process 0's shard size
        shard_size = int(multihost_utils.broadcast_one_to_all(np.int32(shard_size)))
    num_shards = -(-corpus.count // shard_size)
    bounds = [(s * shard_size, min((s + 1) * shard_size, corpus.count))
              for s in range(num_shards)]
    done = np.zeros(num_shards, np.int32)
    if writer:
        for s, (start, stop) in enumerate(bounds):
            path = _shard_path(out_dir, s)
            done[s] = paths.is_file(path) and _read_shard(path, start, stop) is not None
    if jax.process_count() > 1:  # every process must embed the same shards
        done = np.asarray(multihost_utils.broadcast_one_to_all(done))
    if done.any():
        log.info("%s: %d of %d shards already extracted", out_dir, int(done.sum()), num_shards)
    params = jax.device_put(params, parallel.replicated(mesh))  # no-op if already there
    bar = tqdm.tqdm(total=corpus.count, initial=sum(b - a for (a, b), d in zip(bounds, done)
                                                    if d),
                    desc=f"embedding {corpus.split} {corpus.side}s", unit=corpus.side,
                    disable=not (progress and writer), smoothing=0.1)
    for s, (start, stop) in enumerate(bounds):
        if done[s]:
            continue
        vectors, ids = encode.embed_batches(model, params, corpus.batches(start, stop), mesh,
                                              corpus.side, corpus.index_key)
        if len(ids) != stop - start or not np.array_equal(ids, np.arange(stop - start)):
            raise RuntimeError(f"shard {s}: embedded {len(ids)} rows, expected {stop - start}")
        numerics.check_finite(vectors, f"{corpus.side} vectors of shard {s} (row in the shard, "
                                       f"dim; rows {start}–{stop} of {corpus.split})")
        if normalize:
            vectors = numerics.l2_normalize(vectors)
        if writer:
            _write_shard(_shard_path(out_dir, s), {
                "vectors": vectors.astype(np.float32), "ids": np.arange(start, stop),
                "names": np.asarray([str(corpus.names[i]) for i in range(start, stop)]),
                "owners": np.asarray(corpus.owners[start:stop], np.int64)})
        bar.update(stop - start)
    bar.close()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"ldot_jax: extracted {out_dir}")
    return read_embeddings(out_dir)


def read_embeddings(out_dir: str, fingerprint: str | None = None) -> Embeddings:
    """Every shard of a finished extraction, concatenated; an error names a missing or
    partial shard, or a fingerprint other than `fingerprint`."""
    out_dir = paths.absolute(out_dir)
    manifest = fileutil.read_json(paths.join(out_dir, MANIFEST), "extraction manifest")
    if fingerprint is not None and manifest["fingerprint"] != fingerprint:
        raise ValueError(f"{out_dir} was extracted with model {manifest['fingerprint']}, not "
                         f"{fingerprint}")
    count, size = manifest["count"], manifest["shard_size"]
    parts = []
    for s in range(-(-count // size)):
        start, stop = s * size, min((s + 1) * size, count)
        path = _shard_path(out_dir, s)
        shard = _read_shard(path, start, stop) if paths.is_file(path) else None
        if shard is None:
            raise FileNotFoundError(f"{out_dir}: shard {s} (rows {start}–{stop}) is missing or "
                                    f"partial: run the extraction again to finish it")
        parts.append(shard)
    cat = lambda key: np.concatenate([p[key] for p in parts]) if parts else np.zeros(0)
    return Embeddings(cat("vectors").astype(np.float32), cat("ids").astype(np.int64),
                      [str(n) for n in cat("names")], cat("owners").astype(np.int64), manifest)
