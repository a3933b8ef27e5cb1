"""Atomic directory writes: build in a temporary sibling, then rename into place."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from typing import Callable


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, replaceable: Callable[[str], bool] = lambda p: False):
    """Yields a temporary directory next to `path`; on success it replaces `path`.

    On any exception the temporary directory is removed and `path` is left as it was. An
    existing `path` is replaced only if it is an empty directory or `replaceable(path)` says it
    is one of ours; anything else is an error (never delete a user's unrelated data). The old
    one is moved aside to `.NAME.old-*` and deleted only after the new one is in place: after a
    crash between the two renames, the previous version is still there under that name.
    """
    path = os.path.abspath(path)
    if os.path.lexists(path) and not (
            os.path.isdir(path) and (not os.listdir(path) or replaceable(path))):
        raise FileExistsError(f"refusing to replace {path}: it exists and is not a directory "
                              f"this operation wrote (choose another output path)")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{token}")
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.lexists(path):
        old = os.path.join(parent, f".{os.path.basename(path)}.old-{token}")
        os.rename(path, old)
    os.rename(tmp, path)
    if old is not None:
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


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w"):
    """Yields a file open on a temporary sibling of `path`; on success it is synced and renamed
    onto `path`, on any exception removed (`path` is left as it was)."""
    path = os.path.abspath(path)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename."""
    with atomic_file(path, "w") as f:
        f.write(text)
