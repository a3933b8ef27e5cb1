"""Helpers of the reliability tests: directory snapshots, and subprocesses killed with SIGKILL
at a named crash point (`fileutil.pause_point`)."""

import os
import signal
import subprocess
import sys
import tempfile
import time


def snapshot(root, skip=()) -> dict:
    """{relative path: bytes} of every file under root (small trees only), leaving out the
    top-level entries named in `skip`."""
    out = {}
    for directory, dirs, files in os.walk(root):
        if directory == os.fspath(root):
            dirs[:] = [d for d in dirs if d not in skip]
            files = [f for f in files if f not in skip]
        for name in files:
            full = os.path.join(directory, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = f.read()
    return out


def env(**extra) -> dict:
    """The environment of a writer subprocess: one CPU device, plus `extra`."""
    out = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out.update(JAX_PLATFORMS="cpu", **extra)
    return out


def start_paused(point, args, flag, script, cwd=None, **extra) -> subprocess.Popen:
    """Starts `python -c script args…` (in `cwd`) and returns once it waits at `point` (`name`
    or `name#K`, see `fileutil.pause_point`), announced by `flag`. Its output goes to
    a temporary file outside the test's directory (a pipe nobody reads would fill up and stall
    a chatty writer), removed by `kill`."""
    fd, log_path = tempfile.mkstemp(prefix="ldot-writer-", suffix=".log")
    log = os.fdopen(fd, "wb")
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=cwd,
                            env=env(LDOT_JAX_PAUSE_AT=point, LDOT_JAX_PAUSE_FILE=str(flag),
                                    **extra),
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    proc.log_path = log_path
    deadline = time.time() + 300
    while not os.path.exists(flag):
        if proc.poll() is not None:
            raise AssertionError(f"the writer ended before {point}: " + _tail(log_path))
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"the writer never reached {point}: " + _tail(log_path))
        time.sleep(0.05)
    return proc


def _tail(path, size=3000) -> str:
    with open(path, "rb") as f:
        return f.read().decode(errors="replace")[-size:]


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    if getattr(proc, "log_path", None) and os.path.exists(proc.log_path):
        os.remove(proc.log_path)
    assert proc.returncode == -signal.SIGKILL


def kill_at(point, args, tmp_path, script, cwd=None, **extra) -> None:
    """Runs the script until it reaches `point`, then SIGKILLs it; returns once it is dead."""
    kill(start_paused(point, args, tmp_path / f"paused-{point.replace('#', '-')}", script, cwd,
                      **extra))
