"""Helpers of the reliability tests: directory snapshots, and subprocesses killed with SIGKILL
at a named crash point (`fileutil.pause_point`)."""

import os
import signal
import subprocess
import sys
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


def start_paused(point, args, flag, script, **extra) -> subprocess.Popen:
    """Starts `python -c script args…` and returns once it waits at `point` (`name` or
    `name#K`, see `fileutil.pause_point`), announced by `flag`."""
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)],
                            env=env(LDOT_JAX_PAUSE_AT=point, LDOT_JAX_PAUSE_FILE=str(flag),
                                    **extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not os.path.exists(flag):
        if proc.poll() is not None:
            raise AssertionError(f"the writer ended before {point}: "
                                 + proc.stderr.read().decode()[-3000:])
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"the writer never reached {point}")
        time.sleep(0.05)
    return proc


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def kill_at(point, args, tmp_path, script, **extra) -> None:
    """Runs the script until it reaches `point`, then SIGKILLs it; returns once it is dead."""
    kill(start_paused(point, args, tmp_path / f"paused-{point.replace('#', '-')}", script,
                      **extra))
