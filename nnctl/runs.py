"""Runs as records: RUN/status.json, ``nnctl runs`` (the table of runs) and ``nnctl compare``.

No torch here: listing 100 run folders reads small text files only (status.json,
config.yaml, metrics.csv) and never loads a checkpoint.

**RUN/status.json** is the run's own record. The run process (rank 0 only) writes it
atomically (``files.atomic_write(..., run_file=True)``):

- at the start: ``state: running``, the run folder's ``name``, the ``config_name``
  (``name:`` of the config; runs ``digits-mlp``, ``digits-mlp-2``, ... share it),
  ``started_at`` (ISO-8601, UTC), ``epochs_total``, ``parameters`` (total,
  trainable), ``pid``, ``nnctl_version`` and ``overrides`` (the ``--set`` values given,
  with ``--epochs`` / ``--seed`` / ``--device`` as their ``--set`` equivalents);
- after each epoch: ``epochs_done``, ``best`` ({metric, mode, value, epoch}),
  ``wall_seconds`` so far (summed over resumes) and ``last`` (the epoch's metrics row);
- at the end: ``finished`` (``stopped_early`` says whether early stopping ended it),
  ``interrupted`` (SIGINT / SIGTERM: ``loop.Interrupted``) or ``failed`` with
  ``error: {type, message}`` (any other exception, a data error before the first epoch
  included), and ``ended_at``.

A resumed run (``--resume RUN``) keeps ``started_at``, adds an entry to ``resumes`` and
goes on counting. ``nnctl runs`` shows a ``running`` record whose run lock is no longer
held (the process was killed: SIGKILL, power loss) as ``interrupted``. Folders written
by an older nnctl, without status.json, are described from what they hold: config.yaml,
metrics.csv, the checkpoints' presence and the lock.

**Differences.** Runs that share a config name come from one config with different
``--set`` values. For each such group, the keys of the resolved config.yaml whose values
differ among its runs are that run's ``differs`` (key -> its value); keys equal in every
run of the group are left out. ``compare`` does the same over the runs it is given,
whatever their config names.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import UsageError

STATUS = "status.json"
STATES = ("running", "finished", "interrupted", "failed")
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
    from .files import read_input

    path = Path(folder) / STATUS
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
    from .errors import NnctlError
    from .files import atomic_write

    text = (json.dumps(_plain(status), indent=2) + "\n").encode()
    try:
        atomic_write(Path(folder) / STATUS, lambda fh: fh.write(text), run_file=True)
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
        from . import __version__

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
            s.setdefault("started_at", _iso_of_mtime(self.run_dir / "config.yaml") or now_iso())
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
            if getattr(event, "message", "") == "best" and self.monitor is not None:
                metric, mode = self.monitor
                self.status["best"] = {"metric": metric, "mode": mode, "value": _plain(row.get(metric)),
                                       "epoch": int(row.get("epoch", event.epoch + 1))}
            self.status["wall_seconds"] = self._seconds()
            self.write()
        elif kind == "stop":
            self.status["stopped_early"] = True
            self.status["stop_reason"] = event.message or "early stopping"

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
        message = "interrupted (a second Ctrl-C)"
    return {"type": type(error).__name__, "message": message[:4000]}


def state_of_exception(error: BaseException) -> str:
    """interrupted for a signal (loop.Interrupted, KeyboardInterrupt), failed for anything else."""
    if isinstance(error, KeyboardInterrupt) or type(error).__name__ == "Interrupted":
        return "interrupted"
    return "failed"


def record_failure(folder: str | os.PathLike, error: BaseException) -> bool:
    """Mark a run that stopped before its first checkpoint (used by run.Claim.abandon).

    A terminal state the run process already recorded is kept (it knows more); a missing or
    "running" record becomes failed / interrupted with the error. True if a record is in place.
    """
    folder = Path(folder)
    status = read_status(folder) or {}
    if status.get("state") in ("failed", "interrupted", "finished"):
        return True
    from . import __version__

    status.setdefault("format", STATUS_FORMAT)
    status.setdefault("name", folder.name)
    status.setdefault("started_at", _iso_of_mtime(folder / "config.yaml") or now_iso())
    status.setdefault("nnctl_version", __version__)
    status.setdefault("epochs_done", 0)
    status.update(state=state_of_exception(error), ended_at=now_iso(), error=error_record(error))
    return write_status(folder, status)


# --- reading a run folder -------------------------------------------------------------------

def _read_yaml(path: Path) -> dict | None:
    import yaml

    from .files import read_input

    if not path.exists():
        return None
    try:
        data = yaml.safe_load(read_input(path, "config", limit=8 << 20).decode())
    except Exception:  # noqa: BLE001 - a damaged file is described, never fatal to a listing
        return None
    return data if isinstance(data, dict) else None


def read_metrics(folder: str | os.PathLike) -> list[dict]:
    """metrics.csv as rows of numbers (epoch an int); [] if absent or unreadable."""
    path = Path(folder) / "metrics.csv"
    if not path.exists():
        return []
    import io

    from .errors import NnctlError
    from .files import read_input

    rows: list[dict] = []
    try:  # read_input: a regular file only (a FIFO named metrics.csv never blocks the listing)
        text = read_input(path, "metrics file", limit=64 << 20).decode()
        with io.StringIO(text, newline="") as fh:
            for r in csv.DictReader(fh):
                row: dict[str, Any] = {}
                for k, v in r.items():
                    if k is None or v in (None, ""):
                        continue
                    try:
                        row[k] = int(v) if k in ("epoch", "step") else float(v)
                    except ValueError:
                        row[k] = v
                epoch = row.get("epoch")
                if not (_is_int(epoch) and epoch > 0):
                    continue  # a damaged row (epoch 1e300, "x", missing): never a point to plot
                rows.append(row)
    except (OSError, NnctlError, csv.Error, UnicodeDecodeError):
        return []
    return rows


def _legacy_monitor(config: dict | None, columns: Iterable[str]) -> tuple[str, str] | None:
    """For folders without status.json: the metric best.pt tracked, from config.yaml and the columns
    metrics.csv has (an explicit train.checkpoint.monitor, else val_accuracy, val_loss, train_loss)."""
    from .config import mode_of

    cols = set(columns)
    train = (config or {}).get("train")
    chk = train.get("checkpoint") if isinstance(train, dict) else None
    if isinstance(chk, dict) and isinstance(chk.get("monitor"), str) and chk["monitor"] in cols:
        mode = chk.get("mode")
        return chk["monitor"], mode if mode in ("min", "max") else mode_of(chk["monitor"])
    for metric in ("val_accuracy", "val_loss", "train_loss"):
        if metric in cols:
            return metric, mode_of(metric)
    return None


def _best_of(rows: list[dict], metric: str, mode: str) -> dict:
    best = {"metric": metric, "mode": mode, "value": None, "epoch": None}
    for r in rows:
        v = r.get(metric)
        if not isinstance(v, float) or not math.isfinite(v):
            continue
        if best["value"] is None or (v > best["value"] if mode == "max" else v < best["value"]):
            best.update(value=v, epoch=r.get("epoch"))
    return best


def _seconds_of(rows: list[dict]) -> float | None:
    total = sum(r["seconds"] for r in rows if _is_num(r.get("seconds"), 0, _BIG))
    return round(total, 3) if total < _BIG else None


def is_run(folder: str | os.PathLike) -> bool:
    from .files import is_run_folder

    p = Path(folder)
    return p.is_dir() and (is_run_folder(p) or (p / STATUS).is_file())


@dataclass
class RunInfo:
    """One run folder as ``nnctl runs`` shows it."""

    name: str
    path: str
    state: str
    config_name: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    epochs_done: int = 0
    epochs_total: int | None = None
    best: dict | None = None
    parameters: dict | None = None
    wall_seconds: float | None = None
    last: dict | None = None
    error: dict | None = None
    stopped_early: bool = False
    overrides: list = field(default_factory=list)
    checkpoints: list = field(default_factory=list)
    differs: dict = field(default_factory=dict)
    recorded: bool = True  # False: an older nnctl's folder, described from its files
    notes: list = field(default_factory=list)  # what could not be read, e.g. "status.json unreadable field best"
    config: dict | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("config")
        return _plain(d)


def read_run(folder: str | os.PathLike) -> RunInfo:
    """What a run folder says about its run (status.json first, else its files)."""
    from .run import CHECKPOINTS, is_locked

    p = Path(folder)
    status, bad = read_status_checked(p)
    config = _read_yaml(p / "config.yaml")
    checkpoints = [c for c in CHECKPOINTS if (p / c).exists()]
    locked = is_locked(p)
    train = (config or {}).get("train") if isinstance((config or {}).get("train"), dict) else {}
    name = (config or {}).get("name")
    epochs = train.get("epochs")
    info = RunInfo(name=p.name, path=str(p), state="failed", config=config, checkpoints=checkpoints,
                   config_name=name if _is_str(name, 1000) else None,
                   epochs_total=epochs if _is_int(epochs) else None)
    info.notes = [f"status.json unreadable field {b}" for b in bad]
    rows: list[dict] | None = None
    if status is not None:
        info.state = status.get("state") if status.get("state") in STATES else "failed"
        if info.state == "running" and not locked:
            info.state = "interrupted"  # killed: the kernel dropped its lock
            info.error = {"type": "Killed", "message": "the process stopped without recording why "
                                                       "(killed, or the machine stopped)"}
        info.config_name = status.get("config_name") or info.config_name
        info.started_at = status.get("started_at")
        info.ended_at = status.get("ended_at")
        info.epochs_done = int(status.get("epochs_done") or 0)
        info.epochs_total = status.get("epochs_total") or info.epochs_total
        info.best = status.get("best")
        info.parameters = status.get("parameters")
        info.wall_seconds = status.get("wall_seconds")
        info.last = status.get("last")
        info.error = status.get("error") or info.error
        info.stopped_early = bool(status.get("stopped_early"))
        info.overrides = list(status.get("overrides") or [])
        if {"epochs_done", "best", "wall_seconds", "last"} & set(bad):  # fall back on metrics.csv
            rows = read_metrics(p)
            if rows:
                if "epochs_done" in bad:
                    info.epochs_done = rows[-1]["epoch"]
                if "last" in bad:
                    info.last = rows[-1]
                if "wall_seconds" in bad:
                    info.wall_seconds = _seconds_of(rows)
                if "best" in bad:
                    monitor = _legacy_monitor(config, rows[-1].keys())
                    if monitor:
                        info.best = _best_of(rows, *monitor)
        if "state" in bad:  # what the folder's files say
            total = info.epochs_total
            info.state = ("running" if locked else "failed" if not checkpoints else
                          "finished" if isinstance(total, int) and info.epochs_done >= total else "interrupted")
    else:
        info.recorded = False
        rows = read_metrics(p)
        info.started_at = _iso_of_mtime(p / "config.yaml") or _iso_of_mtime(p)
        info.epochs_done = int(rows[-1].get("epoch", len(rows))) if rows else 0
        if rows:
            info.last = rows[-1]
            info.ended_at = _iso_of_mtime(p / "metrics.csv")
            info.wall_seconds = _seconds_of(rows)
            monitor = _legacy_monitor(config, rows[-1].keys())
            if monitor:
                info.best = _best_of(rows, *monitor)
        if locked:
            info.state = "running"
        elif checkpoints:
            total = info.epochs_total
            info.state = "finished" if isinstance(total, int) and info.epochs_done >= total else "interrupted"
        else:
            info.state = "failed"
            info.error = {"type": "Unknown", "message": "stopped before its first checkpoint (no status.json: "
                                                        "an older nnctl wrote this folder)"}
    return info


# --- differences ------------------------------------------------------------------------------

def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A resolved config as dotted keys (list items as key[i]), the way --set names them."""
    out: dict[str, Any] = {}
    if isinstance(value, dict):
        if not value and prefix:
            out[prefix] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
        if not value:
            out[prefix] = []
    else:
        out[prefix] = value
    return out


_MISSING = object()


def differences(configs: list[dict | None]) -> dict[str, list]:
    """The dotted keys whose values differ among the configs -> each config's value (None: absent).

    The name is left out: runs of one config share it, and compare names runs by their folders.
    """
    flat = [flatten(c or {}) for c in configs]
    keys: list[str] = []
    seen: set[str] = set()
    for f in flat:
        for k in f:
            if k not in seen:
                seen.add(k)
                keys.append(k)
    out: dict[str, list] = {}
    for k in keys:
        if k == "name":
            continue
        values = [f.get(k, _MISSING) for f in flat]
        first = values[0]
        if any(v != first or (v is _MISSING) != (first is _MISSING) for v in values[1:]):
            out[k] = [None if v is _MISSING else v for v in values]
    return out


def _fill_differs(infos: list[RunInfo]) -> None:
    groups: dict[str, list[RunInfo]] = {}
    for info in infos:
        if info.config_name and info.config is not None:
            groups.setdefault(info.config_name, []).append(info)
    for members in groups.values():
        if len(members) < 2:
            continue
        diff = differences([m.config for m in members])
        for i, m in enumerate(members):
            m.differs = {k: v[i] for k, v in diff.items()}


def list_runs(folder: str | os.PathLike = "runs") -> list[RunInfo]:
    """The runs under a folder (its run subfolders; or the folder itself if it is a run), by start time."""
    root = Path(folder)
    if not root.exists():
        raise UsageError(f"{root}: no such folder" + (" (no run has been trained here yet: nnctl train CONFIG "
                                                       "makes runs/<name>/)" if str(folder) == "runs" else ""))
    if not root.is_dir():
        raise UsageError(f"{root}: is not a folder")
    if is_run(root):
        folders = [root]
    else:
        try:
            folders = sorted((p for p in root.iterdir() if not p.name.startswith(".") and is_run(p)),
                             key=lambda p: p.name)
        except OSError as exc:
            raise UsageError(f"{root}: cannot be read: {exc.strerror or exc}") from None
    infos = [read_run(p) for p in folders]
    infos.sort(key=lambda i: (i.started_at or "", i.name))
    _fill_differs(infos)
    return infos


# --- compare ------------------------------------------------------------------------------------

@dataclass
class Comparison:
    """Runs side by side: their config differences, final and best metrics, and their curves."""

    runs: list[RunInfo]
    differences: dict[str, list]  # dotted key -> one value per run
    histories: list[list[dict]]  # metrics.csv rows per run
    metric: str | None  # the monitored metric the picture's second panel shows
    plot: str | None = None

    def labels(self, width: int = 100) -> list[str]:
        """Each run's folder name plus what differs, e.g. 'digits-mlp-3 (train.optimizer.Adam.lr=0.01)'.

        Keys are shortened to their shortest unique last parts (``lr``) when the full ones do not fit.
        """
        names = _unique_names([r.path for r in self.runs])
        keys = list(self.differences)

        def texts(shown: list[str]) -> list[str]:
            return [", ".join(f"{s}={format_value(self.differences[k][i])}" for s, k in zip(shown, keys))
                    for i in range(len(names))]

        out = texts(keys)
        if any(len(n) + len(t) + 3 > width for n, t in zip(names, out)):
            out = texts(_short_keys(keys))
        labels = []
        for name, text in zip(names, out):
            room = max(width - len(name) - 3, 12)
            if len(text) > room:
                text = text[: room - 1].rstrip(", ") + "…"
            labels.append(f"{name} ({text})" if text else name)
        return labels

    def finals(self) -> list[dict]:
        return [dict(h[-1]) if h else dict(r.last or {}) for r, h in zip(self.runs, self.histories)]

    def to_dict(self) -> dict:
        return _plain({
            "runs": [r.to_dict() for r in self.runs],
            "differences": self.differences,
            "final": self.finals(),
            "best": [r.best for r in self.runs],
            "metric": self.metric,
            "labels": self.labels(),
            "plot": self.plot,
        })


def _short_keys(keys: list[str]) -> list[str]:
    """The shortest last parts that still tell the keys apart: train.optimizer.Adam.lr -> lr."""
    import re

    parts = [re.split(r"\.(?![^\[]*\])", k) for k in keys]
    out = []
    for i, p in enumerate(parts):
        for n in range(1, len(p) + 1):
            short = ".".join(p[-n:])
            if all(".".join(q[-n:]) != short for j, q in enumerate(parts) if j != i):
                break
        out.append(short)
    return out


def _unique_names(paths: list[str]) -> list[str]:
    names = [Path(p).name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [os.path.normpath(p) for p in paths]


def format_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, str):
        return v
    return json.dumps(v, separators=(", ", ": "))


def compare(runs: Iterable[str | os.PathLike]) -> Comparison:
    """Two or more run folders side by side (UsageError for a path that is not a run folder)."""
    paths = [Path(r) for r in runs]
    if len(paths) < 2:
        raise UsageError("compare needs two run folders or more: nnctl compare RUN RUN ...")
    seen: dict[str, Path] = {}
    for p in paths:
        if not p.exists():
            raise UsageError(f"{p}: no such run folder")
        if not is_run(p):
            raise UsageError(f"{p}: is not an nnctl run folder (no config.yaml, status.json or checkpoint)")
        key = os.path.realpath(p)
        if key in seen:
            raise UsageError(f"{p}: given twice (as {seen[key]})")
        seen[key] = p
    infos = [read_run(p) for p in paths]
    histories = [read_metrics(p) for p in paths]
    for info, rows in zip(infos, histories):  # best from metrics.csv where the record has none
        if (not info.best or info.best.get("value") is None) and rows:
            monitor = _legacy_monitor(info.config, rows[-1].keys())
            if monitor:
                info.best = _best_of(rows, *monitor)
    diff = differences([i.config for i in infos])
    for i, info in enumerate(infos):
        info.differs = {k: v[i] for k, v in diff.items()}
    metric = next((i.best["metric"] for i in infos if i.best and i.best.get("metric")), None)
    return Comparison(infos, diff, histories, metric)


def plot_comparison(comparison: Comparison, out_png: str | os.PathLike = "compare.png") -> str:
    """The runs' curves overlaid: losses (train solid, val dashed) and the monitored metric; one colour
    a run; the legend names each run and what differs. Written atomically; never over an input."""
    from .files import atomic_write, check_output

    out = Path(out_png)
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg", "pdf"):
        raise UsageError(f"-o {out}: the picture's file name must end in .png, .svg or .pdf")
    inputs = [Path(r.path) / name for r in comparison.runs for name in ("metrics.csv", "config.yaml", STATUS,
                                                                          "curves.png")]
    check_output(out, inputs, what="-o")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = comparison.metric
    if metric in (None, "train_loss", "val_loss"):
        metric = next((k for k in ("val_accuracy", "val_mae") if any(h and k in h[0] for h in comparison.histories)),
                      None)
    panels = 2 if metric else 1
    n = len(comparison.runs)
    ncol = 1 if n <= 6 else 2
    legend_rows = -(-n // ncol)
    # 100 dpi: the panels keep their size (3.5 in); the legend below adds 0.2 in a row
    height = 3.5 + 0.2 * legend_rows + 0.1
    fig, axes = plt.subplots(1, panels, figsize=(11 if panels == 2 else 7, height), squeeze=False)
    colours = plt.get_cmap("tab10" if n <= 10 else "tab20")
    labels = comparison.labels(width=100 if ncol == 1 else 60)
    from matplotlib.lines import Line2D

    handles = []
    for i, (info, rows) in enumerate(zip(comparison.runs, comparison.histories)):
        colour = colours(i % colours.N)
        epochs = [r.get("epoch") for r in rows]
        ax = axes[0][0]
        for key, style in (("train_loss", "-"), ("val_loss", "--")):
            if rows and key in rows[0]:
                ax.plot(epochs, [r.get(key) for r in rows], style, color=colour, lw=1.6, marker="o", ms=2.5)
        if metric:
            ax2 = axes[0][1]
            if rows and metric in rows[0]:
                ax2.plot(epochs, [r.get(metric) for r in rows], "-", color=colour, lw=1.6, marker="o", ms=2.5)
                best = info.best or {}
                if best.get("metric") == metric and best.get("epoch") is not None and best.get("value") is not None:
                    ax2.plot([best["epoch"]], [best["value"]], marker="*", ms=12, color=colour,
                             markeredgecolor="black", markeredgewidth=0.6, zorder=5)
        label = labels[i] if rows else f"{labels[i]}: no epoch finished ({info.state})"
        handles.append(Line2D([], [], color=colour, lw=2.2, ls="-" if rows else ":", label=label))
    ax = axes[0][0]
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("loss (train solid, val dashed)", fontsize=10)
    ax.grid(alpha=0.3)
    if metric:
        ax2 = axes[0][1]
        ax2.set_xlabel("epoch")
        ax2.set_ylabel(metric.replace("_", " "))
        ax2.set_title(f"{metric.replace('_', ' ')} (star: best epoch)", fontsize=10)
        ax2.grid(alpha=0.3)
    for a in axes[0]:
        a.xaxis.get_major_locator().set_params(integer=True)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    title = ", ".join(_unique_names([r.path for r in comparison.runs]))
    fig.suptitle("nnctl compare: " + (title if len(title) <= 110 else title[:109] + "…"), fontsize=11)
    fig.tight_layout(rect=(0, (0.2 * legend_rows + 0.1) / height, 1, 1 - 0.3 / height))
    try:
        atomic_write(out, lambda fh: fig.savefig(fh, format=fmt, dpi=100), inputs=inputs)
    finally:
        plt.close(fig)
    comparison.plot = str(out)
    return str(out)
