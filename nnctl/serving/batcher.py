"""The one inference worker: requests queue into one thread, which forms batches and answers them.

A request's samples (``nnctl.use.inputs._Group`` objects, decoded and checked before they queue) wait
in a bounded queue. Once a request waits, the worker waits up to ``max_wait`` seconds for ``max_batch``
samples (only while more requests are on their way: read or decoded by the app, ``coming``; a lone
request is answered at once), takes the waiting requests whole up to ``max_batch`` samples, runs ONE
forward pass over all of them under
``torch.inference_mode()`` (``Predictor.forward``: the recorded preprocessing, the model in eval mode, so
BatchNorm and Dropout answer a sample the same in any batch), and hands each request its slice
(``Predictor.deliver``, with the request's own top-k). A request of more than ``max_batch`` samples is
answered alone, ``max_batch`` samples a pass. A full queue refuses at once (``QueueFull``: the app's 503);
a request whose client stopped waiting (timed out) is skipped; a model that raises answers that batch's
requests with the error and the worker goes on. Before the first request, one warm-up batch of zeros of
the recorded input shape runs (``ready`` is set after it).

The answers reach the event loop through ``loop.call_soon_threadsafe``, once a batch; the worker never
blocks it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
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
    """One request for the worker, made on the event loop before its inputs are read (``Job.here``);
    ``groups`` (its samples, decoded and checked) and ``top_k`` are set when it is queued (``submit``, from
    any thread); ``future`` is settled (None, or an exception) when it is answered or refused."""

    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    groups: list[_Group] = field(default_factory=list)
    top_k: int = 1
    n: int = 0
    queued_at: float = 0.0
    abandoned: bool = False  # the client stopped waiting (timeout, or the drain): skipped if not yet started

    @classmethod
    def here(cls) -> "Job":
        loop = asyncio.get_running_loop()
        return cls(loop.create_future(), loop)


def _settle(futures: list[asyncio.Future], error: BaseException | None) -> None:
    for future in futures:
        if future.done():  # cancelled: the client timed out or left
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


def refuse(job: Job, error: BaseException) -> None:
    """Answer a job with an error, from any thread (its inputs could not be used, the queue is full)."""
    _settle_all([job], error)


def _settle_all(jobs: list[Job], error: BaseException | None) -> None:
    """Answer the jobs on their event loops: one wake-up of a loop for all of its jobs, not one a job. A job
    abandoned meanwhile (its client's deadline, or the drain's, passed during the pass) needs no answer; an
    event loop closed meanwhile (the server stopped while this pass ran) has nobody waiting on it."""
    for loop, mine in itertools.groupby(jobs, key=lambda job: job.loop):
        futures = [job.future for job in mine if not job.abandoned]
        if futures:
            with contextlib.suppress(RuntimeError):  # "Event loop is closed"
                loop.call_soon_threadsafe(_settle, futures, error)


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
        self._queued = 0  # the samples of the queued requests
        self._thread = threading.Thread(target=self._run, name="nnctl-serve-inference", daemon=True)

    # --- the event loop's side ---------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def coming(self, change: int) -> None:
        """A request starts being read (+1), or is refused before it queues (-1): the worker waits for more
        only while some are coming (and is woken when none are left)."""
        with self._cond:
            self._coming += change
            if self._coming <= 0:
                self._cond.notify()

    def submit(self, job: Job, groups: list[_Group], top_k: int) -> None:
        """Queue a request that was coming (from any thread; queued or refused, it is no longer coming);
        QueueFull when max_queue requests wait already. The worker is woken only when this gives it something
        to do: a first request, a full batch, or nothing more on its way (not once a request)."""
        job.groups, job.top_k, job.n = groups, top_k, sum(g.n for g in groups)
        job.queued_at = time.perf_counter()
        with self._cond:
            self._coming -= 1
            if self._stopping or len(self._queue) >= self.max_queue:
                if self._coming <= 0:
                    self._cond.notify()
                raise QueueFull("the server is stopping" if self._stopping else
                                f"{len(self._queue)} requests are waiting already (--max-queue {self.max_queue})")
            self._queue.append(job)
            self._queued += job.n
            self.metrics.queue_depth.set(len(self._queue))
            if len(self._queue) == 1 or self._queued >= self.max_batch or self._coming <= 0:
                self._cond.notify()

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
        """The next batch: whole requests, up to max_batch samples (a larger request alone), waiting at most
        max_wait after the first for more while more are coming; None when stopping with nothing left."""
        with self._cond:
            while True:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return None
                deadline = time.perf_counter() + self.max_wait
                while self._queued < self.max_batch and self._coming > 0 and not self._stopping:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                jobs, size = [], 0
                while self._queue and (not jobs or size + self._queue[0].n <= self.max_batch):
                    job = self._queue.popleft()
                    self._queued -= job.n
                    if not job.abandoned:  # its client stopped waiting (timed out, or the server is draining)
                        jobs.append(job)
                        size += job.n
                self.metrics.queue_depth.set(len(self._queue))
                if jobs:
                    return jobs

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
        _settle_all(jobs, error)

    def _pass(self, pieces: list, owners: list[tuple[Job, int]]) -> None:
        """One forward pass over pieces, delivered to their owners (each job with its count of pieces): the
        consecutive jobs that ask for the same top-k in one ``deliver`` (their answers in one softmax and
        top-k, as ``nnctl.predict`` answers a batch)."""
        out = self.predictor.forward(pieces)
        self.batches += 1
        self.metrics.batch_size.observe(len(out))
        at, row = 0, 0
        for top_k, run in itertools.groupby(owners, key=lambda owner: owner[0].top_k):
            count = sum(c for _, c in run)
            mine = pieces[at:at + count]
            rows = sum(b - a for _, a, b in mine)
            self.predictor.deliver(mine, out[row:row + rows], top_k)
            at += count
            row += rows

    def _refuse_all(self, error: BaseException) -> None:
        with self._cond:
            jobs, self._queue, self._queued = list(self._queue), collections.deque(), 0
            self._stopping = True
        _settle_all(jobs, error)
