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

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable
from nnctl.errors import UsageError
from nnctl.runs.rundir import CHECKPOINTS, SEARCH_RECORD, RunDir
from nnctl.config.loader import flatten
from nnctl.errors import CheckpointError
from nnctl.runs.status import read_status, STATES, _BIG, _is_int, _is_num, _is_str, _iso_of_mtime, _plain, read_status_checked
from nnctl.runs.metrics import read_metrics
from nnctl.tasks import mode_of, task_of_config
from nnctl.config.yamlio import load_file
from nnctl.errors import ConfigError
import re


def resolve(source: str | os.PathLike, which: str = "last") -> Path:
    """A run folder or a checkpoint file -> the checkpoint file."""
    if which not in CHECKPOINTS:
        raise UsageError(f"--which must be best or last, not {which!r}")
    p = Path(source)
    if p.is_dir():
        run = RunDir(p)
        f = run.checkpoint(which)
        if f.exists():
            return f
        other = run.checkpoint("last" if which == "best" else "best")
        if other.exists():
            raise CheckpointError(f"{p}: no {f.name} in this run folder (it has {other.name}: "
                                  f"use --which {other.stem})")
        if run.config.exists():


            status = read_status(p) or {}
            error = status.get("error") if isinstance(status.get("error"), dict) else {}
            message = " ".join(str(error.get("message") or "").split())
            message = message if len(message) <= 300 else message[:299] + "…"
            if status.get("state") in ("failed", "interrupted") and message:
                what = "failed" if status["state"] == "failed" else "was interrupted"
                raise CheckpointError(f"{p}: this run {what} before its first checkpoint: {message}; start it "
                                      f"again with: nnctl train {run.config} --out {p}")
            raise CheckpointError(f"{p}: this run stopped before its first checkpoint was written, so there is "
                                  f"nothing to load or resume; start it again with: nnctl train "
                                  f"{run.config} --out {p}")
        raise CheckpointError(f"{p}: no {f.name} in this folder (is it an nnctl run folder?)")
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or run folder")
    return p


# --- reading a run folder -------------------------------------------------------------------

def _read_yaml(path: Path) -> tuple[dict | None, str | None]:
    """A run's config.yaml through the one YAML reader (config.yamlio, with its limits: an alias bomb,
    a self-referential alias, deep nesting or a huge file is refused before any object is built).

    Returns (the mapping, None), (None, None) when there is no config.yaml, or (None, why) when it is
    refused: a damaged file is described in one line, never fatal to a listing.
    """
    if not path.exists():
        return None, None
    try:
        data = load_file(str(path)).data
    except ConfigError as exc:
        first = exc.problems[0] if exc.problems else None
        if first is None:
            return None, "config.yaml unreadable"
        where = f" at line {first.line}" if first.line is not None else ""
        what = f" ({first.path})" if first.path else ""
        more = len(exc.problems) - 1
        tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        return None, f"config.yaml unreadable{where}{what}: {' '.join(first.message.split())}{tail}"
    if not isinstance(data, dict):
        return None, f"config.yaml unreadable: a {type(data).__name__}, not a mapping"
    return data, None


def _legacy_monitor(config: dict | None, columns: Iterable[str]) -> tuple[str, str] | None:
    """For folders without status.json: the metric best.pt tracked, from config.yaml and the columns
    metrics.csv has (an explicit train.checkpoint.monitor, else the default monitor of the config's task
    as training picks it, else val_loss, train_loss)."""
    cols = set(columns)
    train = (config or {}).get("train")
    chk = train.get("checkpoint") if isinstance(train, dict) else None
    if isinstance(chk, dict) and isinstance(chk.get("monitor"), str) and chk["monitor"] in cols:
        mode = chk.get("mode")
        return chk["monitor"], mode if mode in ("min", "max") else mode_of(chk["monitor"])
    for metric in (task_of_config(config).monitor, "val_loss", "train_loss"):
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
    p = Path(folder)
    run = RunDir(p)
    status, bad = read_status_checked(p)
    config, unreadable = _read_yaml(run.config)
    checkpoints = [path.name for path in (run.last, run.best) if path.exists()]
    locked = run.is_locked()
    train = (config or {}).get("train") if isinstance((config or {}).get("train"), dict) else {}
    name = (config or {}).get("name")
    epochs = train.get("epochs")
    info = RunInfo(name=p.name, path=str(p), state="failed", config=config, checkpoints=checkpoints,
                   config_name=name if _is_str(name, 1000) else None,
                   epochs_total=epochs if _is_int(epochs) else None)
    info.notes = [f"status.json unreadable field {b}" for b in bad] + ([unreadable] if unreadable else [])
    rows: list[dict] | None = None
    if status is not None:
        info.state = status.get("state") if status.get("state") in STATES else "failed"
        if info.state == "running" and not locked:
            done, total, stopping = status.get("epochs_done"), status.get("epochs_total"), status.get("stopping_at")
            saved = len(read_metrics(p))  # metrics.csv is written after the epoch's checkpoints: epochs saved
            done = max(done, saved) if _is_int(done) else saved
            if status.get("stopped_early") or (_is_int(total) and done >= total) or \
                    (_is_int(stopping) and saved >= stopping):
                # killed after its last checkpoint (epoch_end is recorded after the save): it is finished,
                # as its checkpoint says and a --resume answers
                info.state = "finished"
            else:
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
        info.started_at = _iso_of_mtime(run.config) or _iso_of_mtime(p)
        info.epochs_done = int(rows[-1].get("epoch", len(rows))) if rows else 0
        if rows:
            info.last = rows[-1]
            info.ended_at = _iso_of_mtime(run.metrics)
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


def _run_folders(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if not p.name.startswith(".") and RunDir(p).is_run()),
                  key=lambda p: p.name)


def list_runs(folder: str | os.PathLike = "runs") -> list[RunInfo]:
    """The runs under a folder (its run subfolders, and the trials of a search folder in it, named
    ``<search>/<trial>``; or the folder itself if it is a run), by start time."""
    root = Path(folder)
    if not root.exists():
        raise UsageError(f"{root}: no such folder" + (" (no run has been trained here yet: nnctl train CONFIG "
                                                       "makes runs/<name>/)" if str(folder) == "runs" else ""))
    if not root.is_dir():
        raise UsageError(f"{root}: is not a folder")
    if RunDir(root).is_run():
        folders = [root]
    else:
        try:
            folders = _run_folders(root)
            # a search folder's trials (nnctl tune: runs/<name>-tune/trial-NNN), named <search>/<trial>
            for search in sorted(p for p in root.iterdir() if (p / SEARCH_RECORD).is_file() and not p.is_symlink()):
                folders += _run_folders(search)
        except OSError as exc:
            raise UsageError(f"{root}: cannot be read: {exc.strerror or exc}") from None
    infos = [read_run(p) for p in folders]
    for info, p in zip(infos, folders):
        if p.parent != root and p != root:
            info.name = f"{p.parent.name}/{p.name}"
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
        if not RunDir(p).is_run():
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
