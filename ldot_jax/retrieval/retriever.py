"""The Retriever: the two-stage query path over a trained run's towers and indexes.

    retriever = Retriever.load("runs/demo/finetune")        # model/ + index/<split>/
    retriever = Retriever.from_dirs(model_dir, index_dir)   # or any model + index directory
    hits = retriever.search_text(["a red circle left of a blue square"], k=5)
    hits.ids, hits.scores, hits.names, hits.timings_ms       # i64[Q, k], f32[Q, k], …
    hits = retriever.search_image([{"region_feat": f, "boxes": b}], k=5)   # image → captions
    hits = retriever.search_text(["a dog"], k=5, where={"tags": ["beach"]})  # filters.py

Queries are encoded by a jitted tower at fixed shapes (the batch padded to a power of two,
text to a length bucket, regions to a region bucket), so repeated queries never recompile.
A re-ranker (the slow stage) plugs in through `reranker`: it re-scores the top `rerank_top`
candidates of each query and the results are re-sorted by its scores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Mapping, Protocol, Sequence

import jax
import numpy as np

from ldot_jax.checkpoints import pretrained
from ldot_jax.core import numerics, paths
from ldot_jax.core import workdir as workdir_lib
from ldot_jax.data import batching
from ldot_jax.index import backends
from ldot_jax.index import base as index_base
from ldot_jax.models import config as model_config_lib
from ldot_jax.models import towers
from ldot_jax.retrieval import encode, filters

class Reranker(Protocol):
    """The slow stage. Called with the direction, the queries' input pytree (the text input
    i32[Q, L] / the image input [Q, R, ...]), candidate ids i64[Q, M] (-1: none) and their dot
    scores f32[Q, M]; returns new scores f32[Q, M] (higher is better)."""

    def __call__(self, direction: str, queries: dict[str, np.ndarray], candidates: np.ndarray,
                 scores: np.ndarray) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class Results:
    """ids i64[Q, k] and scores f32[Q, k], best first; names[q][j] the catalog name of
    ids[q, j] (image ids, or caption texts); timings_ms: encode / search / rerank / total for
    the whole batch, and per_query (total / Q); filter: how a `where` search ran
    (filters.FilterInfo.to_json()), None without one."""

    ids: np.ndarray
    scores: np.ndarray
    names: list[list[str]]
    timings_ms: dict[str, float]
    filter: dict | None = None


def _batch_size(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class Catalog:
    """What the ids of an index are: names (names.json, written by every index build), and
    for a gallery (items.json, retrieval/gallery.py) each item's key and metadata fields,
    which `where` filters match."""

    def __init__(self, ids=(), names=(), owners=(), items: dict | None = None):
        self.names = dict(zip((int(i) for i in ids), names))
        self.owners = dict(zip((int(i) for i in ids), (int(o) for o in owners)))
        items = items or {"ids": [], "keys": [], "fields": []}
        # Gallery keys both ways (None: an item without one, e.g. added to a run's index).
        self.keys = {str(k): int(i) for i, k in zip(items["ids"], items["keys"])
                     if k is not None}
        self.key_of = {i: k for k, i in self.keys.items()}
        self.fields = filters.FieldTable(dict(zip((int(i) for i in items["ids"]),
                                                  items["fields"])))
        # The file each item was embedded from (gallery builds), e.g. to show its picture.
        self.paths = dict(zip((int(i) for i in items["ids"]), items.get("paths", ())))

    @classmethod
    def read(cls, index_dir: str) -> "Catalog":
        """From an index directory (saved with the index; local, or the local copy of a
        gs:// one: `index.base.readable`)."""
        bodies = {}
        for name in ("names.json", "items.json"):
            path = os.path.join(index_dir, name)
            if os.path.isfile(path):
                with open(path) as f:
                    bodies[name] = json.load(f)
        names = bodies.get("names.json", {})
        return cls(names.get("ids", ()), names.get("names", ()), names.get("owners", ()),
                   bodies.get("items.json"))

    def name(self, i: int) -> str:
        return self.names.get(int(i), str(int(i)) if i >= 0 else "")

    def check_new_keys(self, keys) -> None:
        """ValueError if any of `keys` is taken or repeated (nothing changes)."""
        keys = [str(k) for k in keys]
        taken = [k for k in keys if k in self.keys]
        if taken or len(set(keys)) != len(keys):
            raise ValueError(f"keys already in the gallery (or repeated): "
                             f"{(taken or keys)[:10]}")

    def add(self, ids, names, keys=None, fields=None, owners=None, paths=None) -> None:
        """Records new items (ids i64[n]; keys: gallery ids, refused when already taken;
        paths: the files they came from, if any)."""
        ids = [int(i) for i in ids]
        keys = [None if k is None else str(k) for k in keys] if keys is not None else None
        if keys is not None:
            self.check_new_keys([k for k in keys if k is not None])
        for n, i in enumerate(ids):
            self.names[i] = str(names[n])
            self.owners[i] = -1 if owners is None else int(owners[n])
            if keys is not None and keys[n] is not None:
                self.keys[keys[n]] = i
                self.key_of[i] = keys[n]
            self.fields.add(i, dict(fields[n]) if fields is not None else {})
            if paths is not None and paths[n]:
                self.paths[i] = str(paths[n])

    def entries(self, ids) -> list[dict]:
        """What the catalog holds of `ids` (to put them back with `add`)."""
        return [{"id": int(i), "name": self.names.get(int(i), str(i)),
                 "owner": self.owners.get(int(i), -1), "key": self.key_of.get(int(i)),
                 "fields": self.fields.fields_of(int(i)), "path": self.paths.get(int(i))}
                for i in ids]

    def remove(self, ids) -> None:
        gone = {int(i) for i in ids}
        for i in gone:
            self.names.pop(i, None)
            self.owners.pop(i, None)
            self.fields.remove(i)
            self.paths.pop(i, None)
            key = self.key_of.pop(i, None)
            if key is not None:
                self.keys.pop(key, None)

    def files(self) -> dict[str, str]:
        """names.json (and items.json when the catalog has keys, fields or paths), as saved
        with an index."""
        ids = sorted(self.names)
        out = {"names.json": json.dumps({"ids": ids, "names": [self.names[i] for i in ids],
                                         "owners": [self.owners.get(i, -1) for i in ids]})}
        if self.keys or self.fields.fields or self.paths:
            out["items.json"] = json.dumps({
                "ids": ids, "keys": [self.key_of.get(i) for i in ids],
                "fields": [self.fields.fields_of(i) for i in ids],
                "paths": [self.paths.get(i, "") for i in ids]})
        return out


class Retriever:
    """Encodes queries with one tower and searches the index of the other side.

    model / params: a DualEncoder (or pre-training model) and its params; tokenizer: the
    run's; image_index: searched by captions; text_index: searched by images (either may be
    None); text_buckets / region_buckets: padded query shapes; normalize: L2-normalize query
    vectors (towers trained with normalized embeddings); reranker / rerank_top: the slow stage.
    """

    def __init__(self, model, params, tokenizer, image_index=None, text_index=None,
                 catalogs: dict[str, Catalog] | None = None,
                 text_buckets: Sequence[int] = (16, 24, 32, 48, 64),
                 region_buckets: Sequence[int] = (16, 36, 64, 100), normalize: bool = False,
                 reranker: Reranker | None = None, rerank_top: int = 0):
        # The tokenizer's ids must all have an embedding row (else they would be NaN rows).
        model_config_lib.check_vocabulary(tokenizer, model.config, check_cls=False)
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.indexes = {"image": image_index, "text": text_index}
        self.catalogs = catalogs or {}
        self.text_buckets = encode.fitting_text_buckets(model.config, text_buckets)
        self.region_buckets = tuple(region_buckets)
        # How the image tower's input is padded and split (data/batching.IMAGE_INPUTS).
        self.image_input = batching.image_input(towers.image_input_name(model.config))
        self.normalize = normalize
        self.reranker, self.rerank_top = reranker, int(rerank_top)
        # Where each side's index was read from (from_dirs): updates are saved back there;
        # the model's kind and fingerprint (from_dirs), for a service's /info.
        self.index_dirs: dict[str, str] = {}
        self.kind = self.fingerprint = None

    @classmethod
    def from_dirs(cls, model_dir: str, index_dir: str, tokenizer=None, force: bool = False,
                  **kwargs) -> "Retriever":
        """From a model directory and an index directory (its `image/` and / or `text/`
        indexes, or one index directory), nothing else: the tokenizer is the one saved in the
        model directory unless `tokenizer` (a Tokenizer, or a directory / vocab.txt) is given;
        query vectors are normalized when the index was built from normalized vectors. An
        index built from another model is an error unless `force`. kwargs: text_buckets,
        region_buckets, reranker, rerank_top."""
        loaded = pretrained.load_pretrained(model_dir)
        model = pretrained.build_model(loaded.kind, loaded.config)
        fingerprint = pretrained.fingerprint(loaded.kind, loaded.config, loaded.params)
        indexes, catalogs = {}, {}
        if index_base.is_index_dir(index_dir):  # one index: its metadata names its side
            side = index_base.read_metadata(index_dir).get("info", {}).get("side") or "image"
            sides = {side: index_dir}
        else:
            sides = {side: paths.join(index_dir, side) for side in workdir_lib.SIDES}
        for side, path in sides.items():
            if paths.is_dir(path):
                local = index_base.readable(path)  # a gs:// index: its checked local copy
                indexes[side] = backends.load_index(local, fingerprint, force)
                catalogs[side] = Catalog.read(local)
        if not indexes:
            raise index_base.IndexFormatError(
                f"no index under {index_dir}: build one with `ldot index build`")
        tokenizer = _tokenizer(tokenizer, model_dir)
        normalized = {bool(i.info.get("normalized", False)) for i in indexes.values()}
        kwargs.setdefault("normalize", normalized.pop() if len(normalized) == 1 else False)
        retriever = cls(model, loaded.params, tokenizer, indexes.get("image"),
                        indexes.get("text"), catalogs, **kwargs)
        retriever.index_dirs = {side: sides[side] for side in indexes}
        retriever.kind, retriever.fingerprint = loaded.kind, fingerprint
        return retriever

    @classmethod
    def load(cls, workdir: str, split: str | None = None, model_dir: str | None = None,
             index_dir: str | None = None, force: bool = False, **kwargs) -> "Retriever":
        """From a run's workdir: <workdir>/model (or model_dir) and the indexes under
        <workdir>/index/<split> (or index_dir), with the run's query shapes and
        normalization. An index built from another model is an error unless `force`.
        kwargs: reranker, rerank_top."""
        workdir = paths.absolute(workdir)
        config = workdir_lib.load_config(workdir)
        split = split or backends.index_options(config)["split"]
        model_dir = model_dir or workdir_lib.model_dir(workdir)
        tokenizer = pretrained.load_tokenizer(model_dir)
        if tokenizer is None:  # a model exported without its tokenizer: the run's dataset's
            from ldot_jax.retrieval import index_build
            tokenizer = index_build.open_dataset(config).tokenizer
        return cls.from_dirs(
            model_dir, index_dir or workdir_lib.index_dir(workdir, split), tokenizer, force,
            text_buckets=config.pipeline.text_buckets,
            region_buckets=config.pipeline.region_buckets,
            normalize=bool(config.loss.get("normalize", False)), **kwargs)

    # -- encoding -----------------------------------------------------------------------------

    def _finish(self, vectors: np.ndarray) -> np.ndarray:
        if self.normalize:
            vectors = numerics.l2_normalize(vectors)
        return vectors

    def text_inputs(self, captions: Sequence[str]) -> dict[str, np.ndarray]:
        """The text input of captions, padded (B a power of two ≥ Q, L a text bucket; rows
        past Q are padding)."""
        if isinstance(captions, str) or not len(captions):
            raise ValueError("captions: expected a non-empty list of strings")
        ids = self.tokenizer.encode_batch(list(captions), max(self.text_buckets) - 2, "truncate")
        return batching.collate_text(ids, self.text_buckets, _batch_size(len(ids)),
                                     stub_rows=True)

    def image_inputs(self, images) -> tuple[dict[str, np.ndarray], int]:
        """(the image input of `images`, padded as `text_inputs` pads, the number of images).
        `images`: a list of per-image inputs (regions: {"region_feat": [n, F], "boxes":
        [n, 7]}) or one batch pytree ({"region_feat": [Q, R, F], "boxes": [Q, R, 7],
        optional "region_mask": [Q, R]}); region_buckets are the image input's buckets."""
        per_image = (self.image_input.split(images) if isinstance(images, Mapping)
                     else list(images))
        if not per_image:
            raise ValueError("images: expected at least one image")
        batch = self.image_input.collate(per_image, self.region_buckets,
                                         _batch_size(len(per_image)), stub_rows=True)
        return batch, len(per_image)

    def _encode(self, inputs: dict, side: str, count: int) -> np.ndarray:
        out = encode.encode_batch(self.model, self.params, inputs, side)
        vectors = np.asarray(jax.device_get(out), np.float32)[:count]
        # The inputs were checked (ids against the vocabulary, finite features and boxes).
        numerics.check_finite(vectors, f"the {side} tower's query vectors (query, dim): the "
                                       f"model's params hold non-finite values")
        return self._finish(vectors)

    def encode_text(self, captions: Sequence[str]) -> np.ndarray:
        """f32[Q, D]: the text tower's vectors of captions."""
        return self._encode(self.text_inputs(captions), "text", len(captions))

    def encode_image(self, images) -> np.ndarray:
        """f32[Q, D]: the image tower's vectors (see `image_inputs` for the input forms)."""
        inputs, count = self.image_inputs(images)
        return self._encode(inputs, "image", count)

    # -- searching ----------------------------------------------------------------------------

    def _search(self, direction: str, inputs: dict, count: int, k: int,
                rerank_top: int | None, search_options: dict, where=None) -> Results:
        t0 = time.perf_counter()
        vectors = self._encode(inputs, "text" if direction == "text_to_image" else "image",
                               count)
        return self.search_encoded(direction, vectors, inputs, k, rerank_top, where,
                                   1000 * (time.perf_counter() - t0), **search_options)

    def search_encoded(self, direction: str, vectors: np.ndarray, inputs: dict, k: int = 10,
                       rerank_top: int | None = None, where=None, encode_ms: float = 0.0,
                       **search_options) -> Results:
        """The search of already encoded queries (what a server batching many requests into
        one encoder call does): vectors f32[Q, D] from `encode_text` / `encode_image`, inputs
        the queries' padded input pytree (rows ≥ Q are padding; the re-ranker reads rows < Q)
        and encode_ms the time their encoding took (for the timings)."""
        target = "image" if direction == "text_to_image" else "text"
        if direction not in ("text_to_image", "image_to_text"):
            raise ValueError(f"direction {direction!r}: expected 'text_to_image' or "
                             f"'image_to_text'")
        if int(k) != k or k < 1:
            raise ValueError(f"k={k}: expected a positive integer")
        index = self.indexes[target]
        if index is None:
            raise ValueError(f"no {target} index loaded: {direction} search needs one")
        count = len(vectors)
        t1 = time.perf_counter()
        t0 = t1 - encode_ms / 1000
        m = self.rerank_top if rerank_top is None else int(rerank_top)
        m = m if self.reranker is not None else 0
        catalog = self.catalogs.get(target, Catalog())
        info = None
        if where is None:
            hits = index.search(vectors, max(k, m), **search_options)
        else:
            allowed = filters.allowed_ids(where, index.ids, catalog.fields, catalog.keys)
            hits, info = filters.search(index, vectors, max(k, m), allowed, **search_options)
            info = info.to_json()
        t2 = time.perf_counter()
        ids, scores = hits.ids, hits.scores
        if m:
            m = min(m, ids.shape[1])
            real = jax.tree.map(lambda x: x[:count], inputs)
            new = np.asarray(self.reranker(direction, real, ids[:, :m], scores[:, :m]),
                             np.float32)
            if new.shape != (count, m):
                raise ValueError(f"the re-ranker returned shape {new.shape}, expected "
                                 f"{(count, m)}")
            new = np.where(ids[:, :m] >= 0, new, -np.inf)
            order = np.argsort(-new, axis=1, kind="stable")
            ids = np.concatenate([np.take_along_axis(ids[:, :m], order, 1), ids[:, m:]], 1)
            scores = np.concatenate([np.take_along_axis(new, order, 1), scores[:, m:]], 1)
        t3 = time.perf_counter()
        k = min(k, ids.shape[1])
        ids, scores = ids[:, :k], scores[:, :k]
        names = [[catalog.name(i) for i in row] for row in ids]
        ms = lambda a, b: round(1000 * (b - a), 3)
        timings = {"encode": ms(t0, t1), "search": ms(t1, t2), "rerank": ms(t2, t3),
                   "total": ms(t0, t3)}
        timings["per_query"] = round(timings["total"] / count, 3)
        return Results(ids, scores, names, timings, info)

    def search_text(self, captions: Sequence[str], k: int = 10, rerank_top: int | None = None,
                    where=None, **search_options) -> Results:
        """Text → image: the top-k images of each caption; `where` restricts them to items
        whose metadata matches (filters.py), then the re-ranker re-orders what is allowed.
        search_options go to the index (e.g. leaves_to_search, candidates)."""
        inputs = self.text_inputs(captions)
        return self._search("text_to_image", inputs, len(captions), k, rerank_top,
                            search_options, where)

    def search_image(self, images, k: int = 10, rerank_top: int | None = None, where=None,
                     **search_options) -> Results:
        """Image → text: the top-k captions of each image (`images` as in `image_inputs`);
        `where` as in search_text (captions: an allow-list of ids)."""
        inputs, count = self.image_inputs(images)
        return self._search("image_to_text", inputs, count, k, rerank_top, search_options,
                            where)

    # -- live updates -------------------------------------------------------------------------

    def add_images(self, images, names: Sequence[str] | None = None,
                   keys: Sequence[str] | None = None, fields: Sequence[dict] | None = None,
                   save: bool = True, paths: Sequence[str] | None = None,
                   batch: int = 32) -> np.ndarray:
        """Adds images (per-image inputs, as `image_inputs` takes) to the image index: their
        vectors from the image tower (`batch` at a time: a service's largest warmed batch),
        new ids (never one an earlier item had: info["next_id"]), and their names / gallery
        keys / metadata fields / files in the catalog. Returns the new ids i64[n]. save: write
        the index back to its directory (atomically: a crash leaves the old index or the new
        one); if the save fails, the addition is undone and the error raised."""
        index = self._index("image")
        catalog = self.catalogs.setdefault("image", Catalog())
        per_image = (self.image_input.split(images) if isinstance(images, Mapping)
                     else list(images))
        count = len(per_image)
        for what, values in (("names", names), ("keys", keys), ("fields", fields),
                             ("paths", paths)):
            if values is not None and len(values) != count:
                raise ValueError(f"{what}: {len(values)} for {count} images")
        if fields is not None:
            for n, f in enumerate(fields):
                for field, value in dict(f).items():
                    filters.check_value(value, f"fields[{n}][{field!r}]")
        if keys is not None:
            catalog.check_new_keys(keys)
        if not count:
            return np.zeros(0, np.int64)
        vectors = np.concatenate([self.encode_image(per_image[i:i + batch])
                                  for i in range(0, count, batch)])
        start = _next_id(index)
        ids = np.arange(start, start + count, dtype=np.int64)
        if names is None:  # shown in results: the key, else the id
            names = [str(k) for k in (keys if keys is not None else ids)]
        index.add(vectors, ids)
        catalog.add(ids, names, keys, fields, paths=paths)
        index.info["next_id"] = start + count
        if save:
            try:
                self.save("image")
            except BaseException:
                index.delete(ids)
                catalog.remove(ids)
                index.info["next_id"] = start + count  # still never reused
                raise
        return ids

    def delete(self, ids=None, keys: Sequence[str] | None = None, side: str = "image",
               save: bool = True) -> np.ndarray:
        """Removes items by index id or gallery key (an error names any not there; nothing is
        removed then), and with images the captions of theirs the text index holds. Returns
        the removed ids; save as in add_images (a failed save puts the items back when the
        index keeps its vectors)."""
        index = self._index(side)
        catalog = self.catalogs.setdefault(side, Catalog())
        chosen = []
        for i in (ids if ids is not None else []):
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
                raise ValueError(f"ids: {i!r} is not an integer id")
            chosen.append(int(i))
        if keys is not None:
            unknown = [k for k in keys if str(k) not in catalog.keys]
            if unknown:
                raise ValueError(f"keys not in the gallery: {unknown[:10]}")
            chosen += [catalog.keys[str(k)] for k in keys]
        chosen = np.unique(np.asarray(chosen, np.int64))
        index.positions_of(chosen)  # a KeyError names ids not in the index, before any change
        changes = [(side, chosen)]
        text = self.indexes.get("text")
        if side == "image" and text is not None and "text" in self.catalogs:
            gone, present = set(chosen.tolist()), set(text.ids.tolist())
            owned = [i for i, owner in self.catalogs["text"].owners.items()
                     if owner in gone and i in present]
            if owned:
                changes.append(("text", np.asarray(sorted(owned), np.int64)))
        undo = []
        for name, gone in changes:
            target, entries = self.indexes[name], self.catalogs.setdefault(name, Catalog())
            target.info.setdefault("next_id", _next_id(target))
            undo.append((name, gone, target.vectors_of(gone), entries.entries(gone)))
            target.delete(gone)
            entries.remove(gone)
        if save:
            try:
                for name, _ in changes:
                    self.save(name)
            except BaseException:
                for name, gone, vectors, entries in undo:
                    if vectors is not None:
                        self._put_back(name, gone, vectors, entries)
                raise
        return chosen

    def _put_back(self, side: str, ids, vectors, entries) -> None:
        self.indexes[side].add(vectors, ids)
        self.catalogs[side].add(ids, [e["name"] for e in entries],
                                [e["key"] for e in entries], [e["fields"] for e in entries],
                                [e["owner"] for e in entries], [e["path"] for e in entries])

    def save(self, side: str = "image") -> str:
        """Writes one side's index and catalog back to the directory it was loaded from
        (index.save: atomic)."""
        if side not in self.index_dirs:
            raise ValueError(f"the {side} index was not loaded from a directory "
                             f"(Retriever.from_dirs): nowhere to save it")
        index = self._index(side)
        index.info["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        return index.save(self.index_dirs[side], self.catalogs.get(side, Catalog()).files())

    def check_health(self, side: str = "image", queries: np.ndarray | None = None,
                     count: int = 1000) -> dict:
        """Recall of the index against exact search over its own vectors (it must keep them:
        ExactIndex, ScaNN with keep_vectors) for `queries` f32[Q, D] (default: up to `count`
        of its own vectors); stored in info["health"], saved with the next save."""
        from ldot_jax.index import health
        from ldot_jax.index.exact import ExactIndex
        index = self._index(side)
        vectors = index.vectors_of(index.ids)
        if vectors is None:
            raise ValueError(f"the {side} index ({index.type}) does not keep its vectors, so "
                             f"its recall cannot be measured here (build it with "
                             f"scann.keep_vectors, or measure it with `ldot index build`)")
        given = queries is not None
        queries = queries if given else health.sample_queries(vectors, count)
        exact = ExactIndex(index.dim).add(vectors, index.ids)
        report = health.recall_against_exact(index, exact, queries)
        report.update({"query_side": "given" if given else "own vectors",
                       "checked": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        index.info["health"] = report
        return report

    def _index(self, side: str):
        if side not in self.indexes:
            raise ValueError(f"side {side!r}: expected 'image' or 'text'")
        if self.indexes[side] is None:
            raise ValueError(f"no {side} index loaded")
        return self.indexes[side]

    def warmup(self, batch_sizes: Sequence[int] = (1,), images: bool | None = None) -> None:
        """Compiles the query encoders for every bucket at each of `batch_sizes` (default a
        single query, so the first query is fast; a server: every batch size it pads to).
        images: also the image tower (default: when there is a text index to query with
        images; a server adding items needs it with an image index alone)."""
        if images is None:
            images = self.indexes["text"] is not None
        stub = None
        if images:  # the image tower's smallest input, padded to each bucket
            dummy = towers.image_tower(self.model.config.image_tower).dummy_input(
                self.model.config)
            stub = self.image_input.split(jax.tree.map(np.asarray, dummy))
        for size in batch_sizes:
            if self.indexes["image"] is not None:
                for length in self.text_buckets:
                    self._encode(batching.collate_text([[0] * length] * size, (length,), size),
                                 "text", size)
            if stub is not None:
                for bucket in self.region_buckets:
                    self._encode(self.image_input.collate(stub * size, (bucket,), size),
                                 "image", size)


def _next_id(index) -> int:
    """The id the next added item gets: after every id the index has held (info["next_id"],
    kept by additions and deletions), so a deleted item's id is never given to another."""
    largest = int(index.ids.max()) + 1 if len(index) else 0
    return max(largest, int(index.info.get("next_id", 0)))


def _tokenizer(tokenizer, model_dir: str):
    """A Tokenizer from `tokenizer` (a Tokenizer, a saved directory or a vocab.txt) or, when
    None, the one saved in the model directory."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from ldot_jax.data import text_tokenizers
    from ldot_jax.data.tokenizer import Tokenizer
    if tokenizer is None:
        found = pretrained.load_tokenizer(model_dir)
        if found is None:
            raise ValueError(f"{model_dir} holds no tokenizer (models exported by training "
                             f"carry one; for a converted checkpoint pass tokenizer= the "
                             f"vocab.txt it was trained with)")
        return found
    path = os.fspath(tokenizer)
    return (text_tokenizers.load(path) if paths.is_dir(path)
            else Tokenizer.from_vocab_file(path))
