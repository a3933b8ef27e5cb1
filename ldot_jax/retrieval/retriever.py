"""The Retriever: the two-stage query path over a trained run's towers and indexes.

    retriever = Retriever.load("runs/demo/finetune")        # model/ + index/<split>/
    retriever = Retriever.from_dirs(model_dir, index_dir)   # or any model + index directory
    hits = retriever.search_text(["a red circle left of a blue square"], k=5)
    hits.ids, hits.scores, hits.names, hits.timings_ms       # i64[Q, k], f32[Q, k], …
    hits = retriever.search_image([{"region_feat": f, "boxes": b}], k=5)   # image → captions

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
from ldot_jax.retrieval import encode

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
    the whole batch, and per_query (total / Q)."""

    ids: np.ndarray
    scores: np.ndarray
    names: list[list[str]]
    timings_ms: dict[str, float]


def _batch_size(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class Catalog:
    """Names of the ids of an index (names.json written by the index build)."""

    def __init__(self, ids=(), names=(), owners=()):
        self.names = dict(zip((int(i) for i in ids), names))
        self.owners = dict(zip((int(i) for i in ids), (int(o) for o in owners)))

    @classmethod
    def read(cls, index_dir: str) -> "Catalog":
        """From an index directory (saved with the index; local, or the local copy of a
        gs:// one: `index.base.readable`)."""
        path = os.path.join(index_dir, "names.json")
        if not os.path.isfile(path):
            return cls()
        with open(path) as f:
            body = json.load(f)
        return cls(body["ids"], body["names"], body.get("owners", ()))

    def name(self, i: int) -> str:
        return self.names.get(int(i), str(int(i)) if i >= 0 else "")


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
        self.text_buckets, self.region_buckets = tuple(text_buckets), tuple(region_buckets)
        # How the image tower's input is padded and split (data/batching.IMAGE_INPUTS).
        self.image_input = batching.image_input(towers.image_input_name(model.config))
        self.normalize = normalize
        self.reranker, self.rerank_top = reranker, int(rerank_top)

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
        return cls(model, loaded.params, tokenizer, indexes.get("image"), indexes.get("text"),
                   catalogs, **kwargs)

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
                rerank_top: int | None, search_options: dict) -> Results:
        query_side, target = ("text", "image") if direction == "text_to_image" else (
            "image", "text")
        index = self.indexes[target]
        if index is None:
            raise ValueError(f"no {target} index loaded: {direction} search needs one")
        t0 = time.perf_counter()
        vectors = self._encode(inputs, query_side, count)
        t1 = time.perf_counter()
        m = self.rerank_top if rerank_top is None else int(rerank_top)
        m = m if self.reranker is not None else 0
        hits = index.search(vectors, max(k, m), **search_options)
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
        catalog = self.catalogs.get(target, Catalog())
        names = [[catalog.name(i) for i in row] for row in ids]
        ms = lambda a, b: round(1000 * (b - a), 3)
        timings = {"encode": ms(t0, t1), "search": ms(t1, t2), "rerank": ms(t2, t3),
                   "total": ms(t0, t3)}
        timings["per_query"] = round(timings["total"] / count, 3)
        return Results(ids, scores, names, timings)

    def search_text(self, captions: Sequence[str], k: int = 10, rerank_top: int | None = None,
                    **search_options) -> Results:
        """Text → image: the top-k images of each caption. search_options go to the index
        (e.g. leaves_to_search, candidates)."""
        inputs = self.text_inputs(captions)
        return self._search("text_to_image", inputs, len(captions), k, rerank_top,
                            search_options)

    def search_image(self, images, k: int = 10, rerank_top: int | None = None,
                     **search_options) -> Results:
        """Image → text: the top-k captions of each image (`images` as in `image_inputs`)."""
        inputs, count = self.image_inputs(images)
        return self._search("image_to_text", inputs, count, k, rerank_top, search_options)

    def warmup(self) -> None:
        """Compiles the single-query shapes of every bucket (so the first query is fast)."""
        if self.indexes["image"] is not None:
            for length in self.text_buckets:
                self._encode(batching.collate_text([[0] * length], (length,)), "text", 1)
        if self.indexes["text"] is not None:
            # The image tower's smallest input, padded to each bucket.
            dummy = towers.image_tower(self.model.config.image_tower).dummy_input(
                self.model.config)
            stub = self.image_input.split(jax.tree.map(np.asarray, dummy))
            for bucket in self.region_buckets:
                self._encode(self.image_input.collate(stub, (bucket,)), "image", 1)


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
