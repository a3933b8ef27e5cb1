"""`ldot export-serving`: the towers and the re-ranker as jax.export programs, loaded by the
copied loader.py in a fresh process that imports only jax and numpy, give the Flax models'
outputs (≤ 1e-5, f32) at several batch sizes (the batch is symbolic) and every bucket; bad
inputs are refused by name."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("flatbuffers")

from ldot_jax.checkpoints import pretrained  # noqa: E402
from ldot_jax.configs import demo  # noqa: E402
from ldot_jax.retrieval import exported  # noqa: E402
from ldot_jax.tools import export_serving_cli  # noqa: E402
from ldot_jax.training import train  # noqa: E402

import gallery_fixtures  # noqa: E402

RUNNER = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import loader
programs = loader.load(sys.argv[1])
inputs = np.load(sys.argv[2])
out = {}
for key in sorted({k.split("/")[0] for k in inputs.files}):
    side, bucket = key.split(":")
    arrays = {k.split("/")[1]: inputs[k] for k in inputs.files if k.startswith(key + "/")}
    out[key] = programs[side][int(bucket)](**arrays)
refused = []
text = programs["text"][min(programs["text"])]
length = min(programs["text"])
for bad in ({"input_ids": np.zeros((2, 3), np.int32), "attention_mask": np.zeros((2, 3))},
            {"input_ids": np.full((2, length), 0.5), "attention_mask": np.ones((2, length))},
            {"input_ids": np.ones((2, length), np.int32)}):
    try:
        text(**bad)
        refused.append("")
    except ValueError as e:
        refused.append(str(e))
np.savez(sys.argv[3], **out)
print(json.dumps({"modules": sorted(m for m in sys.modules if m.split(".")[0] in
                                   ("flax", "ldot_jax", "optax", "tensorflow_datasets")),
                  "refused": refused}))
"""


def _run(out_dir, cases, tmp_path):
    """Runs the export's programs on `cases` ({"side:bucket": {name: array}}) in a fresh
    process; returns its outputs and what it imported."""
    np.savez(tmp_path / "inputs.npz", **{f"{key}/{name}": value for key, arrays in
                                         cases.items() for name, value in arrays.items()})
    done = subprocess.run([sys.executable, "-c", RUNNER, str(out_dir),
                           str(tmp_path / "inputs.npz"), str(tmp_path / "outputs.npz")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    with np.load(tmp_path / "outputs.npz") as z:
        return {k: z[k] for k in z.files}, report


def test_a_pixel_model_exported_runs_without_flax(tmp_path):
    model_dir = gallery_fixtures.clip_model(tmp_path)
    out = tmp_path / "exported"
    assert export_serving_cli.main([model_dir, str(out), "--platforms", "cpu,cuda"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["platforms"] == ["cpu", "cuda"] and (out / "tokenizer").is_dir()
    loaded = pretrained.load_pretrained(model_dir)
    model = pretrained.build_model(loaded.kind, loaded.config)
    rng = np.random.default_rng(0)
    side = loaded.config.pixels.image_size
    cases, want = {}, {}
    for batch, key in ((3, "image:0"), (1, "text:16")):
        if key.startswith("image"):
            arrays = {"pixels": rng.integers(0, 256, (batch, side, side, 3), dtype=np.uint8)}
            method = model.encode_image
        else:
            ids = rng.integers(1, 1000, (batch, 16)).astype(np.int32)
            mask = (np.arange(16)[None] < 9).astype(np.int32).repeat(batch, 0)
            arrays, method = {"input_ids": ids, "attention_mask": mask}, model.encode_text
        cases[key] = arrays
        want[key] = np.asarray(model.apply({"params": loaded.params}, arrays, method=method))
    got, report = _run(out, cases, tmp_path)
    assert report["modules"] == [], report
    shape, floats, missing = report["refused"]
    assert "input_ids has shape [2, 3], expected ['b', 16]" in shape
    assert "input_ids: dtype float64, expected int32" in floats
    assert "missing ['attention_mask']" in missing
    for key in cases:
        np.testing.assert_allclose(got[key], want[key], atol=1e-5, err_msg=key)


def test_region_towers_and_reranker_at_every_bucket(tmp_path):
    config = demo.get_config("finetune,tiny")
    kind, model_cfg, _ = train.model_and_config(config)
    params = pretrained.init_params(kind, model_cfg, jax.random.key(1))
    model_dir = pretrained.save_pretrained(tmp_path / "model", kind, model_cfg, params)
    rconfig = demo.get_config("rerank,tiny")
    rkind, rmodel_cfg, _ = train.model_and_config(rconfig)
    rparams = pretrained.init_params(rkind, rmodel_cfg, jax.random.key(2))
    rerank_dir = pretrained.save_pretrained(tmp_path / "rerank", rkind, rmodel_cfg, rparams)
    out = tmp_path / "exported"
    exported.export_serving(model_dir, str(out), rerank_dir, text_buckets=(16, 24),
                            region_buckets=(8, 12), platforms=("cpu",))
    model = pretrained.build_model(kind, model_cfg)
    cross = pretrained.build_model(rkind, rmodel_cfg)
    rng = np.random.default_rng(3)

    def regions(batch, count, feat_dim):
        corners = np.sort(rng.uniform(0, 1, (batch, count, 2, 2)), axis=2)
        x1, x2, y1, y2 = corners[..., 0, 0], corners[..., 1, 0], corners[..., 0, 1], \
            corners[..., 1, 1]
        w, h = x2 - x1, y2 - y1
        boxes = np.stack([x1, y1, x2, y2, w, h, w * h], -1).astype(np.float32)
        mask = (np.arange(count)[None] < count - 2).astype(np.int32).repeat(batch, 0)
        return {"region_feat": rng.normal(size=(batch, count, feat_dim)).astype(np.float32),
                "boxes": boxes, "region_mask": mask}

    def text(batch, length, vocab):
        ids = rng.integers(5, vocab, (batch, length)).astype(np.int32)
        return {"input_ids": ids,
                "attention_mask": (np.arange(length)[None] < length - 3).astype(
                    np.int32).repeat(batch, 0)}
    cases, want = {}, {}
    vocab = model_cfg.text.vocab_size
    for key, batch in (("image:8", 2), ("image:12", 5), ("text:16", 4), ("text:24", 1)):
        bucket = int(key.split(":")[1])
        if key.startswith("image"):
            arrays = regions(batch, bucket, model_cfg.region.feat_dim)
            method = model.encode_image
        else:
            arrays, method = text(batch, bucket, vocab), model.encode_text
        cases[key] = arrays
        want[key] = np.asarray(model.apply({"params": params}, arrays, method=method))
    for key, batch in (("rerank:16", 6), ("rerank:24", 2)):
        t = text(batch, int(key.split(":")[1]), rmodel_cfg.transformer.vocab_size)
        image = regions(batch, 12, rmodel_cfg.region.feat_dim)
        cases[key] = {**t, **image}
        want[key] = np.asarray(cross.apply({"params": rparams}, t, image, method=cross.score))
    got, report = _run(out, cases, tmp_path)
    assert report["modules"] == [], report
    for key in cases:
        np.testing.assert_allclose(got[key], want[key], atol=1e-5, err_msg=key)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted((e["side"], e["bucket"]) for e in manifest["programs"]) == [
        ("image", 8), ("image", 12), ("rerank", 16), ("rerank", 24), ("text", 16),
        ("text", 24)]
    assert manifest["model_fingerprint"] == pretrained.fingerprint(kind, model_cfg, params)
