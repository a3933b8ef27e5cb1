"""Writers under faults: a real `kill -9` at each named point of a replacement (a subprocess
pauses there and is killed from outside), with and without the atomic exchange; outputs that
are not ours; inputs inside the output; symlinked outputs; two writers at once; damaged files.

After every fault the output holds the old or the new complete copy, the next write cleans up
what the crash left, and nothing else on disk changed (the tree is snapshotted before and
after)."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import ldot_jax
from ldot_jax.checkpoints import checkpoint, pretrained
from ldot_jax.core import fileutil
from ldot_jax.index import backends, base
from ldot_jax.index.exact import ExactIndex
from ldot_jax.retrieval import extract

import faults
from conftest import PARITY, SMALL_HEADS
from faults import snapshot

# Writes index version N to a path; with NO_EXCHANGE the filesystem "cannot" exchange.
WRITER = textwrap.dedent("""
    import os, sys
    import numpy as np
    from ldot_jax.core import fileutil
    from ldot_jax.index.exact import ExactIndex
    if os.environ.get("NO_EXCHANGE"):
        fileutil._exchange = lambda a, b: False
    path, version = sys.argv[1], int(sys.argv[2])
    ExactIndex(4).add(np.full((3, 4), version, np.float32), np.arange(3)).save(path)
""")


def write_index(path, version, **extra):
    done = subprocess.run([sys.executable, "-c", WRITER, str(path), str(version)],
                          env=faults.env(**extra), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def kill_at(point, args, tmp_path, script=WRITER, **extra):
    faults.kill_at(point, args, tmp_path, script, **extra)


def version_of(path) -> int:
    index = backends.load_index(path)
    return int(index.search(np.ones((1, 4), np.float32), 1).scores[0, 0]) // 4


# The points of a replacement: with the atomic exchange, and with two renames (filesystems
# without RENAME_EXCHANGE).
POINTS = [(p, True) for p in ("before_manifest", "before_swap", "after_swap")] + [
    (p, False) for p in ("before_manifest", "before_swap", "between_renames")]


@pytest.mark.parametrize("point,exchange", POINTS,
                         ids=[f"{p}-{'exchange' if e else 'renames'}" for p, e in POINTS])
def test_a_kill_at_any_point_leaves_the_old_or_the_new_index(tmp_path, point, exchange):
    env = {} if exchange else {"NO_EXCHANGE": "1"}
    root = tmp_path / "root"
    root.mkdir()
    (root / "precious.txt").write_text("a user's file beside the output")
    out = root / "index"
    write_index(out, 1, **env)
    kill_at(point, [out, 2], tmp_path, **env)
    # The old or the new complete copy; the new one only once the swap happened.
    assert version_of(out) == (2 if point == "after_swap" else 1)
    # The next write cleans up whatever the crash left and replaces the index.
    write_index(out, 3, **env)
    assert version_of(out) == 3
    assert sorted(os.listdir(root)) == ["index", "precious.txt"]
    assert (root / "precious.txt").read_text() == "a user's file beside the output"


def test_a_kill_between_the_renames_is_repaired_on_the_next_read(tmp_path):
    out = tmp_path / "index"
    write_index(out, 1, NO_EXCHANGE="1")
    kill_at("between_renames", [out, 2], tmp_path, NO_EXCHANGE="1")
    assert not out.exists()  # the crash left only the moved-aside old copy…
    assert version_of(out) == 1  # …which the reader puts back
    assert sorted(os.listdir(tmp_path)) == ["index", "paused-between_renames"]


def test_a_kill_during_a_file_write_keeps_the_old_file(tmp_path):
    script = textwrap.dedent("""
        import sys
        from ldot_jax.core import fileutil
        fileutil.atomic_write_text(sys.argv[1], sys.argv[2])
    """)
    target = tmp_path / "config.json"
    target.write_text("old")
    kill_at("file_before_rename", [target, "new"], tmp_path, script=script)
    assert target.read_text() == "old"
    assert len(os.listdir(tmp_path)) == 3  # the file, the flag and the dead writer's temporary
    fileutil.atomic_write_text(target, "newer")
    assert target.read_text() == "newer"
    assert sorted(os.listdir(tmp_path)) == ["config.json", "paused-file_before_rename"]


def test_a_second_writer_is_refused_while_the_first_lives_and_takes_over_after(tmp_path):
    out = tmp_path / "index"
    write_index(out, 1)
    proc = faults.start_paused("before_swap", [out, 2], tmp_path / "paused", WRITER)
    try:
        with pytest.raises(fileutil.LockedError, match=rf"being written by pid {proc.pid}"):
            ExactIndex(4).add(np.zeros((3, 4), np.float32), np.arange(3)).save(out)
    finally:
        faults.kill(proc)
    assert version_of(out) == 1
    ExactIndex(4).add(np.full((3, 4), 5, np.float32), np.arange(3)).save(out)  # stale lock
    assert version_of(out) == 5
    assert sorted(os.listdir(tmp_path)) == ["index", "paused"]


CONVERT = textwrap.dedent("""
    import os, sys
    from ldot_jax.core import fileutil
    if os.environ.get("NO_EXCHANGE"):
        fileutil._exchange = lambda a, b: False
    import ldot_jax
    ldot_jax.convert_checkpoint("lightningdot", sys.argv[1], sys.argv[2],
                                num_heads=int(sys.argv[3]))
""")


def test_a_kill_at_any_point_leaves_the_old_or_the_new_model_directory(tmp_path):
    """The model directory's writer at each crash point: the directory loads as the old or
    the new model (by their weights), and the next conversion cleans up and replaces it."""
    v1 = PARITY / "ldot_small_weights.npz"
    v2 = tmp_path / "v2.npz"  # the same model with other weights
    with np.load(v1) as z:
        np.savez(v2, **{k: z[k] + 1 if z[k].dtype.kind == "f" else z[k] for k in z.files})
    root = tmp_path / "root"
    out = root / "model"
    ldot_jax.convert_checkpoint("lightningdot", v1, out, num_heads=SMALL_HEADS)

    def weights(path=out):
        leaves = jax.tree.leaves(pretrained.load_pretrained(path).params)
        return np.concatenate([np.ravel(x)[:4] for x in leaves])
    first = weights()
    ldot_jax.convert_checkpoint("lightningdot", v2, tmp_path / "m2", num_heads=SMALL_HEADS)
    second = weights(tmp_path / "m2")
    assert not np.array_equal(first, second)
    # (point, with the atomic exchange, whether the new copy is in place after a kill there)
    for point, exchange, new in (("before_manifest", True, False), ("before_swap", True, False),
                                 ("after_swap", True, True), ("between_renames", False, False)):
        env = {} if exchange else {"NO_EXCHANGE": "1"}
        before = weights()
        source, written = (v2, second) if np.array_equal(before, first) else (v1, first)
        kill_at(point, [source, out, SMALL_HEADS], tmp_path, script=CONVERT, **env)
        # The old or the new complete copy (a reader puts an old copy moved aside back).
        np.testing.assert_array_equal(weights(), written if new else before, err_msg=point)
    ldot_jax.convert_checkpoint("lightningdot", v1, out, num_heads=SMALL_HEADS)
    np.testing.assert_array_equal(weights(), first)
    assert sorted(os.listdir(root)) == ["model"]  # every leftover cleaned up
    pretrained.verify(out, full=True)


# ---------------------------------------------------------------------------------------------
# What is not ours


def _index(value=1.0):
    return ExactIndex(4).add(np.full((3, 4), value, np.float32), np.arange(3))


@pytest.mark.parametrize("planted", ["index.json", "notes.txt", "sub/data.bin"])
def test_an_index_never_replaces_a_directory_with_files_it_did_not_write(tmp_path, planted):
    out = tmp_path / "out"
    if planted != "index.json":  # an index of ours, plus a user's file
        _index().save(out)
    path = out / planted
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("the user's")
    before = snapshot(tmp_path)
    with pytest.raises(fileutil.OwnershipError, match=rf"refusing to replace .*out.*"
                                                       rf"{planted.split('/')[-1]}"):
        _index(2.0).save(out)
    assert snapshot(tmp_path) == before


def test_a_model_directory_never_replaces_another_format_or_a_legacy_directory(tmp_path):
    index_dir = _index().save(tmp_path / "idx")
    before = snapshot(tmp_path)
    with pytest.raises(fileutil.OwnershipError, match="holds a 'ldot_jax.index', not a "
                                                      "'ldot_jax.model'"):
        ldot_jax.convert_checkpoint("lightningdot", PARITY / "ldot_small_weights.npz",
                                    index_dir, num_heads=SMALL_HEADS)
    legacy = tmp_path / "legacy"  # a model directory without a manifest (older versions)
    legacy.mkdir()
    (legacy / pretrained.CONFIG_FILE).write_text("{}")
    (legacy / "weights.npz").write_text("the only copy")
    before = snapshot(tmp_path)
    with pytest.raises(fileutil.OwnershipError, match=r"did not record writing .*weights.npz"):
        ldot_jax.convert_checkpoint("lightningdot", PARITY / "ldot_small_weights.npz", legacy,
                                    num_heads=SMALL_HEADS)
    assert snapshot(tmp_path) == before


def test_an_input_inside_the_output_is_refused(tmp_path):
    models = tmp_path / "models" / "x"
    models.mkdir(parents=True)
    source = models / "weights.npz"
    source.write_bytes((PARITY / "ldot_small_weights.npz").read_bytes())
    before = snapshot(tmp_path)
    for output in (models, tmp_path / "models"):
        with pytest.raises(ValueError, match=r"input .*weights.npz is inside the output"):
            ldot_jax.convert_checkpoint("lightningdot", source, output, num_heads=SMALL_HEADS)
    assert snapshot(tmp_path) == before


def test_a_symlinked_output_updates_its_target(tmp_path):
    v1 = _index(1.0).save(tmp_path / "v1")
    link = tmp_path / "current"
    link.symlink_to("v1")
    _index(2.0).save(link)
    assert link.is_symlink() and os.readlink(link) == "v1"
    assert version_of(v1) == 2 and version_of(link) == 2
    assert sorted(os.listdir(tmp_path)) == ["current", "v1"]


def test_an_extraction_refuses_a_directory_with_other_files(tmp_path):
    out = tmp_path / "emb"
    out.mkdir()
    (out / "vectors.npy").write_text("the user's")
    before = snapshot(tmp_path)

    class Corpus:  # never read: the refusal comes first
        side, split, count, padding, content = "image", "test", 3, {}, None
    with pytest.raises(fileutil.OwnershipError, match=r"refusing to extract .*vectors.npy"):
        extract.extract(None, None, Corpus(), str(out), None, "fp", progress=False)
    assert snapshot(tmp_path) == before
    # An extraction of ours with a torn shard of an older version: accepted, the torn one
    # removed.
    ours = tmp_path / "ours"
    ours.mkdir()
    manifest = {"side": "image", "split": "test", "count": 3, "shard_size": 8,
                "fingerprint": "fp", "normalized": False}
    (ours / extract.MANIFEST).write_text(json.dumps(manifest))
    (ours / "shard-00000.npz.tmp-0123abcd").write_bytes(b"torn")
    assert extract._check_manifest(str(ours), dict(manifest), False)["count"] == 3
    assert sorted(os.listdir(ours)) == [extract.MANIFEST]


# ---------------------------------------------------------------------------------------------
# Integrity


def test_a_damaged_model_file_is_named(tmp_path):
    model = tmp_path / "model"
    ldot_jax.convert_checkpoint("lightningdot", PARITY / "ldot_small_weights.npz", model,
                                num_heads=SMALL_HEADS)
    manifest = json.loads((model / fileutil.MANIFEST).read_text())
    assert manifest["format"] == pretrained.FORMAT
    name = max(manifest["files"], key=lambda n: manifest["files"][n]["size"])
    path = model / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash sees it
    path.write_bytes(bytes(data))
    pretrained.verify(model)  # the cheap check passes…
    with pytest.raises(checkpoint.CheckpointError, match=rf"{name}: SHA-256 differs"):
        pretrained.verify(model, full=True)  # …the full one names the file
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(checkpoint.CheckpointError, match=rf"{name} has \d+ bytes"):
        pretrained.load_pretrained(model)


def test_a_damaged_index_file_and_a_manifest_that_escapes_are_named(tmp_path):
    out = _index().save(tmp_path / "idx")
    ids = os.path.join(out, base.IDS_FILE)
    with open(ids, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    backends.load_index(out)  # sizes agree
    with pytest.raises(base.IndexFormatError, match=rf"{base.IDS_FILE}: SHA-256 differs"):
        base.read_metadata(out, full=True)
    manifest = json.loads(open(os.path.join(out, fileutil.MANIFEST)).read())
    manifest["files"]["../outside"] = {"size": 1, "sha256": ""}
    with open(os.path.join(out, fileutil.MANIFEST), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(base.IndexFormatError, match=r"'../outside' is not inside"):
        backends.load_index(out)
