"""Bad values at every boundary are errors that name the tensor, record, row or key, never a
good-looking number: non-finite embeddings in recall, non-finite or overflowing weights in the
converter, features that overflow float16, pixel boxes, out-of-vocabulary ids (host checks,
and NaN rather than a clamped row inside jit), and runs that would silently continue another
experiment (changed config, a second writer, duplicate metric rows, stale extraction shards)."""

import json
import os
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import ldot_jax
from ldot_jax.core import fileutil, parallel
from ldot_jax.core import workdir as workdir_lib
from ldot_jax.data import batching, datasets, pipeline, schema, uniter_db
from ldot_jax.evaluation import recall
from ldot_jax.models import config as model_config
from ldot_jax.models import layers
from ldot_jax.retrieval import extract
from ldot_jax.training import metric_writer

from conftest import PARITY, SMALL_HEADS


def test_a_nan_embedding_is_an_error_not_a_recall():
    rng = np.random.default_rng(0)
    text, image = rng.standard_normal((10, 4)), rng.standard_normal((5, 4))
    owners = np.arange(10) // 2
    assert 0 <= recall.retrieval_metrics(text, image, owners)["ar"] <= 100
    image[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"image vectors .*1 non-finite .* first at \(3, 1\)"):
        recall.retrieval_metrics(text, image, owners)
    text[:] = np.nan
    with pytest.raises(ValueError, match="text vectors"):
        recall.retrieval_metrics(text, image * 0, owners)


@pytest.mark.parametrize("value,match", [(np.nan, "non-finite"), (np.inf, "non-finite"),
                                         (1e39, "does not fit float32")])
def test_the_converter_refuses_non_finite_and_overflowing_weights(tmp_path, value, match):
    state = dict(np.load(PARITY / "ldot_small_weights.npz"))
    key = next(k for k in state if k.endswith("encode_proj.0.weight"))
    state[key] = state[key].astype(np.float64)
    state[key][0, 1] = value
    source = tmp_path / "bad.npz"
    np.savez(source, **state)
    with pytest.raises(ValueError, match=rf"tensor '{key}'.*{match}"):
        ldot_jax.convert_checkpoint("lightningdot", source, tmp_path / "out",
                                    num_heads=SMALL_HEADS)
    assert sorted(os.listdir(tmp_path)) == ["bad.npz"]


def _record(**changes):
    record = {"image_id": "im7", "region_feat": np.ones((3, 4), np.float32),
              "boxes": np.tile([[0.1, 0.2, 0.5, 0.6]], (3, 1)), "captions": ["a"]}
    record.update(changes)
    return record


def test_records_with_overflowing_features_or_pixel_boxes_are_refused():
    spec = schema.RecordSpec(feat_dim=4)
    schema.check_record(_record(), spec, "file.json row 7")
    with pytest.raises(ValueError, match=r"file.json row 7: region features: .*70000 does not "
                                         r"fit float16"):
        schema.check_record(_record(region_feat=np.full((3, 4), 7e4, np.float32)), spec,
                            "file.json row 7")
    pixels = np.tile([[12.0, 40.0, 300.0, 220.0]], (3, 1))
    with pytest.raises(ValueError, match=r"file.json row 7: boxes outside \[0, 1\].*row 0: "
                                         r"\[12.0, 40.0, 300.0.*look like pixel coordinates"):
        schema.check_record(_record(boxes=pixels), spec, "file.json row 7")


def test_collated_inputs_refuse_non_finite_features_and_pixel_boxes():
    good = {"region_feat": np.ones((2, 4), np.float32), "boxes": np.full((2, 7), 0.5)}
    batching.collate_regions([good], (4,))
    bad = dict(good, region_feat=np.array([[1, 2, np.nan, 4], [1, 2, 3, 4]], np.float32))
    with pytest.raises(ValueError, match=r"example 1's region features .* first at \(0, 2\)"):
        batching.collate_regions([good, bad], (4,))
    with pytest.raises(ValueError, match="example 0's boxes outside .*pixel coordinates"):
        batching.collate_regions([dict(good, boxes=np.full((2, 7), 640.0))], (4,))


def test_an_out_of_vocabulary_id_is_nan_inside_jit_on_every_path():
    table = jnp.arange(15, dtype=jnp.float32).reshape(5, 3)
    ids = np.array([[1, 7], [0, 5], [2, 3], [4, 4], [0, 1], [1, 2], [3, 9], [0, 0]], np.int32)
    plain = jax.jit(layers.take_rows)(table, ids)
    mesh = parallel.make_mesh()
    with jax.set_mesh(mesh):
        sharded = jax.device_put(ids, NamedSharding(mesh, P("data")))
        on_mesh = jax.jit(layers.take_rows)(jax.device_put(table, NamedSharding(mesh, P())),
                                            sharded)
    for out in (np.asarray(plain), np.asarray(on_mesh)):
        bad = ids >= 5
        assert np.isnan(out[bad]).all() and np.isfinite(out[~bad]).all()
        np.testing.assert_array_equal(out[~bad], np.asarray(table)[ids[~bad]])


def test_token_ids_are_checked_against_the_vocabulary():
    class Tok:
        cls_id, sep_id, vocab_size = 1, 2, 50
    record = {"captions": ["a", "b"], "caption_ids": np.array([7, 8, 60], np.int32),
              "caption_lengths": np.array([2, 1], np.int32)}
    with pytest.raises(ValueError, match=r"val: caption 3 \(image 1\) has token id 60 outside "
                                         r"the vocabulary \[0, 50\)"):
        pipeline.tokenize_captions([dict(record, caption_ids=np.array([7, 8, 9])), record],
                                   Tok(), None, "drop", "val")
    config = model_config.base_dual_encoder_config()
    Tok.vocab_size = config.text.vocab_size + 1
    with pytest.raises(ValueError, match=rf"tokenizer has {Tok.vocab_size} tokens but "
                                         rf"model.text.vocab_size={config.text.vocab_size}"):
        model_config.check_vocabulary(Tok(), config)


# ---------------------------------------------------------------------------------------------
# Runs that know what they are


def _config(lr=1e-4, stop_at=None, allow=False):
    return ml_collections.ConfigDict({
        "seed": 0, "optimizer": {"learning_rate": lr},
        "train": {"stop_at": stop_at, "allow_config_change": allow}})


def test_a_restart_with_another_config_is_refused_unless_allowed_and_then_recorded(tmp_path):
    workdir = str(tmp_path)
    workdir_lib.record_config(_config(), workdir)
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(workdir_lib.ConfigChangedError,
                       match=r"optimizer.learning_rate: 0.0001 → 0.001"):
        workdir_lib.record_config(_config(lr=1e-3), workdir)
    assert (tmp_path / "config.json").read_text() == before
    assert not (tmp_path / workdir_lib.CHANGES_FILE).exists()
    workdir_lib.record_config(_config(stop_at=5), workdir)  # allow-listed: recorded
    workdir_lib.record_config(_config(lr=1e-3, stop_at=5, allow=True), workdir)
    rows = [json.loads(line) for line in open(tmp_path / workdir_lib.CHANGES_FILE)]
    assert [sorted(r["changes"]) for r in rows] == [
        ["train.stop_at"], ["optimizer.learning_rate", "train.allow_config_change"]]
    assert json.loads((tmp_path / "config.json").read_text())["optimizer"]["learning_rate"] == 1e-3


def test_a_second_training_in_a_workdir_is_refused(tmp_path):
    from ldot_jax.training import train
    workdir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from ldot_jax.core import fileutil
            with fileutil.exclusive({str(workdir)!r}, "run directory"):
                print("held", flush=True)
                sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(fileutil.LockedError, match=rf"run directory .*run is being "
                                                       rf"written by pid {holder.pid}"):
            train.train_and_evaluate(_config(), str(workdir))
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not workdir.exists()


def test_a_resumed_run_drops_the_rows_it_logs_again(tmp_path):
    path = tmp_path / metric_writer.JSONL
    path.write_text("".join(json.dumps({"step": s, "split": "train", "loss": 1.0}) + "\n"
                            for s in (1, 2, 3, 4)) + '{"step": 5, "spl')  # a torn last line
    writer = metric_writer.MetricWriter(str(tmp_path), tensorboard=False, resume_step=2)
    writer.write(3, {"loss": 0.5}, echo=False)
    writer.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 1.0), (3, 0.5)]


def test_shards_of_other_data_or_padding_are_not_reused(tmp_path):
    class Dataset:
        name, directory = "toy", str(tmp_path / "data")

        def caption_table(self, split):
            return [{"captions": ["a"], "num_regions": 3, "image_id": "x"}]
    os.makedirs(Dataset.directory)
    record_file = tmp_path / "data" / "records-00000"
    record_file.write_bytes(b"v1")
    first = datasets.split_digest(Dataset(), "test")
    time.sleep(0.01)
    record_file.write_bytes(b"v2")  # re-prepared data, same size
    second = datasets.split_digest(Dataset(), "test")
    assert first != second
    out = tmp_path / "emb"
    out.mkdir()
    manifest = {"side": "image", "split": "test", "count": 1, "shard_size": 8,
                "fingerprint": "f", "normalized": False, "data": first,
                "padding": {"image_buckets": [16]}, "content": None}
    (out / extract.MANIFEST).write_text(json.dumps(manifest))
    assert extract._check_manifest(str(out), dict(manifest), False) == manifest
    for change in ({"data": second}, {"padding": {"image_buckets": [36]}}):
        with pytest.raises(ValueError, match=rf"other settings {list(change)[0]}"):
            extract._check_manifest(str(out), {**manifest, **change}, False)


def test_training_into_a_directory_of_other_files_is_refused(tmp_path):
    (tmp_path / "thesis.tex").write_text("a user's file")
    with pytest.raises(fileutil.OwnershipError, match=r"not a run's \(thesis.tex\)"):
        workdir_lib.record_config(_config(), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["thesis.tex"]


def test_a_txt_db_with_ids_past_its_vocabulary_is_refused(tmp_path):
    import fixture_files as ff
    rng = np.random.default_rng(0)
    images = {"im0.npz": ff.regions(rng, 12, classes=7)}
    ff.write_img_db(str(tmp_path / "img"), images, {"im0.npz": 10})
    ff.write_txt_db(str(tmp_path / "txt"), [("t0", "im0.npz", [2000, 29500], "uncased ids")])
    config = uniter_db.uniter_config("bad", {"train": (tmp_path / "txt", tmp_path / "img")},
                                     feat_dim=ff.FEAT_DIM)
    builder = datasets.UniterDb(config=config, data_dir=str(tmp_path / "out"),
                                file_format="array_record")
    with pytest.raises(ValueError, match=r"text 't0' has token id 29500 outside the vocabulary "
                                         r"\[0, 28996\)"):
        datasets.prepare(builder)
