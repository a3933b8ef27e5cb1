"""PyTorch checkpoints read without PyTorch (checkpoints/torch_files.py): both formats
`torch.save` writes, written by real PyTorch (tests/data/torch_formats/make_fixtures.py), give
the saved tensors exactly (every state_dict dtype, strided views, shared storages, 0-d and empty
tensors, parameters); the converter turns the original's legacy checkpoint into the same model
as its .npz; pickles that would run code, and damaged files, are errors that name them."""

import os
import pickle
import zipfile

import jax
import numpy as np
import pytest

import ldot_jax
from ldot_jax.checkpoints import pretrained, torch_files

from conftest import PARITY, SMALL_HEADS

FORMATS = os.path.join(os.path.dirname(__file__), "data", "torch_formats")


def expected() -> dict:
    with np.load(os.path.join(FORMATS, "expected.npz")) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("name", ["zip", "legacy"])
def test_both_formats_give_the_saved_tensors(name):
    obj = torch_files.load(os.path.join(FORMATS, f"{name}.pt"))
    assert obj["epoch"] == 3 and obj["note"] == "fixture" and obj["optimizer"] is None
    state = obj["model_dict"]
    want = expected()
    assert list(state) == [k.removesuffix(".bf16") for k in want]  # OrderedDict order kept
    for key, value in want.items():
        got = state[key.removesuffix(".bf16")]
        if key.endswith(".bf16"):
            assert str(got.dtype) == "bfloat16"
            got = got.astype(np.float32)
        assert got.dtype == value.dtype and got.shape == value.shape, key
        np.testing.assert_array_equal(got, value, err_msg=key)
    assert state["transposed"].flags["C_CONTIGUOUS"]  # views are copied out of the storage


@pytest.mark.parametrize("name", ["zip", "legacy"])
def test_torch_load_agrees_where_torch_is_installed(name):
    torch = pytest.importorskip("torch", reason="optional: the fixtures' expected.npz is the "
                                                "torch-free check")
    theirs = torch.load(os.path.join(FORMATS, f"{name}.pt"), weights_only=True)["model_dict"]
    ours = torch_files.load(os.path.join(FORMATS, f"{name}.pt"))["model_dict"]
    for key, tensor in theirs.items():
        np.testing.assert_array_equal(np.asarray(ours[key]).astype(np.float32),
                                      tensor.detach().float().numpy(), err_msg=key)


def test_the_original_legacy_checkpoint_converts_to_the_npz_model(tmp_path):
    from_pt = ldot_jax.convert_checkpoint(
        "lightningdot", os.path.join(FORMATS, "ldot_small_legacy.pt"), tmp_path / "pt",
        num_heads=SMALL_HEADS)
    from_npz = ldot_jax.convert_checkpoint(
        "lightningdot", PARITY / "ldot_small_weights.npz", tmp_path / "npz",
        num_heads=SMALL_HEADS)
    jax.tree.map(np.testing.assert_array_equal, pretrained.load_pretrained(from_pt).params,
                 pretrained.load_pretrained(from_npz).params)


class _Payload:
    """Unpickling this runs `os.system(command)`."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _zip_checkpoint(path, obj):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
        z.writestr("archive/version", "3\n")


def _legacy_checkpoint(path, obj):
    with open(path, "wb") as f:
        for part in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, obj, []):
            pickle.dump(part, f, protocol=2)


@pytest.mark.parametrize("write", [_zip_checkpoint, _legacy_checkpoint],
                         ids=["zip", "legacy"])
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, write):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    write(path, {"model_dict": {"w": _Payload(f"touch {marker}")}})
    with pytest.raises(torch_files.UnsafeCheckpointError,
                       match=r"evil.pt: the pickle refers to (posix|os)\.system"):
        torch_files.load(path)
    with pytest.raises(torch_files.UnsafeCheckpointError, match=r"--trust_pickle"):
        ldot_jax.convert_checkpoint("lightningdot", path, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["zip", "legacy"])
def test_a_truncated_checkpoint_is_named(tmp_path, name):
    data = open(os.path.join(FORMATS, f"{name}.pt"), "rb").read()
    path = tmp_path / f"cut-{name}.pt"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match=rf"cut-{name}.pt"):
        torch_files.load(path)


def test_a_file_that_is_no_checkpoint_is_named(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_bytes(pickle.dumps("just a string"))
    with pytest.raises(ValueError, match=r"notes.pt: not a PyTorch checkpoint"):
        torch_files.load(path)
    with zipfile.ZipFile(tmp_path / "other.pt", "w") as z:
        z.writestr("readme.txt", "a zip, but no data.pkl")
    with pytest.raises(ValueError, match=r"other.pt: not a PyTorch checkpoint archive"):
        torch_files.load(tmp_path / "other.pt")


def _unicode(text: str) -> bytes:
    data = text.encode()
    return b"X" + len(data).to_bytes(4, "little") + data


def test_a_pickle_cannot_rewrite_the_readers_functions(tmp_path):
    # GLOBAL torch._utils._rebuild_parameter, then BUILD with a state: on a plain function
    # this would set its attributes (e.g. __defaults__) for the rest of the process.
    body = (b"\x80\x02ctorch._utils\n_rebuild_parameter\n}" + _unicode("__defaults__")
            + b"K\x01\x85sb.")
    _zip_bytes(tmp_path / "build.pt", body)
    with pytest.raises(torch_files.UnsafeCheckpointError, match="sets the state"):
        torch_files.load(tmp_path / "build.pt")
    assert torch_files._rebuild_parameter.__defaults__ is None


def test_an_expanded_view_is_refused_not_allocated(tmp_path):
    # One stored float viewed as 10^9 elements through stride 0 (a few hundred bytes of file).
    storage = (b"(" + _unicode("storage") + b"ctorch\nFloatStorage\n" + _unicode("0")
               + _unicode("cpu") + b"K\x01tQ")
    size, stride = b"(J" + (10**9).to_bytes(4, "little") + b"t", b"(K\x00t"
    body = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(" + storage + b"K\x00" + size
            + stride + b"\x89ccollections\nOrderedDict\n)Rt" + b"R.")
    _zip_bytes(tmp_path / "expanded.pt", body, {"archive/data/0": b"\0\0\x80?"})
    with pytest.raises(ValueError, match=r"expanded.pt: .*more elements than its storage"):
        torch_files.load(tmp_path / "expanded.pt")


def test_a_storage_cut_short_inside_a_valid_archive_is_named(tmp_path):
    source = os.path.join(FORMATS, "zip.pt")
    path = tmp_path / "short.pt"
    with zipfile.ZipFile(source) as z, zipfile.ZipFile(path, "w") as out:
        storages = sorted(n for n in z.namelist() if "/data/" in n)
        for name in z.namelist():
            data = z.read(name)
            out.writestr(name, data[:4] if name == storages[0] else data)
    assert zipfile.is_zipfile(path)
    with pytest.raises(ValueError, match=r"short.pt: .*more elements than its storage \(1\): a truncated"):
        torch_files.load(path)


def _zip_bytes(path, body: bytes, extra=None):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", body)
        for name, data in (extra or {}).items():
            z.writestr(name, data)
