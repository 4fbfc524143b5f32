"""RunDir: every file name of a run folder, 'is this a run', epoch checkpoint names, the run lock."""

from __future__ import annotations

from nnctl.errors import UsageError
import os
import stat
from pathlib import Path
import errno

def epoch_name(epoch: int) -> str:
    """The file name of the checkpoint kept after ``epoch`` (train.checkpoint.every)."""
    return f"epoch-{epoch}.pt"

# the files nnctl itself keeps in a run folder; no export or -o may replace them
RUN_FILES = ("last.pt", "best.pt", "config.yaml", "metrics.csv", "curves.png", ".lock", "status.json",
             "tensorboard")  # tensorboard: a folder of TensorBoard event files (train.log)
EPOCH_CHECKPOINT = r"epoch-[0-9]+\.pt"  # train.checkpoint.every: epoch-N.pt


def is_run_file(name: str) -> bool:
    """A file name nnctl keeps in a run folder (RUN_FILES, or an epoch-N.pt checkpoint)."""
    import re

    return name in RUN_FILES or re.fullmatch(EPOCH_CHECKPOINT, name) is not None


def is_run_folder(folder: str | os.PathLike) -> bool:
    """A folder nnctl made for a run: it holds a checkpoint, its config.yaml or its lock."""
    p = Path(folder)
    return any((p / f).exists() for f in ("last.pt", "best.pt", "config.yaml", ".lock"))

LOCKED_ENV = "NNCTL_RUN_LOCKED"  # set by the distributed launcher, which holds the lock for its workers
CHECKPOINTS = ("last.pt", "best.pt")


# --- the lock ---------------------------------------------------------------------------

class RunLock:
    """One training process a run folder: an exclusive flock on RUN/.lock (dropped by the kernel at exit)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / ".lock"
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
            except IsADirectoryError:
                raise UsageError(f"{self.path}: the run lock is a folder, not a file; nnctl never makes it so: "
                                 "remove it (rmdir) if no nnctl process is using this run folder") from None
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise UsageError(f"{self.path}: the run lock is a symbolic link; refused (remove it)") from None
                raise UsageError(f"cannot lock the run folder {self.folder}: {exc.strerror or exc}") from None
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise UsageError(f"{self.path}: the run lock is not a regular file; refused (remove it)")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise UsageError(f"{self.folder}: another nnctl process{f' (pid {holder})' if holder else ''} is "
                                 "training in this run folder; wait for it, or stop it first") from None
            except OSError as exc:
                os.close(fd)
                raise UsageError(f"cannot lock the run folder {self.folder}: {exc.strerror or exc}") from None
            try:  # the file we locked must still be the one at the path (a releaser may have unlinked it)
                same = os.stat(self.path, follow_symlinks=False).st_ino == st.st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd
            return self
        raise UsageError(f"{self.folder}: could not take the run lock")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked: a waiter re-checks the inode
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def is_locked(folder: str | os.PathLike) -> bool:
    """True while a live process holds the folder's run lock."""
    import fcntl

    try:
        fd = os.open(Path(folder) / ".lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


# --- run folders ----------------------------------------------------------------------------

def has_checkpoint(folder: str | os.PathLike) -> bool:
    return any((Path(folder) / f).exists() for f in CHECKPOINTS)
