"""What ``nnctl cache info`` and ``nnctl cache clear`` do: list every entry with its status, remove
entries (all, or those of one folder), with the stray temporaries of killed fills."""

from __future__ import annotations

import os
import time
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnctl import locks
from nnctl.data.cache.entry import (
    _Invalid,
    _paths,
    _prod,
    _read_header,
    _Unusable,
    _verify,
    _why,
    cache_dir,
)
from nnctl.data.cache.fill import _temporaries, _try_lock
from nnctl.errors import UsageError
from nnctl.files import open_input

# --- info and clear -------------------------------------------------------------------------

@dataclass
class Entry:
    """One cache entry as ``nnctl cache info`` shows it."""

    key: str
    path: Path                      # the data file
    status: str                     # valid | superseded by KEY | corrupt: why | incomplete | building | partial
    root: str | None = None
    images: int | None = None
    shape: list[int] | None = None
    bytes: int = 0                  # on disk, data + header + temporaries
    last_used: float | None = None  # the header's mtime (epoch seconds)
    created_at: str | None = None
    verified: bool = False  # cache info --verify: the whole data file hashed and found equal to the header
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"key": self.key, "path": str(self.path), "status": self.status, "root": self.root,
                "images": self.images, "shape": self.shape, "bytes": self.bytes,
                "last_used": _iso(self.last_used), "created_at": self.created_at, "verified": self.verified}


def _iso(seconds: float | None) -> str | None:
    """Epoch seconds as ISO 8601 in local time with its offset: the form of created_at beside it."""
    return None if seconds is None else time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds))


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
                        e.verified = True  # every chunk's SHA-256 equals the header's
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
    _mark_superseded(out)
    out.sort(key=lambda e: -(e.last_used or 0))
    return out


def _mark_superseded(found: list[Entry]) -> None:
    """An older entry of the same folder and shape as a newer one: the folder changed between them (a key
    holds every file's size, times and inode, and a changed ctime cannot be set back), so no run reads it
    again. Intact, but "superseded", so that `cache info` does not show it as in use; `cache clear --root`
    frees it."""
    newest: dict[tuple, Entry] = {}
    for e in found:
        if e.status != "valid" or e.root is None or e.shape is None:
            continue
        group = (e.root, tuple(e.shape))
        keep = newest.get(group)
        if keep is None or (e.created_at or "", e.last_used or 0) > (keep.created_at or "", keep.last_used or 0):
            newest[group] = e
    for e in found:
        keep = newest.get((e.root, tuple(e.shape or ())))
        if e.status == "valid" and keep is not None and keep is not e:
            e.status = f"superseded by {keep.key[:12]} (the folder changed since)"


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
        raise UsageError("say which entries to remove: --all for every one, or --root DIR for those of one "
                         "image folder")
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
