"""The decoded-image cache: an image folder decoded and resized once, then read at memory speed.

``data.cache: true`` (source ``image_folder`` only; default false, since the cache writes to
disk outside the run folder) keeps every image of the folder, decoded to uint8 and resized
as nnctl decodes it without the cache, in one raw file that later runs and later epochs
memory-map instead of decoding again. The page cache and ``np.memmap`` do the rest, so a
folder larger than memory works too (it is read from disk, not decoded).

Where: ``$NNCTL_CACHE_DIR``, else ``$XDG_CACHE_HOME/nnctl/decoded`` (``~/.cache/nnctl/decoded``).
One entry per key, the sha256 of: the format version, the folder's absolute path, every
file in the store's order with its size, modification time (ns) and class index, the
colour mode, the target size (or "native"), the resize method and the decoder's version.
A file added, removed, renamed or changed (size or mtime) changes the key, so a stale
entry is simply never found; ``nnctl cache clear`` frees it.

An entry is two files:

* ``<key>.u8``: the samples, N x C x H x W uint8, C order, no header (``np.memmap`` or
  ``torch.from_file`` read it directly);
* ``<key>.json``: the header (shape, the folder, counts, when it was made, the sha256 of
  every 16 MiB chunk of the data, and the data file's (size, mtime_ns, inode) when it was
  completed). Its mtime is the entry's "last used" time.

Writing: under an exclusive lock (``nnctl.locks``, an flock) on ``<key>.lock``, the images are decoded in
parallel (DataLoader workers, one per core) into ``<key>.u8.tmp-<pid>-<random>``, which is
fsynced and renamed to ``<key>.u8``; the header is written last (``files.atomic_write``), so
its presence marks a complete entry. Several processes (DDP ranks, two runs at once) all
take the lock in turn: the first builds, the others wait and then use its result. A process
killed mid-fill leaves only a temporary file, removed by the next builder of that key
(which holds the lock, so no live writer owns it) or by ``nnctl cache clear``.

Reading (no lock: a complete header means a complete entry; a rebuild renames new files
into place, so a mapping already open keeps its own copy): the header is parsed and
checked, the data file's size must match, and its chunks are hashed (two threads; sha256
runs at about 1.2 GB/s a core) against the header, in full when the data is at most
``FULL_VERIFY_BYTES`` (2 GiB: ~25 ms for 60 MB), otherwise when its (size, mtime, inode)
changed since it was written, or else a sample of 8 chunks (first, last and 6 spread
between). A corrupt, truncated or unreadable entry is never used: the run prints
``note: decoded cache <file> was corrupt (<why>): rebuilt`` and builds it again.

Decoding is the same function as without the cache (``nnctl.data.decode.decode_image``, the
one decoder: PIL, bilinear resize), so a cache hit gives exactly the batches of a fresh decode.
The key holds ``decode.DECODER`` (nnctl's decoder version and PIL's), so an entry written by
an older decoder is rebuilt, never reused. torchvision's
``decode_image`` + ``resize(antialias=True)`` gives the same pixels on this build but was no
faster for small images on the CPU (3,700 against 4,000 files/s a core for 32x32 and 96x96
PNG/JPEG), so the decoder is unchanged; the speed comes from decoding once, in parallel.

Progress: ``progress_to(callback)`` makes every fill in its scope call ``callback(done,
total)`` (the CLI renders a bar with files/s). Nothing here prints; the run's notes (a
built, rebuilt or unusable cache) are appended to the ``notes`` list the caller passes.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from nnctl import locks
from nnctl.errors import NnctlError, UsageError
from nnctl.data.decode import DECODER, RESIZE
import stat as st_
from nnctl.files import _kind
from nnctl.files import read_input
from concurrent.futures import ThreadPoolExecutor
import numpy as np
import torch
from nnctl.files import open_input
from nnctl.data.store import _iterate, _loader, _StoreDataset
from nnctl.files import atomic_write
import stat

FORMAT = 1
CHUNK_BYTES = 16 << 20
FULL_VERIFY_BYTES = 2 << 30
SAMPLED_CHUNKS = 8
PARALLEL_FROM = 256  # files; fewer are decoded in-process (starting workers costs more)
BATCH = 64

_PROGRESS: contextvars.ContextVar[Callable[[int, int], None] | None] = contextvars.ContextVar(
    "nnctl_cache_progress", default=None)


def cache_dir() -> Path:
    """$NNCTL_CACHE_DIR, else $XDG_CACHE_HOME/nnctl/decoded (~/.cache/nnctl/decoded)."""
    env = os.environ.get("NNCTL_CACHE_DIR")
    if env:
        return Path(os.path.abspath(os.path.expanduser(env)))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nnctl" / "decoded"


@contextlib.contextmanager
def progress_to(callback: Callable[[int, int], None] | None) -> Iterator[None]:
    """Every cache fill in this scope reports ``callback(files_done, files_total)``."""
    token = _PROGRESS.set(callback)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


# --- keys and headers -----------------------------------------------------------------------

def _decoder_version() -> str:
    """nnctl's decoder and PIL's version (``decode.DECODER``): a change of either rebuilds the entry."""
    return DECODER


def make_key(root: str | os.PathLike, files: list[str], labels: list[int], mode: str,
             size: tuple[int, int] | None) -> str:
    """The entry's name: sha256 of everything that decides its pixels (see the module docstring)."""
    h = hashlib.sha256()
    head = {"format": FORMAT, "root": os.path.abspath(os.fspath(root)), "mode": mode,
            "size": list(size) if size else "native", "resize": RESIZE, "decoder": _decoder_version(),
            "count": len(files)}
    h.update(json.dumps(head, sort_keys=True).encode())
    for path, label in zip(files, labels):
        try:
            st = os.stat(path)
        except OSError as exc:
            raise UsageError(f"image {path}: cannot read: {exc.strerror or exc} (it changed while the folder "
                             "was read?)") from None
        h.update(f"\0{path}\0{st.st_size}\0{st.st_mtime_ns}\0{int(label)}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _paths(directory: Path, key: str) -> tuple[Path, Path, Path]:
    return directory / f"{key}.u8", directory / f"{key}.json", directory / f"{key}.lock"


class _Invalid(Exception):
    """Why an entry cannot be used (said in the note)."""


class _Unusable(Exception):
    """A path of the entry cannot be opened, locked or replaced (a folder, a socket, no permission)."""


def _why(path: Path, exc: OSError | None = None) -> str:
    """``<name> is a folder`` / ``<name>: <strerror>``: what is wrong with one of an entry's paths."""


    for look in (os.stat, os.lstat):  # what a link points to; else the (dangling) link itself
        try:
            mode = look(path).st_mode
        except OSError:
            continue
        if not st_.S_ISREG(mode):
            return f"{path.name} is {_kind(mode)}, not a regular file"
        break
    return f"{path.name}: {(exc.strerror or exc) if exc is not None else 'unusable'}"


def _read_header(path: Path) -> dict:

    try:
        raw = read_input(path, "cache header", error=_Invalid, limit=64 << 20)
        head = json.loads(raw.decode("utf-8"))
    except _Invalid:
        raise
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Invalid(f"unreadable header {path.name}: {type(exc).__name__}") from None
    if not isinstance(head, dict):
        raise _Invalid(f"unreadable header {path.name}: not a mapping")
    try:
        shape = [int(v) for v in head["shape"]]
        chunks = head["chunks"]
        ok = (head["format"] == FORMAT and head["dtype"] == "uint8" and len(shape) == 4
              and all(v >= 1 for v in shape) and int(head["chunk_bytes"]) == CHUNK_BYTES
              and isinstance(chunks, list) and all(isinstance(c, str) and len(c) == 64 for c in chunks)
              and len(chunks) == -(-_prod(shape) // CHUNK_BYTES))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise _Invalid(f"header {path.name} is not a valid nnctl cache header (format {FORMAT})")
    return head


def _prod(shape) -> int:
    n = 1
    for v in shape:
        n *= int(v)
    return n


def _hash_chunks(fd: int, nbytes: int, which: list[int]) -> dict[int, str]:
    """sha256 of the chunks `which` of the open file, read with pread in two threads."""

    def one(i: int) -> str:
        off = i * CHUNK_BYTES
        want = min(CHUNK_BYTES, nbytes - off)
        h = hashlib.sha256()
        while want > 0:
            buf = os.pread(fd, min(want, 4 << 20), off)
            if not buf:
                raise _Invalid("the data file is shorter than its header says (truncated)")
            h.update(buf)
            off += len(buf)
            want -= len(buf)
        return h.hexdigest()

    if len(which) <= 1:
        return {i: one(i) for i in which}
    with ThreadPoolExecutor(max_workers=min(2, len(which))) as pool:
        return dict(zip(which, pool.map(one, which)))


def _verify(fd: int, head: dict, full: bool | None = None) -> None:
    """Raise _Invalid unless the open data file matches the header (see the module docstring)."""
    nbytes = _prod(head["shape"])
    st = os.fstat(fd)
    if st.st_size != nbytes:
        raise _Invalid(f"the data file has {st.st_size:,} bytes, its header says {nbytes:,}"
                       + (" (truncated)" if st.st_size < nbytes else ""))
    chunks = head["chunks"]
    stamp = head.get("stamp") or {}
    same = (stamp.get("size") == st.st_size and stamp.get("mtime_ns") == st.st_mtime_ns
            and stamp.get("ino") == st.st_ino)
    if full is None:
        full = nbytes <= FULL_VERIFY_BYTES or not same
    n = len(chunks)
    which = list(range(n)) if full or n <= SAMPLED_CHUNKS else \
        sorted({0, n - 1, *(round(k * (n - 1) / (SAMPLED_CHUNKS - 1)) for k in range(1, SAMPLED_CHUNKS - 1))})
    got = _hash_chunks(fd, nbytes, which)
    for i in which:
        if got[i] != chunks[i]:
            raise _Invalid(f"checksum mismatch in bytes {i * CHUNK_BYTES:,}..{min((i + 1) * CHUNK_BYTES, nbytes):,}")


def _open_valid(directory: Path, key: str):
    """(tensor, header) of a valid entry, (None, None) when there is none, or raise _Invalid."""

    data, header, _ = _paths(directory, key)
    if not header.exists():
        return None, None
    head = _read_header(header)
    if head.get("key") != key:
        raise _Invalid(f"header {header.name} belongs to another entry")

    try:
        fh = open_input(data, "cache data file", error=_Invalid)
    except _Invalid as exc:
        raise _Invalid(f"no usable data file ({' '.join(str(exc).split())})") from None
    with fh:
        try:
            _verify(fh.fileno(), head)
        except OSError as exc:
            raise _Invalid(f"cannot read the data file: {exc.strerror or exc}") from None
        shape = tuple(int(v) for v in head["shape"])
        # copy-on-write mapping: lazily paged in, writable (torch wants that), never written back
        arr = np.memmap(fh, dtype=np.uint8, mode="c", shape=shape)
    try:
        os.utime(header)  # "last used"
    except OSError:
        pass
    return torch.from_numpy(arr), head


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
    if free < nbytes + (64 << 20):
        raise _NoRoom(f"{nbytes / 2**20:,.0f} MiB needed, {free / 2**20:,.0f} MiB free in {directory}")
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
                while pos < len(buf):  # sha256 of every CHUNK_BYTES of the data
                    take = min(CHUNK_BYTES - in_chunk, len(buf) - pos)
                    h.update(buf[pos:pos + take])
                    pos += take
                    in_chunk += take
                    if in_chunk == CHUNK_BYTES:
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
        "decode_seconds": round(time.perf_counter() - t0, 3), "chunk_bytes": CHUNK_BYTES, "chunks": chunks,
        "stamp": {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino},
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


def _bytes(n: int) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:,.1f} {unit}"
    return f"{n} bytes"


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
    key = make_key(root, store.files, labels, store.image_mode, store.image_size)
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


# --- info and clear -------------------------------------------------------------------------

@dataclass
class Entry:
    """One cache entry as ``nnctl cache info`` shows it."""

    key: str
    path: Path                      # the data file
    status: str                     # valid | corrupt: why | incomplete | building | partial (killed writer)
    root: str | None = None
    images: int | None = None
    shape: list[int] | None = None
    bytes: int = 0                  # on disk, data + header + temporaries
    last_used: float | None = None  # the header's mtime (epoch seconds)
    created_at: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"key": self.key, "path": str(self.path), "status": self.status, "root": self.root,
                "images": self.images, "shape": self.shape, "bytes": self.bytes, "last_used": self.last_used,
                "created_at": self.created_at}


def _regular(p: Path) -> bool:

    try:
        return stat.S_ISREG(os.stat(p).st_mode)  # a link to a regular file is one
    except OSError:
        return False


def _size(p: Path) -> int:
    """Bytes of a regular file; 0 for anything else or nothing."""
    return os.stat(p).st_size if _regular(p) else 0


def entries(directory: str | os.PathLike | None = None, verify: bool = False) -> list[Entry]:
    """Every entry of the cache folder, newest use first. ``verify``: hash all of every data file."""
    d = Path(directory) if directory is not None else cache_dir()
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise UsageError(f"cache folder {d}: cannot read: {exc.strerror or exc}") from None
    keys = sorted({k for k in (n.lstrip(".").split(".", 1)[0] for n in names) if len(k) == 64 and k.isalnum()})
    out = []
    for key in keys:
        data, header, lock = _paths(d, key)
        temps = _temporaries(d, key)
        size = _size(data) + _size(header) + sum(_size(t) for t in temps)
        e = Entry(key=key, path=data, status="valid", bytes=size)
        odd = [_why(p) for p in (data, header, lock) if os.path.lexists(p) and not _regular(p)]
        if odd:
            e.status = f"unusable: {'; '.join(odd)}"
        elif header.exists():
            try:
                head = _read_header(header)
                e.root, e.images, e.shape = head.get("root"), head.get("images"), head["shape"]
                e.created_at, e.last_used = head.get("created_at"), os.stat(header).st_mtime

                with open_input(data, "cache data file", error=_Invalid) as fh:
                    if verify:
                        _verify(fh.fileno(), head, full=True)
                    else:
                        nbytes = _prod(head["shape"])
                        if os.fstat(fh.fileno()).st_size != nbytes:
                            raise _Invalid(f"the data file has {os.fstat(fh.fileno()).st_size:,} bytes, its "
                                           f"header says {nbytes:,}")
            except (_Invalid, OSError) as exc:
                e.status = f"corrupt: {' '.join(str(exc).split())}"
        else:
            if locks.is_held(lock, follow_symlinks=True):  # a shared probe: never in a builder's way
                e.status = "building"
            else:
                e.status = "partial (an interrupted fill)" if temps else "incomplete (no header)"
        out.append(e)
    out.sort(key=lambda e: -(e.last_used or 0))
    return out


@dataclass
class Cleared:
    removed: int = 0
    freed: int = 0
    busy: list[str] = field(default_factory=list)  # entries being built by a live process: left alone
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, why): paths that could not be removed
    directory: Path | None = None


def clear(root: str | os.PathLike | None = None, all: bool = False,
          directory: str | os.PathLike | None = None) -> Cleared:
    """Remove every entry (``all``), or those of one image folder (``root``); skip entries being built."""
    if not all and root is None:
        raise UsageError("say which entries to remove: --all, or --root DIR for one image folder's")
    d = Path(directory) if directory is not None else cache_dir()
    result = Cleared(directory=d)
    want = os.path.abspath(os.path.expanduser(os.fspath(root))) if root is not None else None
    for e in entries(d):
        if want is not None and e.root != want:
            continue
        data, header, lock = _paths(d, e.key)
        odd_lock = False
        try:
            taken = _try_lock(lock)
        except _Unusable:  # a folder (or such) where the lock belongs: no process can lock it, so none is building
            taken, odd_lock = locks.FileLock(lock), True
        if taken is None:
            result.busy.append(e.key)
            continue
        left = []
        try:
            temps = _temporaries(d, e.key)
            left = [w for w in (_discard(p) for p in (header, data, *temps)) if w]
            if taken.held or odd_lock:  # we hold it; a waiter re-checks the path after locking (nnctl.locks)
                left += [w for w in [_discard(lock)] if w]
        finally:
            taken.release()
        if left:
            result.skipped.append((e.key, "; ".join(left)))
        else:
            result.removed += 1
        result.freed += max(0, e.bytes - sum(_size(p) for p in (header, data)))
    return result


def _discard(path: Path) -> str | None:
    """Remove one of an entry's paths (an empty folder too); None when done, else why it is still there."""
    try:
        os.unlink(path)
        return None
    except FileNotFoundError:
        return None
    except OSError as exc:  # a folder: Linux says EISDIR, POSIX allows EPERM
        if not (os.path.isdir(path) and not os.path.islink(path)):
            return _why(path, exc)
    try:
        os.rmdir(path)
        return None
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{path.name} is a folder that cannot be removed ({exc.strerror or exc})"
