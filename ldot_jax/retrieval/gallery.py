"""A user's own gallery → an index, with no training run: the model directory's image tower
embeds the pictures (or region features) a JSONL file or a folder lists.

    ldot index build --model models/clip --gallery photos.jsonl --out galleries/photos

gallery.jsonl, one item per line (paths relative to the file's directory):
  {"id": "beach-01", "image": "photos/beach.jpg", "name": "Beach at dawn",
   "source": "flickr", "tags": ["sea", "sky"], "captions": ["waves at sunrise"]}
  {"id": "r-7", "features": "feats/r-7.npz"}     region features: features [n, F], boxes [n, 7]
"id" (a string or an int, unique) and one of "image" / "features" are required; "name"
(default: the id) is what results show; "captions" (optional) are indexed too (image → text
search) and are the health check's queries. Every other key is a metadata field the filters
match: a string, number, bool or a list of strings. A folder instead of a file: every picture
under it (picture_files.EXTENSIONS), its id the path relative to the folder.

Output, under --out (nothing else there is touched):
  <out>/image/         the index of the gallery's vectors, searched by captions, with
                       names.json (id → name) and items.json (id → key and fields)
  <out>/text/          the captions' index (when the gallery has captions)
  <out>/build/         the build's working files (decoded pictures, embedding shards): a
                       rerun after a crash resumes from them; safe to delete once built
                       (for a gs:// --out they stay in the local cache instead)
Item ids in the index are the items' positions in the gallery (0, 1, …; with
bad_images="skip", among the pictures kept); items.json maps each to its "key" (the gallery's
id), fields and file. Bad pictures are reported together by name before
any vector is computed (bad_images="skip": left out with a warning naming them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
import tqdm

from ldot_jax.checkpoints import kinds, pretrained
from ldot_jax.core import fileutil, parallel, paths
from ldot_jax.data import images, picture_files, region_files, schema
from ldot_jax.index import backends
from ldot_jax.models import config as model_config
from ldot_jax.models import towers
from ldot_jax.retrieval import encode, extract, filters, index_build

log = logging.getLogger(__name__)

RESERVED = ("id", "image", "features", "name", "captions")
SIDES_DIR = ("image", "text")
BUILD_DIR = "build"
PIXELS_FILE = "pixels.npy"
PIXELS_INFO = "pixels.json"


class GalleryError(ValueError):
    """A gallery file or folder that cannot be indexed (the message names line and key)."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One gallery item: key (the gallery's id, a string), name, the absolute path of its
    picture or region-feature file and which ("image" / "features"), its metadata fields and
    captions."""

    key: str
    name: str
    path: str
    kind: str
    fields: dict
    captions: tuple = ()


def _field_value(value, where: str, key: str):
    try:
        filters.check_value(value, f"{where}: field {key!r}")
    except ValueError as e:
        raise GalleryError(str(e)) from None
    return value


def _item(body: Any, base_dir: str, where: str) -> Item:
    if not isinstance(body, dict):
        raise GalleryError(f"{where}: expected a JSON object, got {type(body).__name__}")
    if "id" not in body:
        raise GalleryError(f"{where}: no \"id\" (has {sorted(body)})")
    key = body["id"]
    if isinstance(key, bool) or not isinstance(key, (str, int)) or str(key) == "":
        raise GalleryError(f"{where}: \"id\" = {key!r}: expected a non-empty string or an int")
    sources = [k for k in ("image", "features") if k in body]
    if len(sources) != 1:
        raise GalleryError(f"{where} (id {key!r}): expected one of \"image\" (a picture file) "
                           f"or \"features\" (a region-feature .npz), got {sources or 'neither'}")
    kind = sources[0]
    file_name = body[kind]
    if not isinstance(file_name, str) or not file_name:
        raise GalleryError(f"{where} (id {key!r}): \"{kind}\" = {file_name!r}: expected a path")
    path = file_name if os.path.isabs(file_name) else os.path.join(base_dir, file_name)
    name = body.get("name", str(key))
    if not isinstance(name, str):
        raise GalleryError(f"{where} (id {key!r}): \"name\" = {name!r}: expected a string")
    captions = body.get("captions", [])
    if not isinstance(captions, list) or not all(isinstance(c, str) and c.strip()
                                                 for c in captions):
        raise GalleryError(f"{where} (id {key!r}): \"captions\" = {captions!r}: expected a "
                           f"list of non-empty strings")
    fields = {k: _field_value(v, f"{where} (id {key!r})", k) for k, v in body.items()
              if k not in RESERVED}
    return Item(str(key), name, os.path.abspath(path), kind, fields, tuple(captions))


def read_gallery(source: str, exclude: str | None = None) -> list[Item]:
    """The items of a gallery JSONL file or picture folder (see the module docstring). Errors
    name the file, the line and the key; duplicate ids name both lines. exclude: a directory
    inside the folder that is not part of it (the build's own output)."""
    source = os.fspath(source)
    if os.path.isdir(source):
        skip = os.path.abspath(exclude) if exclude else None
        found = sorted(os.path.relpath(os.path.join(root, f), source)
                       for root, _, files in os.walk(source) for f in files
                       if os.path.splitext(f)[1].lower() in picture_files.EXTENSIONS
                       and not (skip and os.path.commonpath([os.path.abspath(root), skip])
                                == skip))
        if not found:
            raise GalleryError(f"{source}: no pictures ({', '.join(picture_files.EXTENSIONS)})")
        return [Item(rel, rel, os.path.abspath(os.path.join(source, rel)), "image", {})
                for rel in found]
    if not os.path.isfile(source):
        raise GalleryError(f"gallery {source}: no such file or folder")
    items, lines = [], {}
    base_dir = os.path.dirname(os.path.abspath(source))
    with open(source, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{source} line {number}"
            try:
                body = json.loads(line)
            except json.JSONDecodeError as e:
                raise GalleryError(f"{where}: not JSON ({e})") from None
            item = _item(body, base_dir, where)
            if item.key in lines:
                raise GalleryError(f"{where}: id {item.key!r} again (first on line "
                                   f"{lines[item.key]})")
            lines[item.key] = number
            items.append(item)
    if not items:
        raise GalleryError(f"gallery {source} lists no items")
    kinds_seen = {i.kind for i in items}
    if len(kinds_seen) > 1:
        raise GalleryError(f"gallery {source} mixes pictures and region features: one model "
                           f"tower reads one of them")
    return items


def layout_config(model_config, eval_batch_size: int = 64,
                  text_buckets: Sequence[int] = (16, 24, 32, 48, 64),
                  region_buckets: Sequence[int] = (16, 36, 64, 100)) -> ml_collections.ConfigDict:
    """The part of a run config that extraction reads (extract.batch_layout), for a model
    with no run: batch size, text buckets (those the text tower's positions allow) and region
    buckets."""
    text = encode.fitting_text_buckets(model_config, text_buckets)
    tower = getattr(model_config, "image_tower", None)
    return ml_collections.ConfigDict({
        "train": {"eval_batch_size": int(eval_batch_size)},
        "pipeline": {"text_buckets": text, "region_buckets": tuple(region_buckets)},
        "model": {"image_tower": tower}})


def _digest(items: Sequence[Item], extra: str = "") -> str:
    """What the gallery lists (keys, files with their sizes and times): reused work files
    must come from the same gallery."""
    h = hashlib.sha256(extra.encode())
    for item in items:
        stat = os.stat(item.path) if os.path.exists(item.path) else None
        h.update(json.dumps([item.key, item.path, stat and stat.st_size,
                             stat and stat.st_mtime_ns]).encode())
    return h.hexdigest()


def decode_pictures(items: Sequence[Item], size: int, build_dir: str, bad_images: str = "error",
                    workers: int = 0, progress: bool = True) -> tuple[np.ndarray, list[int]]:
    """(uint8[N, size, size, 3] memory-mapped from <build_dir>/pixels.npy, the positions of
    `items` it holds): every picture decoded once by `workers` processes and stored, so
    embedding never meets a bad file; reused when the gallery and size are unchanged. Bad
    pictures: a GalleryError naming them (bad_images="error") or left out ("skip")."""
    if bad_images not in picture_files.BAD_IMAGE_POLICIES:
        raise ValueError(f"bad_images={bad_images!r}: expected one of "
                         f"{picture_files.BAD_IMAGE_POLICIES}")
    digest = _digest(items, f"pixels:{size}:{bad_images}")
    info_path = os.path.join(build_dir, PIXELS_INFO)
    array_path = os.path.join(build_dir, PIXELS_FILE)
    if os.path.isfile(info_path) and os.path.isfile(array_path):
        info = fileutil.read_json(info_path, "decoded gallery pictures")
        if info.get("digest") == digest:
            pixels = np.load(array_path, mmap_mode="r")
            if pixels.shape == (len(info["kept"]), size, size, 3):
                return pixels, list(info["kept"])
    paths.make_dirs(build_dir)
    bad, kept = [], []
    tmp = array_path + ".tmp"
    stored = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                       shape=(len(items), size, size, 3))
    bar = tqdm.tqdm(total=len(items), desc="decoding gallery pictures", unit="image",
                    disable=not progress)
    decoded = picture_files.decode_all([i.path for i in items], size, num_workers=workers)
    for position, result in enumerate(decoded):
        if isinstance(result, str):
            bad.append(result)
        else:
            stored[len(kept)] = result
            kept.append(position)
        bar.update(1)
    bar.close()
    stored.flush()
    del stored
    if bad and bad_images == "error":
        os.remove(tmp)
        listed = "; ".join(bad[:picture_files.LISTED])
        more = (f" (and {len(bad) - picture_files.LISTED} more)"
                if len(bad) > picture_files.LISTED else "")
        raise GalleryError(f"{len(bad)} of {len(items)} gallery pictures cannot be read: "
                           f"{listed}{more} (bad_images='skip' leaves them out)")
    if bad:
        log.warning("left out %d of %d gallery pictures that cannot be read: %s", len(bad),
                    len(items), "; ".join(bad[:picture_files.LISTED]))
    if not kept:
        os.remove(tmp)
        raise GalleryError(f"none of the {len(items)} gallery pictures can be read")
    # Keep only the decoded rows: rewrite the file at its final length.
    full = np.load(tmp, mmap_mode="r")
    with fileutil.atomic_file(array_path, "wb") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(full[:len(kept)]))
    del full
    os.remove(tmp)
    fileutil.atomic_write_text(info_path, json.dumps({"digest": digest, "kept": kept}))
    return np.load(array_path, mmap_mode="r"), kept


def region_file_input(path: str, spec: schema.RecordSpec, name: str | None = None) -> dict:
    """The region input {"region_feat": f32[n, F], "boxes": f32[n, 7]} of a .npz
    (region_files.read_regions), checked as a dataset's records are (dimension, finite values,
    boxes in [0, 1]; 4- or 6-column boxes completed to 7); the features keep the file's
    precision."""
    raw = region_files.read_regions(path, spec, name or path)
    checked = schema.check_record({"image_id": name or path, "captions": [], **raw}, spec,
                                  path if name is None else f"{path} (gallery id {name!r})")
    return {"region_feat": np.asarray(raw["region_feat"], np.float32), "boxes": checked["boxes"]}


def image_file_input(model_config, path: str) -> dict:
    """The per-image input of one file for a model's image tower: a picture's pixels
    (data/images.py) for a ViT, a region .npz's regions otherwise (a query image)."""
    if towers.image_input_name(model_config) == "pixels":
        return {"pixels": images.load_pixels(path, model_config.pixels.image_size)}
    return region_file_input(path, schema.RecordSpec(feat_dim=model_config.region.feat_dim))


def _region_record(item: Item, spec: schema.RecordSpec) -> dict:
    return {"image_id": item.key, **region_file_input(item.path, spec, item.key)}


def _check_regions(items: Sequence[Item], spec: schema.RecordSpec) -> None:
    """Reads every region-feature file once, before any vector is computed; every bad one is
    named in one error."""
    problems = []
    for item in items:
        try:
            _region_record(item, spec)
        except (ValueError, FileNotFoundError) as e:
            problems.append(str(e))
    if problems:
        raise GalleryError(f"{len(problems)} of {len(items)} region-feature files are bad: "
                           + "; ".join(problems[:picture_files.LISTED]))


class _RegionRecords:
    """The region records of items, read from their files on demand."""

    def __init__(self, items: Sequence[Item], spec: schema.RecordSpec):
        self.items, self.spec = items, spec

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return _region_record(self.items[i], self.spec)


class _PixelRecords:
    def __init__(self, pixels: np.ndarray, items: Sequence[Item]):
        self.pixels, self.items = pixels, items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"image_id": self.items[i].key, "image": np.asarray(self.pixels[i])}


def query_normalization(loaded: pretrained.Pretrained) -> bool:
    """Whether a model's retrieval vectors are L2-normalized before search: what its run
    trained with (the model directory's metadata, written by training's export), else its
    config's normalize_embeddings."""
    if "normalize" in loaded.metadata:
        return bool(loaded.metadata["normalize"])
    return bool(getattr(loaded.config, "normalize_embeddings", False))


def items_json(items: Sequence[Item]) -> str:
    """items.json, saved with the gallery's image index: {"ids": positions, "keys",
    "fields", "paths"} by id (the filters read the fields; a service shows the pictures)."""
    return json.dumps({"ids": list(range(len(items))), "keys": [i.key for i in items],
                       "fields": [i.fields for i in items], "paths": [i.path for i in items]})


def _catalog(ids, names, owners) -> str:
    return json.dumps({"ids": [int(i) for i in ids], "names": list(names),
                       "owners": [int(o) for o in owners]})


def build_gallery(model_dir: str, gallery: str, out_dir: str, backend: str = "scann",
                  bad_images: str = "error", workers: int = 0, normalize: bool | None = None,
                  progress: bool = True, eval_batch_size: int = 64,
                  **options) -> index_build.BuiltIndexes:
    """Embeds a gallery (`read_gallery`) with the model directory's image tower (and its
    captions with the text tower) and builds <out_dir>/image (and /text) with the health
    check: recall against exact search for caption queries when the gallery has captions,
    else for a sample of its own vectors. options: any `index` option (shard_size, d_low,
    candidates, health_queries, target_recall, target_k, scann={...}). normalize: L2-normalize
    the vectors (default `query_normalization`)."""
    items = read_gallery(gallery, exclude=out_dir)
    loaded = pretrained.load_pretrained(model_dir)
    if not kinds.get(loaded.kind).is_dual_encoder:
        raise ValueError(f"{model_dir} holds a {loaded.kind!r} model, not a dual encoder "
                         f"({' or '.join(kinds.dual_encoder_kinds())})")
    config = loaded.config
    input_name = towers.image_input_name(config)
    wanted = "image" if input_name == "pixels" else "features"
    if items[0].kind != wanted:
        raise GalleryError(f"{model_dir}'s image tower reads {input_name}: the gallery must "
                           f"list \"{wanted}\" files, it lists \"{items[0].kind}\"")
    out_dir = paths.absolute(out_dir)
    # The work files stay on local disk: beside the output, or for a gs:// output in the cache.
    build_dir = (paths.cache_dir("gallery-builds", hashlib.sha256(out_dir.encode()).hexdigest()
                                 [:20]) if paths.is_remote(out_dir)
                 else os.path.join(out_dir, BUILD_DIR))
    if normalize is None:
        normalize = query_normalization(loaded)
    if input_name == "pixels":
        pixels, kept = decode_pictures(items, config.pixels.image_size, build_dir, bad_images,
                                       workers, progress)
        items = [items[k] for k in kept]
        records = _PixelRecords(pixels, items)
    else:
        spec = schema.RecordSpec(feat_dim=config.region.feat_dim)
        _check_regions(items, spec)
        records = _RegionRecords(items, spec)
    # ScaNN keeps the vectors too, so filters can search a small allowed subset exactly.
    options["scann"] = {"keep_vectors": True, **dict(options.get("scann") or {})}
    options = backends.index_options(None, backend=backend, **options)
    run_like = layout_config(config, eval_batch_size)
    mesh = parallel.make_mesh()
    parallel.check_global_batch(eval_batch_size, mesh)
    model = pretrained.build_model(loaded.kind, config)
    fingerprint = pretrained.fingerprint(loaded.kind, config, loaded.params)
    digest = _digest(items)
    corpora = {"image": extract.image_corpus(records, "gallery", run_like,
                                             names=[i.name for i in items])}
    table = [{"captions": list(i.captions)} for i in items]
    has_captions = any(i.captions for i in items)
    if has_captions:
        tokenizer = pretrained.load_tokenizer(model_dir)
        if tokenizer is None:
            raise GalleryError(f"the gallery has captions but {model_dir} holds no tokenizer "
                               f"to read them")
        model_config.check_vocabulary(tokenizer, config, check_cls=False)
        corpora["text"] = extract.caption_corpus(table, tokenizer, "gallery", run_like)
    embeddings = {}
    for side, corpus in corpora.items():
        embeddings[side] = extract.extract(
            model, loaded.params, corpus, os.path.join(build_dir, "embeddings", side), mesh,
            # overwrite: the build's own work files of another gallery state or model are stale.
            fingerprint, options["shard_size"], normalize, True, progress, digest)
    built, reports, tuned = {}, {}, {}
    for side in corpora:
        other = "text" if side == "image" else "image"
        query_vectors = embeddings[other if has_captions else side].vectors
        queries, tuning_queries = index_build.held_out_queries(
            query_vectors, options["health_queries"], options.get("target_recall") is not None)
        index = index_build.build_index(embeddings[side], options["backend"], options,
                                        queries, other if has_captions else side, (),
                                        tuning_queries)
        index.info.update({"names": "names.json", "gallery": os.path.abspath(gallery),
                           "split": "gallery"})
        extras = {"names.json": _catalog(embeddings[side].ids, embeddings[side].names,
                                         embeddings[side].owners)}
        if side == "image":
            index.info["items"] = "items.json"
            extras["items.json"] = items_json(items)
        if jax.process_index() == 0:
            built[side] = index.save(paths.join(out_dir, side), extras)
        reports[side] = index.info.get("health", {})
        if "tuning" in index.info:
            tuned[side] = index.info["tuning"]
    extracted = {side: os.path.join(build_dir, "embeddings", side) for side in corpora}
    return index_build.BuiltIndexes(extracted, built, reports, tuned)


class GalleryRecords:
    """A gallery's items by id, read on demand from the files they were embedded from (the
    catalog's paths: a region .npz → {"region_feat", "boxes"}, a picture → {"image":
    uint8[S, S, 3]} at `image_size`): what the re-ranker's stores read
    (rerank.RecordImageStore, PatchImageStore). Items added later are found through the same
    catalog; an item without a file is an error naming it."""

    def __init__(self, catalog, feat_dim: int | None = None, image_size: int | None = None):
        self.catalog, self.image_size = catalog, image_size
        self.spec = schema.RecordSpec(feat_dim=feat_dim) if feat_dim else None

    def __len__(self) -> int:
        return max(self.catalog.names, default=-1) + 1

    def __getitem__(self, i: int) -> dict:
        path = self.catalog.paths.get(int(i))
        if not path:
            raise ValueError(f"gallery item {i} has no file to re-rank it from (not in the "
                             f"gallery, or added without one)")
        if path.lower().endswith(".npz"):
            if self.spec is None:
                raise ValueError(f"gallery item {i} ({path}) holds regions; this re-ranker "
                                 f"reads pictures")
            return {"image_id": str(i), **region_file_input(path, self.spec, str(i))}
        if self.image_size is None:
            raise ValueError(f"gallery item {i} ({path}) is a picture; this re-ranker reads "
                             f"regions")
        return {"image_id": str(i), "image": images.load_pixels(path, self.image_size)}


def gallery_reranker(reranker_dir: str, catalog, region_bucket: int = 100,
                     pairs_per_batch: int = 64):
    """A CrossEncoderReranker (text → image) over a gallery's items, their inputs read on
    demand from their files (`GalleryRecords`; a region re-ranker pads to region_bucket, a
    patch re-ranker reads the pictures at its own image size)."""
    from ldot_jax.retrieval import rerank
    loaded = pretrained.load_pretrained(reranker_dir)
    if loaded.kind != "uniter_itm":
        raise ValueError(f"{reranker_dir} holds a {loaded.kind!r} model, not a re-ranker "
                         f"(uniter_itm)")
    cross = pretrained.build_model(loaded.kind, loaded.config)
    config = loaded.config
    if config.image_tower == "vit":
        records = GalleryRecords(catalog, image_size=config.pixels.image_size)
        store = rerank.PatchImageStore(records, cross, loaded.params)
    else:
        records = GalleryRecords(catalog, feat_dim=config.region.feat_dim)
        store = rerank.RecordImageStore(records, region_bucket)
    buckets = encode.fit_buckets((16, 24, 32, 48, 64), config.transformer.max_position_embeddings)
    return rerank.CrossEncoderReranker(cross, loaded.params, store,
                                       pairs_per_batch=pairs_per_batch, text_buckets=buckets)


def save_inputs(directory: str, keys: Sequence[str], inputs: Sequence[dict]) -> list[str]:
    """Writes per-image inputs given inline (a service's new items) as files under
    `directory`, so the re-ranker and the page can read them like the gallery's own: pixels
    as PNG (lossless: the same pixels come back), regions as .npz. Returns their paths."""
    from PIL import Image
    os.makedirs(directory, exist_ok=True)
    out = []
    for key, value in zip(keys, inputs):
        stem = hashlib.sha256(str(key).encode()).hexdigest()[:20]
        if "pixels" in value:
            path = os.path.join(directory, stem + ".png")
            with fileutil.atomic_file(path, "wb") as f:
                Image.fromarray(np.asarray(value["pixels"], np.uint8)).save(f, "PNG")
        else:
            path = os.path.join(directory, stem + ".npz")
            with fileutil.atomic_file(path, "wb") as f:
                np.savez(f, features=np.asarray(value["region_feat"], np.float32),
                         boxes=np.asarray(value["boxes"], np.float32))
        out.append(path)
    return out
