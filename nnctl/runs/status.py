"""status.json: the run's own record (state, epochs, best, timing)."""

from __future__ import annotations

import json
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable
from nnctl.errors import UsageError
from nnctl.runs.rundir import RunDir
from nnctl.files import read_input
from nnctl.errors import NnctlError, Pruned
from nnctl.files import atomic_write
from nnctl._version import __version__

STATES = ("running", "finished", "interrupted", "failed", "pruned")
STATUS_FORMAT = 1


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _iso_of_mtime(path: Path) -> str | None:
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="milliseconds")
    except OSError:
        return None


def _plain(value: Any) -> Any:
    """JSON-safe: non-finite floats become None, tuples lists, other objects their str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    try:  # a 0-d tensor or numpy scalar
        return _plain(value.item())
    except (AttributeError, ValueError, TypeError):
        return str(value)


# --- writing status.json (the run process) ---------------------------------------------------

def read_status(folder: str | os.PathLike) -> dict | None:
    """The run's status.json, or None (absent, unreadable or not a JSON object); invalid fields dropped."""
    return read_status_checked(folder)[0]


_BIG = 10**9  # epochs, pids, seconds: anything at or above this is not a real run's value
_HUGE = 1e15  # metric values and parameter counts


def _is_int(v: Any, top: int = _BIG) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < top


def _is_num(v: Any, low: float = -_HUGE, top: float = _HUGE) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and low <= v < top)


def _is_str(v: Any, limit: int = 10_000) -> bool:
    return isinstance(v, str) and len(v) <= limit


def _opt(check):
    return lambda v: v is None or check(v)


def _valid_best(v: Any) -> bool:
    return (isinstance(v, dict) and _is_str(v.get("metric"), 200) and bool(v.get("metric"))
            and _opt(_is_num)(v.get("value")) and _opt(_is_int)(v.get("epoch"))
            and _opt(lambda m: m in ("min", "max"))(v.get("mode"))
            and (v.get("value") is None) == (v.get("epoch") is None))


def _valid_row(v: Any) -> bool:
    return (isinstance(v, dict) and all(isinstance(k, str) and (_is_num(x) or _is_str(x, 1000) or x is None)
                                        for k, x in v.items())
            and _opt(lambda e: _is_int(e) and e > 0)(v.get("epoch")))


# each field of status.json nnctl reads -> whether a value is valid (None: the field is absent)
_STATUS_FIELDS: dict[str, Callable[[Any], bool]] = {}


def _status_fields() -> dict:
    if not _STATUS_FIELDS:
        str_ = _opt(_is_str)
        _STATUS_FIELDS.update({
            "format": _opt(_is_int),
            "state": _opt(lambda v: v in STATES),
            "name": str_, "config_name": str_, "started_at": str_, "ended_at": str_, "updated_at": str_,
            "nnctl_version": str_, "source": str_, "stop_reason": str_,
            "epochs_done": _opt(_is_int), "epochs_total": _opt(_is_int), "pid": _opt(_is_int),
            "wall_seconds": _opt(lambda v: _is_num(v, 0, _BIG)),
            "best": _opt(_valid_best),
            "last": _opt(_valid_row),
            "parameters": _opt(lambda v: isinstance(v, dict) and _is_int(v.get("total"), int(_HUGE))
                               and _is_int(v.get("trainable"), int(_HUGE))),
            "error": _opt(lambda v: isinstance(v, dict) and _opt(_is_str)(v.get("type"))
                          and _opt(_is_str)(v.get("message"))),
            "stopped_early": _opt(lambda v: isinstance(v, bool)),
            "overrides": _opt(lambda v: isinstance(v, list) and all(_is_str(x) for x in v)),
            "resume_overrides": _opt(lambda v: isinstance(v, list) and all(_is_str(x) for x in v)),
            "resumes": _opt(lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v)),
        })
    return _STATUS_FIELDS


def check_status(data: dict) -> tuple[dict, list[str]]:
    """status.json's fields of the wrong type or out of range dropped (as if absent): (the rest, their names)."""
    clean: dict = {}
    bad: list[str] = []
    checks = _status_fields()
    for key, value in data.items():
        check = checks.get(key)
        try:
            ok = check is None or bool(check(value))
        except Exception:  # noqa: BLE001 - a field nnctl cannot judge is one it cannot use
            ok = False
        if ok:
            clean[key] = value
        else:
            bad.append(str(key))
    return clean, bad


def read_status_checked(folder: str | os.PathLike) -> tuple[dict | None, list[str]]:
    """read_status, plus the names of the fields it dropped as invalid (never raises)."""

    path = RunDir(folder).status
    if not path.exists():
        return None, []
    try:
        data = json.loads(read_input(path, "status file", limit=1 << 20).decode())
    except (UsageError, OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None, []
    if not isinstance(data, dict):
        return None, []
    return check_status(data)


def write_status(folder: str | os.PathLike, status: dict) -> bool:
    """Write status.json atomically; False (never an exception) if it could not be written.

    The record must never hide the run's own outcome: a full disk or a refused target costs
    the record, not the run.
    """

    text = (json.dumps(_plain(status), indent=2) + "\n").encode()
    try:
        atomic_write(RunDir(folder).status, lambda fh: fh.write(text), run_file=True)
        return True
    except (OSError, NnctlError):
        return False


class StatusRecorder:
    """Keeps RUN/status.json up to date from the run's events (rank 0 only).

    ``begin()`` once the run folder is claimed and config.yaml written; ``on_event`` gets the
    loop's events; ``end(state, error=..., result=...)`` when the run stops, whatever stopped it.
    """

    def __init__(self, run_dir: str | os.PathLike, *, config_name: str, epochs_total: int,
                 parameters: tuple[int, int] | None = None, overrides: Iterable[str] = (),
                 continuing: bool = False, resume_epoch: int = 0, best: dict | None = None,
                 source: str = ""):

        self.run_dir = Path(run_dir)
        self.began = time.monotonic()
        previous = read_status(self.run_dir) if continuing else None
        s: dict[str, Any] = dict(previous or {})
        self.base_seconds = float(s.get("wall_seconds") or 0.0) if previous else 0.0
        s.update(format=STATUS_FORMAT, state="running", name=self.run_dir.name, config_name=config_name,
                 epochs_total=int(epochs_total), pid=os.getpid(), nnctl_version=__version__, ended_at=None,
                 error=None, stopped_early=False, stop_reason=None)
        if parameters is not None:
            s["parameters"] = {"total": int(parameters[0]), "trainable": int(parameters[1])}
        if continuing:
            s.setdefault("started_at", _iso_of_mtime(RunDir(self.run_dir).config) or now_iso())
            s["resumes"] = list(s.get("resumes") or []) + [{"at": now_iso(), "epoch": int(resume_epoch),
                                                             "pid": os.getpid()}]
            s.setdefault("overrides", [])
            if list(overrides):
                s["resume_overrides"] = list(overrides)
        else:
            s["started_at"] = now_iso()
            s["overrides"] = list(overrides)
            s["resumes"] = []
            if source:
                s["source"] = source  # a new run from another run's checkpoint
        s["epochs_done"] = int(resume_epoch)  # the checkpoint's epoch: what the run continues from
        if best is not None and best.get("metric"):
            s["best"] = dict(best)
        s.setdefault("best", None)
        s.setdefault("last", None)
        s["wall_seconds"] = self.base_seconds
        self.status = s
        self.monitor: tuple[str, str] | None = None
        self.written = False

    @property
    def complete(self) -> bool:
        """The run's last checkpoint is written: its last epoch ended (epoch_end comes after the save), or
        early stopping ended it (stop). A signal from here on leaves the run finished."""
        s = self.status
        return bool(s.get("stopped_early")) or int(s.get("epochs_done") or 0) >= int(s.get("epochs_total") or 1)

    def _seconds(self) -> float:
        return round(self.base_seconds + (time.monotonic() - self.began), 3)

    def write(self) -> None:
        self.status["updated_at"] = now_iso()
        self.written = write_status(self.run_dir, self.status) or self.written

    def begin(self) -> None:
        self.write()

    def set_monitor(self, metric: str, mode: str) -> None:
        """The metric best.pt tracks (loop.monitor_for), known once the data is loaded."""
        self.monitor = (metric, mode)
        best = self.status.get("best")
        if not best or best.get("metric") != metric:
            self.status["best"] = {"metric": metric, "mode": mode, "value": None, "epoch": None}

    def on_event(self, event) -> None:
        kind = getattr(event, "kind", "")
        if kind == "epoch_end" and event.row is not None:
            row = dict(event.row)
            self.status["epochs_done"] = int(row.get("epoch", event.epoch + 1))
            self.status["last"] = _plain(row)
            if getattr(event, "stopped", False):  # written with this epoch: a kill from here leaves it finished
                self.status["stopped_early"] = True
            if getattr(event, "message", "") == "best" and self.monitor is not None:
                metric, mode = self.monitor
                self.status["best"] = {"metric": metric, "mode": mode, "value": _plain(row.get(metric)),
                                       "epoch": int(row.get("epoch", event.epoch + 1))}
            self.status["wall_seconds"] = self._seconds()
            self.write()
        elif kind == "stopping":  # early stopping ends the run at this epoch, whose checkpoint comes next
            self.status["stopping_at"] = int(event.epoch) + 1
            self.write()
        elif kind == "stop":
            self.status["stopped_early"] = True
            self.status["stop_reason"] = event.message or "early stopping"
            self.write()

    def end(self, state: str, error: BaseException | None = None, result: Any = None) -> None:
        s = self.status
        s["state"] = state
        s["ended_at"] = now_iso()
        s["wall_seconds"] = self._seconds()
        if result is not None:
            s["epochs_done"] = int(result.history[-1]["epoch"]) if result.history else s.get("epochs_done", 0)
            if result.best and result.best.get("metric"):
                s["best"] = _plain(dict(result.best))
            s["stopped_early"] = bool(result.stopped_early)
            if result.history:
                s["last"] = _plain(dict(result.history[-1]))
        if error is not None:
            s["error"] = error_record(error)
        self.write()


def error_record(error: BaseException) -> dict:
    message = str(error).strip() or type(error).__name__
    if isinstance(error, KeyboardInterrupt):
        message = "interrupted (Ctrl-C)"
    return {"type": type(error).__name__, "message": message[:4000]}


def state_of_exception(error: BaseException) -> str:
    """interrupted for a signal (loop.Interrupted, KeyboardInterrupt), pruned when a search stopped the run
    (errors.Pruned), failed for anything else."""
    if isinstance(error, KeyboardInterrupt) or type(error).__name__ == "Interrupted":
        return "interrupted"
    if isinstance(error, Pruned):
        return "pruned"
    return "failed"


def record_failure(folder: str | os.PathLike, error: BaseException) -> bool:
    """Mark a run that stopped before its first checkpoint (used by run.Claim.abandon).

    A terminal state the run process already recorded is kept (it knows more); a missing or
    "running" record becomes failed / interrupted with the error. True if a record is in place.
    """
    folder = Path(folder)
    status = read_status(folder) or {}
    if status.get("state") in ("failed", "interrupted", "finished", "pruned"):
        return True

    status.setdefault("format", STATUS_FORMAT)
    status.setdefault("name", folder.name)
    status.setdefault("started_at", _iso_of_mtime(RunDir(folder).config) or now_iso())
    status.setdefault("nnctl_version", __version__)
    status.setdefault("epochs_done", 0)
    status.update(state=state_of_exception(error), ended_at=now_iso(), error=error_record(error))
    return write_status(folder, status)
