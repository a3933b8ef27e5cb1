"""One path abstraction for local disk and object stores (fsspec, the backend of etils.epath).

Every path the library reads or writes (workdirs, checkpoints, metrics, datasets, extraction
shards, indexes, model directories, locks) may be local or a URL such as `gs://bucket/run`.
Paths are passed around as strings; the functions here take either kind:

  - local paths are made absolute (`~` expanded) and handled by the OS;
  - URLs (`scheme://…`) go through fsspec, the backend `etils.epath` uses for them (gcsfs for
    `gs://`; Orbax reaches the same store through epath), here with its listing cache off:
    several processes (a pod's hosts) write one run, and a cached listing would hide what the
    others wrote.

Object stores have no directories (a "directory" is a prefix: `make_dirs` is a no-op there),
no atomic rename and no append; `core/fileutil.py` builds its atomic writers on what they do
have: a single object's upload is all-or-nothing.

Components that need local files (ScaNN, ArrayRecord, memory maps) read a verified local copy
under `cache_dir()` ($LDOT_JAX_CACHE, default ~/.cache/ldot_jax); the only local writes a
run on an object store makes are there.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from typing import IO


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
CACHE_ENV = "LDOT_JAX_CACHE"


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL of an object store (gs://, s3://, …), not a local path."""
    return bool(_URL.match(os.fspath(path)))


def absolute(path: str | os.PathLike) -> str:
    """The absolute form of `path`: a URL without a trailing slash, or an absolute local path
    (`~` expanded)."""
    text = os.fspath(path)
    if is_remote(text):
        return text.rstrip("/")
    return os.path.abspath(os.path.expanduser(text))


def join(base: str | os.PathLike, *names: str) -> str:
    """`base/name/…` for either kind of path."""
    base = os.fspath(base)
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(n.strip("/") for n in names)])
    return os.path.join(base, *names)


def split(path: str | os.PathLike) -> tuple[str, str]:
    """(parent, name) of an absolute path; a bucket itself has no parent to write beside."""
    path = absolute(path)
    if not is_remote(path):
        return os.path.split(path)
    parent, _, name = path.rpartition("/")
    if parent.endswith(":/"):
        raise ValueError(f"{path} is a bucket, not a path inside one: choose an output path "
                         f"inside it (e.g. {path}/run)")
    return parent, name


def exists(path: str | os.PathLike) -> bool:
    if not is_remote(path):
        return os.path.lexists(path)
    fs, key = _fs(path)
    return fs.exists(key)


def is_file(path: str | os.PathLike) -> bool:
    if not is_remote(path):
        return os.path.isfile(path)
    fs, key = _fs(path)
    return fs.isfile(key)


def is_dir(path: str | os.PathLike) -> bool:
    """A local directory, or a prefix holding at least one object."""
    if not is_remote(path):
        return os.path.isdir(path)
    fs, key = _fs(path)
    return fs.isdir(key)


def list_dir(path: str | os.PathLike) -> list[str]:
    """The names directly under `path`, sorted ([] if it does not exist)."""
    if not is_remote(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, key = _fs(path)
    if not fs.isdir(key):
        return []
    return sorted({name.rstrip("/").rpartition("/")[2] for name in fs.ls(key, detail=False)}
                  - {""})


def walk_files(root: str | os.PathLike) -> list[str]:
    """Every file under `root`, relative to it, sorted (local symlinks count as files)."""
    root = absolute(root)
    if not is_remote(root):
        out = []
        for directory, dirs, files in os.walk(root):
            for name in files + [d for d in dirs if os.path.islink(os.path.join(directory, d))]:
                out.append(os.path.relpath(os.path.join(directory, name), root))
        return sorted(out)
    fs, prefix = _fs(root)
    if not fs.isdir(prefix):
        return []
    return sorted(name[len(prefix) + 1:] for name in fs.find(prefix))


def size(path: str | os.PathLike) -> int:
    if not is_remote(path):
        return os.path.getsize(path)
    fs, key = _fs(path)
    return int(fs.size(key))


def make_dirs(path: str | os.PathLike) -> None:
    """Creates a local directory and its parents (object stores need none)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def remove(path: str | os.PathLike) -> None:
    """Removes one file (or object); a missing one is fine."""
    with contextlib.suppress(FileNotFoundError):
        if is_remote(path):
            fs, key = _fs(path)
            fs.rm_file(key)
        else:
            os.remove(path)


def generation(url: str) -> str | None:
    """The generation of object `url` on a store that numbers them (GCS), else None (also
    when there is no object)."""
    fs, key = _fs(url)
    try:
        found = fs.info(key).get("generation")
    except FileNotFoundError:
        return None
    return str(found) if found else None


def remove_generation(url: str, generation: str | None) -> bool:
    """Removes object `url` only while it is still `generation` (GCS: a delete of that
    generation, refused once the object was replaced); False if it was replaced or is gone.
    Without a generation (a store that has none), a plain remove."""
    if generation is None:
        remove(url)
        return True
    import fsspec
    fs, key = _fs(url)
    versioned = fsspec.filesystem(fs.protocol[0] if isinstance(fs.protocol, tuple)
                                  else fs.protocol, version_aware=True,
                                  use_listings_cache=False)
    try:
        versioned.rm_file(f"{key}#{generation}")
    except FileNotFoundError:
        return False
    return True


def remove_tree(path: str | os.PathLike) -> None:
    """Removes a directory (or every object under a prefix); a missing one is fine."""
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs, prefix = _fs(path)
    with contextlib.suppress(FileNotFoundError):
        if fs.isdir(prefix):
            fs.rm(prefix, recursive=True)


def open_file(path: str | os.PathLike, mode: str = "r") -> IO:
    """A file object for reading (or, for local paths only, writing: writers use
    `fileutil.atomic_file`)."""
    if not is_remote(path):
        return open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"}))
    fs, key = _fs(path)
    return fs.open(key, mode)


def read_text(path: str | os.PathLike) -> str:
    with open_file(path) as f:
        return f.read()


def read_bytes(path: str | os.PathLike) -> bytes:
    with open_file(path, "rb") as f:
        return f.read()


def _fs(url: str):
    """(fsspec filesystem, path within it) of a URL (no listing cache: see the docstring)."""
    import fsspec
    return fsspec.core.url_to_fs(absolute(url), use_listings_cache=False)


def upload(local: str, url: str) -> None:
    """Copies local file `local` to object `url`: one upload, visible only when whole."""
    fs, path = _fs(url)
    fs.put_file(local, path)


def download(url: str, local: str) -> None:
    """Copies object `url` to local file `local` (overwritten)."""
    fs, path = _fs(url)
    fs.get_file(path, local)


def cache_dir(*parts: str) -> str:
    """A directory under the local cache ($LDOT_JAX_CACHE, default ~/.cache/ldot_jax), created:
    where copies of remote data, and the staging of uploads, are kept."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                      "ldot_jax")
    path = os.path.join(os.path.abspath(root), *parts)
    os.makedirs(path, exist_ok=True)
    return path
