"""Filling the cache: under the key's lock, decode a folder in parallel into a temporary file, fsync,
rename, then write the header; ``attach`` gives a run's store its cached samples (nnctl.data.cache)."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import json
import math
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from nnctl import locks
from nnctl.data.cache import (
    entry,  # entry.CHUNK_BYTES read at fill time (tests shrink it)
)
from nnctl.data.cache.entry import (
    BATCH,
    FORMAT,
    FREE_MARGIN,
    PARALLEL_FROM,
    _decoder_version,
    _Invalid,
    _open_valid,
    _paths,
    _prod,
    _Unusable,
    _why,
    cache_dir,
    settle,
    stamp_files,
)
from nnctl.data.decode import RESIZE
from nnctl.data.store import _iterate, _loader, _StoreDataset
from nnctl.errors import NnctlError
from nnctl.files import atomic_write

_PROGRESS: contextvars.ContextVar[Callable[[int, int], None] | None] = contextvars.ContextVar(
    "nnctl_cache_progress", default=None)


@contextlib.contextmanager
def progress_to(callback: Callable[[int, int], None] | None) -> Iterator[None]:
    """Every cache fill in this scope reports ``callback(files_done, files_total)``."""
    token = _PROGRESS.set(callback)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


# --- locking --------------------------------------------------------------------------------

@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """The entry's lock (``nnctl.locks``: an exclusive flock), held by this process; waits for another holder.

    Raises _Unusable when path is not a lockable regular file (a folder, a socket, no permission).
    """
    lock = locks.FileLock(path)
    try:
        lock.acquire()
    except locks.NotRegular:
        raise _Unusable(_why(path)) from None
    except OSError as exc:
        raise _Unusable(_why(path, exc)) from None
    try:
        yield
    finally:
        lock.release()


def _try_lock(path: Path) -> locks.FileLock | None:
    """The entry's lock, taken when free; None when another process holds it.

    No lock file: a lock not held (nobody can hold a lock file that does not exist). Raises
    _Unusable when path is not a lockable regular file (a folder, a socket, no permission).
    """
    lock = locks.FileLock(path, create=False)
    try:
        return lock if lock.acquire(blocking=False) else None
    except FileNotFoundError:
        return lock
    except locks.NotRegular:
        raise _Unusable(_why(path)) from None
    except OSError as exc:
        raise _Unusable(_why(path, exc)) from None


# --- building -------------------------------------------------------------------------------

def _remove(*paths: Path) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def _temporaries(directory: Path, key: str) -> list[Path]:
    """The key's partial files: its data being filled, its header being written (files.atomic_write)."""
    prefixes = (f"{key}.u8.tmp-", f".{key}.json.tmp-")
    try:
        return [directory / n for n in os.listdir(directory) if n.startswith(prefixes)]
    except OSError:
        return []


class _NoRoom(Exception):
    pass


def _build(directory: Path, key: str, store, root: str, workers: int) -> None:
    """Decode the store's files into a new entry (the caller holds the key's lock)."""


    data, header, _ = _paths(directory, key)
    _remove(header, data, *_temporaries(directory, key))  # a corrupt entry, a killed writer's leftovers
    n = len(store)
    shape = (n, *store.sample_shape)
    nbytes = _prod(shape)
    free = shutil.disk_usage(directory).free
    if free < nbytes + FREE_MARGIN:
        raise _NoRoom(f"{_bytes(nbytes, up=True)} needed and {_bytes(FREE_MARGIN)} kept free, "
                      f"{_bytes(free, up=False)} free in {directory}")
    tmp = directory / f"{key}.u8.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    progress = _PROGRESS.get()
    chunks: list[str] = []
    h = hashlib.sha256()
    in_chunk = 0
    done = 0
    t0 = time.perf_counter()
    if progress is not None:
        progress(0, n)
    try:
        with open(tmp, "wb") as fh:
            loader = _loader(_StoreDataset(store), batch_size=BATCH, num_workers=workers)
            for x, _ in _iterate(loader):
                buf = memoryview(np.ascontiguousarray(x.numpy())).cast("B")
                fh.write(buf)
                pos = 0
                while pos < len(buf):  # sha256 of every entry.CHUNK_BYTES of the data
                    take = min(entry.CHUNK_BYTES - in_chunk, len(buf) - pos)
                    h.update(buf[pos:pos + take])
                    pos += take
                    in_chunk += take
                    if in_chunk == entry.CHUNK_BYTES:
                        chunks.append(h.hexdigest())
                        h, in_chunk = hashlib.sha256(), 0
                done += len(x)
                if progress is not None:
                    progress(done, n)
            if in_chunk:
                chunks.append(h.hexdigest())
            fh.flush()
            os.fsync(fh.fileno())
        if done != n:
            raise NnctlError(f"decoding {root} gave {done} images, expected {n}")
        os.replace(tmp, data)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(directory)
    st = os.stat(data)
    head = {
        "format": FORMAT, "key": key, "dtype": "uint8", "shape": list(shape), "root": root, "images": n,
        "classes": len(store.class_names or []), "mode": store.image_mode, "size": list(store.image_size),
        "resize": RESIZE, "decoder": _decoder_version(), "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "decode_seconds": round(time.perf_counter() - t0, 3), "chunk_bytes": entry.CHUNK_BYTES, "chunks": chunks,
        "stamp": {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino},
    }
    try:
        atomic_write(header, lambda f: f.write(json.dumps(head, indent=1).encode()))
    except BaseException:
        _remove(data)
        raise


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _workers(n: int) -> int:
    if n < PARALLEL_FROM:
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, 16))


def _bytes(n: int, up: bool | None = None) -> str:
    """n bytes in the largest unit it fills, to one decimal: rounded up (``up=True``: a need, never
    shown as less than it is), down (``up=False``: what is free, never shown as more) or to nearest."""
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            tenths = n * 10 / div
            tenths = math.ceil(tenths) if up else math.floor(tenths) if up is False else round(tenths)
            return f"{tenths / 10:,.1f} {unit}"
    return f"{n} byte" if n == 1 else f"{n} bytes"


def _short(path: Path) -> str:
    home = os.path.expanduser("~")
    text = str(path)
    return "~" + text[len(home):] if home not in ("", "/") and text.startswith(home + os.sep) else text


def attach(store, root: str | os.PathLike, measure_size: Callable[[], tuple[int, int]] | None = None) -> bool:
    """Point an image_folder store (``files`` set, ``x`` None) at its cache entry, building it if needed.

    On success ``store.x`` is the memory-mapped uint8 tensor (N, C, H, W), ``store.files`` None,
    and ``store.image_size`` / ``sample_shape`` come from the entry (for a store made without a
    target size, ``measure_size()`` gives it when the entry has to be built). Returns False, with
    a note, when the cache cannot be used here (no room, an unwritable folder): the store then
    decodes as without the cache. Corrupt image files raise UsageError naming the file, as
    without the cache.
    """
    directory = cache_dir()
    root = os.path.abspath(os.fspath(root))
    labels = store.y.tolist()
    key, newest_change = stamp_files(root, store.files, labels, store.image_mode, store.image_size)
    data, header, lock = _paths(directory, key)
    what = f"decoded cache {_short(data)}"

    def use(x, head, hit: bool = False, waited: bool = False) -> bool:
        if hit:
            store.notes.append(f"using {what} ({len(store):,} images, {_bytes(_prod(head['shape']))}, made "
                               f"{head.get('created_at', '?')}{' by another process' if waited else ''})")
        store.x = x
        store.files = None
        store.mapped = True
        store.image_size = tuple(int(v) for v in head["shape"][2:])
        store.sample_shape = tuple(int(v) for v in head["shape"][1:])
        return True

    try:
        x, head = _open_valid(directory, key)
        if x is not None and len(x) == len(store):
            return use(x, head, hit=True)
    except _Invalid:
        pass  # decided again under the lock (another process may be rebuilding it right now)
    except OSError:
        pass
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        store.notes.append(f"cannot use the decoded cache folder {_short(directory)} "
                           f"({exc.strerror or exc}): decoding without the cache")
        return False
    try:
        with _locked(lock):
            problem = None
            try:
                x, head = _open_valid(directory, key)
                if x is not None and len(x) != len(store):
                    raise _Invalid(f"it holds {len(x)} images, the folder {len(store)}")
                if x is not None:
                    return use(x, head, hit=True, waited=True)
            except _Invalid as exc:
                problem = str(exc)
            except OSError as exc:
                problem = f"cannot read it: {exc.strerror or exc}"
            if store.image_size is None:
                if measure_size is None:
                    raise ValueError("a store without image_size needs measure_size")
                size = tuple(measure_size())
                store.image_size = size
                store.sample_shape = (store.sample_shape[0], *size)
            settle(newest_change)  # decode after the clock tick of the newest change (entry.settle)
            t0 = time.perf_counter()
            _build(directory, key, store, root, _workers(len(store)))
            took = time.perf_counter() - t0
            x, head = _open_valid(directory, key)
            if x is None:
                raise NnctlError(f"{what}: written but not found afterwards")
    except _NoRoom as exc:
        store.notes.append(f"not enough room for the decoded cache ({exc}): decoding without the cache")
        return False
    except _Unusable as exc:
        store.notes.append(f"cannot use {what} ({exc}): decoding without the cache")
        return False
    except _Invalid as exc:  # just written and already unreadable: a failing disk
        raise NnctlError(f"{what}: unreadable right after it was written ({exc})") from None
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EPERM):
            store.notes.append(f"cannot write the decoded cache in {_short(directory)} ({exc.strerror or exc}): "
                               "decoding without the cache")
        else:  # a folder or other odd file where an entry's file belongs, ...
            culprit = exc.filename2 or exc.filename
            store.notes.append(f"cannot use {what} ({_why(Path(culprit), exc) if culprit else exc}): "
                               "decoding without the cache")
        return False
    if problem is not None:
        store.notes.append(f"{what} was corrupt ({problem}): rebuilt")
    rate = len(store) / took if took > 0 else float("inf")
    store.notes.append(f"decoded {len(store):,} images into {what} ({_bytes(_prod(head['shape']))}) "
                       f"in {took:.1f}s, {rate:,.0f} files/s")
    return use(x, head)
