"""A whole run on gs:// against a local GCS emulator (tests/gcs.py): a tiny pre-training run
killed with SIGKILL mid-run (a preempted VM) and resumed, fine-tuning from its exported model
with the best checkpoint exported, `ldot export` of another step, extraction, indexes and
queries through the Retriever: every file under gs://bucket/…, locally nothing but the cache."""

import os
import struct

import numpy as np
import pytest

from ldot_jax.checkpoints import checkpoint, pretrained
from ldot_jax.configs import demo
from ldot_jax.core import fileutil, paths
from ldot_jax.core import workdir as workdir_lib
from ldot_jax.retrieval import extract, index_build
from ldot_jax.retrieval.retriever import Retriever
from ldot_jax.tools import export_cli
from ldot_jax.training import metric_writer, train

import faults
import gcs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = "import sys\nfrom ldot_jax.tools import train_cli\nsys.exit(train_cli.main(sys.argv[1:]))"
STEPS, EVERY = 6, 2
LEASE_S = "4"  # a killed writer's lock expires this soon (default 60 s)
# Checkpoints: pre-training in Orbax's default format (OCDBT, whose manifest commits are
# conditional writes: tests/gcs.py gives the emulator GCS's preconditions), fine-tuning in
# train.checkpoint_format="zarr" (one TensorStore array per leaf).


def pretrain_flags(workdir, data_dir):
    return [f"--config={ROOT}/ldot_jax/configs/demo.py:pretrain,tiny", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", f"--config.train.num_steps={STEPS}",
            f"--config.train.checkpoint_every={EVERY}", "--config.train.log_every=1",
            "--config.data.eval_split="]


def pretrain_config(data_dir):
    c = demo.get_config("pretrain,tiny")
    c.data.data_dir = data_dir
    c.train.num_steps, c.train.checkpoint_every, c.train.log_every = STEPS, EVERY, 1
    c.data.eval_split = ""
    return c


def finetune_config(data_dir, init):
    c = demo.get_config("finetune,tiny")
    c.data.data_dir = data_dir
    c.init.model = init
    c.train.num_steps, c.train.log_every = 4, 1
    c.train.update(eval_every=2, checkpoint_every=2, best_metric="ar", best_mode="max",
                   checkpoint_format="zarr")
    return c


def tensorboard_steps(workdir: str, tag: str) -> list[int]:
    """The steps of scalar `tag` in the TensorBoard event files under <workdir>/tensorboard
    (TFRecord framing: length, its CRC, an Event proto, its CRC)."""
    from tensorboardX.proto import event_pb2
    steps = []
    for name in paths.walk_files(paths.join(workdir, metric_writer.TENSORBOARD)):
        blob = paths.read_bytes(paths.join(workdir, metric_writer.TENSORBOARD, name))
        at = 0
        while at < len(blob):
            length, = struct.unpack("<Q", blob[at:at + 8])
            event = event_pb2.Event.FromString(blob[at + 12:at + 12 + length])
            at += 12 + length + 4
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return sorted(steps)


@pytest.fixture
def local(tmp_path, monkeypatch, gcs_emulator):
    """The local disk a run may touch: the cache; the working and home directories must stay
    empty."""
    where = {name: tmp_path / name for name in ("cwd", "home", "cache", "tmp")}
    for path in where.values():
        path.mkdir()
    monkeypatch.chdir(where["cwd"])
    monkeypatch.setenv("HOME", str(where["home"]))
    monkeypatch.setenv(paths.CACHE_ENV, str(where["cache"]))
    monkeypatch.setenv(fileutil.LEASE_ENV, LEASE_S)
    return where


def test_a_run_on_gcs_preempted_resumed_exported_indexed_and_queried(local, tmp_path):
    bucket = gcs.fresh_prefix()
    data, pre, fine = f"{bucket}/data", f"{bucket}/pretrain", f"{bucket}/finetune"

    # Pre-training, killed right after its second checkpoint save started (step 4).
    faults.kill_at("checkpoint_started#2", pretrain_flags(pre, data), tmp_path, TRAIN,
                   cwd=local["cwd"], TMPDIR=str(local["tmp"]))
    with checkpoint.TrainCheckpointer(workdir_lib.checkpoints_dir(pre)) as reader:
        resumed_from = reader.latest_step()
    assert resumed_from in (2, 4)
    assert paths.is_file(fileutil.lock_path(pre))  # the dead run's lease, left behind
    summary = train.train_and_evaluate(pretrain_config(data), pre)  # waits for the lease
    assert summary["step"] == STEPS
    assert [r["step"] for r in metric_writer.read_jsonl(pre, "train")] == list(
        range(1, STEPS + 1))  # each step logged once, across the kill
    # TensorBoard: the killed run published its events up to its last checkpoint (a file of
    # its own); the resumed run logs the steps after the checkpoint it resumed from.
    assert tensorboard_steps(pre, "train/learning_rate") == sorted(
        list(range(1, 5)) + list(range(resumed_from + 1, STEPS + 1)))
    assert pretrained.load_pretrained(workdir_lib.model_dir(pre)).metadata["step"] == STEPS

    # Fine-tuning from the exported model; the export takes the best checkpoint.
    train.train_and_evaluate(finetune_config(data, workdir_lib.model_dir(pre)), fine)
    scores = {r["step"]: r["ar"] for r in metric_writer.read_jsonl(fine) if "ar" in r}
    assert sorted(scores) == [2, 4] and tensorboard_steps(fine, "eval/ar") == [2, 4]
    model = pretrained.load_pretrained(workdir_lib.model_dir(fine))
    assert model.metadata["step"] == max(scores, key=scores.get)
    exported = f"{bucket}/exported"
    assert export_cli.main(["--workdir", fine, "--step", "2", "--out", exported]) == 0
    assert pretrained.load_pretrained(exported).metadata["step"] == 2
    assert pretrained.load_tokenizer(exported) is not None  # enough to query

    # Extraction and indexes, then queries.
    built = index_build.build_from_workdir(fine, shard_size=5, progress=False)
    assert built.indexes["image"] == f"{fine}/index/test/image"
    images = extract.read_embeddings(built.embeddings["image"])
    captions = extract.read_embeddings(built.embeddings["text"])
    assert len(images.ids) == 16 and len(captions.ids) == 80
    retriever = Retriever.load(fine)
    hits = retriever.search_text(captions.names[:3], k=5)
    want = np.argsort(-(captions.vectors[:3] @ images.vectors.T), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(hits.ids, want)
    assert hits.names[0] == [images.names[i] for i in want[0]]
    # An index rebuilt in place (the catalog is part of the index, not a stray file).
    index_build.build_from_workdir(fine, shard_size=5, progress=False)

    # On GCS: the run directories, no locks, no uncommitted generations.
    assert {n.split("/")[0] for n in gcs.objects(fine)} >= {
        "config.json", "metrics.jsonl", "checkpoints", "tokenizer", "model",
        "embeddings", "index"}
    everything = gcs.objects(bucket)
    assert not [n for n in everything if n.endswith(".lock")], everything
    for directory in (workdir_lib.model_dir(pre), workdir_lib.model_dir(fine), exported,
                      f"{fine}/index/test/image", f"{fine}/index/test/text"):
        generation = fileutil.read_manifest(directory)["generation"]
        inside = paths.list_dir(directory)
        assert sorted(inside) == sorted([fileutil.MANIFEST, generation]), inside
    # Locally: nothing outside the cache, and no staging left in it.
    assert not os.listdir(local["cwd"]) and not os.listdir(local["home"])
    assert not [f for f in local["tmp"].rglob("*") if f.is_file()]  # (TFDS leaves empty dirs)
    assert not [f for f in (local["cache"] / "staging").rglob("*") if f.is_file()]
