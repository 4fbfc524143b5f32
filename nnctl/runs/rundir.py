"""RunDir: the one owner of a run folder: every file name in it, "is this a run", its lock.

A run folder (``runs/<name>``, or ``--out``) holds, byte for byte these names:

- ``config.yaml``: the resolved config (written first, right after the folder is claimed)
- ``last.pt``, ``best.pt``: the checkpoints; ``epoch-N.pt``: those kept by ``train.checkpoint.every``
- ``metrics.csv``, ``curves.png``: one row an epoch, and its plot
- ``status.json``: the run's own record (``runs.status``)
- ``.lock``: the run lock (an flock, ``nnctl.locks``; it holds the holder's pid)
- ``tensorboard/``: TensorBoard event files (``train.log: [tensorboard]``)
- ``mlruns/``: MLflow's file store (``train.log: [mlflow]`` without ``train.mlflow.tracking_uri``; MLflow writes it)
- ``mlflow.json``: which MLflow run records this run (its tracking URI and run id: a resume continues it)
- ``export/``: ``nnctl export``'s default output folder (user output: not a file nnctl keeps)

A search folder (``nnctl tune``: ``runs/<name>-tune/``) is not a run: it holds ``tune.json`` (its
record, ``SEARCH_RECORD``) and one run folder a trial (``trial-007/``); ``nnctl runs`` lists them.

**Is this a run** (``RunDir.is_run``, the one rule): a folder holding ``config.yaml``, a checkpoint
(``last.pt`` / ``best.pt``) or ``status.json``. nnctl writes config.yaml right after claiming the
folder, so every run it started has one of them; a folder of an older nnctl (no status.json), or one
whose config.yaml was removed, still counts. The lock alone does not: a process that claims a folder
holds it before the folder is a run (``claim``), and a killed claimer's lock file blocks nothing.

Only the standard library, ``nnctl.errors`` and ``nnctl.locks`` here: ``nnctl.files`` imports
this module to refuse an output over a run's files.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Self

from nnctl import locks
from nnctl.errors import NnctlError, UsageError

CONFIG = "config.yaml"
LAST = "last.pt"
BEST = "best.pt"
METRICS = "metrics.csv"
CURVES = "curves.png"
STATUS = "status.json"
LOCK = ".lock"
TENSORBOARD = "tensorboard"  # a folder of TensorBoard event files
MLRUNS = "mlruns"  # MLflow's file store, the default tracking URI of train.log: [mlflow]
MLFLOW = "mlflow.json"  # the MLflow run that records this run (runs.mlflow)
EXPORT = "export"  # nnctl export's default folder: the user's outputs, not a file nnctl keeps

# the files nnctl itself keeps in a run folder; no export or -o may replace them
RUN_FILES = (LAST, BEST, CONFIG, METRICS, CURVES, LOCK, STATUS, TENSORBOARD, MLRUNS, MLFLOW)
CHECKPOINTS = {"last": LAST, "best": BEST}
_EPOCH = re.compile(r"epoch-([0-9]+)\.pt")  # train.checkpoint.every: epoch-N.pt
_MARKS = (CONFIG, LAST, BEST, STATUS)  # what makes a folder a run (module docstring)

SEARCH_RECORD = "tune.json"  # a search folder's record (nnctl tune): its trials are run folders inside it
LOCKED_ENV = "NNCTL_RUN_LOCKED"  # set by the distributed launcher, which holds the lock for its workers


class RunDir:
    """A run folder's paths and facts: ``RunDir(p).last``, ``.checkpoint("best")``, ``.epoch(3)``, ``.is_run()``."""

    __slots__ = ("path",)

    def __init__(self, path: str | os.PathLike):
        self.path = path.path if isinstance(path, RunDir) else Path(path)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    # --- the names -------------------------------------------------------------------------

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def best(self) -> Path:
        return self.path / BEST

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def curves(self) -> Path:
        return self.path / CURVES

    @property
    def status(self) -> Path:
        return self.path / STATUS

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def mlruns(self) -> Path:
        return self.path / MLRUNS

    @property
    def mlflow(self) -> Path:
        return self.path / MLFLOW

    @property
    def export_dir(self) -> Path:
        return self.path / EXPORT

    def checkpoint(self, which: str) -> Path:
        """``last`` or ``best`` -> its file (ValueError for anything else)."""
        try:
            return self.path / CHECKPOINTS[which]
        except (KeyError, TypeError):
            raise ValueError(f"a run's checkpoint is 'last' or 'best', not {which!r}") from None

    def epoch(self, n: int) -> Path:
        """The checkpoint kept after epoch ``n`` (train.checkpoint.every)."""
        return self.path / f"epoch-{int(n)}.pt"

    # --- what the folder holds ---------------------------------------------------------------

    def epoch_checkpoints(self) -> list[tuple[int, Path]]:
        """The epoch-N.pt names in the folder, as (N, path), by N (any kind of file: the caller checks)."""
        try:
            names = os.listdir(self.path)
        except OSError:
            return []
        return sorted((int(m.group(1)), self.path / name) for name in names if (m := _EPOCH.fullmatch(name)))

    def is_run(self) -> bool:
        """The one rule: a folder holding config.yaml, a checkpoint or status.json (module docstring)."""
        return self.path.is_dir() and any((self.path / name).exists() for name in _MARKS)

    def has_checkpoint(self) -> bool:
        return self.last.exists() or self.best.exists()

    @staticmethod
    def is_own_file(name: str) -> bool:
        """A name nnctl keeps in a run folder (RUN_FILES, or an epoch-N.pt checkpoint)."""
        return name in RUN_FILES or _EPOCH.fullmatch(name) is not None

    # --- the lock ------------------------------------------------------------------------------

    def lock(self) -> RunLock:
        """The run lock, held (UsageError at once when another process holds it)."""
        return RunLock(self).acquire()

    def is_locked(self) -> bool:
        """True while a live process holds the run lock."""
        return locks.is_held(self.lock_file)


class RunLock:
    """One training process a run folder: an exclusive flock on RUN/.lock holding its pid (``nnctl.locks``).

    The kernel drops it when the process dies; ``release`` removes the file while still holding it.
    A pid that cannot be written (a full disk) releases the lock and removes its file (NnctlError).
    """

    def __init__(self, folder: str | os.PathLike | RunDir):
        self.run = RunDir(folder)
        self.folder = self.run.path
        self.path = self.run.lock_file
        self._lock = locks.FileLock(self.path, follow_symlinks=False)

    def acquire(self) -> Self:
        try:
            free = self._lock.acquire(blocking=False)
        except IsADirectoryError:
            raise UsageError(f"{self.path}: the run lock is a folder, not a file; nnctl never makes it so: "
                             "remove it (rmdir) if no nnctl process is using this run folder") from None
        except locks.NotRegular:
            raise UsageError(f"{self.path}: the run lock is not a regular file; refused (remove it)") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UsageError(f"{self.path}: the run lock is a symbolic link; refused (remove it)") from None
            raise UsageError(f"cannot lock the run folder {self.folder}: {exc.strerror or exc}") from None
        if not free:
            pid = _pid(self._lock.holder)
            raise UsageError(f"{self.folder}: another nnctl process{f' (pid {pid})' if pid else ''} is training "
                             "in this run folder; wait for it, or stop it first")
        try:
            self._lock.write(f"{os.getpid()}\n")
        except OSError as exc:  # a full disk, a file-size limit: let go, and leave no lock file behind
            self._lock.release(remove=True)
            raise NnctlError(f"cannot write the run lock {self.path}: {exc.strerror or exc}") from None
        return self

    def release(self) -> None:
        self._lock.release(remove=True)  # while still locked: a waiter re-checks the path

    @property
    def held(self) -> bool:
        return self._lock.held

    def __enter__(self) -> Self:
        return self if self.held else self.acquire()  # `with RunDir(p).lock():` holds it already

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def _pid(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None
