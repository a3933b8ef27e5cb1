"""Datasets under faults: a preparation killed mid-way (real SIGKILL) leaves no dataset that
looks prepared, and the next one removes what it left and makes the same data; a second
preparation waits for the first (or is refused, naming it); a version directory of other files
is refused before any work; caption caches of other data or damaged ones are rebuilt."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from ldot_jax.core import fileutil
from ldot_jax.data import datasets

import faults
from faults import snapshot

# The tiny test data (configs/base.py:tiny): 48 + 16 + 16 images.
SIZES = dict(train_size=48, val_size=16, test_size=16, feat_dim=32)
PREPARE = """
import sys
from ldot_jax.data import datasets
datasets.load("scenes", config="small", data_dir=sys.argv[1], train_size=48, val_size=16,
              test_size=16, feat_dim=32)
"""
ONE_WORKER = {"LDOT_DATA_WORKERS": "1"}  # records made in the killed process itself


def load(data_dir, **kwargs):
    return datasets.load("scenes", config="small", data_dir=str(data_dir), **SIZES, **kwargs)


def version_dir(data_dir) -> str:
    return os.fspath(datasets.make_builder("scenes", "small", str(data_dir), **SIZES).data_path)


def same_data(a, b) -> None:
    for split in ("train", "val", "test"):
        x, y = a.split(split), b.split(split)
        assert len(x) == len(y)
        for i in (0, len(x) - 1):
            np.testing.assert_array_equal(x[i]["region_feat"], y[i]["region_feat"])
        assert a.caption_table(split) == b.caption_table(split)
    assert a.tokenizer.vocab_size == b.tokenizer.vocab_size


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return load(tmp_path_factory.mktemp("reference"))


def test_a_killed_preparation_is_not_a_dataset_and_the_next_one_cleans_up(tmp_path, reference):
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("a user's file in the data_dir")
    faults.kill_at("dataset_record#20", [data], tmp_path, PREPARE, **ONE_WORKER)
    path = version_dir(data)
    parent = os.path.dirname(path)
    left = [n for n in os.listdir(parent) if n.startswith("incomplete.")]
    assert left and not os.path.exists(path)  # only TFDS's temporary copy
    assert not datasets.make_builder("scenes", "small", str(data), **SIZES).is_prepared()
    again = load(data)
    same_data(again, reference)
    assert not [n for n in os.listdir(parent) if n.startswith("incomplete.")]
    assert sorted(os.listdir(parent)) == [os.path.basename(path)]  # no lock file left either
    assert (data / "notes.txt").read_text() == "a user's file in the data_dir"


def test_a_kill_between_the_data_and_its_vocabulary_is_finished_on_the_next_load(
        tmp_path, reference):
    faults.kill_at("dataset_prepared", [tmp_path / "data"], tmp_path, PREPARE, **ONE_WORKER)
    path = version_dir(tmp_path / "data")
    assert os.path.isfile(os.path.join(path, "dataset_info.json"))
    assert not os.path.exists(os.path.join(path, "vocab.txt"))
    same_data(load(tmp_path / "data"), reference)


def test_a_second_preparation_waits_for_the_first_or_is_refused_naming_it(tmp_path, reference):
    data = tmp_path / "data"
    proc = faults.start_paused("dataset_record#5", [data], tmp_path / "paused", PREPARE,
                               **ONE_WORKER)
    try:
        builder = datasets.make_builder("scenes", "small", str(data), **SIZES)
        with pytest.raises(fileutil.LockedError, match=rf"dataset .* by pid {proc.pid}"):
            datasets.prepare(builder, wait=0.5)
    finally:
        faults.kill(proc)
    same_data(load(data), reference)  # the dead holder's lock is taken over


def test_a_second_preparation_waits_and_takes_over_from_a_holder_that_dies(tmp_path,
                                                                          reference):
    data = tmp_path / "data"
    holder = faults.start_paused("dataset_record#5", [data], tmp_path / "paused", PREPARE,
                                 **ONE_WORKER)
    log = tmp_path / "waiter.log"
    with open(log, "w") as sink:
        waiter = subprocess.Popen([sys.executable, "-c", PREPARE, str(data)], env=faults.env(
            **ONE_WORKER), stdout=subprocess.DEVNULL, stderr=sink, text=True)
    try:
        # Until it says whom it waits for (its start-up takes seconds on a loaded machine),
        # then a little longer: it must be waiting for the lock, not failing.
        deadline = time.time() + 240
        while "is being written by pid" not in log.read_text():
            assert waiter.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "the waiter never reported the holder"
            time.sleep(0.2)
        time.sleep(1)
        assert waiter.poll() is None  # waiting for the lock, not failing
    finally:
        faults.kill(holder)  # the kernel releases its lock: the waiter goes on
    waiter.wait(timeout=300)
    err = log.read_text()
    assert waiter.returncode == 0, err[-3000:]
    assert f"is being written by pid {holder.pid}" in err  # it said whom it waited for
    same_data(load(data), reference)
    parent = os.path.dirname(version_dir(data))
    assert sorted(os.listdir(parent)) == [os.path.basename(version_dir(data))]


def test_an_empty_version_directory_is_prepared_not_taken_for_data(tmp_path, reference):
    os.makedirs(version_dir(tmp_path / "data"))
    same_data(load(tmp_path / "data"), reference)


def test_a_version_directory_of_other_files_is_refused_before_any_work(tmp_path):
    path = version_dir(tmp_path / "data")
    os.makedirs(path)
    with open(os.path.join(path, "mine.npz"), "w") as f:
        f.write("a user's file")
    before = snapshot(tmp_path)
    with pytest.raises(fileutil.OwnershipError, match=r"not a prepared dataset .*mine.npz"):
        load(tmp_path / "data")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("damage", ["garbage", "legacy", "other_data", "short"])
def test_a_caption_cache_of_other_data_or_damaged_is_rebuilt(tmp_path, reference, damage):
    data = load(tmp_path / "data")
    want = data.caption_table("test")
    path = os.path.join(data.directory, "captions_test.json")
    cached = json.load(open(path))
    bogus = [{"captions": ["not the data"], "num_regions": 1}] * len(want)
    body = {"garbage": "{not json",
            "legacy": json.dumps(bogus),  # an older version's plain list
            "other_data": json.dumps({"source": "0" * 64, "rows": bogus}),
            "short": json.dumps({"source": cached["source"], "rows": want[:-1]})}[damage]
    with open(path, "w") as f:
        f.write(body)
    assert data.caption_table("test") == want == reference.caption_table("test")
    assert json.load(open(path))["rows"] == want  # rewritten
