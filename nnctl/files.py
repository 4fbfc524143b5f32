"""Files nnctl reads and writes: only regular files, never over an input, never a hang.

No torch here. Every input (config, weights, checkpoint, data file) is opened
with ``open_input``, which refuses FIFOs, devices, sockets and folders without
blocking on them (a FIFO opened for reading would wait forever for a writer).
Every output target is checked with ``check_output``: a target that exists and
is not a regular file, or that is one of the command's inputs, or that is a file
nnctl owns in a run folder, is refused (exit 2) before anything is written.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import UsageError

# the files nnctl itself keeps in a run folder; no export or -o may replace them
RUN_FILES = ("last.pt", "best.pt", "config.yaml", "metrics.csv", "curves.png", ".lock", "status.json")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def open_input(path: str | os.PathLike, what: str = "file", error: type[Exception] = UsageError) -> BinaryIO:
    """Open a regular file for reading, without ever blocking on a FIFO or a device.

    O_NONBLOCK makes open() return at once even on a FIFO with no writer; fstat on the
    open descriptor then decides (no window between the check and the open).
    """
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, not a {what}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: is {_kind(st.st_mode)}, not a regular {what}; refused")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_input(path: str | os.PathLike, what: str = "file", error: type[Exception] = UsageError,
               limit: int | None = None) -> bytes:
    """The bytes of a regular file (at most limit + 1 bytes when a limit is given)."""
    with open_input(path, what, error) as fh:
        try:
            return fh.read() if limit is None else fh.read(limit + 1)
        except OSError as exc:
            raise error(f"{os.fspath(path)}: cannot read: {exc.strerror or exc}") from None


def is_regular(path: str | os.PathLike) -> bool:
    """True for a regular file (following links), False for anything else or nothing."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _same(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return os.path.abspath(a) == os.path.abspath(b)


def is_run_folder(folder: str | os.PathLike) -> bool:
    """A folder nnctl made for a run: it holds a checkpoint, its config.yaml or its lock."""
    p = Path(folder)
    return any((p / f).exists() for f in ("last.pt", "best.pt", "config.yaml", ".lock"))


def check_output(path: str | os.PathLike, inputs: tuple | list = (), what: str = "output",
                 allow_run_files: bool = False) -> Path:
    """Refuse an output target that would destroy something; return it as a Path.

    Refused (UsageError, exit 2): an existing target that is not a regular file (a device,
    a FIFO, a folder, a symbolic link: a rename would replace it); a target that is one of
    the command's inputs; a target that is one of the files nnctl keeps in a run folder.
    """
    p = Path(path)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise UsageError(f"{what} {p}: {exc.strerror or exc}") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{what} {p}: exists and is {_kind(st.st_mode)}, not a regular file; refused "
                         "(nnctl only replaces regular files)")
    for src in inputs:
        if src is not None and (st is not None and _same(p, src) or os.path.abspath(p) == os.path.abspath(src)):
            raise UsageError(f"{what} {p}: is an input of this command; refused (choose another -o)")
    if not allow_run_files and p.name in RUN_FILES and is_run_folder(p.parent):
        raise UsageError(f"{what} {p}: is a file nnctl keeps in the run folder {p.parent}; refused "
                         "(choose another -o)")
    return p
