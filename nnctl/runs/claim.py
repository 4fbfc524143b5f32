"""Claiming a run folder for a new run or a resume."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from nnctl import files
from nnctl.errors import UsageError
from nnctl.runs import tensorboard as TB
from nnctl.runs.rundir import LOCKED_ENV, RunDir, RunLock
from nnctl.runs.status import record_failure


def _reusable(run: RunDir) -> str | None:
    """None if nnctl may start a run in this existing folder (under its lock), else the reason."""
    if run.has_checkpoint():
        return "already holds a run"
    try:
        names = [n for n in os.listdir(run.path) if not n.startswith(".")]  # .lock, .write-test-*: ours
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if not names:
        return None
    if not run.is_run():
        return f"is not empty and is not an nnctl run folder (it holds {min(names)!r})"
    foreign = [n for n in names if not RunDir.is_own_file(n)]
    if foreign:
        return f"holds files nnctl did not write ({min(foreign)!r})"
    if run.tensorboard.name in names:
        other = TB.only_event_files(run.tensorboard)
        if other:
            return f"holds files nnctl did not write ({other!r})"
    return None


def _clear_stale(run: RunDir) -> None:
    """The leftovers of a run that stopped before its first checkpoint (the folder is locked)."""
    for path in (run.config, run.metrics, run.curves, run.status):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    TB.clear(run.path)  # RUN/tensorboard: its event files only


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p folder; the folders it made, outermost first (a failed claim removes them again)."""
    missing = []
    for parent in (folder, *folder.parents):
        if os.path.lexists(parent):
            break
        missing.append(parent)
    folder.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def _remove_made(folders: list[Path]) -> None:
    """Remove the folders a failed claim made, innermost first; only if empty (never a file nnctl did not make)."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


@dataclass
class Claim:
    """A run folder this process holds: its lock, whether it made the folder, and the parents it made."""

    folder: Path
    lock: RunLock | None
    created: bool = False
    parents: list[Path] = field(default_factory=list)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def abandon(self, error: BaseException | None = None) -> None:
        """A run that failed before its first checkpoint: leave nothing that blocks the next one.

        With the error, once config.yaml is written: the folder stays as the run's record
        (status.json: failed or interrupted, the error), and the next run of the same name
        reuses it (it holds no checkpoint and only nnctl's files). Otherwise its files go, and
        the folder too if this process made it.
        """
        run = RunDir(self.folder)
        if error is not None and not run.has_checkpoint() and run.config.is_file():
            if record_failure(self.folder, error):
                self.release()
                return
        if not run.has_checkpoint():
            _clear_stale(run)
            if self.created:
                if self.lock is not None:
                    self.lock.release()
                _remove_made([*self.parents, self.folder])  # only if empty: never a file nnctl did not make
        self.release()


def _lock(folder: Path) -> RunLock | None:
    """Lock a folder, unless the distributed launcher that started this process holds its lock."""
    held = os.environ.get(LOCKED_ENV)
    if held and os.path.abspath(held) == os.path.abspath(folder):
        return None
    return RunDir(folder).lock()


def claim_new(name: str, out: str | os.PathLike | None = None, base: str | os.PathLike = "runs",
              input_dirs: tuple | list = ()) -> Claim:
    """A fresh run folder, locked: --out as given, else the first free runs/<name>, runs/<name>-2, ...

    A name is taken by an atomic mkdir, so two runs started at once never share a folder. An
    existing folder is used only if it is locked by this process and holds no checkpoint and no
    foreign file (a run that stopped before its first checkpoint, or an empty folder). A folder inside
    one of ``input_dirs`` (the data folders the run reads) is refused before anything is made: it would
    be read as data (a class folder, images) by the next run.
    """
    if out is not None:
        files.check_out_folder(out)
    files.refuse_inside(Path(out) if out is not None else Path(base) / name, input_dirs,
                        "--out" if out is not None else "the run folder", advice="give --out DIR elsewhere")
    if out is not None:
        return _claim_one(Path(out), explicit=True)
    root = Path(base)
    for i in range(1, 100_000):
        p = root / (name if i == 1 else f"{name}-{i}")
        try:
            return _claim_one(p, explicit=False)
        except _Taken:
            continue
    raise UsageError(f"{root}: no free run folder name for {name!r}")


class _Taken(Exception):
    pass


def _claim_one(p: Path, explicit: bool) -> Claim:
    parents: list[Path] = []
    try:
        parents = _make_parents(p.parent)
        os.mkdir(p)
        created = True
    except FileExistsError:
        created = False
    except OSError as exc:
        _remove_made(parents)
        raise UsageError(f"cannot write to the run folder {p}: {exc.strerror or exc}") from None
    if not created and (p.is_symlink() or not p.is_dir()):
        if explicit:
            raise UsageError(f"--out {p}: exists and is not a folder")
        raise _Taken
    made = parents + [p] if created else parents
    try:
        lock = _lock(p)
    except UsageError:  # a claim that fails leaves nothing behind (only the empty folders it made go)
        if explicit:
            _remove_made(made)
            raise
        _remove_made([p] if created else [])  # the next name is tried in the same parent
        raise _Taken from None
    except BaseException:  # the lock's pid could not be written (a full disk): the lock file is gone too
        _remove_made(made)
        raise
    claim = Claim(p, lock, created, parents)
    if not created:
        run = RunDir(p)
        reason = _reusable(run)
        if reason is not None:
            claim.release()
            if explicit:
                hint = (f"continue it with --resume {p}, or choose another --out" if run.has_checkpoint()
                        else "choose another --out")
                raise UsageError(f"--out {p}: {reason}; {hint}")
            raise _Taken
        _clear_stale(run)
    try:
        files.probe_writable(p, "run folder")
    except UsageError:
        claim.abandon()
        raise
    return claim


def claim_existing(folder: str | os.PathLike) -> Claim:
    """Lock a run folder to continue its run (before its checkpoint is read); its run files checked at once."""
    p = Path(folder)
    claim = Claim(p, _lock(p), False)
    try:
        _check_run_files(p)
    except BaseException:
        claim.release()
        raise
    return claim


def _check_run_files(folder: Path) -> None:
    """A continued run writes status.json, metrics.csv, config.yaml and tensorboard/ in place: each must be
    a regular file (a folder), never a FIFO, a folder or a symbolic link. UsageError up front, before
    anything is trained or written."""
    run = RunDir(folder)
    for path, want_dir in ((run.status, False), (run.metrics, False), (run.config, False), (run.tensorboard, True)):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise UsageError(f"--resume {folder}: {path} cannot be read ({exc.strerror or exc})") from None
        if stat.S_ISLNK(st.st_mode):
            what = "a symbolic link"
        elif want_dir:
            what = None if stat.S_ISDIR(st.st_mode) else ("a regular file" if stat.S_ISREG(st.st_mode)
                                                         else "not a folder")
        elif stat.S_ISREG(st.st_mode):
            what = None
        else:
            what = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode)
                    else "not a regular file")
        if what:
            need = "a folder" if want_dir else "a regular file"
            raise UsageError(f"--resume {folder}: {path} is {what}, not {need}; nnctl never makes it so: "
                             "refused before anything is trained or written (remove or replace it)")
