"""One cache entry on disk: where the cache lives, an entry's key, its header, and reading a valid entry
(the format and the checks are described in nnctl.data.cache)."""

from __future__ import annotations

import hashlib
import json
import os
import stat as st_
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from nnctl.data.decode import DECODER, RESIZE
from nnctl.errors import UsageError
from nnctl.files import _kind, open_input, read_input

FORMAT = 1
CHUNK_BYTES = 16 << 20
FULL_VERIFY_BYTES = 2 << 30
SAMPLED_CHUNKS = 8
PARALLEL_FROM = 256  # files; fewer are decoded in-process (starting workers costs more)
BATCH = 64
FREE_MARGIN = 64 << 20  # bytes a fill leaves free on the cache's disk
SETTLE_NS = 50_000_000  # a fill starts this long after the newest change of a file (beyond a clock tick)


def cache_dir() -> Path:
    """$NNCTL_CACHE_DIR, else $XDG_CACHE_HOME/nnctl/decoded (~/.cache/nnctl/decoded)."""
    env = os.environ.get("NNCTL_CACHE_DIR")
    if env:
        return Path(os.path.abspath(os.path.expanduser(env)))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nnctl" / "decoded"


# --- keys and headers -----------------------------------------------------------------------

def _decoder_version() -> str:
    """nnctl's decoder and PIL's version (``decode.DECODER``): a change of either rebuilds the entry."""
    return DECODER


def make_key(root: str | os.PathLike, files: list[str], labels: list[int], mode: str,
             size: tuple[int, int] | None) -> str:
    """The entry's name: sha256 of everything that decides its pixels (see the module docstring)."""
    return stamp_files(root, files, labels, mode, size)[0]


def stamp_files(root: str | os.PathLike, files: list[str], labels: list[int], mode: str,
                size: tuple[int, int] | None) -> tuple[str, int]:
    """(the entry's key, the newest change time of a file in ns): every file's size, mtime, ctime and inode.

    ctime is what catches a copy that keeps the size and restores the mtime (``cp -p``, ``rsync -a``,
    ``tar x``): the kernel sets it to the current time on every write and every metadata change
    (the ``utime`` that restores the mtime included), and no call sets it back. The inode catches a
    file replaced by a rename on a filesystem whose rename keeps the ctime.
    """
    h = hashlib.sha256()
    head = {"format": FORMAT, "root": os.path.abspath(os.fspath(root)), "mode": mode,
            "size": list(size) if size else "native", "resize": RESIZE, "decoder": _decoder_version(),
            "count": len(files)}
    h.update(json.dumps(head, sort_keys=True).encode())
    newest = 0
    for path, label in zip(files, labels):
        try:
            st = os.stat(path)
        except OSError as exc:
            raise UsageError(f"image {path}: cannot read: {exc.strerror or exc} (it changed while the folder "
                             "was read?)") from None
        newest = max(newest, st.st_ctime_ns)
        h.update(f"\0{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\0{int(label)}"
                 .encode("utf-8", "surrogateescape"))
    return h.hexdigest(), newest


def settle(newest_change_ns: int) -> None:
    """Wait, before decoding, until the clock is past the newest file change by SETTLE_NS (50 ms at most).

    The filesystem stamps ctime with a coarse clock (one tick: 1-10 ms on Linux): a file rewritten in
    the same tick as its previous change keeps its ctime. Decoding only once the clock has moved past
    every stamped change means any later write gets a ctime the key does not hold. A change time
    further ahead than that (a clock set back, a network filesystem's skewed clock) is not waited for.
    """
    wait = newest_change_ns + SETTLE_NS - time.time_ns()
    if 0 < wait <= SETTLE_NS:
        time.sleep(wait / 1e9)


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
    except RecursionError:  # e.g. 100,000 nested '[': json gives up in the middle
        raise _Invalid(f"unreadable header {path.name}: nested too deeply") from None
    if not isinstance(head, dict):
        raise _Invalid(f"unreadable header {path.name}: not a mapping")
    try:
        shape = [int(v) for v in head["shape"]]
        chunks = head["chunks"]
        ok = (head["format"] == FORMAT and head["dtype"] == "uint8" and len(shape) == 4
              and all(v >= 1 for v in shape) and int(head["chunk_bytes"]) == CHUNK_BYTES
              and isinstance(chunks, list) and all(isinstance(c, str) and len(c) == 64 for c in chunks)
              and len(chunks) == -(-_prod(shape) // CHUNK_BYTES)
              and head.get("images") == shape[0])  # the count shown must be the count used
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
            and stamp.get("ctime_ns") == st.st_ctime_ns and stamp.get("ino") == st.st_ino)
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
