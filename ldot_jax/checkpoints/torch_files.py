"""PyTorch checkpoint files (.pt / .bin / .pth) read without PyTorch.

Both formats `torch.save` writes: the zip archive (PyTorch ≥ 1.6: `<name>/data.pkl` plus one
raw file per storage) and the legacy stream (older releases, e.g. the released UNITER and
LightningDOT checkpoints: pickles followed by the storages' bytes). The pickle is read with a
restricted unpickler that knows only what a state_dict of tensors needs — tensors, parameters,
storages, `OrderedDict` and plain values — the same promise as `torch.load(weights_only=True)`:
any other global (a class, `os.system`, …) is an `UnsafeCheckpointError` naming it, and no code
from the file runs. Tensors come back as NumPy arrays of their dtype (bfloat16 as
`ml_dtypes.bfloat16`), with their strides and storage offsets applied.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

# torch.<Name>Storage → NumPy dtype.
STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file's pickle refers to something other than tensors and plain containers."""


class _StorageType:
    """What a pickled `torch.FloatStorage` (etc.) stands for: its element dtype."""

    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(STORAGE_DTYPES[name])


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_unused) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2: a view of `storage` (1-d, element dtype) with `size`,
    `stride` (in elements) and `offset`, copied into a contiguous array."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise ValueError(f"tensor of size {size} and stride {stride}: not a valid layout")
    if size and min(size) == 0:
        return np.zeros(size, storage.dtype)
    if int(np.prod(size, dtype=np.int64)) > len(storage):
        # An expanded (stride-0) view: a state_dict holds none, and copying it out could
        # allocate without bound from a few bytes of file.
        raise ValueError(f"tensor of size {size} and stride {stride} has more elements than "
                         f"its storage ({len(storage)}): a truncated storage, or an expanded "
                         f"view (not read)")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or last >= len(storage):
        raise ValueError(f"tensor of size {size}, stride {stride} at offset {offset} reads past "
                         f"its storage of {len(storage)} elements (truncated file?)")
    view = np.lib.stride_tricks.as_strided(storage[offset:], size,
                                           [s * storage.itemsize for s in stride])
    return np.array(view, order="C")


def _rebuild_parameter(data, *_unused):
    return data


def _rebuild_from_type_v2(function, _new_type, args, _state):
    # Tensor subclasses: the array is what `function(*args)` builds (a tensor rebuild).
    return function(*args)


class _Callable:
    """What a pickle gets for an allowed function: callable, and nothing else. A function
    object itself would let the pickle's BUILD opcode rewrite its __dict__ / __defaults__ (the
    reader's own state for the rest of the process); this has no attributes to set."""

    __slots__ = ("_function",)

    def __init__(self, function):
        object.__setattr__(self, "_function", function)

    def __call__(self, *args):
        return self._function(*args)

    def __setattr__(self, name, value):
        raise UnsafeCheckpointError(f"the pickle sets attribute {name!r} of a function")

    def __setstate__(self, state):
        raise UnsafeCheckpointError("the pickle sets the state of a function")


# (module, name) → what the restricted unpickler gives for it.
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _Callable(lambda *args: _legacy_rebuild(*args)),
    ("torch._utils", "_rebuild_tensor"): _Callable(lambda *args: _legacy_rebuild(*args)),
    ("torch._utils", "_rebuild_parameter"): _Callable(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Callable(_rebuild_parameter),
    ("torch._tensor", "_rebuild_from_type_v2"): _Callable(_rebuild_from_type_v2),
    ("torch.nn.parameter", "Parameter"): _Callable(_rebuild_parameter),
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice, ("builtins", "complex"): complex,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, load_storage, where: str):
        super().__init__(file)
        self._load_storage, self._where = load_storage, where

    def find_class(self, module: str, name: str):
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise UnsafeCheckpointError(
            f"{self._where}: the pickle refers to {module}.{name}, which is not part of a "
            f"state_dict of tensors (refused, as torch.load(weights_only=True) would). If you "
            f"trust the file, read it with trust_pickle=True / --trust_pickle (needs PyTorch)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"{self._where}: unknown persistent id {pid!r:.80}")
        return self._load_storage(pid)


def _dtype_of(storage_type, where: str) -> np.dtype:
    if isinstance(storage_type, _StorageType):
        return storage_type.dtype
    raise UnsafeCheckpointError(f"{where}: storage of unknown type {storage_type!r:.80}")


def _read_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise ValueError(f"{path}: not a PyTorch checkpoint archive (expected one "
                             f"data.pkl, found {len(pickles)})")
        prefix = pickles[0][: -len("data.pkl")]
        order = (archive.read(prefix + "byteorder").decode().strip()
                 if prefix + "byteorder" in names else "little")
        if order not in ("little", "big"):
            raise ValueError(f"{path}: byteorder {order!r}")
        loaded: dict[str, np.ndarray] = {}

        def load_storage(pid):
            _, storage_type, key, _location, numel = pid[:5]
            dtype = _dtype_of(storage_type, path)
            if key not in loaded:
                name = f"{prefix}data/{key}"
                if name not in names:
                    raise ValueError(f"{path}: storage {key} ({name}) is missing")
                raw = archive.read(name)
                dtype = dtype.newbyteorder("<" if order == "little" else ">")
                if len(raw) % dtype.itemsize:
                    raise ValueError(f"{path}: storage {key} has {len(raw)} bytes, not a "
                                     f"multiple of {dtype.itemsize} ({dtype})")
                loaded[key] = np.frombuffer(raw, dtype).astype(dtype.newbyteorder("="))
            return loaded[key]

        with archive.open(pickles[0]) as f:
            return _Unpickler(io.BytesIO(f.read()), load_storage, path).load()


def _read_legacy(path: str) -> Any:
    """The pre-1.6 stream: magic, protocol, sys_info, the object (storages as persistent ids),
    the storage keys, then each storage as an int64 element count and its bytes."""
    with open(path, "rb") as f:
        restricted = lambda: _Unpickler(f, _no_storage, path).load()
        if restricted() != _LEGACY_MAGIC:
            raise ValueError(f"{path}: not a PyTorch checkpoint (no zip archive, no legacy "
                             f"magic number)")
        if restricted() != _LEGACY_PROTOCOL:
            raise ValueError(f"{path}: unsupported legacy PyTorch protocol")
        sys_info = restricted()
        little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
        wanted: dict[str, np.dtype] = {}
        views = []

        def load_storage(pid):
            _, storage_type, key, _location, numel = pid[:5]
            wanted[key] = _dtype_of(storage_type, path)
            if len(pid) > 5 and pid[5] is not None:  # a view (key, offset, size) of a storage
                raise ValueError(f"{path}: storage views of the oldest format are not "
                                 f"supported; re-save the file with a recent PyTorch")
            holder = _Pending(key)
            views.append(holder)
            return holder

        obj = _Unpickler(f, load_storage, path).load()
        keys = restricted()
        storages = {}
        for key in keys:
            header = f.read(8)
            if len(header) != 8:
                raise ValueError(f"{path}: truncated before storage {key}")
            (count,) = struct.unpack("<q" if little else ">q", header)
            dtype = wanted.get(key, np.dtype(np.uint8)).newbyteorder("<" if little else ">")
            raw = f.read(count * dtype.itemsize)
            if len(raw) != count * dtype.itemsize:
                raise ValueError(f"{path}: storage {key} is truncated ({len(raw)} of "
                                 f"{count * dtype.itemsize} bytes)")
            storages[key] = np.frombuffer(raw, dtype).astype(dtype.newbyteorder("="))
    return _resolve(obj, storages, path)


class _Pending:
    """A legacy storage (its bytes follow the object) with the tensor views built on it."""

    def __init__(self, key):
        self.key = key


class _PendingTensor:
    def __init__(self, storage: _Pending, args):
        self.storage, self.args = storage, args


def _no_storage(pid):
    raise UnsafeCheckpointError(f"unexpected storage {pid!r:.80} in a header pickle")


def _resolve(obj, storages: dict, path: str):
    """Builds the legacy format's tensors once their storages are read."""
    if isinstance(obj, _PendingTensor):
        if obj.storage.key not in storages:
            raise ValueError(f"{path}: storage {obj.storage.key} is missing")
        return _rebuild_tensor(storages[obj.storage.key], *obj.args)
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _resolve(v, storages, path)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v, storages, path) for v in obj)
    return obj


def _legacy_rebuild(storage, *args):
    if isinstance(storage, _Pending):  # the legacy stream: built after its bytes are read
        return _PendingTensor(storage, args)
    return _rebuild_tensor(storage, *args)


def load(path: str | os.PathLike) -> Any:
    """The object `torch.save` wrote to `path` (a state_dict, or a dict holding one), tensors
    as NumPy arrays. Raises UnsafeCheckpointError for anything but tensors and plain values,
    ValueError (naming the file) for files that are not PyTorch checkpoints, are damaged or
    truncated."""
    path = os.fspath(path)
    reader = _read_zip if zipfile.is_zipfile(path) else _read_legacy
    try:
        return reader(path)
    except UnsafeCheckpointError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, struct.error, IndexError,
            KeyError, TypeError, AttributeError, ValueError, OverflowError, MemoryError) as e:
        message = str(e)
        if path not in message:
            what = "PyTorch checkpoint archive" if reader is _read_zip else "PyTorch checkpoint"
            message = f"{path}: not a readable {what} ({type(e).__name__}: {message})"
        raise ValueError(message) from e
