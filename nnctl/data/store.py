"""The decoded data in memory (a store), datasets over it, the batch order and the batches."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor

from nnctl.data import record as P
from nnctl.data.decode import decode_image
from nnctl.errors import NnctlError, UsageError
from nnctl.seeds import derive
from nnctl.tasks import Task

# --- the store: every source read into tensors ----------------------------------------

@dataclass
class _Store:
    """All samples of a source: raw x (or image files), targets y, and the split."""

    y: Tensor                       # (N,) int64 labels or (N, k) float32 targets
    sample_shape: tuple[int, ...]
    x: Tensor | None = None         # (N, *sample_shape) uint8 or float32; None: stream `files`
    scale: float | None = None      # uint8 x is divided by this (255, or 16 for digits)
    num_classes: int | None = None
    test_start: int | None = None   # samples from here on are the dataset's own test split
    files: list[str] | None = None  # image_folder, streamed
    names: list[str] | None = None  # image_folder's files, kept when decoded or cached: what its fingerprint hashes
    image_mode: str = "RGB"
    image_size: tuple[int, int] | None = None  # (H, W) to resize to
    class_names: list[str] | None = None  # index = class id (the preprocessing record's `classes`)
    notes: list[str] = field(default_factory=list)  # what reading skipped, for the run to print
    mapped: bool = False  # x is memory-mapped from the decoded cache (data.cache): indexing it reads pages
    parts: list[tuple[str, str, int]] = field(default_factory=list)  # image_folder's (val_root|test_root, path, start)

    def __len__(self) -> int:
        return len(self.y)

    def nbytes(self) -> int:
        per = math.prod(self.sample_shape) * (self.x.element_size() if self.x is not None else 1)
        return len(self) * per + self.y.numel() * self.y.element_size()

    def fingerprint(self, root: str | None = None) -> dict:
        """What the split is derived from (the record's ``data``): count, per class, a digest of the samples in
        order (image files: paths under ``root`` and labels; else bytes); val_root / test_root's under its key."""
        key, folder, start = self.parts[0] if self.parts else (None, None, len(self))
        out = self._fingerprint(0, start, root)
        return {**out, key: self._fingerprint(start, len(self), folder)} if key else out

    def _fingerprint(self, start: int, end: int, root: str | None) -> dict:
        h = hashlib.sha256()  # faster than blake2b here (SHA extensions): 150 MB in 0.15 s
        x, y = (self.x[start:end] if self.x is not None else None), self.y[start:end]
        if (names := self.names if self.names is not None else self.files) is not None:  # however they are held
            for f, label in zip(names[start:end], y.tolist()):
                name = os.path.relpath(f, root) if root else f
                h.update(os.fsencode(name) + b"\0" + str(label).encode() + b"\n")
        else:
            for t in (x, y):
                if t is not None:
                    t = t.detach().cpu().contiguous()
                    h.update(str((t.dtype, tuple(t.shape))).encode())
                    h.update(t.view(torch.uint8).reshape(-1).numpy() if t.numel() else b"")
        out = {"samples": len(y), "digest": h.hexdigest()[:32], **({"by": "files"} if names is not None else {})}
        if y.dtype == torch.int64 and y.dim() == 1 and len(y):
            out["per_class"] = torch.bincount(y.clamp_min(0)).tolist()
        return out

    def sample(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.x[i] if self.x is not None else decode_image(self.files[i], self.image_mode, self.image_size)
        return x, self.y[i]


class _StoreDataset(torch.utils.data.Dataset):
    def __init__(self, store: _Store):
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> "tuple[Tensor, Tensor] | _Failed":
        try:
            return self.store.sample(i)
        except UsageError as exc:  # a bad file: a value, so that no worker traceback crosses processes
            return _Failed(" ".join(str(exc).split()))


class _Failed:
    """A sample that could not be read; the DataLoader hands it back in place of a batch."""

    def __init__(self, message: str):
        self.message = message


def _collate(items: list) -> Any:
    for item in items:
        if isinstance(item, _Failed):
            return item
    batch = torch.utils.data.default_collate(items)
    if isinstance(items, _ToAugment):  # a training batch of augmented streamed data: scaled and augmented here
        x, y = batch
        return items.finish(x), y
    return batch


class _StepIndices(list):
    """One training batch's sample indices, tagged with its (epoch, step) for the worker's augmentation."""

    def __init__(self, indices: list[int], epoch: int, step: int):
        super().__init__(indices)
        self.epoch, self.step = epoch, step


class _ToAugment(list):
    """A training batch's samples, with what the worker needs to scale and augment them after collation."""

    def __init__(self, items: list, augment, scale: float | None, seed: int, epoch: int, step: int, rank: int):
        super().__init__(items)
        self.augment, self.scale, self.key = augment, scale, (seed, epoch, step, rank)

    def finish(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            x = x.to(torch.float32).div_(self.scale)
        elif x.dtype != torch.float32:
            x = x.to(torch.float32)
        return self.augment(x, self.augment.generator(*self.key))


class _AugmentedDataset(_StoreDataset):
    """A streamed training split with data.augment: batches tagged by the sampler are augmented in the
    DataLoader's workers (see _collate), with the generator of their (seed, epoch, step, rank)."""

    def __init__(self, store: _Store, augment, seed: int, rank: int):
        super().__init__(store)
        self.augment, self.seed, self.rank = augment, seed, rank

    def __getitems__(self, indices: list[int]) -> list:
        items = [self[i] for i in indices]
        if isinstance(indices, _StepIndices):
            return _ToAugment(items, self.augment, self.store.scale, self.seed, indices.epoch, indices.step,
                              self.rank)
        return items


WORKER_TERM_GRACE_S = 60


def _worker_term(signum, frame) -> None:
    """SIGTERM in a worker: die WORKER_TERM_GRACE_S seconds later, unless the main process shuts the
    worker down first (a group SIGTERM reaches the main process too, which stops at the next step
    boundary, saves and closes its workers)."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(WORKER_TERM_GRACE_S)


def _worker_init(worker_id: int) -> None:
    """DataLoader workers leave stops to the main process: Ctrl-C (sent to the whole process group) is
    ignored, and SIGTERM ends a worker only after a grace period (see _worker_term). A worker that
    died at once would fail the main process's next batch, or its SIGCHLD handler in the middle of
    a step, where no consistent state can be saved."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C pending since the fork is dropped here
    signal.signal(signal.SIGTERM, _worker_term)
    threading.excepthook = _worker_thread_error
    if _STOPS_MASKABLE:  # blocked from before the fork (_HeldStops): a pending SIGTERM arrives now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)


def _worker_thread_error(args) -> None:
    """A worker's background thread that lost its connection (the main process stopped reading while
    the worker was handing it a batch's shared memory) ends quietly: the main process says why it
    stopped. Any other error is printed as Python does."""
    if issubclass(args.exc_type, BrokenPipeError | ConnectionResetError | EOFError):
        return
    threading.__excepthook__(args)


_STOPS = {signal.SIGINT, signal.SIGTERM}
_STOPS_MASKABLE = hasattr(signal, "pthread_sigmask")


class _HeldStops:
    """SIGINT and SIGTERM noted instead of handled while a DataLoader of ours starts its workers or
    hands over a batch, then raised again at once, to the handlers this process had (_iterate).

    Why: a handler that raises (KeyboardInterrupt, the Interrupted of a run's start) raised the
    exception wherever Python happened to be: inside the DataLoader half built (workers nobody shut
    down: the exit waited out their 60 s grace), or in a ``__del__`` or a fork hook, where Python
    prints "Exception ignored" and drops it (the stop lost: the run went on and finished). Held, it is
    raised between batches, in _iterate. A second signal of a kind already held is not held: the
    handlers are put back and both are raised at once (a second Ctrl-C still stops a stuck worker).

    ``fork``: the signals are also blocked in this thread, so a worker forked meanwhile (it inherits
    the mask, and this process's handlers) gets one only once _worker_init has set its own handlers.
    Outside the main thread (where Python cannot set handlers) only the blocking is done.
    """

    def __init__(self, fork: bool):
        self.fork = fork and _STOPS_MASKABLE
        self.held: list[int] = []
        self.handlers: dict[int, Any] = {}
        self.mask = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in _STOPS:
                self.handlers[sig] = signal.signal(sig, self._hold)
        if self.fork:
            self.mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
        return self

    def _hold(self, signum, frame) -> None:
        again = signum in self.held
        self.held.append(signum)
        if again:
            self._release()

    def _release(self) -> None:
        for sig, handler in self.handlers.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self.handlers = {}
        held, self.held = self.held, []
        for sig in held:  # each handler runs before raise_signal returns
            signal.raise_signal(sig)

    def __exit__(self, *exc) -> bool:
        if self.mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
            self.mask = None
        self._release()
        return False


def _loader(dataset, **kwargs) -> torch.utils.data.DataLoader:
    """A DataLoader that draws no global random numbers (its own generator) and returns bad samples
    as values (see _Failed)."""
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    workers = kwargs.get("num_workers", 0)
    return torch.utils.data.DataLoader(dataset, collate_fn=_collate,
                                       worker_init_fn=_worker_init if workers else None, **kwargs)


class LoaderStopped(NnctlError):
    """A DataLoader worker process died (a signal, the out-of-memory killer): exit 1, not the data's fault."""


def _iterate(loader) -> Iterator[Any]:
    """A DataLoader's batches; a sample that could not be read is a one-line UsageError naming the file,
    and a worker process that died (a signal, out of memory) a one-line NnctlError, never a traceback."""
    ours = bool(getattr(loader, "num_workers", 0)) and loader.worker_init_fn is _worker_init
    it = None
    try:
        with _HeldStops(fork=True) if ours else contextlib.nullcontext():
            it = iter(loader)
        yield from _batches_of(it, ours)
    finally:  # however it ends (a signal, an error): its workers stop now, not at the interpreter's exit
        if not getattr(loader, "persistent_workers", False) and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def _batches_of(it, hold: bool) -> Iterator[Any]:
    """The batches of a DataLoader iterator, its failures as nnctl errors (see _iterate); ``hold``:
    a stop signal while waiting for a batch is raised between batches (_HeldStops)."""
    while True:
        try:
            with _HeldStops(fork=False) if hold else contextlib.nullcontext():
                batch = next(it)
        except StopIteration:
            return
        except NnctlError:  # a stop signal (Interrupted) while waiting for a batch
            raise
        except RuntimeError as exc:
            text = " ".join(str(exc).split())
            if "DataLoader worker" in text:
                raise LoaderStopped(f"a DataLoader worker process stopped ({text[:200]}); this is not a fault "
                                 "of the data: a signal or the out-of-memory killer ended it") from None
            raise
        if isinstance(batch, _Failed):
            raise UsageError(batch.message)
        yield batch


# --- batches ---------------------------------------------------------------------------

@dataclass
class _Order:
    """Which samples each batch of an epoch holds, for one rank (see ``Batches``)."""

    indices: Tensor
    batch_size: int
    shuffle: bool
    seed: int
    rank: int = 0
    world_size: int = 1

    def __len__(self) -> int:
        n, b = len(self.indices), self.batch_size
        count = -(-n // b)
        if self.world_size > 1 and n % b and n % b < self.world_size:
            count -= 1  # too few samples left to give every rank one
        return count

    def order(self, epoch: int) -> Tensor:
        if not self.shuffle:
            return self.indices
        g = torch.Generator().manual_seed(derive(self.seed, epoch))
        return self.indices[torch.randperm(len(self.indices), generator=g)]

    def batches(self, epoch: int, start_step: int, device: torch.device | None = None) -> Iterator[Tensor]:
        order = self.order(epoch)
        if device is not None:
            order = order.to(device)  # one copy an epoch, then every batch is a slice
        b, ws = self.batch_size, self.world_size
        for step in range(start_step, len(self)):
            chunk = order[step * b:(step + 1) * b]
            yield torch.tensor_split(chunk, ws)[self.rank] if ws > 1 else chunk


class _EpochBatchSampler:
    """Hands a DataLoader the index lists of one epoch, from a start step on."""

    def __init__(self, order: _Order):
        self.order = order
        self.epoch = 0
        self.start_step = 0
        self.tag = False  # data.augment: tag each index list with its (epoch, step)

    def __iter__(self) -> Iterator[list[int]]:
        for step, idx in enumerate(self.order.batches(self.epoch, self.start_step), self.start_step):
            yield _StepIndices(idx.tolist(), self.epoch, step) if self.tag else idx.tolist()

    def __len__(self) -> int:
        return max(0, len(self.order) - self.start_step)


class Batches:
    """The batches of one split, for one process.

    Training batches are shuffled by a permutation that depends only on
    ``(seed, epoch)``, so ``epoch(e, start_step=k)`` yields exactly batches
    k, k+1, ... of ``epoch(e)``. Validation batches come in order. The last
    partial batch is kept.

    Several processes (``world_size > 1``): every rank draws the same permutation;
    each global batch of ``batch_size`` samples is cut into ``world_size``
    consecutive slices and rank r takes slice r, so a rank's batches hold
    ``batch_size // world_size`` samples and the ranks together see each global
    batch exactly once. The last partial global batch is split as evenly as
    possible (``torch.tensor_split``), and dropped if it has fewer samples than
    ranks so that every rank runs the same number of steps. Validation is split
    differently: each rank evaluates one contiguous block of the validation
    samples (sum the metrics over ranks).

    Iterate one epoch at a time: a streamed split shares one DataLoader (and its
    persistent workers) between epochs; starting a new epoch abandons the last.

    ``target: input`` with noise: ``x`` gets ``noise * N(0, 1)`` from a generator
    seeded by (seed, epoch, step, rank) for training, by (seed, step, rank) for
    validation; ``y`` is the clean ``x``.

    ``augment`` (data.augment, training splits only; see nnctl.augment): each batch is
    augmented per sample on [0, 1] images, before normalisation, with the generator of
    (seed, epoch, step, rank): on the device for preloaded data, in the DataLoader's
    workers for streamed data. ``epoch(..., augment=False)`` gives the plain batches.
    """

    def __init__(self, store: _Store, indices: Tensor, batch_size: int, device: torch.device, *,
                 shuffle: bool, seed: int, mean: list[float] | None, std: list[float] | None,
                 target_input: bool, noise: float, preloaded: bool, num_workers: int = 0,
                 rank: int = 0, world_size: int = 1, device_x: Tensor | None = None,
                 device_y: Tensor | None = None, augment=None):
        self.store = store
        self.augment = augment if augment else None
        self.indices = indices
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.seed = seed
        # validation is sharded through `indices` already
        self._order = _Order(indices, batch_size, shuffle, seed, rank, world_size if shuffle else 1)
        self.target_input = target_input
        self.noise = float(noise)
        self.preloaded = preloaded
        self.rank = rank
        self.world_size = self._order.world_size
        view = (1, -1) + (1,) * (len(store.sample_shape) - 1)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=device).view(view) if mean else None
        self._std = torch.tensor(std, dtype=torch.float32, device=device).view(view) if std else None
        self._x, self._y = device_x, device_y
        self._loader = None
        if not preloaded:
            # the sampler must not refer back to this object: a reference cycle would leave the
            # persistent workers to be shut down by the garbage collector, slowly
            self._sampler = _EpochBatchSampler(self._order)
            # A DataLoader iterator draws its workers' base seed when it is made: from this generator,
            # never from the global RNG, whose stream belongs to dropout (exact resume). The workers
            # draw no random numbers (decoding is deterministic; noise is added in _finish).
            self._generator = torch.Generator()
            dataset = _StoreDataset(store) if self.augment is None else \
                _AugmentedDataset(store, self.augment, seed, rank)
            self._loader = _loader(
                dataset, batch_sampler=self._sampler, num_workers=num_workers,
                pin_memory=device.type == "cuda", persistent_workers=num_workers > 0, generator=self._generator)
        self._len = len(self._order)
        self.num_samples = sum(map(len, self._order.batches(0, 0))) if self.world_size > 1 else len(indices)

    def __len__(self) -> int:
        return self._len

    def close(self) -> None:
        """Shut this split's DataLoader workers down now (persistent workers otherwise live until the
        garbage collector or the interpreter's exit; at exit, multiprocessing SIGTERMs and joins them,
        and a worker waits out its grace period first; see _worker_term). The next epoch starts new
        workers."""
        it = getattr(self._loader, "_iterator", None)
        if it is not None:
            it._shutdown_workers()
            self._loader._iterator = None

    def global_size(self, step: int) -> int:
        """Samples in batch ``step`` summed over every rank (the global batch; smaller for the last)."""
        return max(0, min(self.batch_size, len(self.indices) - step * self.batch_size))

    def order(self, epoch: int) -> Tensor:
        """This split's sample indices in the order of ``epoch`` (all ranks)."""
        return self._order.order(epoch)

    def epoch(self, epoch: int, start_step: int = 0, *, augment: bool = True) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(x, y)`` on the device for batches ``start_step``, ... of ``epoch``
        (augmented when this split has a data.augment pipeline, unless ``augment=False``)."""
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        augment = augment and self.augment is not None
        if self.preloaded:
            for step, idx in enumerate(self._order.batches(epoch, start_step, self.device), start_step):
                yield self._finish(self._x[idx], self._y[idx], epoch, step, augment)
        else:
            self._sampler.epoch, self._sampler.start_step = epoch, start_step
            self._sampler.tag = augment  # the workers augment (see _collate)
            if start_step >= self._len:
                return
            nb = self.device.type == "cuda"
            self._generator.manual_seed(derive(self.seed, epoch, 0x10AD))
            for step, (x, y) in enumerate(_iterate(self._loader), start_step):
                yield self._finish(x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb),
                                   epoch, step)

    def _finish(self, x: Tensor, y: Tensor, epoch: int, step: int,
                augment: bool = False) -> tuple[Tensor, Tensor]:
        """Scale, (preloaded, augment) augment, normalise and (target: input) copy and noise one batch,
        on the device."""
        if x.dtype == torch.uint8:
            x = x.to(torch.float32).div_(self.store.scale)
        elif x.dtype != torch.float32:
            x = x.to(torch.float32)
        if augment:  # streamed batches come augmented from the workers, as float32
            x = self.augment(x, self.augment.generator(self.seed, epoch, step, self.rank))
        if self._mean is not None:
            x = (x - self._mean) / self._std
        if not self.target_input:
            return x, y
        y = x
        if self.noise > 0:
            seed = derive(self.seed, epoch, step, self.rank) if self.shuffle else derive(self.seed, 7, step, self.rank)
            g = torch.Generator(device=x.device).manual_seed(seed)
            x = x + self.noise * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        return x, y


@dataclass
class DataBundle:
    """What the trainer needs to know about its data."""

    train: Batches
    val: Batches | None
    input_shape: tuple[int, ...]
    num_classes: int | None
    task: Task                      # the run's task (nnctl.tasks), as the data confirmed it
    mean: list[float] | None
    std: list[float] | None
    description: str
    preloaded: bool
    preprocessing: P.Preprocessing | None = None  # the record every checkpoint of this data carries
    # what reading skipped or decided, one line each, for the run to print (as "note: ...")
    notes: list[str] = field(default_factory=list)
    target_shape: tuple[int, ...] | None = None  # one sample's regression target; None for class labels
    label_range: tuple[int, int] | None = None  # (min, max) class label over both splits
    where: str = ""  # the data, for messages: "tensors file d.pt", "image_folder data/pets", "digits"

    def close(self) -> None:
        """Shut both splits' DataLoader workers down (see Batches.close); the data stays usable."""
        for split in (self.train, self.val):
            if split is not None:
                split.close()
