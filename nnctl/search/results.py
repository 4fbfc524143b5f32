"""``nnctl tune show``: a search's trials, its best one (at its best epoch), ``best.yaml`` and pictures."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from nnctl import files
from nnctl.config.yamlio import load_file
from nnctl.errors import ConfigError, UsageError
from nnctl.runs.rundir import RunDir
from nnctl.search import study as S

STALE_AFTER = 120.0  # as the search loop's (a trial of another machine without a heartbeat this long)
STATE_NAMES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
               TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}


@dataclass
class TrialRow:
    number: int
    state: str  # complete | pruned | failed | retried (did not count: run again) | running | died | waiting
    value: float | None  # complete: the metric at its best epoch; pruned: at its last reported epoch
    epoch: int | None
    params: dict[str, Any]
    run: str | None
    error: str | None = None

    def to_dict(self) -> dict:
        return {"number": self.number, "state": self.state, "value": self.value, "epoch": self.epoch,
                "params": self.params, "run": self.run, "error": self.error}


@dataclass
class TuneSummary:
    """What ``tune show`` prints (``to_dict`` for ``--json``)."""

    folder: str
    study: str
    metric: str
    direction: str
    target: int
    trials: list[TrialRow]
    best: TrialRow | None
    best_yaml: str | None = None
    pictures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.trials:
            out[t.state] = out.get(t.state, 0) + 1
        return out

    @property
    def commands(self) -> dict[str, str]:
        """How to retrain the best trial from scratch, and how to export its weights."""
        if self.best is None:
            return {}
        return {"retrain": f"nnctl train {self.best_yaml or Path(self.folder) / S.BEST}",
                "export": f"nnctl export-weights {self.best.run}"}

    def to_dict(self) -> dict:
        return {"folder": self.folder, "study": self.study, "metric": self.metric, "direction": self.direction,
                "trials_target": self.target, "counts": self.counts,
                "best": self.best.to_dict() if self.best else None, "best_yaml": self.best_yaml,
                "pictures": self.pictures, "commands": self.commands, "notes": self.notes,
                "trials": [t.to_dict() for t in self.trials]}


def _row(t: optuna.trial.FrozenTrial, now: float | None = None) -> TrialRow:
    state = STATE_NAMES.get(t.state, t.state.name.lower())
    if t.state == TrialState.FAIL and t.user_attrs.get(S.RETRY):
        state = "retried"
    if t.state == TrialState.RUNNING and not S.owner_alive(t, STALE_AFTER, now or time.time()):
        row = TrialRow(t.number, "died", None, None, dict(t.params), t.user_attrs.get(S.RUN),
                       "its process is gone (killed?): the next nnctl tune of this search runs it again")
        return row
    value, epoch = t.value, t.user_attrs.get(S.BEST_EPOCH)
    if t.state == TrialState.PRUNED and t.intermediate_values:
        epoch = max(t.intermediate_values)
        value = t.intermediate_values[epoch]
    error = t.user_attrs.get(S.ERROR) or (t.user_attrs.get(S.RETRY) if state == "retried" else None)
    return TrialRow(t.number, state, value, epoch, dict(t.params), t.user_attrs.get(S.RUN), error)


def summarize(folder: str | Path, write: bool = True, storage: str | None = None) -> TuneSummary:
    """The search in ``folder``; with ``write``, also ``best.yaml`` (the best trial's full config, ready for
    ``nnctl train``) and the pictures (optimization history, parameter importances, parallel coordinates)."""
    folder = Path(folder)
    study, record = S.load_study(require_search(folder), storage)
    trials = study.get_trials(deepcopy=False)
    rows = [_row(t) for t in trials]
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)]
    best = None
    if complete:
        pick = max if record["direction"] == "maximize" else min
        best = _row(pick(complete, key=lambda t: (t.value, -t.number) if pick is max else (t.value, t.number)))
    summary = TuneSummary(str(folder), record["study"], record["metric"], record["direction"],
                          int(record.get("trials") or 0), rows, best)
    if write:
        if best is not None:
            summary.best_yaml = _write_best(folder, best, summary.notes)
        summary.pictures = _pictures(study, folder, record["metric"], summary.notes)
    return summary


def _write_best(folder: Path, best: TrialRow, notes: list[str]) -> str | None:
    if not best.run or not RunDir(best.run).config.is_file():
        notes.append(f"the best trial's run folder {best.run} has no config.yaml (moved or removed): no best.yaml")
        return None
    try:
        data = load_file(str(RunDir(best.run).config)).data
    except ConfigError as exc:
        notes.append(f"{RunDir(best.run).config}: unreadable ({exc.problems[0].message}): no best.yaml")
        return None
    data = {k: v for k, v in data.items() if k != "tune"} if isinstance(data, dict) else data
    text = (f"# the best trial ({best.number}) of the search in {folder}: nnctl train {folder / S.BEST}\n"
            + yaml.safe_dump(data, sort_keys=False)).encode()
    target = folder / S.BEST
    files.atomic_write(target, lambda fh: fh.write(text), inputs=[RunDir(best.run).config])
    return str(target)


def _pictures(study: optuna.Study, folder: Path, metric: str, notes: list[str]) -> list[str]:
    """Optuna's own matplotlib plots, written through the one writer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    plots = [("history.png", ovm.plot_optimization_history, 1),
             ("epochs.png", _intermediate, 0),  # every trial's metric by epoch: where the pruned ones stopped
             ("importances.png", ovm.plot_param_importances, 2),
             ("parallel.png", ovm.plot_parallel_coordinate, 1)]
    written = []
    for name, plot, needs in plots:
        if needs == 0 and not any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
            continue
        if len(done) < needs:
            notes.append(f"{name}: needs {needs} complete trial{'s' if needs > 1 else ''}; {len(done)} so far")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            try:
                ax = plot(study, target_name=metric)
            except (ValueError, RuntimeError) as exc:  # e.g. importances of one distinct value
                notes.append(f"{name}: not drawn ({' '.join(str(exc).split())[:200]})")
                continue
        fig = (ax[0] if hasattr(ax, "__len__") and not hasattr(ax, "figure") else ax).figure
        try:
            fig.set_size_inches(max(fig.get_figwidth(), 8), max(fig.get_figheight(), 5))
            fig.tight_layout()
            written.append(str(files.save_figure(fig, folder / name, "png", dpi=100)))
        finally:
            plt.close(fig)
    return written


def _intermediate(study: optuna.Study, target_name: str):
    """Optuna's intermediate-values plot, titled with the metric (its y axis says only "Intermediate Value")."""
    from optuna.visualization import matplotlib as ovm

    ax = ovm.plot_intermediate_values(study)
    ax.set_ylabel(f"{target_name} (each epoch)")
    ax.set_xlabel("epoch")
    ax.set_title(f"{target_name} by epoch, every trial (pruned ones end early)")
    return ax


def require_search(folder: str | Path) -> Path:
    p = Path(folder)
    if not p.is_dir():
        raise UsageError(f"{p}: no such search folder (nnctl tune CONFIG makes runs/<name>-tune/)")
    return p
