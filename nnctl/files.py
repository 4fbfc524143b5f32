"""Files nnctl reads and writes: only regular files, never over an input, never a hang.

No torch here. Every input (config, weights, checkpoint, data file) is opened
with ``open_input``, which refuses FIFOs, devices, sockets and folders without
blocking on them (a FIFO opened for reading would wait forever for a writer).
Every output target is checked with ``check_output``: a target that exists and
is not a regular file, or that is one of the command's inputs, or that lies inside a
data folder the command reads, or that is a file nnctl owns in a run folder, is
refused (exit 2) before anything is written.

This is the one writer: every file nnctl writes goes through ``atomic_write`` (pictures
through ``save_figure``), and tests/test_one_writer.py fails on any other write in the
package outside its short allow-list. ``display_name`` is the one way a name from the
file system (which may hold bytes that are not UTF-8) becomes text for an output.
"""

from __future__ import annotations

import math
import os
import secrets
import signal
import stat
import threading
from pathlib import Path
from typing import BinaryIO

from nnctl.errors import NnctlError, UsageError
from nnctl.runs.rundir import RunDir


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


def json_ready(obj):
    """A value made ready for strict JSON: NaN and infinity -> null, every string through ``display_name`` (no
    surrogates), tuples as lists; what the CLI's ``--json`` / ``--format jsonl`` and ``nnctl serve`` write."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, str):
        return display_name(obj)
    if isinstance(obj, dict):
        return {json_ready(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_ready(v) for v in obj]
    return obj


def display_name(name: object) -> str:
    """A name from the file system as text every writer can encode (a CSV, a picture, JSON, a terminal).

    POSIX names are bytes: one that is not UTF-8 (a folder named b'caf\\xe9') comes from os.listdir
    as a str holding surrogates ('caf\\udce9'), which no UTF-8 writer accepts and matplotlib refuses.
    Each such byte is shown as \\xNN ('caf\\\\xe9'); a valid name is returned unchanged.
    """
    text = str(name)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the name's own bytes (os.fsencode on POSIX)
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte: shown as \\udXXX
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def _inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether path is folder or lies anywhere under it, links and '..' resolved (realpath) on both sides."""
    try:
        real, root = os.path.realpath(path), os.path.realpath(folder)
    except (OSError, ValueError):
        return False
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def refuse_inside(path: str | os.PathLike, input_dirs: tuple | list, what: str = "output",
                  advice: str | None = None) -> None:
    """UsageError when path is one of ``input_dirs`` or lies anywhere under one (links and '..' resolved):
    a data folder the command reads, whose every file is an input and where a new file or folder would be
    read as data next time (a picture as an image, a run folder as a class)."""
    for folder in input_dirs:
        if folder is not None and _inside(path, folder):
            raise UsageError(f"{what} {path}: is inside {folder}, a data folder this command reads (an input); "
                             f"refused ({advice or _choose(what)})")


def check_out_folder(path: str | os.PathLike, what: str = "--out") -> Path:
    """A folder nnctl makes or continues in (a run's --out, a search's --out): refused (UsageError, exit 2)
    when the name is a symbolic link (nnctl never writes through one), exists and is not a folder, has a
    parent that is a file, or has a component longer than the file system allows, each said as it is
    (an OSError of these, raised later, said "Not a directory" or "File name too long" with exit 1)."""
    p = Path(path)
    for part in p.parts:
        if len(os.fsencode(part)) > _NAME_MAX:
            raise UsageError(f"{what} {p}: the name {display_name(part)[:40]}... is {len(os.fsencode(part))} bytes "
                             f"long; a file system allows {_NAME_MAX}")
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise UsageError(f"{what} {p}: is a symbolic link; nnctl never writes through one: give the folder itself")
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{what} {p}: exists and is not a folder")
    for parent in p.parents:
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"{what} {p}: {parent} is a file, not a folder")
    return p


_NAME_MAX = 255  # bytes of one name in a path: ext4, xfs, btrfs, tmpfs (os.pathconf's PC_NAME_MAX)


def _choose(what: str) -> str:
    """The advice of a refusal: the option that names the target (-o, --graph, --confusion-out)."""
    return f"choose another {what}" if what.startswith("-") else "choose another file"


def check_output(path: str | os.PathLike, inputs: tuple | list = (), what: str = "output",
                 allow_run_files: bool = False, input_dirs: tuple | list = ()) -> Path:
    """Refuse an output target that would destroy something; return it as a Path.

    Refused (UsageError, exit 2): an existing target that is not a regular file (a device,
    a FIFO, a folder, a symbolic link: a rename would replace it); a target that is one of
    the command's inputs; a target anywhere under one of ``input_dirs`` (a data root the
    command reads: every file in it is an input, and a new file there would be read as data
    next time), resolved with realpath so links and '..' do not get around it; a target that
    is one of the files nnctl keeps in a run folder.
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
            raise UsageError(f"{what} {p}: is an input of this command; refused ({_choose(what)})")
    refuse_inside(p, input_dirs, what)
    if not allow_run_files and RunDir.is_own_file(p.name) and RunDir(p.parent).is_run():
        raise UsageError(f"{what} {p}: is a file nnctl keeps in the run folder {p.parent}; refused "
                         f"({_choose(what)})")
    return p


# --- writing -----------------------------------------------------------------------

class WriteError(NnctlError, OSError):
    """A file could not be written (disk full, read-only folder, file-size limit): exit 1.

    Both an NnctlError (the CLI prints one line, no traceback) and an OSError (callers
    that catch OSError, such as the optional learning-curve plot, still do).
    """

    reason: str = ""  # the operating system's words, e.g. "No space left on device"

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class _Recording:
    """A file object that remembers the OSError of a failed write (serialisers may hide it)."""

    def __init__(self, fh):
        self._fh = fh
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            n = self._fh.write(data)
        except OSError as exc:
            self.error = exc
            raise
        return n

    def __getattr__(self, name):
        return getattr(self._fh, name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files of earlier writes to path whose process is gone (killed mid-write)."""
    prefix = f".{path.name}.tmp-"
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        if not name.startswith(prefix):
            continue
        try:
            pid = int(name[len(prefix):].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            try:
                os.unlink(path.parent / name)
            except OSError:
                pass


class deferred_signals:
    """Hold SIGINT and SIGTERM until a write is complete, then deliver them (main thread only).

    A second Ctrl-C while a checkpoint is written would otherwise break the write in the
    middle of torch's zip writer. The signal is not lost: it is raised again on exit.
    """

    def __enter__(self):
        self.pending: list[int] = []
        self.old: dict = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self.old[sig] = signal.signal(sig, lambda signum, frame: self.pending.append(signum))
                except (ValueError, OSError):
                    pass
        return self

    def __exit__(self, *exc):
        for sig, old in self.old.items():
            signal.signal(sig, old)
        for sig in dict.fromkeys(self.pending):
            signal.raise_signal(sig)
        return False


def atomic_write(path: str | os.PathLike, write, inputs: tuple | list = (), run_file: bool = False,
                 input_dirs: tuple | list = ()) -> None:
    """Call write(fileobj) on a temporary file beside path, then rename it into place.

    A target that exists and is not a regular file (a device, a FIFO, a folder, a link) or
    that is one of ``inputs``, or that lies under one of ``input_dirs``, or that is one of the
    files nnctl keeps in a run folder (unless ``run_file``: the run itself writing them) is
    refused (UsageError) before anything is written (``check_output``). An I/O
    failure removes the temporary file, leaves any previous file at path intact and raises
    WriteError naming the file. SIGINT / SIGTERM are held until the file is in place.
    Temporary files left by a writer killed mid-write are removed.
    """
    path = check_output(path, inputs, what="target", allow_run_files=run_file, input_dirs=input_dirs)
    _remove_stale_temporaries(path)
    with deferred_signals():
        _atomic_write(path, write)


def _atomic_write(path: Path, write) -> None:
    # unique per writer: two threads of one process (the API) never share a temporary file
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    sink = None
    try:
        with open(tmp, "wb") as fh:
            sink = _Recording(fh)
            write(sink)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        # torch.save reports a failed write (disk full, EFBIG) as a RuntimeError about the zip
        # writer's position; the OSError underneath is the real reason
        cause = exc if isinstance(exc, OSError) else (sink.error if sink is not None else None)
        if cause is not None and not isinstance(exc, WriteError) and not isinstance(exc, KeyboardInterrupt):
            err = WriteError(cause.errno, f"could not write {path}: {cause.strerror or cause}")
            err.reason = cause.strerror or str(cause)
            raise err from None
        raise
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some filesystems cannot fsync a folder; the rename is still atomic
        pass


FIGURE_FORMATS = ("png", "svg", "pdf")


def save_figure(fig, path: str | os.PathLike, fmt: str | None = None, dpi: int = 110, inputs: tuple | list = (),
                run_file: bool = False, input_dirs: tuple | list = ()) -> Path:
    """A matplotlib figure written through ``atomic_write`` (never ``fig.savefig(path)``: that follows a
    link onto an input, replaces a run's file, and blocks forever on a FIFO). ``fmt``: png, svg or pdf
    (default: the file's suffix). The caller closes the figure."""
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in FIGURE_FORMATS:
        raise UsageError(f"{path}: a picture's file name must end in .png, .svg or .pdf")
    atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, dpi=dpi), inputs, run_file=run_file,
                 input_dirs=input_dirs)
    return path


def probe_writable(folder: str | os.PathLike, what: str = "folder") -> None:
    """Refuse (UsageError) a folder nothing can be written to (read-only, no permission): an empty
    file made and removed, before anything long-running starts."""
    probe = Path(folder) / f".write-test-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"cannot write to the {what} {folder}: {exc.strerror or exc}") from None
