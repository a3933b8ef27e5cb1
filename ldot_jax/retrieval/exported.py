"""A model directory's serving programs as `jax.export` artifacts: serialized StableHLO that a
process with only jax and numpy runs (exported_loader.py, copied beside them as loader.py).

    ldot export-serving models/clip exported/clip [--reranker models/rerank]

  <out>/manifest.json           what each program takes and gives, the model's fingerprint
  <out>/params.npz              the dual encoder's parameters, flattened ("00000", …)
  <out>/text_L{L}.jaxexport     text tower: input_ids, attention_mask i32[b, L] → f32[b, P]
  <out>/image_R{R}.jaxexport    region tower: region_feat f32[b, R, F], boxes f32[b, R, 7],
                                region_mask i32[b, R] → f32[b, P] (image_0: pixels
                                uint8[b, S, S, 3] for a ViT)
  <out>/rerank_L{L}.jaxexport   the re-ranker's rank logit f32[b] of b (caption, image) pairs
  <out>/rerank_params.npz       its parameters
  <out>/tokenizer/              the model directory's tokenizer, when it has one
  <out>/loader.py               the loader

The batch `b` is symbolic (any size); text lengths and region counts are the buckets, as the
Retriever pads them. Programs are lowered for `platforms` (CPU, CUDA and TPU by default), so the
same files run on any of them. The vectors are the towers' own (not normalized: the manifest
says whether the model's retrieval vectors are).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Sequence

import jax
import numpy as np

from ldot_jax.checkpoints import kinds, pretrained
from ldot_jax.core import fileutil
from ldot_jax.models import towers
from ldot_jax.retrieval import encode, exported_loader

FORMAT = exported_loader.FORMAT
PLATFORMS = ("cpu", "cuda", "tpu")


def _spec(name: str, shape, dtype) -> dict:
    return {"name": name, "shape": list(shape), "dtype": np.dtype(dtype).name}


def _avals(inputs: list[dict], batch):
    return [jax.ShapeDtypeStruct(tuple(batch if d == "b" else d for d in spec["shape"]),
                                 spec["dtype"]) for spec in inputs]


def _export(fn, params, inputs: list[dict], platforms) -> bytes:
    """fn(params pytree, {name: array}) → array, exported with params flattened first."""
    leaves, treedef = jax.tree.flatten(params)
    names = [spec["name"] for spec in inputs]

    def flat(leaf_list, *arrays):
        return fn(jax.tree.unflatten(treedef, leaf_list), dict(zip(names, arrays)))
    batch = jax.export.symbolic_shape("b")[0]
    leaf_avals = [jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype) for x in leaves]
    program = jax.export.export(jax.jit(flat), platforms=tuple(platforms))(
        leaf_avals, *_avals(inputs, batch))
    return bytes(program.serialize())


def _save_params(path: str, params) -> None:
    leaves = jax.tree.leaves(params)
    np.savez(path, **{f"{i:05d}": np.asarray(leaf) for i, leaf in enumerate(leaves)})


def text_inputs(length: int) -> list[dict]:
    return [_spec("input_ids", ("b", length), np.int32),
            _spec("attention_mask", ("b", length), np.int32)]


def image_inputs(config, regions: int) -> list[dict]:
    """The image tower's inputs: pixels for a ViT (regions unused), else regions."""
    if towers.image_input_name(config) == "pixels":
        side = config.pixels.image_size
        return [_spec("pixels", ("b", side, side, 3), np.uint8)]
    return [_spec("region_feat", ("b", regions, config.region.feat_dim), np.float32),
            _spec("boxes", ("b", regions, config.region.box_dim), np.float32),
            _spec("region_mask", ("b", regions), np.int32)]


def export_serving(model_dir: str, out: str, reranker_dir: str | None = None,
                   text_buckets: Sequence[int] = (16, 24, 32, 48, 64),
                   region_buckets: Sequence[int] = (16, 36, 64, 100),
                   rerank_regions: int | None = None,
                   platforms: Sequence[str] = PLATFORMS) -> str:
    """Writes the export directory (atomically) and returns its path. text_buckets are cut to
    the text tower's positions; rerank_regions: the re-ranker's region count (default the
    largest region bucket; a patch re-ranker reads pixels)."""
    loaded = pretrained.load_pretrained(model_dir)
    if not kinds.get(loaded.kind).is_dual_encoder:
        raise ValueError(f"{model_dir} holds a {loaded.kind!r} model, not a dual encoder")
    model = pretrained.build_model(loaded.kind, loaded.config)
    config = loaded.config
    buckets = encode.fitting_text_buckets(config, text_buckets)
    pixels = towers.image_input_name(config) == "pixels"
    image_buckets = (0,) if pixels else tuple(region_buckets)

    def text_fn(params, arrays):
        return model.apply({"params": params}, arrays, method=model.encode_text)

    def image_fn(params, arrays):
        return model.apply({"params": params}, arrays, method=model.encode_image)
    entries, files = [], {}
    for length in buckets:
        inputs = text_inputs(length)
        files[f"text_L{length}.jaxexport"] = _export(text_fn, loaded.params, inputs, platforms)
        entries.append({"side": "text", "bucket": length, "file": f"text_L{length}.jaxexport",
                        "params": "params.npz", "inputs": inputs,
                        "output": {"shape": ["b", config.project_dim], "dtype": "float32"}})
    for regions in image_buckets:
        inputs = image_inputs(config, regions)
        name = f"image_R{regions}.jaxexport" if not pixels else "image_0.jaxexport"
        files[name] = _export(image_fn, loaded.params, inputs, platforms)
        entries.append({"side": "image", "bucket": regions, "file": name,
                        "params": "params.npz", "inputs": inputs,
                        "output": {"shape": ["b", config.project_dim], "dtype": "float32"}})
    rerank = None
    if reranker_dir is not None:
        rerank = pretrained.load_pretrained(reranker_dir)
        if rerank.kind != "uniter_itm":
            raise ValueError(f"{reranker_dir} holds a {rerank.kind!r} model, not a re-ranker "
                             f"(uniter_itm)")
        cross = pretrained.build_model(rerank.kind, rerank.config)
        count = rerank_regions or max(region_buckets)

        def rerank_fn(params, arrays):
            text = {k: arrays[k] for k in ("input_ids", "attention_mask")}
            image = {k: v for k, v in arrays.items() if k not in text}
            return cross.apply({"params": params}, text, image, method=cross.score)
        cross_pixels = rerank.config.image_tower == "vit"
        for length in encode.fit_buckets(text_buckets,
                                         rerank.config.transformer.max_position_embeddings):
            image = ([_spec("pixels", ("b", rerank.config.pixels.image_size,
                                       rerank.config.pixels.image_size, 3), np.uint8)]
                     if cross_pixels else
                     [_spec("region_feat", ("b", count, rerank.config.region.feat_dim),
                            np.float32),
                      _spec("boxes", ("b", count, rerank.config.region.box_dim), np.float32),
                      _spec("region_mask", ("b", count), np.int32)])
            inputs = text_inputs(length) + image
            name = f"rerank_L{length}.jaxexport"
            files[name] = _export(rerank_fn, rerank.params, inputs, platforms)
            entries.append({"side": "rerank", "bucket": length, "file": name,
                            "params": "rerank_params.npz", "inputs": inputs,
                            "output": {"shape": ["b"], "dtype": "float32"}})
    manifest = {"format": FORMAT, "version": 1, "kind": loaded.kind,
                "model_fingerprint": pretrained.fingerprint(loaded.kind, config, loaded.params),
                "normalized": bool(loaded.metadata.get("normalize",
                                                        config.normalize_embeddings)),
                "platforms": list(platforms), "jax": jax.__version__, "programs": entries}
    if rerank is not None:
        manifest["reranker_fingerprint"] = pretrained.fingerprint(rerank.kind, rerank.config,
                                                                  rerank.params)
    tokenizer_dir = os.path.join(pretrained.readable(model_dir), pretrained.TOKENIZER_DIR)
    with fileutil.atomic_directory(out, FORMAT, inputs=[model_dir] + (
            [reranker_dir] if reranker_dir else [])) as tmp:
        for name, blob in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(blob)
        _save_params(os.path.join(tmp, "params.npz"), loaded.params)
        if rerank is not None:
            _save_params(os.path.join(tmp, "rerank_params.npz"), rerank.params)
        if os.path.isdir(tokenizer_dir):
            shutil.copytree(tokenizer_dir, os.path.join(tmp, "tokenizer"))
        shutil.copyfile(exported_loader.__file__, os.path.join(tmp, "loader.py"))
        with open(os.path.join(tmp, exported_loader.MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
    return os.path.abspath(out)

