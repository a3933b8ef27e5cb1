"""Writes that never destroy what they do not own and never leave a half-written output.

Directories (model directories, indexes) are written with `atomic_directory(path, format)`:

  1. one writer per output: an advisory lock (`.NAME.lock` beside it, naming its holder; the
     kernel releases it when the holder dies, so a stale lock is simply taken over);
  2. leftovers of an earlier crash beside `path` (`.NAME.tmp-HOST-PID-*` of dead processes,
     `.NAME.old-*`) are removed, and an old copy whose replacement was interrupted is put back;
  3. an existing `path` is replaced only if it is empty or carries this format's manifest
     (`ldot_manifest.json`) and holds nothing but the files listed there; otherwise
     `OwnershipError` names the unexpected files. An input inside the output is refused;
  4. the new copy is built in `.NAME.tmp-HOST-PID-TOKEN`, its manifest (every file's size and
     SHA-256) written last, everything fsynced;
  5. it is swapped with the old copy in one step (`renameat2(RENAME_EXCHANGE)`), the parent
     directory fsynced, and the old copy (now under the temporary name) removed. Where the
     filesystem cannot exchange, two renames are used and step 2 of the next write (or
     `recover`, called by the readers) puts the old copy back after a crash between them.

After a kill at any instant `path` holds the old or the new complete copy. A symlink at `path`
is followed: its target is replaced and the link stays. Files are written with `atomic_file`
(a temporary sibling, fsync, rename, parent fsync).

`verify(directory)` checks a directory against its manifest: sizes always, SHA-256 with
`full=True`; file names in a manifest are confined to the directory.

Crash tests: with LDOT_JAX_PAUSE_AT=<point> (or <point>#K, its K-th arrival) and
LDOT_JAX_PAUSE_FILE=<file> a process creates <file> when it reaches <point> and waits there to
be killed. The points: `before_manifest`, `before_swap`, `between_renames`, `after_swap`
(directories), `file_before_rename` (files), `shard_before_rename` (extraction shards),
`dataset_record`, `dataset_prepared` (dataset preparation), `checkpoint_started` (training).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
import uuid
from typing import Iterable

MANIFEST = "ldot_manifest.json"
MANIFEST_VERSION = 1
PAUSE_AT, PAUSE_FILE = "LDOT_JAX_PAUSE_AT", "LDOT_JAX_PAUSE_FILE"
log = logging.getLogger(__name__)
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40] or "host"


class OwnershipError(FileExistsError):
    """An output path holds something this writer did not write (it is left untouched)."""


class LockedError(RuntimeError):
    """Another live process is writing the same output."""


class IntegrityError(ValueError):
    """A file differs from what its directory's manifest recorded (damaged or modified)."""


# ---------------------------------------------------------------------------------------------
# Crash points (tests)


_REACHED: dict[str, int] = {}


def pause_point(name: str) -> None:
    """Where LDOT_JAX_PAUSE_AT names this point (`name`, or `name#K` for its K-th arrival in
    this process): announce it (create LDOT_JAX_PAUSE_FILE) and wait to be killed. A no-op
    otherwise."""
    wanted = os.environ.get(PAUSE_AT)
    if not wanted or wanted.split("#")[0] != name:
        return
    _REACHED[name] = _REACHED.get(name, 0) + 1
    if "#" in wanted and int(wanted.split("#")[1]) != _REACHED[name]:
        return
    with open(os.environ[PAUSE_FILE], "w") as f:
        f.write(str(os.getpid()))
    while True:
        time.sleep(60)


# ---------------------------------------------------------------------------------------------
# Durability


def fsync_dir(path: str) -> None:
    """Makes the entries of directory `path` (renames, creations) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(directory)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps paths a and b (Linux renameat2); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


# ---------------------------------------------------------------------------------------------
# Locks


_HELD: dict[str, int] = {}


def _holder() -> str:
    return (f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%dT%H:%M:%S')} ({' '.join(sys.argv)[:200]})")


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, what: str = "output", wait: float = 0):
    """Holds the advisory lock of `path` (`.NAME.lock` beside it) for the block; a second
    writer gets `LockedError` naming the holder, after waiting up to `wait` seconds for it
    to finish (0: not at all). Re-entrant within a process."""
    import fcntl
    path = os.path.abspath(path)
    if path in _HELD:
        yield
        return
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    lock_path = os.path.join(parent, f".{name}.lock")
    deadline, told = time.monotonic() + wait, False
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 1000, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if time.monotonic() >= deadline:
                raise LockedError(f"{what} {path} is being written by {holder}; wait for it "
                                  f"to finish (or stop it)") from None
            if not told:
                log.warning("%s %s is being written by %s: waiting for it", what, path, holder)
                told = True
            time.sleep(min(1.0, max(0.01, deadline - time.monotonic())))
            continue
        try:  # the file may have been unlinked by its previous holder after we opened it
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, _holder().encode(), 0)
    _HELD[path] = fd
    try:
        yield
    finally:
        del _HELD[path]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Manifests


def _files(root: str) -> list[str]:
    """Every file under root, relative, sorted (symlinks count as files)."""
    out = []
    for directory, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(directory, d))]:
            out.append(os.path.relpath(os.path.join(directory, name), root))
    return sorted(out)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: str, format: str) -> dict:
    """Records every file of `directory` (size, SHA-256) under `format` in its manifest."""
    files = {name: {"size": os.path.getsize(os.path.join(directory, name)),
                    "sha256": _sha256(os.path.join(directory, name))}
             for name in _files(directory) if name != MANIFEST}
    body = {"format": format, "manifest_version": MANIFEST_VERSION, "files": files}
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump(body, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return body


def read_manifest(directory: str | os.PathLike) -> dict | None:
    """The manifest of `directory`, or None if it has none (an older version wrote it, or
    nothing of ours did). A manifest that is not one is an IntegrityError."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            body = json.load(f)
    except (OSError, ValueError) as e:
        raise IntegrityError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(body, dict) or not isinstance(body.get("files"), dict) or not isinstance(
            body.get("format"), str):
        raise IntegrityError(f"{path}: not an ldot_jax manifest (expected format and files)")
    for name in body["files"]:
        confined(directory, name, path)
    return body


def confined(directory: str | os.PathLike, name: str, where: str = "manifest") -> str:
    """directory/name, refusing a name that leaves the directory (absolute, `..`, a link out)."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in re.split(
            r"[\\/]", name):
        raise IntegrityError(f"{where}: file name {name!r} is not inside its directory")
    root = os.path.realpath(directory)
    full = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, full]) != root:
        raise IntegrityError(f"{where}: file name {name!r} leads outside {directory}")
    return os.path.join(directory, name)


def verify(directory: str | os.PathLike, format: str | None = None, full: bool = False,
           required: bool = False) -> dict | None:
    """Checks `directory` against its manifest: every file present with its size (and its
    SHA-256 with `full`); `format` must match. Returns the manifest (None if there is none
    and not `required`). Errors name the file."""
    directory = os.fspath(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        if required:
            raise IntegrityError(f"{directory}: {MANIFEST} is missing")
        return None
    if format is not None and manifest["format"] != format:
        raise IntegrityError(f"{directory} holds a {manifest['format']!r}, not a {format!r}")
    for name, entry in manifest["files"].items():
        path = confined(directory, name, os.path.join(directory, MANIFEST))
        if not os.path.isfile(path):
            raise IntegrityError(f"{path} is missing (listed in {MANIFEST})")
        size = os.path.getsize(path)
        if size != entry.get("size"):
            raise IntegrityError(f"{path} has {size} bytes, {entry.get('size')} were written "
                                 f"(damaged or modified)")
        if full and _sha256(path) != entry.get("sha256"):
            raise IntegrityError(f"{path}: SHA-256 differs from the one written (damaged or "
                                 f"modified)")
    return manifest


# ---------------------------------------------------------------------------------------------
# Ownership


def _describe(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_replaceable(path: str, format: str) -> None:
    """OK if `path` does not exist, is an empty directory, or is a `format` directory holding
    only its manifest's files; otherwise OwnershipError naming what is in the way."""
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise OwnershipError(f"refusing to replace {path}: it is a file, not a directory this "
                             f"writer made (choose another output path)")
    present = _files(path)
    if not present:
        return
    try:
        manifest = read_manifest(path)
    except IntegrityError as e:
        raise OwnershipError(f"refusing to replace {path}: {e}") from e
    if manifest is None:
        raise OwnershipError(
            f"refusing to replace {path}: it holds files ldot_jax did not record writing "
            f"({_describe(present)}; no {MANIFEST}). Choose another output path, or move "
            f"them away yourself")
    if manifest["format"] != format:
        raise OwnershipError(f"refusing to replace {path}: it holds a {manifest['format']!r}, "
                             f"not a {format!r}")
    unexpected = sorted(set(present) - set(manifest["files"]) - {MANIFEST})
    if unexpected:
        raise OwnershipError(f"refusing to replace {path}: besides the {format} it holds "
                             f"files it did not write: {_describe(unexpected)} (move them "
                             f"away, or choose another output path)")


def check_not_inside(output: str | os.PathLike, inputs: Iterable) -> None:
    """ValueError if an input is the output or lies inside it (replacing the output would
    delete it)."""
    out = os.path.realpath(output)
    for item in inputs:
        if item is None:
            continue
        full = os.path.realpath(item)
        if full == out or os.path.commonpath([out, full]) == out:
            raise ValueError(f"the input {item} is inside the output {output}: writing the "
                             f"output would replace it (choose another output path)")


# ---------------------------------------------------------------------------------------------
# Crash leftovers


def _leftover(name: str, base: str) -> str | None:
    """'tmp' / 'old' if `name` is one of our temporary siblings of `base`, else None."""
    match = re.fullmatch(rf"\.{re.escape(base)}\.(tmp|old)-(.+)", name)
    return match.group(1) if match else None


def _alive(tag: str) -> bool:
    """Whether the writer that made a temporary sibling (tag HOST-PID-TOKEN) may still run."""
    match = re.fullmatch(r"(.+)-(\d+)-[0-9a-f]+", tag)
    if not match or match.group(1) != _HOST:
        return match is not None  # another host's (shared filesystem): leave it alone
    try:
        os.kill(int(match.group(2)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def recover(path: str | os.PathLike) -> None:
    """Finishes what a crash interrupted beside `path`: an old copy moved aside whose
    replacement never arrived is put back; dead writers' temporary copies are removed. Only
    our own hidden siblings (`.NAME.tmp-*`, `.NAME.old-*`) are touched."""
    path = os.path.abspath(path)
    parent, base = os.path.split(path)
    if not os.path.isdir(parent):
        return
    olds, tmps = [], []
    for name in os.listdir(parent):
        kind = _leftover(name, base)
        if kind == "old":
            olds.append(name)
        elif kind == "tmp" and not _alive(name.split(".tmp-", 1)[1]):
            tmps.append(name)
    if olds and not os.path.lexists(path):
        newest = max(olds, key=lambda n: os.path.getmtime(os.path.join(parent, n)))
        os.rename(os.path.join(parent, newest), path)
        fsync_dir(parent)
        olds.remove(newest)
    for name in olds + tmps:
        full = os.path.join(parent, name)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(full)


def recover_for_reading(path: str | os.PathLike) -> None:
    """`recover` before a read, when a crash left `path` missing beside an old copy (and no
    live writer holds it)."""
    path = resolve_output(path)
    parent, base = os.path.split(path)
    if os.path.lexists(path) or not os.path.isdir(parent) or not any(
            _leftover(n, base) == "old" for n in os.listdir(parent)):
        return
    with contextlib.suppress(LockedError):
        with exclusive(path):
            recover(path)


def _temporary(parent: str, base: str, kind: str) -> str:
    return os.path.join(parent, f".{base}.{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def resolve_output(path: str | os.PathLike) -> str:
    """The path to write for output `path`: a symlink's target (the link stays and sees the
    new copy), else the absolute path."""
    path = os.path.abspath(path)
    return os.path.realpath(path) if os.path.islink(path) else path


# ---------------------------------------------------------------------------------------------
# Writers


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, format: str, inputs: Iterable = ()):
    """Yields a temporary directory; on success it replaces `path` (see the module docstring:
    lock, leftovers, ownership, manifest, exchange). On an exception `path` is left as it was.
    `format` names the writer ("ldot_jax.model", "ldot_jax.index"); `inputs` are paths the
    writer reads, which must not lie inside `path`."""
    path = resolve_output(path)
    check_not_inside(path, inputs)
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    with exclusive(path):
        recover(path)
        check_replaceable(path, format)
        tmp = _temporary(parent, base, "tmp")
        os.makedirs(tmp)
        try:
            yield tmp
            pause_point("before_manifest")
            write_manifest(tmp, format)
            _fsync_tree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        pause_point("before_swap")
        if not os.path.lexists(path):
            os.rename(tmp, path)
            fsync_dir(parent)
        elif _exchange(tmp, path):  # path: the new copy; tmp: the old one
            fsync_dir(parent)
            pause_point("after_swap")
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            old = _temporary(parent, base, "old")
            os.rename(path, old)
            fsync_dir(parent)
            pause_point("between_renames")  # `recover` puts `old` back
            os.rename(tmp, path)
            fsync_dir(parent)
            shutil.rmtree(old, ignore_errors=True)


def read_json(path: str | os.PathLike, what: str = "file"):
    """The JSON value in `path`; errors name the file (`what` says what it should be)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e


def _clean_file_leftovers(path: str) -> None:
    parent, base = os.path.split(path)
    for name in os.listdir(parent):
        if _leftover(name, base) == "tmp" and not _alive(name.split(".tmp-", 1)[1]):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(parent, name))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", point: str = "file_before_rename"):
    """Yields a file open on a temporary sibling of `path`; on success it is synced and renamed
    onto `path` (and the directory synced), on any exception removed (`path` is left as it
    was). Dead writers' temporary siblings of `path` are removed first. `point`: the name of
    the crash point between the sync and the rename (see `pause_point`)."""
    path = resolve_output(path)
    parent, base = os.path.split(path)
    _clean_file_leftovers(path)
    tmp = _temporary(parent, base, "tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        pause_point(point)
        os.replace(tmp, path)
        fsync_dir(parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename."""
    with atomic_file(path, "w") as f:
        f.write(text)
