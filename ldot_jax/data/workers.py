"""An ordered parallel map over worker subprocesses, for CPU-bound record generation.

Why not `multiprocessing`: "fork" is unsafe once JAX has started its threads, and "spawn" /
"forkserver" re-run the caller's `__main__` in every worker, which hangs scripts that lack an
`if __name__ == "__main__"` guard. Workers here are fresh `python -m ldot_jax.data.workers`
processes that import only the function's module; jobs go in and results come back as pickles
over pipes, and results are yielded in job order.
"""

from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys
from typing import Any, Callable, Iterator, Sequence



def _resolve(name: str) -> Callable:
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def ordered_map(function: str, jobs: Sequence[Any], workers: int = 0) -> Iterator[Any]:
    """Yields `f(job)` for each job, in order, computed by `workers` subprocesses.

    `function` is "package.module:name" (a top-level function, importable by the workers);
    jobs and results must pickle. workers 0 = one per CPU; 1 = in this process.
    """
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    if workers <= 1:
        f = _resolve(function)
        yield from (f(job) for job in jobs)
        return
    procs = []
    try:
        for w in range(workers):
            proc = subprocess.Popen([sys.executable, "-m", "ldot_jax.data.workers"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            # Worker w takes jobs w, w + workers, …; reading round-robin restores the order.
            pickle.dump((function, list(jobs[w::workers])), proc.stdin)
            proc.stdin.close()
            procs.append(proc)
        for i in range(len(jobs)):
            proc = procs[i % workers]
            try:
                ok, value = pickle.load(proc.stdout)
            except EOFError:
                raise RuntimeError(f"worker {i % workers} running {function} died (exit code "
                                   f"{proc.wait()}); see its error output above") from None
            if not ok:
                raise RuntimeError(f"{function} failed on job {i}:\n{value}")
            yield value
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()


def _worker() -> None:
    import traceback
    function, jobs = pickle.load(sys.stdin.buffer)
    # Results own the real stdout; anything a library prints goes to stderr instead.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    f = _resolve(function)
    for job in jobs:
        try:
            result = (True, f(job))
        except Exception:  # the parent re-raises with the traceback text
            result = (False, traceback.format_exc())
        pickle.dump(result, out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()
        if not result[0]:
            return


if __name__ == "__main__":
    _worker()
