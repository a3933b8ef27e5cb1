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

On an object store (`gs://…`, see core/paths.py), where nothing can be renamed, the same rules
hold with a commit marker instead of a rename: the lock is a lease object (`.NAME.lock`,
renewed while held, taken over once expired); `atomic_file` uploads a finished local file in
one request (an object appears whole or not at all); `atomic_directory` uploads the new copy
under `NAME/.ldot-gen-TOKEN/` and then its manifest, `NAME/ldot_manifest.json`, naming that
generation: replacing that one object is the commit. Readers follow the manifest (through
`local_directory`, which keeps a verified local copy in the cache), so they see the old or the
new copy; generations no manifest names are removed by the next writer.

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
import tempfile
import threading
import time
import uuid
from typing import Iterable

from ldot_jax.core import paths

MANIFEST = "ldot_manifest.json"
MANIFEST_VERSION = 1
PAUSE_AT, PAUSE_FILE = "LDOT_JAX_PAUSE_AT", "LDOT_JAX_PAUSE_FILE"
log = logging.getLogger(__name__)
GENERATION_PREFIX = ".ldot-gen-"  # an object store directory's copies (one per write)
LEASE_ENV = "LDOT_JAX_LEASE_S"  # how long an object store lock lives unless renewed
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


_HELD: dict[str, object] = {}


def _holder() -> str:
    return (f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%dT%H:%M:%S')} ({' '.join(sys.argv)[:200]})")


def lock_path(path: str | os.PathLike) -> str:
    """The lock of output `path`: `.NAME.lock` beside it."""
    parent, name = paths.split(path)
    return paths.join(parent, f".{name}.lock")


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, what: str = "output", wait: float = 0):
    """Holds the lock of `path` (`.NAME.lock` beside it) for the block; a second writer gets
    `LockedError` naming the holder, after waiting up to `wait` seconds for it to finish (0:
    not at all). Re-entrant within a process. Local paths: an advisory lock (flock), released
    by the kernel when the holder dies; object stores: a lease (see `_lease`)."""
    path = paths.absolute(path)
    if path in _HELD:
        yield
        return
    if not paths.is_remote(path):
        with _flock(path, what, wait):
            yield
        return
    # A lease outlives a holder that died (a preempted VM) by up to its life: a restarted
    # writer waits that long before it says the output is taken.
    with _lease(path, what, max(wait, lease_seconds() + 5)):
        yield


def _waited(what: str, path: str, holder: str, deadline: float, told: bool) -> bool:
    """Raises LockedError once `deadline` passed; otherwise logs (once) and sleeps a little."""
    if time.monotonic() >= deadline:
        raise LockedError(f"{what} {path} is being written by {holder}; wait for it to finish "
                          f"(or stop it)") from None
    if not told:
        log.warning("%s %s is being written by %s: waiting for it", what, path, holder)
    time.sleep(min(1.0, max(0.01, deadline - time.monotonic())))
    return True


@contextlib.contextmanager
def _flock(path: str, what: str, wait: float):
    import fcntl
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    lock = lock_path(path)
    deadline, told = time.monotonic() + wait, False
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 1000, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            told = _waited(what, path, holder, deadline, told)
            continue
        try:  # the file may have been unlinked by its previous holder after we opened it
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
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
            os.unlink(lock)
        os.close(fd)


def lease_seconds() -> float:
    return float(os.environ.get(LEASE_ENV) or 60)


def _read_lease(lock: str) -> dict | None:
    """The lease in object `lock` (None if there is none; an unreadable one counts as
    expired: a lease is written in one upload, so it is never torn by its writer)."""
    try:
        body = json.loads(paths.read_bytes(lock))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"token": "", "holder": "an unreadable lease", "expires": 0}
    return body if isinstance(body, dict) else {"token": "", "holder": "?", "expires": 0}


def _write_lease(lock: str, body: dict, create: bool) -> bool:
    """Writes the lease; with `create`, only if no object is there (a conditional create on
    stores that support it, as GCS does: False when another writer won)."""
    fs, key = paths._fs(lock)
    try:
        with fs.open(key, "xb" if create else "wb") as f:
            f.write(json.dumps(body).encode())
    except FileExistsError:
        return False
    return True


@contextlib.contextmanager
def _lease(path: str, what: str, wait: float):
    """An object store lock: the object `.NAME.lock` holds {token, holder, expires}; its holder
    renews it every third of its life (LDOT_JAX_LEASE_S, default 60 s) from a thread, so a
    holder that died (a preempted VM) loses it within that time and the next writer takes
    over. Taking it is a create-only upload (GCS: ifGenerationMatch=0), then a read-back of
    the token, so of two writers racing for a free lease one wins; an expired lease is
    removed only as the generation that was seen expired (so of two writers taking over the
    same dead lease, the later one cannot remove the earlier one's new lease)."""
    lock = lock_path(path)
    token = uuid.uuid4().hex
    life = lease_seconds()
    deadline, told = time.monotonic() + wait, False

    def body() -> dict:
        return {"token": token, "holder": _holder(), "expires": time.time() + life}

    while True:
        # The generation first: the body read after it is that one or newer, so an expired
        # body is never used to remove a newer lease.
        seen = paths.generation(lock)
        current = _read_lease(lock)
        if current is not None and float(current.get("expires", 0)) > time.time():
            told = _waited(what, path, str(current.get("holder")), deadline, told)
            continue
        if current is not None:  # expired: its holder died or lost contact
            log.warning("%s %s: taking over the expired lock of %s", what, path,
                        current.get("holder"))
            # Only that expired lease: a writer that took it over meanwhile keeps its own.
            paths.remove_generation(lock, seen)
        if _write_lease(lock, body(), create=True) and (
                _read_lease(lock) or {}).get("token") == token:
            break
    stop = threading.Event()

    def renew():
        while not stop.wait(life / 3):
            if (_read_lease(lock) or {}).get("token") != token:
                log.error("%s %s: its lock %s was taken over (this process was out of contact "
                          "longer than the lease, %.0f s)", what, path, lock, life)
                return
            _write_lease(lock, body(), create=False)

    renewer = threading.Thread(target=renew, name=f"lease {lock}", daemon=True)
    renewer.start()
    _HELD[path] = token
    try:
        yield
    finally:
        del _HELD[path]
        stop.set()
        renewer.join()
        if (_read_lease(lock) or {}).get("token") == token:
            paths.remove(lock)


# ---------------------------------------------------------------------------------------------
# Manifests


def _files(root: str) -> list[str]:
    """Every file under root, relative, sorted (symlinks count as files)."""
    return paths.walk_files(root)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with paths.open_file(path, "rb") as f:
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
    nothing of ours did). A manifest that is not one is an IntegrityError. On an object store
    it also names the generation that holds the files (`generation`)."""
    path = paths.join(directory, MANIFEST)
    try:
        text = paths.read_bytes(path)
    except (FileNotFoundError, IsADirectoryError):
        return None
    except OSError as e:
        raise IntegrityError(f"{path}: unreadable manifest ({e})") from e
    try:
        body = json.loads(text)
    except ValueError as e:
        raise IntegrityError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(body, dict) or not isinstance(body.get("files"), dict) or not isinstance(
            body.get("format"), str):
        raise IntegrityError(f"{path}: not an ldot_jax manifest (expected format and files)")
    generation = body.get("generation")
    if paths.is_remote(directory) and not (
            isinstance(generation, str) and re.fullmatch(rf"{re.escape(GENERATION_PREFIX)}"
                                                         r"[0-9a-z-]+", generation)):
        raise IntegrityError(f"{path}: names no generation of its files (generation="
                             f"{generation!r}); it was not written by this version")
    for name in body["files"]:
        confined(directory, name, path)
    return body


def confined(directory: str | os.PathLike, name: str, where: str = "manifest") -> str:
    """directory/name, refusing a name that leaves the directory (absolute, `..`, a link out)."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in re.split(
            r"[\\/]", name) or paths.is_remote(name):
        raise IntegrityError(f"{where}: file name {name!r} is not inside its directory")
    if paths.is_remote(directory):  # no links on object stores
        return paths.join(directory, name)
    root = os.path.realpath(directory)
    full = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, full]) != root:
        raise IntegrityError(f"{where}: file name {name!r} leads outside {directory}")
    return os.path.join(directory, name)


def _content_root(directory: str, manifest: dict) -> str:
    """Where a directory's files are: itself, or on an object store its manifest's
    generation."""
    generation = manifest.get("generation")
    return paths.join(directory, generation) if paths.is_remote(directory) else directory


def verify(directory: str | os.PathLike, format: str | None = None, full: bool = False,
           required: bool = False) -> dict | None:
    """Checks `directory` against its manifest: every file present with its size (and its
    SHA-256 with `full`); `format` must match. Returns the manifest (None if there is none
    and not `required`). Errors name the file."""
    directory = paths.absolute(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        if required:
            raise IntegrityError(f"{directory}: {MANIFEST} is missing")
        return None
    if format is not None and manifest["format"] != format:
        raise IntegrityError(f"{directory} holds a {manifest['format']!r}, not a {format!r}")
    root = _content_root(directory, manifest)
    for name, entry in manifest["files"].items():
        path = confined(root, name, paths.join(directory, MANIFEST))
        if not paths.is_file(path):
            raise IntegrityError(f"{path} is missing (listed in {MANIFEST})")
        size = paths.size(path)
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
    only its manifest's files; otherwise OwnershipError naming what is in the way. On an object
    store a directory's own generations (`.ldot-gen-*/`) count as its files."""
    if paths.is_remote(path):
        if paths.is_file(path):
            raise OwnershipError(f"refusing to replace {path}: it is an object, not a "
                                 f"directory this writer made (choose another output path)")
    elif not os.path.lexists(path):
        return
    elif not os.path.isdir(path):
        raise OwnershipError(f"refusing to replace {path}: it is a file, not a directory this "
                             f"writer made (choose another output path)")
    present = [n for n in _files(path) if not (
        paths.is_remote(path) and n.startswith(GENERATION_PREFIX))]
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
    listed = set() if paths.is_remote(path) else set(manifest["files"])  # remote: generation
    unexpected = sorted(set(present) - listed - {MANIFEST})
    if unexpected:
        raise OwnershipError(f"refusing to replace {path}: besides the {format} it holds "
                             f"files it did not write: {_describe(unexpected)} (move them "
                             f"away, or choose another output path)")


def check_not_inside(output: str | os.PathLike, inputs: Iterable) -> None:
    """ValueError if an input is the output or lies inside it (replacing the output would
    delete it)."""
    remote = paths.is_remote(output)
    out = paths.absolute(output) if remote else os.path.realpath(output)
    for item in inputs:
        if item is None or paths.is_remote(item) != remote:
            continue
        full = paths.absolute(item) if remote else os.path.realpath(item)
        if full == out or (full.startswith(out + "/") if remote else
                           os.path.commonpath([out, full]) == out):
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
    our own hidden siblings (`.NAME.tmp-*`, `.NAME.old-*`) are touched. On an object store:
    the directory's generations that its manifest does not name (call with its lock held)."""
    path = paths.absolute(path)
    if paths.is_remote(path):
        _drop_generations(path)
        return
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


def _drop_generations(path: str) -> None:
    """Removes the generations under object store directory `path` that its manifest does not
    name (what interrupted or replaced writes left)."""
    try:
        manifest = read_manifest(path)
    except IntegrityError:
        manifest = None
    keep = (manifest or {}).get("generation")
    for name in paths.list_dir(path):
        if name.startswith(GENERATION_PREFIX) and name != keep:
            paths.remove_tree(paths.join(path, name))


def recover_for_reading(path: str | os.PathLike) -> None:
    """`recover` before a read, when a crash left `path` missing beside an old copy (and no
    live writer holds it). Nothing to do on an object store (readers follow the manifest)."""
    if paths.is_remote(path):
        return
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
    new copy), else the absolute path (URLs as they are)."""
    path = paths.absolute(path)
    if paths.is_remote(path):
        return path
    return os.path.realpath(path) if os.path.islink(path) else path


# ---------------------------------------------------------------------------------------------
# Writers


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, format: str, inputs: Iterable = ()):
    """Yields a temporary directory; on success it replaces `path` (see the module docstring:
    lock, leftovers, ownership, manifest, exchange). On an exception `path` is left as it was.
    `format` names the writer ("ldot_jax.model", "ldot_jax.index"); `inputs` are paths the
    writer reads, which must not lie inside `path`. On an object store the temporary
    directory is local (in the cache) and is uploaded as a new generation (module
    docstring)."""
    path = resolve_output(path)
    check_not_inside(path, inputs)
    if paths.is_remote(path):
        with _remote_directory(path, format) as tmp:
            yield tmp
        return
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


@contextlib.contextmanager
def _remote_directory(path: str, format: str):
    """atomic_directory on an object store: the new copy is built locally, uploaded under
    `path/.ldot-gen-TOKEN/`, and committed by uploading the manifest naming it."""
    with exclusive(path):
        recover(path)
        check_replaceable(path, format)
        old = (read_manifest(path) or {}).get("generation")
        tmp = tempfile.mkdtemp(prefix=".staging-", dir=paths.cache_dir("staging"))
        try:
            yield tmp
            pause_point("before_manifest")
            generation = f"{GENERATION_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-" \
                         f"{uuid.uuid4().hex[:8]}"
            body = write_manifest(tmp, format)
            for name in body["files"]:
                paths.upload(os.path.join(tmp, name), paths.join(path, generation, name))
            body["generation"] = generation
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump(body, f, indent=1)
            pause_point("before_swap")
            paths.upload(os.path.join(tmp, MANIFEST), paths.join(path, MANIFEST))  # the commit
            pause_point("after_swap")
            if old and old != generation:
                paths.remove_tree(paths.join(path, old))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def local_directory(path: str | os.PathLike, format: str | None = None) -> str:
    """A local directory holding the files of directory `path`, to read: `path` itself when
    local (after `recover_for_reading`); for an object store, a copy in the cache of the
    generation its manifest names, downloaded once and checked against the manifest (sizes
    and SHA-256), with the manifest beside the files. FileNotFoundError if nothing is there;
    IntegrityError if a remote directory has no manifest (ldot_jax did not write it, or its
    first write never finished) or is not a `format`."""
    path = paths.absolute(path)
    if not paths.is_remote(path):
        recover_for_reading(path)
        return resolve_output(path)
    for attempt in range(3):  # a writer may replace the generation while it is copied
        manifest = read_manifest(path)
        if manifest is None:
            if not paths.is_dir(path):
                raise FileNotFoundError(f"{path} does not exist")
            raise IntegrityError(f"{path}: {MANIFEST} is missing (not written by ldot_jax, or "
                                 f"its first write never finished)")
        if format is not None and manifest["format"] != format:
            raise IntegrityError(f"{path} holds a {manifest['format']!r}, not a {format!r}")
        key = hashlib.sha256(path.encode()).hexdigest()[:16]
        home = paths.cache_dir("copies", f"{key}-{paths.split(path)[1]}")
        copy = os.path.join(home, manifest["generation"])
        if os.path.isfile(os.path.join(copy, MANIFEST)):
            return copy
        try:
            _download_generation(path, manifest, home, copy)
        except FileNotFoundError:
            if attempt == 2:
                raise
            continue
        for name in os.listdir(home):  # older generations of the same directory
            if name != manifest["generation"] and name.startswith(GENERATION_PREFIX):
                shutil.rmtree(os.path.join(home, name), ignore_errors=True)
        return copy
    raise AssertionError("unreachable")


def _download_generation(path: str, manifest: dict, home: str, copy: str) -> None:
    staging = tempfile.mkdtemp(prefix=".partial-", dir=home)
    try:
        root = _content_root(path, manifest)
        for name, entry in manifest["files"].items():
            local = os.path.join(staging, name)
            os.makedirs(os.path.dirname(local), exist_ok=True)
            paths.download(confined(root, name), local)
            seen = {"size": os.path.getsize(local), "sha256": _sha256(local)}
            if seen != {"size": entry.get("size"), "sha256": entry.get("sha256")}:
                raise IntegrityError(
                    f"{paths.join(root, name)} differs from what {paths.join(path, MANIFEST)} "
                    f"recorded (damaged or modified): {seen['size']} bytes, SHA-256 "
                    f"{seen['sha256'][:12]}…; recorded {entry.get('size')} bytes, "
                    f"{str(entry.get('sha256'))[:12]}…")
        with open(os.path.join(staging, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        try:
            os.rename(staging, copy)
        except OSError:  # another process made the same copy meanwhile
            if not os.path.isfile(os.path.join(copy, MANIFEST)):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_json(path: str | os.PathLike, what: str = "file"):
    """The JSON value in `path`; errors name the file (`what` says what it should be)."""
    path = os.fspath(path)
    if not paths.is_file(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return json.loads(paths.read_bytes(path))
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
    the crash point between the sync and the rename (see `pause_point`). On an object store
    the temporary file is local (in the cache) and is uploaded in one request (the object
    appears whole or not at all)."""
    path = resolve_output(path)
    if paths.is_remote(path):
        with _remote_file(path, mode, point) as f:
            yield f
        return
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


@contextlib.contextmanager
def _remote_file(path: str, mode: str, point: str):
    fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=paths.cache_dir("staging"))
    os.close(fd)
    try:
        with open(tmp, mode) as f:
            yield f
        pause_point(point)
        paths.upload(tmp, path)
    finally:
        os.remove(tmp)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Appends `text` to file `path` durably (fsync). An object cannot be appended to: there
    the whole file is rewritten (atomically), so keep such files small (logs, not data)."""
    if not paths.is_remote(path):
        with open(path, "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return
    old = paths.read_text(path) if paths.is_file(path) else ""
    atomic_write_text(path, old + text)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename."""
    with atomic_file(path, "w") as f:
        f.write(text)
