"""Dynamic batching for a service: the queries of requests that arrive together go through the
encoder as one fixed-shape batch.

    batcher = QueryBatcher(retriever, max_batch=32, max_wait_ms=5)
    future = batcher.submit(Search("text_to_image", ["a red circle"], k=5))
    results = future.result()            # retriever.Results
    batcher.close()                      # finishes what was submitted, then stops

One worker thread owns the devices. It takes the oldest job and gathers those that arrive
within `max_wait_ms` after it (the same direction, up to `max_batch` queries in all), encodes
their queries in one call — padded to a power of two ≤ max_batch, and text to a length bucket,
so the encoder compiles one program per (batch size, bucket), all of them in `warmup` — and
then searches: jobs asking the same (k, rerank_top, where) in one call to the index and the
re-ranker (whose fixed-shape pair batches they then share), the others each with their own.
Other work (updates: `Call`) runs on the same thread between batches, so a search never sees
half an update. A full queue raises QueueFull at submit (a service answers 503).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import queue
import threading
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from ldot_jax.retrieval import encode

DIRECTIONS = {"text_to_image": "text", "image_to_text": "image"}


class QueueFull(RuntimeError):
    """The batcher holds max_queue jobs already."""


class Closed(RuntimeError):
    """The batcher was closed: it takes no new jobs."""


@dataclasses.dataclass
class Search:
    """direction "text_to_image" (queries: captions) or "image_to_text" (per-image inputs)."""

    direction: str
    queries: Sequence
    k: int = 10
    rerank_top: int | None = None
    where: Any = None


@dataclasses.dataclass
class Embed:
    """side "text" (queries: captions) or "image" (per-image inputs) → f32[Q, D]."""

    side: str
    queries: Sequence


@dataclasses.dataclass
class Call:
    """Any other work on the device thread (updates): fn() → its result."""

    fn: Callable[[], Any]


@dataclasses.dataclass
class _Job:
    work: Any
    future: concurrent.futures.Future
    queued: float

    @property
    def side(self) -> str | None:
        if isinstance(self.work, Search):
            return DIRECTIONS[self.work.direction]
        if isinstance(self.work, Embed):
            return self.work.side
        return None

    @property
    def size(self) -> int:
        return len(self.work.queries) if self.side else 0


class Observer:
    """What the batcher reports (a service's metrics): each encoder batch's size in queries
    and each job's wait in the queue."""

    def batch(self, size: int) -> None:
        pass

    def waited(self, seconds: float) -> None:
        pass


class QueryBatcher:
    """See the module docstring. max_batch: queries per encoder call (and per request);
    max_wait_ms: how long the oldest job waits for company; max_queue: jobs waiting at
    most."""

    def __init__(self, retriever, max_batch: int = 32, max_wait_ms: float = 5.0,
                 max_queue: int = 256, observer: Observer | None = None):
        if max_batch < 1 or max_batch & (max_batch - 1):
            raise ValueError(f"max_batch={max_batch}: expected a power of two (the encoder's "
                             f"batch shapes)")
        if max_wait_ms < 0 or max_queue < 1:
            raise ValueError(f"max_wait_ms={max_wait_ms}, max_queue={max_queue}: expected "
                             f"≥ 0 and ≥ 1")
        self.retriever, self.max_batch = retriever, int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000
        self.max_queue = int(max_queue)
        self.observer = observer or Observer()
        self._queue: queue.Queue = queue.Queue()
        self._held: collections.deque = collections.deque()
        self._closed = False
        self._current: list = []  # the jobs the worker is serving (failed if it errs)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="ldot-batcher", daemon=True)
        self._thread.start()

    # -- the callers' side ------------------------------------------------------------------

    def submit(self, work) -> concurrent.futures.Future:
        """Queues a Search, Embed or Call; its future gets the result or the exception."""
        if isinstance(work, Search) and work.direction not in DIRECTIONS:
            raise ValueError(f"direction {work.direction!r}: expected one of "
                             f"{sorted(DIRECTIONS)}")
        if isinstance(work, Embed) and work.side not in ("text", "image"):
            raise ValueError(f"side {work.side!r}: expected 'text' or 'image'")
        if isinstance(work, (Search, Embed)) and not 1 <= len(work.queries) <= self.max_batch:
            raise ValueError(f"{len(work.queries)} queries: expected 1 to {self.max_batch}")
        with self._lock:
            if self._closed or not self._thread.is_alive():
                raise Closed("the batcher is closed")
            if self._queue.qsize() >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are waiting already")
            job = _Job(work, concurrent.futures.Future(), time.perf_counter())
            self._queue.put(job)
        return job.future

    @property
    def depth(self) -> int:
        """Jobs waiting (not yet taken by the worker)."""
        return self._queue.qsize() + len(self._held)

    def close(self, timeout: float | None = None) -> None:
        """Takes no more jobs, finishes every job already submitted, stops the worker."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
        self._thread.join(timeout)

    def warmup(self) -> int:
        """Compiles every (batch size, bucket) the worker can use; returns how many programs
        the encoder holds after it."""
        r = self.retriever
        # The image tower too: for image queries, and for items added while serving.
        r.warmup([1 << i for i in range(self.max_batch.bit_length())],
                 images=r.indexes.get("text") is not None or r.indexes.get("image") is not None)
        return encode.encode_batch._cache_size()

    # -- the worker -------------------------------------------------------------------------

    def _next(self, timeout: float | None):
        if self._held:
            return self._held.popleft()
        try:
            if timeout is not None and timeout <= 0:
                return self._queue.get_nowait()
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return _EMPTY

    def _run(self) -> None:
        while True:
            try:
                if not self._step():
                    return
            except BaseException as e:  # never die: fail what was being done, go on
                for job in self._current:
                    if not job.future.done():
                        job.future.set_exception(e)
            finally:
                self._current = []

    def _step(self) -> bool:
        """Serves the next job (and those that join its batch); False once closed."""
        job = self._next(None)
        if job is None:  # closed, and everything before it is done
            return False
        self._current = [job]
        if job.side is None:
            self._run_call(job)
            return True
        group, size = [job], job.size
        deadline = time.perf_counter() + self.max_wait
        while size < self.max_batch:
            nxt = self._next(deadline - time.perf_counter())
            if nxt is _EMPTY:
                break
            # The end of the queue, work of the other side or an update, or too many
            # queries: the next batch starts with it.
            if nxt is None or nxt.side != job.side or size + nxt.size > self.max_batch:
                self._held.append(nxt)
                break
            group.append(nxt)
            self._current.append(nxt)
            size += nxt.size
        self._run_group(group, job.side)
        return True

    def _run_call(self, job: _Job) -> None:
        self.observer.waited(time.perf_counter() - job.queued)
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.work.fn())
        except BaseException as e:  # the caller gets it; the worker goes on
            job.future.set_exception(e)

    def _run_group(self, group: list[_Job], side: str) -> None:
        now = time.perf_counter()
        for job in group:
            self.observer.waited(now - job.queued)
        group = [job for job in group if job.future.set_running_or_notify_cancel()]
        if group:
            self._serve(group, side)

    def _serve(self, group: list[_Job], side: str) -> None:
        """Encodes the group's queries in one call and answers each job from its rows; if the
        encoding fails, each job alone (one bad job must not fail the others)."""
        try:
            vectors, inputs, encode_ms = self._encode(group, side)
        except Exception as e:
            if len(group) == 1:
                group[0].future.set_exception(e)
            else:
                for job in group:
                    self._serve([job], side)
            return
        self.observer.batch(sum(job.size for job in group))
        rows, start = {}, 0
        for job in group:
            rows[id(job)] = (start, start + job.size)
            start += job.size
        searches: dict[str, list[_Job]] = {}
        for job in group:
            if isinstance(job.work, Embed):
                a, b = rows[id(job)]
                job.future.set_result(vectors[a:b])
            else:  # jobs asking the same search go to the index and the re-ranker together
                searches.setdefault(_search_key(job), []).append(job)
        for jobs in searches.values():
            self._search(jobs, rows, vectors, inputs, encode_ms)

    def _search(self, jobs: list[_Job], rows: dict, vectors, inputs, encode_ms: float) -> None:
        """One search (and re-ranking) of several jobs' queries, split back per job."""
        take = np.concatenate([np.arange(*rows[id(job)]) for job in jobs])
        w = jobs[0].work
        try:
            results = self.retriever.search_encoded(
                w.direction, vectors[take], jax.tree.map(lambda x: x[take], inputs), w.k,
                w.rerank_top, w.where, encode_ms)
        except Exception as e:
            if len(jobs) == 1:
                jobs[0].future.set_exception(e)
            else:  # each alone, so that the error goes to the job that caused it
                for job in jobs:
                    self._search([job], rows, vectors, inputs, encode_ms)
            return
        start = 0
        for job in jobs:
            stop = start + job.size
            job.future.set_result(dataclasses.replace(
                results, ids=results.ids[start:stop], scores=results.scores[start:stop],
                names=results.names[start:stop]))
            start = stop

    def _encode(self, group: list[_Job], side: str):
        """(vectors f32[n, D], the padded inputs, ms) of every query of the group, in order."""
        r = self.retriever
        queries = [q for job in group for q in job.work.queries]
        t0 = time.perf_counter()
        if side == "text":
            inputs, count = r.text_inputs(queries), len(queries)
        else:
            inputs, count = r.image_inputs(queries)
        vectors = r._encode(inputs, side, count)
        return vectors, inputs, 1000 * (time.perf_counter() - t0)


_EMPTY = object()


def _search_key(job: _Job):
    """Jobs with equal keys are searched together: the same direction, k, rerank_top and
    where. A `where` that is not plain JSON (arrays, odd keys) gets a key of its own."""
    w = job.work
    try:
        return json.dumps([w.direction, w.k, w.rerank_top, w.where], sort_keys=True)
    except (TypeError, ValueError):
        return ("alone", id(job))
