"""The writers and readers of core/fileutil.py on an object store (gs://, against a local GCS
emulator): single files appear whole, directories are committed by their manifest (readers see
the old or the new copy at every kill point), ownership is kept, locks are leases."""

import json
import subprocess
import sys
import time

import pytest

from ldot_jax.core import fileutil, paths

import faults
import gcs

FORMAT = "test.dir"
WRITE = """import sys
from ldot_jax.core import fileutil
with fileutil.atomic_directory(sys.argv[1], "test.dir") as tmp:
    open(tmp + "/payload.txt", "w").write(sys.argv[2])
    open(tmp + "/second.txt", "w").write(sys.argv[2] * 2)
"""


def write_dir(path, text):
    with fileutil.atomic_directory(path, FORMAT) as tmp:
        with open(f"{tmp}/payload.txt", "w") as f:
            f.write(text)
        with open(f"{tmp}/second.txt", "w") as f:
            f.write(text * 2)


def read_dir(path):
    local = fileutil.local_directory(path, FORMAT)
    fileutil.verify(local, FORMAT, full=True, required=True)
    with open(f"{local}/payload.txt") as f:
        return f.read()


@pytest.fixture
def prefix(gcs_emulator, tmp_path, monkeypatch):
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    return gcs.fresh_prefix()


def test_paths_on_an_object_store(prefix):
    assert paths.is_remote(prefix) and not paths.is_remote("/tmp/x")
    assert paths.absolute(prefix + "/a/") == prefix + "/a"
    assert paths.join(prefix, "a", "b.txt") == prefix + "/a/b.txt"
    with pytest.raises(ValueError, match="is a bucket"):
        paths.split("gs://bucket")
    fileutil.atomic_write_text(paths.join(prefix, "a", "b.txt"), "hello")
    assert paths.is_file(paths.join(prefix, "a", "b.txt")) and paths.is_dir(
        paths.join(prefix, "a"))
    assert paths.list_dir(prefix) == ["a"] and paths.list_dir(prefix + "/missing") == []
    assert paths.walk_files(prefix) == ["a/b.txt"] and paths.size(prefix + "/a/b.txt") == 5
    fileutil.append_text(prefix + "/log.jsonl", "1\n")
    fileutil.append_text(prefix + "/log.jsonl", "2\n")
    assert paths.read_text(prefix + "/log.jsonl") == "1\n2\n"
    assert fileutil.read_json(_json(prefix + "/x.json", {"k": 1})) == {"k": 1}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fileutil.read_json(prefix + "/none.json", "run config")


def test_uploads_round_trip_byte_exactly(prefix, tmp_path):
    """The emulator itself (tests/gcs.py fixes its multipart parser): bodies ending in a line
    end, or in a bare carriage return, come back as sent."""
    for i, body in enumerate([b"abc\r", b"abc\r\n", b"abc\n", b"\r", b"\r\r\n\r",
                              bytes(range(256)) * 3]):
        local = tmp_path / f"f{i}"
        local.write_bytes(body)
        paths.upload(str(local), f"{prefix}/f{i}")
        assert paths.read_bytes(f"{prefix}/f{i}") == body, body[-8:]


def _json(path, value):
    fileutil.atomic_write_text(path, json.dumps(value))
    return path


def test_a_failed_single_file_write_leaves_the_old_object(prefix):
    path = prefix + "/config.json"
    fileutil.atomic_write_text(path, "old")
    with pytest.raises(RuntimeError):
        with fileutil.atomic_file(path) as f:
            f.write("half of the new")
            raise RuntimeError("crash")
    assert paths.read_text(path) == "old"
    assert paths.walk_files(prefix) == ["config.json"]


def test_directories_are_committed_by_their_manifest(prefix):
    path = prefix + "/model"
    write_dir(path, "one")
    first = fileutil.read_manifest(path)["generation"]
    assert read_dir(path) == "one"
    assert sorted(paths.walk_files(path)) == sorted(
        [fileutil.MANIFEST, f"{first}/payload.txt", f"{first}/second.txt"])
    write_dir(path, "two")
    second = fileutil.read_manifest(path)["generation"]
    assert second != first and read_dir(path) == "two"
    assert not [n for n in paths.walk_files(path) if n.startswith(first)]  # old copy removed
    # An exception inside the block leaves the committed copy as it was.
    with pytest.raises(RuntimeError):
        with fileutil.atomic_directory(path, FORMAT) as tmp:
            open(f"{tmp}/payload.txt", "w").write("three")
            raise RuntimeError("crash")
    assert read_dir(path) == "two" and fileutil.read_manifest(path)["generation"] == second


@pytest.mark.parametrize("point", ["before_manifest", "before_swap", "after_swap"])
def test_a_directory_write_killed_at_each_point_reads_as_old_or_new(prefix, tmp_path, point):
    path = prefix + "/model"
    write_dir(path, "old")
    faults.kill_at(point, [path, "new"], tmp_path, WRITE, LDOT_JAX_CACHE=str(tmp_path / "c2"))
    assert read_dir(path) == ("new" if point == "after_swap" else "old")
    # The next write removes what the killed one left (its lease expired with it).
    lock = fileutil.lock_path(path)
    body = json.loads(paths.read_bytes(lock)) if paths.is_file(lock) else None
    if body is not None:  # the dead writer's lease: expire it rather than wait a minute
        body["expires"] = 0
        fileutil.atomic_write_text(lock, json.dumps(body))
    write_dir(path, "newer")
    generation = fileutil.read_manifest(path)["generation"]
    assert {n.split("/")[0] for n in paths.walk_files(path)} == {fileutil.MANIFEST, generation}
    assert read_dir(path) == "newer" and not paths.exists(lock)


def test_ownership_on_an_object_store(prefix):
    foreign = prefix + "/theirs"
    fileutil.atomic_write_text(foreign + "/notes.txt", "mine")
    with pytest.raises(fileutil.OwnershipError, match="notes.txt"):
        write_dir(foreign, "x")
    assert paths.walk_files(foreign) == ["notes.txt"]
    ours = prefix + "/ours"
    write_dir(ours, "x")
    fileutil.atomic_write_text(ours + "/extra.txt", "user's")
    with pytest.raises(fileutil.OwnershipError, match="extra.txt"):
        write_dir(ours, "y")
    assert read_dir(ours) == "x"
    an_object = prefix + "/file"
    fileutil.atomic_write_text(an_object, "x")
    with pytest.raises(fileutil.OwnershipError, match="it is an object"):
        write_dir(an_object, "y")
    with pytest.raises(fileutil.IntegrityError, match="ldot_manifest.json is missing"):
        fileutil.local_directory(foreign)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fileutil.local_directory(prefix + "/nothing")
    with pytest.raises(fileutil.IntegrityError, match="not a 'other'"):
        fileutil.local_directory(ours, "other")
    with pytest.raises(ValueError, match="inside the output"):
        with fileutil.atomic_directory(ours, FORMAT, inputs=[ours + "/sub"]):
            pass


def test_a_damaged_object_is_named_and_not_copied(prefix, tmp_path):
    path = prefix + "/model"
    write_dir(path, "good")
    generation = fileutil.read_manifest(path)["generation"]
    fileutil.atomic_write_text(f"{path}/{generation}/payload.txt", "evil")  # same size
    with pytest.raises(fileutil.IntegrityError, match="payload.txt differs"):
        fileutil.local_directory(path, FORMAT)
    assert not (tmp_path / "cache" / "copies").exists() or not any(
        p.name.startswith(fileutil.GENERATION_PREFIX)
        for p in (tmp_path / "cache" / "copies").rglob("*"))


def test_the_lock_is_a_lease(prefix, monkeypatch):
    monkeypatch.setenv(fileutil.LEASE_ENV, "1.5")
    path = prefix + "/run"
    with fileutil.exclusive(path, "run directory"):
        time.sleep(2.5)  # past its first life: renewed meanwhile
        lease = json.loads(paths.read_bytes(fileutil.lock_path(path)))
        assert lease["expires"] > time.time()
        with pytest.raises(fileutil.LockedError, match=r"run directory .* is being written by "
                                                       r"pid \d+"):
            fileutil._lease(path, "run directory", 0).__enter__()
        with fileutil.exclusive(path):  # re-entrant in its process
            pass
    assert not paths.exists(fileutil.lock_path(path))
    # A dead holder's lease (expired) is taken over; a live one is waited for.
    fileutil.atomic_write_text(fileutil.lock_path(path), json.dumps(
        {"token": "dead", "holder": "pid 1 on gone", "expires": time.time() - 1}))
    with fileutil.exclusive(path, wait=0):
        assert json.loads(paths.read_bytes(fileutil.lock_path(path)))["token"] != "dead"
    fileutil.atomic_write_text(fileutil.lock_path(path), json.dumps(
        {"token": "live", "holder": "pid 2 on elsewhere", "expires": time.time() + 1.0}))
    start = time.monotonic()
    with fileutil.exclusive(path, wait=10):
        assert time.monotonic() - start >= 0.9


def test_a_dead_lease_taken_over_by_one_writer_only(prefix, monkeypatch):
    """A writer that saw the dead lease expired removes only that generation: a lease taken
    over meanwhile stays, and its own create-only upload is refused."""
    monkeypatch.setenv(fileutil.LEASE_ENV, "30")
    path, lock = prefix + "/run", fileutil.lock_path(prefix + "/run")
    fileutil.atomic_write_text(lock, json.dumps(
        {"token": "dead", "holder": "pid 1 on gone", "expires": time.time() - 1}))
    dead = paths.generation(lock)
    assert dead is not None
    with fileutil.exclusive(path, wait=0):  # the first writer takes it over
        mine = json.loads(paths.read_bytes(lock))["token"]
        assert paths.generation(lock) != dead
        # The second writer, acting on what it saw before:
        assert not paths.remove_generation(lock, dead)
        assert not fileutil._write_lease(lock, {"token": "late"}, create=True)
        assert json.loads(paths.read_bytes(lock))["token"] == mine
    assert not paths.exists(lock)


RACER = """
import os, sys, time
from ldot_jax.core import fileutil
path, log, me = sys.argv[1:]
for _ in range(3):
    with fileutil.exclusive(path, wait=120):
        with open(log, "a") as f:
            f.write(f"in {me}\\n")
        time.sleep(0.3)
        with open(log, "a") as f:
            f.write(f"out {me}\\n")
"""


def test_writers_racing_for_a_lease_hold_it_one_at_a_time(prefix, tmp_path, monkeypatch):
    """Three processes take the same lease three times each, starting at a dead one: never
    two inside at once (their enter / leave lines alternate, each pair from one writer)."""
    monkeypatch.setenv(fileutil.LEASE_ENV, "3")
    path, log = prefix + "/run", tmp_path / "log"
    fileutil.atomic_write_text(fileutil.lock_path(path), json.dumps(
        {"token": "dead", "holder": "pid 1 on gone", "expires": time.time() - 1}))
    racers = [subprocess.Popen([sys.executable, "-c", RACER, path, str(log), str(i)])
              for i in range(3)]
    assert [r.wait(timeout=240) for r in racers] == [0, 0, 0]
    lines = log.read_text().split()
    pairs = list(zip(lines[0::4], lines[1::4], lines[2::4], lines[3::4]))
    assert len(lines) == 3 * 3 * 4 and all(
        a == "in" and c == "out" and b == d for a, b, c, d in pairs), lines
    assert not paths.exists(fileutil.lock_path(path))
