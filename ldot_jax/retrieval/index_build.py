"""From a training workdir to saved indexes: extract embeddings, build, check health, save.

  <workdir>/embeddings/<split>/{image,text}/   extraction shards (resumable)
  <workdir>/index/<split>/image/               images, searched by caption vectors (IR)
  <workdir>/index/<split>/text/                captions, searched by image vectors (TR)

Health: each index is searched with up to `health_queries` vectors of the other modality and
its recall@{1,10,100} against ExactIndex on the same vectors is stored in its metadata
(info["health"]) and logged. With `target_recall` (recall-targeted builds, index/tuning.py),
the settings are chosen on another `health_queries` vectors of the other modality, so that
health measures the chosen settings on queries they were not chosen on; the choice and every
probe go into info["tuning"].
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Mapping, Sequence

import jax
import numpy as np

from ldot_jax.checkpoints import kinds
from ldot_jax.checkpoints import pretrained
from ldot_jax.core import parallel, paths
from ldot_jax.core import workdir as workdir_lib
from ldot_jax.index import backends
from ldot_jax.index import base, health, tuning
from ldot_jax.index.exact import ExactIndex
from ldot_jax.retrieval import extract

log = logging.getLogger(__name__)


def build_index(embeddings: extract.Embeddings, backend: str, options: Mapping,
                queries: np.ndarray | None = None, query_side: str | None = None,
                matryoshka_dims: Sequence[int] = (),
                tuning_queries: np.ndarray | None = None) -> base.VectorIndex:
    """Builds an index over `embeddings` and records its metadata: the model fingerprint,
    build time, what it holds, and health (recall against exact search for `queries`).
    With options["target_recall"], an approximate backend's settings are chosen on
    `tuning_queries` (f32[Q, D], held out: not the health queries) by `tuning.tune`."""
    manifest = embeddings.manifest
    dim = embeddings.vectors.shape[1]

    def make(build_overrides: dict) -> base.VectorIndex:
        scann = {**dict(options.get("scann", {})), **build_overrides}
        return backends.make_index(backend, dim, {**options, "scann": scann}, matryoshka_dims,
                                   manifest.get("normalized", False))

    target = options.get("target_recall")
    exact = None
    start = time.perf_counter()
    if target is not None and not backends.backend(backend).exact:
        if tuning_queries is None or not len(tuning_queries):
            raise ValueError(f"target_recall={target}: a recall-targeted build needs held-out "
                             f"queries (tuning_queries), none were given")
        exact = ExactIndex(dim, **dict(options.get("exact", {})))
        exact.add(embeddings.vectors, embeddings.ids)
        index, report = tuning.tune(
            make, embeddings.vectors, embeddings.ids, tuning_queries, float(target),
            int(options.get("target_k", 10)),
            tuning.build_ladder(len(embeddings.ids), dict(options.get("scann", {}))),
            exact=exact)
        index.info["tuning"] = {**report.to_json(), "query_side": query_side}
        log.info("%s index tuned: %s", backend, report.summary())
    else:
        index = make({}).add(embeddings.vectors, embeddings.ids)
    build_time = time.perf_counter() - start
    index.info.update({
        "model_fingerprint": manifest.get("fingerprint"), "build_time_s": round(build_time, 3),
        "side": manifest.get("side"), "split": manifest.get("split"),
        "normalized": bool(manifest.get("normalized", False)),
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    if queries is not None and len(queries):
        if backends.backend(backend).exact:
            report = {"queries": int(len(queries)), "exact": True}
        else:
            if exact is None:
                exact = ExactIndex(index.dim, **dict(options.get("exact", {})))
                exact.add(embeddings.vectors, embeddings.ids)
            report = health.recall_against_exact(index, exact, queries)
        report["query_side"] = query_side
        index.info["health"] = report
    return index


@dataclasses.dataclass(frozen=True)
class BuiltIndexes:
    """Paths of what `build_from_workdir` wrote, each index's health report, and the tuning
    report of each recall-targeted index."""

    embeddings: dict[str, str]
    indexes: dict[str, str]
    health: dict[str, dict]
    tuning: dict[str, dict] = dataclasses.field(default_factory=dict)


def open_dataset(config):
    """The run's dataset (`datasets.load_for_run`: a RetrievalDataset). Imported here, not at
    module level, so that the query path does not load TFDS and grain."""
    from ldot_jax.data import datasets
    return datasets.load_for_run(config.data)


def build_from_workdir(workdir: str, model_dir: str | None = None, out_dir: str | None = None,
                       overwrite: bool = False, progress: bool = True,
                       **overrides) -> BuiltIndexes:
    """Extracts the split's embeddings with the run's model and builds its indexes.

    overrides: any `index` config key (split, backend, sides, d_low, candidates, shard_size,
    health_queries, target_recall, target_k, scann={...}); model_dir: default
    <workdir>/model; out_dir: default <workdir>/index/<split>.
    """
    workdir = paths.absolute(workdir)
    config = workdir_lib.load_config(workdir)
    options = backends.index_options(config, **overrides)
    split = options["split"]
    model_dir = model_dir or workdir_lib.model_dir(workdir)
    if not paths.is_dir(model_dir):
        raise FileNotFoundError(
            f"no model at {model_dir}: a finished run exports one (or `ldot export --workdir "
            f"{workdir}` from a checkpoint); otherwise "
            f"pass model_dir / --model (a directory written by ldot_jax.save_pretrained)")
    loaded = pretrained.load_pretrained(model_dir)
    if not kinds.get(loaded.kind).is_dual_encoder:
        raise ValueError(f"{model_dir} holds a {loaded.kind!r} model, not a dual encoder "
                         f"({' or '.join(kinds.dual_encoder_kinds())})")
    model = pretrained.build_model(loaded.kind, loaded.config)
    fingerprint = pretrained.fingerprint(loaded.kind, loaded.config, loaded.params)
    mesh = parallel.make_mesh()
    parallel.check_global_batch(config.train.eval_batch_size, mesh)
    normalize = bool(config.loss.get("normalize", False))
    dataset = open_dataset(config)
    corpora = {}
    from ldot_jax.data import datasets  # (not at module level: see open_dataset)
    data_digest = datasets.split_digest(dataset, split)
    if "image" in options["sides"] or "text" in options["sides"]:
        corpora["image"] = extract.image_corpus(dataset.split(split), split, config)
        corpora["text"] = extract.caption_corpus(dataset.caption_table(split),
                                                 dataset.tokenizer, split, config)
    params = loaded.params
    embeddings, extracted = {}, {}
    # Both modalities are extracted: an index of one side is checked with queries of the other.
    for side, corpus in corpora.items():
        extracted[side] = workdir_lib.embeddings_dir(workdir, split, side)
        embeddings[side] = extract.extract(model, params, corpus, extracted[side], mesh,
                                           fingerprint, options["shard_size"], normalize,
                                           overwrite, progress, data_digest)
    out_dir = out_dir or workdir_lib.index_dir(workdir, split)
    indexes, reports, tuned = {}, {}, {}
    matryoshka = tuple(config.loss.get("matryoshka_dims", ()) or ())
    for side in options["sides"]:
        other = workdir_lib.QUERY_SIDE[side]
        queries, tuning_queries = held_out_queries(embeddings[other].vectors,
                                                   options["health_queries"],
                                                   options.get("target_recall") is not None)
        index = build_index(embeddings[side], options["backend"], options, queries, other,
                            matryoshka, tuning_queries)
        index.info["names"] = "names.json"
        if jax.process_index() == 0:
            indexes[side] = index.save(paths.join(out_dir, side),
                                       {"names.json": _catalog(embeddings[side])})
        reports[side] = index.info.get("health", {})
        if "tuning" in index.info:
            tuned[side] = index.info["tuning"]
        log.info("%s index of %d %ss built in %.2f s; recall vs exact (%s queries): %s",
                 options["backend"], len(index), side, index.info["build_time_s"], other,
                 {k: v for k, v in reports[side].items() if k.startswith("recall")})
    return BuiltIndexes(extracted, indexes, reports, tuned)


def held_out_queries(vectors: np.ndarray, count: int,
                     tuned: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(health queries, tuning queries or None): up to `count` rows of vectors f32[n, D]
    each, disjoint (drawn together, fixed seed; with fewer than 2·count rows, half each)."""
    if not tuned:
        return health.sample_queries(vectors, count), None
    rows = health.sample_rows(len(vectors), 2 * count)
    rows = np.random.default_rng(1).permutation(rows)
    half = min(count, len(rows) // 2)
    return vectors[np.sort(rows[:half])], vectors[np.sort(rows[half:2 * half])]


def _catalog(embeddings: extract.Embeddings) -> str:
    """names.json, saved with the index: {"ids", "names", "owners"} by id (for display and for
    mapping a caption to its image)."""
    order = np.argsort(embeddings.ids)
    return json.dumps({"ids": embeddings.ids[order].tolist(),
                       "names": [embeddings.names[i] for i in order],
                       "owners": embeddings.owners[order].tolist()})
