"""``nnctl tune``: the search loop. Each trial is a normal ``nnctl train`` run in the search folder.

One worker runs trials one after another in its own process (``nnctl.train`` with the sampled values
as ``--set`` overrides, into ``trial-NNN/``), reporting the metric every epoch so the pruner can stop
it (``errors.Pruned``: the run's record says pruned, its checkpoints are kept). ``workers > 1`` starts
that many worker processes on this machine, all on one study; other machines join a study in a shared
database by running the same command (Optuna's storage is the only coordinator).

Exactly ``tune.trials`` trials count: a worker asks for a trial only while the counted and running ones
are fewer (on one machine under a lock, so never one too many); a trial whose process died is marked
failed with ``nnctl.retry``, and its parameters are queued to run again.
"""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from nnctl import checking as CHK
from nnctl.config import loader as CL
from nnctl.config import structure as CS
from nnctl.config.tune import choice_label, flow
from nnctl.errors import NnctlError, Pruned, UsageError
from nnctl.locks import FileLock
from nnctl.runs import mlflow as MLF
from nnctl.runs.metrics import read_metrics
from nnctl.runs.status import read_status
from nnctl.training import launch as LAUNCH
from nnctl.training import run as RUN
from nnctl.training.signals import Interrupted, stop_on_sigterm
from nnctl.search import study as S

HEARTBEAT_SECONDS = 20.0
STALE_AFTER = 120.0  # a trial of another machine without a heartbeat for this long is taken as dead
WORKER_ENV = S.WORKER_INDEX  # set in the worker processes that `--workers N` starts (1, 2, ...)
TRIAL_ENV = "NNCTL_TUNE_TRIAL"  # a DDP trial's processes: the study and trial their rank 0 reports to


@dataclass
class TrialOutcome:
    """One trial as it starts (state running) and ends (complete, pruned, failed, interrupted)."""

    number: int
    state: str
    params: dict[str, Any]
    run: str
    value: float | None = None  # complete: the metric at its best epoch; pruned: at the last one
    epoch: int | None = None  # that epoch
    error: str | None = None
    seconds: float = 0.0


@dataclass
class TuneResult:
    folder: Path
    metric: str
    direction: str
    outcomes: list[TrialOutcome] = field(default_factory=list)  # this process's trials
    stopped: str = ""  # why the search stopped: "" (every trial done), "timeout"
    notes: list[str] = field(default_factory=list)  # what did not work and cost nothing else (MLflow away)


def space_of(params: dict[str, dict]) -> dict[str, list]:
    """The grid sampler's space: every value of each parameter (choices as their labels)."""
    grid: dict[str, list] = {}
    for path, spec in params.items():
        if "choice" in spec:
            grid[path] = [choice_label(v) for v in spec["choice"]]
        elif "int" in spec:
            lo, hi = (int(v) for v in spec["int"])
            grid[path] = list(range(lo, hi + 1, int(spec.get("step") or 1)))
        elif spec.get("step") is not None:
            lo, hi = (float(v) for v in spec["float"])
            n = int(math.floor((hi - lo) / spec["step"] + 1e-9))
            grid[path] = [lo + i * spec["step"] for i in range(n + 1)]
    return grid


def sample(trial: optuna.Trial, params: dict[str, dict]) -> dict[str, Any]:
    """The trial's value of each parameter, as the config takes it."""
    values: dict[str, Any] = {}
    for path, spec in params.items():
        if "choice" in spec:
            labels = [choice_label(v) for v in spec["choice"]]
            values[path] = spec["choice"][labels.index(trial.suggest_categorical(path, labels))]
        elif "int" in spec:
            lo, hi = (int(v) for v in spec["int"])
            values[path] = trial.suggest_int(path, lo, hi, step=int(spec.get("step") or 1), log=spec.get("log", False))
        else:
            lo, hi = (float(v) for v in spec["float"])
            values[path] = trial.suggest_float(path, lo, hi, step=spec.get("step"), log=spec.get("log", False))
    return values


def overrides_of(values: dict[str, Any]) -> list[str]:
    """The trial's values as ``--set`` options (what its run records, and what retrains it)."""
    return [f"{path}={flow(v)}" for path, v in values.items()]


# --- the search -----------------------------------------------------------------------------------

def tune(config: str, *, overrides: list[str] | tuple = (), out: str | os.PathLike | None = None,
         workers: int = 1, on_trial: Callable[[TrialOutcome], None] | None = None,
         stale_after: float = STALE_AFTER, nproc_per_node: int = 1) -> TuneResult:
    """Run (or continue) the search of a config file's ``tune:`` section until ``tune.trials`` count."""
    overrides = list(overrides)
    if workers < 1:
        raise UsageError("--workers must be at least 1")
    if nproc_per_node < 1:
        raise UsageError("--nproc-per-node must be at least 1")
    checked = CHK.load_checked(config, overrides, purpose="tune")
    cfg = checked.cfg
    if cfg.tune is None:
        raise UsageError(f"{config}: has no tune: section (what to search; see the README's Tuning section)")
    if cfg.train.threads is None and workers > 1:
        overrides.append(f"train.threads={max(1, (os.cpu_count() or 1) // workers)}")
    folder = Path(out) if out is not None else S.default_folder(cfg.name)
    search = S.open_search(cfg, folder, space_of(cfg.tune.params), config, overrides)
    result = TuneResult(folder, search.metric, search.direction)
    mlflow = _mlflow_parent(search, cfg, result.notes) if "mlflow" in cfg.train.log else None
    if mlflow is not None:  # every trial's MLflow run a child of the search's
        overrides += [f"train.mlflow.tracking_uri={mlflow[0]}", f"train.mlflow.parent_run_id={mlflow[1]}"]
    if workers > 1 and not os.environ.get(WORKER_ENV):
        result.stopped = _run_workers(config, overrides, folder, workers, nproc_per_node)
        return result
    deadline = time.monotonic() + cfg.tune.timeout_seconds if cfg.tune.timeout is not None else None
    target = min(cfg.tune.trials, _grid_size(cfg))
    try:
        return _search(search, cfg, config, overrides, result, target, deadline, stale_after, on_trial,
                       nproc_per_node, mlflow)
    except Interrupted as exc:  # the trial's own message says "resume with --resume": a search runs it again
        stopped = Interrupted(exc.signum, None)
        stopped.args = (f"stopped by {signal.Signals(exc.signum).name}: the running trial is marked to run "
                        "again; the same nnctl tune command continues the search",)
        raise stopped from None


def _search(search, cfg, config, overrides, result, target, deadline, stale_after, on_trial, nproc_per_node,
            mlflow) -> TuneResult:
    """The worker's loop: trials one after another until the study has its trials (or the timeout)."""
    with stop_on_sigterm():
        while True:
            trial = _next_trial(search, target, deadline, stale_after)
            if isinstance(trial, str):
                result.stopped = trial if trial != "done" else ""
                if mlflow is not None and trial == "done":
                    _mlflow_end(search, mlflow, result.notes)
                return result
            if trial is None:
                time.sleep(1.0)  # the last trials run elsewhere: wait, in case one dies and must run again
                continue
            outcome = _run_trial(search, cfg, config, overrides, trial, on_trial, nproc_per_node)
            result.outcomes.append(outcome)
            gc.collect()  # the trial's model, optimizer and data (reference cycles) freed now: memory stays flat


MLFLOW_RUN = "nnctl.mlflow_run"  # the study's user attribute: [tracking URI, the search's MLflow run id]


def _mlflow_parent(search: S.Search, cfg, notes: list[str]) -> tuple[str, str] | None:
    """(tracking URI, run id) of the search's MLflow run, made once per study (its id is kept in the
    study, so every worker and machine finds it); None, with a note, when MLflow cannot be reached."""
    section = cfg.train.mlflow
    uri = section.tracking_uri if section is not None and section.tracking_uri else \
        (search.folder.resolve() / "mlruns").as_uri()
    kept = search.study.user_attrs.get(MLFLOW_RUN)
    known = kept[1] if isinstance(kept, list) and len(kept) == 2 and kept[0] == uri else None
    params = {"tune.metric": search.metric, "tune.direction": search.direction,
              **{f"tune.params.{k}": v for k, v in cfg.tune.params.items()}}
    try:
        run_id = MLF.search_run(uri, MLF.experiment_name(cfg), f"{cfg.name} search", known, params)
    except Exception as exc:  # MLflow away: the search goes on, its trials log where their config says
        notes.append(f"MLflow: the search's run could not be made ({' '.join(str(exc).split())[:200]}); "
                     "trials log without a parent run")
        return None
    if run_id != known:
        search.study.set_user_attr(MLFLOW_RUN, [uri, run_id])
    return uri, run_id


def _mlflow_end(search: S.Search, mlflow: tuple[str, str], notes: list[str]) -> None:
    done = [t for t in search.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    pick = max if search.direction == "maximize" else min
    try:
        MLF.end_search_run(*mlflow, search.metric, pick(t.value for t in done) if done else None)
    except Exception as exc:
        notes.append(f"MLflow: the search's run could not be ended ({' '.join(str(exc).split())[:200]})")


def _grid_size(cfg) -> int:
    if "grid" not in cfg.tune.sampler:
        return cfg.tune.trials
    return math.prod(len(v) for v in space_of(cfg.tune.params).values())


def _next_trial(search: S.Search, target: int, deadline: float | None, stale_after: float):
    """A new trial (ours to run), None (wait: the last ones are running elsewhere), or why to stop."""
    study = search.study
    lock = FileLock(search.folder / ".ask.lock")  # this machine's workers ask one at a time
    with lock:
        _retry_dead(study, stale_after)
        trials = study.get_trials(deepcopy=False)
        done = sum(S.counted(t) for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        if done >= target:
            return "done"
        if deadline is not None and time.monotonic() >= deadline:
            return "timeout"
        if done + running >= target:
            return None
        trial = study.ask()
        trial.set_user_attr(S.HOST, socket.gethostname())
        trial.set_user_attr(S.PID, os.getpid())
        trial.set_user_attr("nnctl.started", S.process_start(os.getpid()))
        trial.set_user_attr(S.BEAT, time.time())
    # another machine (a shared database, no common lock) may have asked at the same moment
    earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number
               and (S.counted(t) or t.state == TrialState.RUNNING)]
    if len(earlier) >= target:
        trial.set_user_attr(S.RETRY, "surplus: the study had its trials")
        _tell(study, trial, state=TrialState.FAIL)
        return None
    return trial


def _retry_dead(study: optuna.Study, stale_after: float) -> None:
    """RUNNING trials whose process is gone: failed with nnctl.retry, their parameters queued again."""
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if S.owner_alive(t, stale_after, now):
            continue
        try:
            optuna.trial.Trial(study, t._trial_id).set_user_attr(S.RETRY, "its process died")
            _tell(study, t.number, state=TrialState.FAIL)
        except (RuntimeError, ValueError):  # another process got there first
            continue
        study.enqueue_trial(t.params, user_attrs={"nnctl.retry_of": t.number}, skip_if_exists=False)


def _run_trial(search: S.Search, cfg, config: str, overrides: list[str], trial: optuna.Trial,
               on_trial: Callable | None, nproc_per_node: int = 1) -> TrialOutcome:
    study, metric = search.study, search.metric
    began = time.monotonic()
    run = S.trial_folder(search.folder, trial.number)
    try:
        values = sample(trial, cfg.tune.params)
    except BaseException:
        _tell(study, trial, state=TrialState.FAIL)
        raise
    outcome = TrialOutcome(trial.number, "running", values, str(run))
    trial.set_user_attr(S.RUN, str(run))
    if on_trial is not None:
        on_trial(outcome)
    sets = [*overrides, *overrides_of(values), "tune=null"]
    trial_cfg = _valid_config(config, [*overrides, *overrides_of(values)])
    if trial_cfg is not None and trial_cfg.data is not None:
        try:  # the data its earlier trials trained on, unchanged: else the search stops here
            S.refuse_changed_data(search, trial_cfg)
        except BaseException as exc:
            trial.set_user_attr(S.ERROR, " ".join(str(exc).split())[:2000])
            _tell(study, trial, state=TrialState.FAIL)
            raise
    try:
        # the sampled config with its search (tune.metric against this trial's model: a top-5 metric of a
        # 3-output trial) through the check pipeline: its refusal is the trial's failure, before any folder
        CHK.check(CL.load_document(config, [*overrides, *overrides_of(values)]), "train").refuse()
        with _Heartbeat(trial):
            if nproc_per_node > 1:
                history = _launch_trial(search, cfg, config, sets, run, trial, nproc_per_node)
            else:
                history = RUN.train(config, overrides=sets, out=str(run),
                                    on_event=reporter(trial, metric, cfg.train.epochs)).history
    except Pruned as exc:
        if trial_cfg is not None and trial_cfg.data is not None:
            S.note_data(trial, trial_cfg, run)
        _tell(study, trial, state=TrialState.PRUNED)
        outcome.state, outcome.value, outcome.epoch = "pruned", exc.value, exc.epoch
    except (Interrupted, KeyboardInterrupt) as exc:
        _interrupted(study, trial, exc)
        raise
    except NnctlError as exc:
        outcome.state, outcome.error = "failed", " ".join(str(exc).split())[:2000]
        trial.set_user_attr(S.ERROR, outcome.error)
        _tell(study, trial, state=TrialState.FAIL)
    except BaseException:
        _interrupted(study, trial, None)
        raise
    else:
        best = _best(history, metric, search.direction)
        if best is None:
            outcome.state, outcome.error = "failed", f"the run logged no finite {metric}"
            trial.set_user_attr(S.ERROR, outcome.error)
            _tell(study, trial, state=TrialState.FAIL)
        else:
            outcome.state, (outcome.epoch, outcome.value) = "complete", best
            trial.set_user_attr(S.BEST_EPOCH, outcome.epoch)
            if trial_cfg is not None and trial_cfg.data is not None:
                S.note_data(trial, trial_cfg, run)
            _tell(study, trial, outcome.value)
    outcome.seconds = time.monotonic() - began
    if on_trial is not None:
        on_trial(outcome)
    return outcome


def _valid_config(config: str, sets: list[str]):
    """The trial's config, or None when it is not valid (the check pipeline then says why: a failed trial)."""
    try:
        return CS.validate(CL.load_document(config, sets))
    except NnctlError:
        return None


def reporter(trial: optuna.Trial, metric: str, epochs: int) -> Callable:
    """The run's on_event for a trial: the metric to Optuna after every epoch; Pruned when the pruner says
    so (never after the last epoch: there is nothing left to save). Under DDP it runs on rank 0, and the
    trainer stops every rank together (``Trainer.epoch_end``)."""

    def report(event) -> None:
        if event.kind != "epoch_end" or event.row is None:
            return
        value = event.row.get(metric)
        epoch = int(event.row.get("epoch", event.epoch + 1))
        if value is None or not math.isfinite(value):
            return
        trial.report(float(value), epoch)
        if epoch < epochs and trial.should_prune():
            raise Pruned(epoch, metric, float(value))

    return report


def remote_reporter(spec: str) -> Callable:
    """``reporter`` in a DDP trial's rank 0 (``nnctl train`` started by torchrun for the search): the trial
    named by the search in ``TRIAL_ENV``, reached through the study's storage."""
    d = json.loads(spec)
    storage = S.open_storage(d["storage"])
    study = optuna.load_study(study_name=d["study"], storage=storage,
                              pruner=S.pruner_from(d["pruner"], int(d["epochs"])))
    return reporter(optuna.trial.Trial(study, int(d["trial_id"])), d["metric"], int(d["epochs"]))


def _launch_trial(search: S.Search, cfg, config: str, sets: list[str], run: Path, trial: optuna.Trial,
                  nproc_per_node: int) -> list[dict]:
    """A trial as a DDP run (torch.distributed.run, as nnctl train --nproc-per-node): its rank 0 reports to
    the study itself (``remote_reporter``); the outcome is read back from the run's own record."""
    spec = {"storage": cfg.tune.storage if cfg.tune.storage and "://" in cfg.tune.storage
            else os.path.abspath(cfg.tune.storage or search.folder / S.JOURNAL),
            "study": search.study.study_name, "trial_id": trial._trial_id, "metric": search.metric,
            "pruner": cfg.tune.pruner, "epochs": cfg.train.epochs}
    old = os.environ.get(TRIAL_ENV)
    os.environ[TRIAL_ENV] = json.dumps(spec)
    failure = None
    try:
        LAUNCH.launch(config, LAUNCH.Torchrun(nproc_per_node=nproc_per_node), overrides=sets, out=str(run))
    except NnctlError as exc:
        failure = exc
    finally:
        if old is None:
            os.environ.pop(TRIAL_ENV, None)
        else:
            os.environ[TRIAL_ENV] = old
    status = read_status(run) or {}
    history = read_metrics(run)
    if status.get("state") == "pruned":
        last = history[-1] if history else {}
        raise Pruned(int(last.get("epoch", 0)), search.metric, float(last.get(search.metric, float("nan"))))
    if status.get("state") == "finished" and failure is None:
        return history
    message = ((status.get("error") or {}).get("message") or (str(failure) if failure else "")
               or f"the run ended {status.get('state') or 'without a record'}")
    raise NnctlError(message)


def _tell(study: optuna.Study, trial, *args, **kwargs) -> None:
    """study.tell, where the grid sampler's "the grid is done" (a Study.stop meant for study.optimize, raised
    after the trial's state is stored) is not an error: the loop stops by counting trials."""
    try:
        study.tell(trial, *args, **kwargs)
    except RuntimeError as exc:
        if "Study.stop" not in str(exc):
            raise


def _interrupted(study: optuna.Study, trial: optuna.Trial, exc: BaseException | None) -> None:
    """A trial stopped by a signal (or an internal error): it does not count; its values run again."""
    try:
        trial.set_user_attr(S.RETRY, "stopped by a signal" if exc is not None else "stopped by an internal error")
        _tell(study, trial, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"nnctl.retry_of": trial.number}, skip_if_exists=False)
    except Exception:  # the storage itself is gone: the next start sees a dead RUNNING trial
        pass


def _best(history: list[dict], metric: str, direction: str) -> tuple[int, float] | None:
    """(epoch, value) of the best epoch for the search's metric, not the last one."""
    rows = [(int(r["epoch"]), float(r[metric])) for r in history
            if r.get(metric) is not None and math.isfinite(r[metric])]
    if not rows:
        return None
    pick = max if direction == "maximize" else min
    return pick(rows, key=lambda er: (er[1], -er[0]) if direction == "maximize" else (er[1], er[0]))


class _Heartbeat:
    """Stamps the trial every HEARTBEAT_SECONDS while it runs (how other machines know it is alive)."""

    def __init__(self, trial: optuna.Trial):
        self.trial, self.stop = trial, threading.Event()
        self.thread = threading.Thread(target=self._beat, name="nnctl-tune-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_SECONDS):
            try:
                self.trial.set_user_attr(S.BEAT, time.time())
            except Exception:  # the trial ended meanwhile, or the storage is away for a moment
                pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)
        return False


# --- several workers on this machine ---------------------------------------------------------------

def _run_workers(config: str, overrides: list[str], folder: Path, workers: int, nproc_per_node: int) -> str:
    """Start the worker processes, pass SIGINT/SIGTERM on to them, wait for all; their exit says how."""
    cmd = [sys.executable, "-m", "nnctl", "tune", os.path.abspath(config), "--out", str(folder),
           "--nproc-per-node", str(nproc_per_node)]
    for item in overrides:
        cmd += ["--set", item]
    procs = [subprocess.Popen(cmd, env={**os.environ, WORKER_ENV: str(i + 1)}, stdin=subprocess.DEVNULL)
             for i in range(workers)]  # each worker its own stream of the seeded sampler (study.WORKER_INDEX)
    got: list[int] = []

    def forward(signum, frame):
        got.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [p.wait() for p in procs]
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if got:
        raise Interrupted(got[0], None)
    bad = [c for c in codes if c != 0]
    if bad:
        raise NnctlError(f"{len(bad)} of {workers} tune workers failed (exit {', '.join(map(str, bad))}); "
                         "run the same command again to continue the search")
    return ""
