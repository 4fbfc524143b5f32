"""The one inference worker: requests queue into one thread, which forms batches and answers them.

A request's samples (``nnctl.use.inputs._Group`` objects, decoded and checked before they queue) wait
in a bounded queue. The worker takes the first waiting request, then keeps taking whole requests for up
to ``max_wait`` seconds or until ``max_batch`` samples (it waits only while more requests are on their
way: read or decoded by the app, ``coming``; a lone request is answered at once), runs ONE forward pass over all of them under
``torch.inference_mode()`` (``Predictor.forward``: the recorded preprocessing, the model in eval mode, so
BatchNorm and Dropout answer a sample the same in any batch), and hands each request its slice
(``Predictor.deliver``, with the request's own top-k). A request of more than ``max_batch`` samples is
answered alone, ``max_batch`` samples a pass. A full queue refuses at once (``QueueFull``: the app's 503);
a request whose client stopped waiting (timed out) is skipped; a model that raises answers that batch's
requests with the error and the worker goes on. Before the first request, one warm-up batch of zeros of
the recorded input shape runs (``ready`` is set after it).

The answers reach the event loop through ``loop.call_soon_threadsafe``; the worker never blocks it.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field

import torch

from nnctl.use.inputs import _Group
from nnctl.use.predict import Predictor, batches

from nnctl.serving.metrics import Metrics


class QueueFull(Exception):
    """The queue holds max_queue requests already: try again later."""


class InferenceFailed(Exception):
    """The model raised on a batch (one line: its type and message)."""


@dataclass(eq=False)
class Job:
    """One request's samples waiting for the worker; ``future`` is set (None, or an exception) when answered."""

    groups: list[_Group]
    top_k: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    n: int = 0
    queued_at: float = field(default_factory=time.perf_counter)
    abandoned: bool = False  # the client stopped waiting (timeout): skipped if not yet started

    def __post_init__(self):
        self.n = sum(g.n for g in self.groups)


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # cancelled: the client timed out or left
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class Batcher:
    """The worker thread and its queue (see the module docstring)."""

    def __init__(self, predictor: Predictor, max_batch: int, max_wait: float, max_queue: int, metrics: Metrics):
        self.predictor = predictor
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_queue = max_queue
        self.metrics = metrics
        self.ready = threading.Event()
        self.failure: str | None = None  # the warm-up's error, if it failed (never ready then)
        self.batches = 0
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._coming = 0  # requests the app is reading or decoding: worth waiting for
        self._thread = threading.Thread(target=self._run, name="nnctl-serve-inference", daemon=True)

    # --- the event loop's side ---------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def coming(self, change: int) -> None:
        """A request starts being read (+1), or is queued or refused (-1): the worker waits for more only
        while some are coming."""
        with self._cond:
            self._coming += change
            self._cond.notify()

    def submit(self, groups: list[_Group], top_k: int) -> Job:
        """Queue a request (called on the event loop); QueueFull when max_queue requests wait already."""
        loop = asyncio.get_running_loop()
        job = Job(groups, top_k, loop.create_future(), loop)
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is stopping")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting already (--max-queue {self.max_queue})")
            self._queue.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify()
        return job

    def stop(self, timeout: float = 30.0) -> None:
        """Answer what is queued, then end the worker (bounded by ``timeout`` seconds)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- the worker's side -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._warm_up()
        except Exception as exc:  # a model that cannot run at all: /ready says why, and never turns ready
            self.failure = f"the warm-up batch failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            self._refuse_all(InferenceFailed(self.failure))
            return
        self.ready.set()
        while True:
            jobs = self._collect()
            if jobs is None:
                return
            self._answer(jobs)

    def _warm_up(self) -> None:
        shape = list(self.predictor.pre.input_shape or [])
        if not shape:
            return  # a plain module without a recorded input shape: nothing to warm up with
        x = _Group("warm-up", torch.zeros([self.max_batch, *shape]))
        with torch.inference_mode():
            self.predictor.forward([(x, 0, x.n)])

    def _collect(self) -> list[Job] | None:
        """The next batch: whole requests, up to max_batch samples, waiting at most max_wait for more after
        the first; None when stopping with nothing left."""
        with self._cond:
            first = None
            while first is None:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return None
                first = self._pop()
            jobs, size = [first], first.n
            deadline = time.perf_counter() + self.max_wait
            while size < self.max_batch:
                if not self._queue:
                    left = deadline - time.perf_counter()
                    if left <= 0 or self._stopping or self._coming <= 0:
                        break
                    self._cond.wait(left)
                    continue
                if size + self._queue[0].n > self.max_batch:
                    break
                job = self._pop()
                if job is not None:
                    jobs.append(job)
                    size += job.n
            self.metrics.queue_depth.set(len(self._queue))
            return jobs

    def _pop(self) -> Job | None:
        job = self._queue.popleft()
        return None if job.abandoned else job

    def _answer(self, jobs: list[Job]) -> None:
        started = time.perf_counter()
        for job in jobs:
            self.metrics.queue_wait.observe(started - job.queued_at)
        try:
            with torch.inference_mode():
                if len(jobs) == 1 and jobs[0].n > self.max_batch:  # one large request: max_batch a pass
                    for pieces in batches(jobs[0].groups, self.max_batch):
                        self._pass(pieces, [(jobs[0], len(pieces))])
                else:
                    pieces = [(g, 0, g.n) for job in jobs for g in job.groups]
                    self._pass(pieces, [(job, len(job.groups)) for job in jobs])
            error = None
        except Exception as exc:  # the model's own failure on this batch: these requests get it, the worker goes on
            error = InferenceFailed(f"the model failed on this batch: {type(exc).__name__}: "
                                    f"{' '.join(str(exc).split())[:300]}")
        for job in jobs:
            job.loop.call_soon_threadsafe(_settle, job.future, error)

    def _pass(self, pieces: list, owners: list[tuple[Job, int]]) -> None:
        """One forward pass over pieces, delivered to their owners (each job with its count of pieces)."""
        out = self.predictor.forward(pieces)
        self.batches += 1
        self.metrics.batch_size.observe(len(out))
        at, row = 0, 0
        for job, count in owners:
            mine = pieces[at:at + count]
            rows = sum(b - a for _, a, b in mine)
            self.predictor.deliver(mine, out[row:row + rows], job.top_k)
            at += count
            row += rows

    def _refuse_all(self, error: BaseException) -> None:
        with self._cond:
            jobs, self._queue = list(self._queue), collections.deque()
            self._stopping = True
        for job in jobs:
            job.loop.call_soon_threadsafe(_settle, job.future, error)
