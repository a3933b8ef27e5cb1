"""Where training metrics go: stdout (logging), <workdir>/metrics.jsonl and TensorBoard event
files (<workdir>/tensorboard, written with tensorboardX: no TensorFlow needed).

Only process 0 writes; the other processes' writers are silent. On an object store (a
gs:// workdir) metrics.jsonl is rewritten whole at each write (objects cannot be appended to;
the file stays small), and the TensorBoard events are written to a local staging directory
in the cache and uploaded whole at each `flush` (training flushes after every checkpoint save)
and at `close`: tensorboardX's own GCS writer re-uploads its buffer when garbage-collected
and retries for minutes when the store is gone. One JSON line per write:
    {"step": 100, "split": "train", "loss": 1.23, "steps_per_sec": 4.1, ...}
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from typing import Mapping

from ldot_jax.core import fileutil, paths

log = logging.getLogger(__name__)

JSONL = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def _number(value) -> float | int | str:
    if isinstance(value, str):
        return value
    value = float(value)
    return value if math.isfinite(value) else str(value)


def drop_rows_after(path: str, step: int) -> int:
    """Rewrites a metrics.jsonl without its rows past `step` (a run resumed from the
    checkpoint at `step` logs them again); returns how many were dropped. A torn last line (a
    crash mid-write) is dropped too."""
    if not paths.is_file(path):
        return 0
    lines = paths.read_text(path).splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if int(row.get("step", 0)) <= step:
            keep.append(json.dumps(row) + "\n")
    if len(keep) != len(lines):
        fileutil.atomic_write_text(path, "".join(keep))
    return len(lines) - len(keep)


class MetricWriter:
    """resume_step: the step a resumed run continues from (its later rows are dropped)."""

    def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int = 0):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        paths.make_dirs(workdir)
        path = paths.join(workdir, JSONL)
        dropped = drop_rows_after(path, resume_step)
        if dropped:
            log.info("%s: dropped %d row(s) past step %d (they are logged again)", path,
                     dropped, resume_step)
        # Line-buffered append (locally): a resumed run continues the same file.
        self._jsonl = _RemoteLines(path) if paths.is_remote(path) else open(path, "a",
                                                                              buffering=1)
        if tensorboard:
            events = paths.join(workdir, TENSORBOARD)
            self._tb = _RemoteEvents(events) if paths.is_remote(events) else _summary_writer(
                events)

    def write(self, step: int, scalars: Mapping[str, object], split: str = "train",
              echo: bool = True) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "split": split, **{k: _number(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key not in ("step", "split") and isinstance(value, float):
                    self._tb.add_scalar(f"{split}/{key}", value, int(step))
        if echo:
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in row.items() if k not in ("step", "split"))
            log.info("[%s] step %d: %s", split, step, text)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _summary_writer(directory: str):
    from tensorboardX import SummaryWriter
    return SummaryWriter(directory)


class _RemoteEvents:
    """TensorBoard events for an object-store directory: tensorboardX writes a local staging
    directory (in the cache, this writer's own), whose files are uploaded whole to
    `directory` at each flush and at close; close then removes the staging. Each writer
    starts its own events file (tensorboardX names it by time and host), so a resumed run
    adds a file and never rewrites a published one. What a killed run wrote after its last
    flush stays in its staging directory, unpublished."""

    def __init__(self, directory: str):
        self.directory = directory
        self.staging = tempfile.mkdtemp(prefix="tensorboard-", dir=paths.cache_dir("events"))
        self._tb = _summary_writer(self.staging)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._tb.add_scalar(tag, value, step)

    def _publish(self) -> None:
        for name in sorted(os.listdir(self.staging)):
            paths.upload(os.path.join(self.staging, name), paths.join(self.directory, name))

    def flush(self) -> None:
        self._tb.flush()
        self._publish()

    def close(self) -> None:
        self._tb.close()
        self._publish()
        shutil.rmtree(self.staging)


class _RemoteLines:
    """metrics.jsonl on an object store: the file's lines, uploaded whole at each write."""

    def __init__(self, path: str):
        self.path = path
        self.text = paths.read_text(path) if paths.is_file(path) else ""

    def write(self, line: str) -> None:
        self.text += line
        fileutil.atomic_write_text(self.path, self.text)

    def close(self) -> None:
        pass


def read_jsonl(workdir: str, split: str | None = None) -> list[dict]:
    """The rows of <workdir>/metrics.jsonl (optionally of one split)."""
    path = paths.join(workdir, JSONL)
    rows = []
    with paths.open_file(path) as f:
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e})") from None
            if split is None or row.get("split") == split:
                rows.append(row)
    return rows
