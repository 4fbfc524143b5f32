"""One training run: the run folder and its lock, resume / init / freeze decisions, config.yaml, restarts.

The order is what makes it safe. The run folder is claimed (created with ``mkdir``, or
locked) before anything is read or chosen: a new run's folder name is taken with an
atomic ``mkdir`` and locked at once; a resumed run's folder is locked before its
checkpoint is read. The lock is a ``flock`` on ``RUN/.lock``, so the kernel drops it when
the process dies: there are no stale locks, whatever happens to the pid.

Resume semantics (README, "Resuming"):

- ``--resume RUN`` or ``--resume RUN/last.pt`` continues that run, in that folder;
- any other checkpoint (``RUN/best.pt``, a ``frozen.pt`` from ``nnctl freeze -o``, a
  copied file), or ``--resume RUN --out NEW``, starts a new run folder (``--out`` or
  ``runs/<name>-N``) from that checkpoint's full training state; the source is only read.

nnctl never writes into a folder it did not make: ``--out`` must be new, empty, or a run
folder that holds no checkpoint (a run that stopped before its first one).

The run's record, ``RUN/status.json`` (``nnctl.runs``), is written by rank 0: running at the
start, after each epoch, and finished / interrupted / failed (with the error) at the end,
before the lock is released. A run that fails before its first checkpoint keeps its folder
with config.yaml and status.json; the next run of the same name reuses that folder (it holds
no checkpoint and only nnctl's files), so a failure never pushes it to a ``-2`` suffix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable
import torch
import yaml
from nnctl import checking as CHK
from nnctl.config import schema as C
from nnctl.data import loading as D
from nnctl.data.record import changed_split, data_changes
from nnctl.data.sources.read import read_paths
from nnctl.errors import CheckpointError, ConfigError, Pruned, UsageError
from nnctl.model import freeze as F
from nnctl.model import plan as M
from nnctl.model import weights as W
from nnctl.runs import checkpoint as K
from nnctl.runs import mlflow as MLF
from nnctl.runs import tensorboard as TB
from nnctl.runs.status import StatusRecorder, state_of_exception
from nnctl.training import distributed as DIST
from nnctl.training import trainer as T
from nnctl.training.policy import monitor_for
from nnctl.training.ranks import check_same_run
from nnctl.training.signals import Interrupted, signal_of
from nnctl.training.resume import ResumeSource, accepted_resume, resume_source  # noqa: F401  (launch uses them)
from nnctl.runs.rundir import RunDir
from nnctl.seeds import rank_seed
from nnctl.runs.claim import Claim, claim_existing, claim_new
from nnctl.runs.plots import plot_quietly
from nnctl.optim import losses
from nnctl.model.tv import pretrained_preprocessing
from nnctl import files as files

# --- the run ---------------------------------------------------------------------------------

@dataclass
class RunResult:
    """What nnctl.train returns: the run folder, the fit result and the learning-curve plot."""

    run_dir: Path
    fit: Any
    plot: str | None = None
    notes: list[str] = field(default_factory=list)
    name: str = ""

    @property
    def history(self) -> list[dict]:
        return self.fit.history

    @property
    def best(self) -> dict:
        return self.fit.best


@dataclass
class Request:
    """What train() was asked, once its own checks passed: the one argument of _train_locked."""

    cfg: Any  # the checked config (None: the resumed checkpoint's, checked in _train_locked)
    doc: Any
    checked: Any  # the check pipeline's result for cfg
    overrides: list[str]
    out: str | None
    source: ResumeSource | None  # what --resume names
    init: str | None
    partial: bool
    force: bool
    on_event: Callable | None
    say: Callable[[str], None]
    dist: Any  # distributed.Dist
    claim: Claim | None  # the lock of the run folder a resume continues in (rank 0)


@dataclass
class RunSpec:
    """One run made ready to fit (built by _train_locked): the one argument of _fit_recorded and _fit."""

    cfg: Any
    doc: Any
    model: Any
    plan: Any
    state: dict | None  # the checkpoint resumed from (its full training state), or None
    run_dir: Path
    claim: Claim | None  # released when the run ends well (the caller abandons it on a failure)
    continuing: bool  # the run continues in its own folder
    freezing: dict | None
    init_report: str | None
    notes: list[str]
    dev: Any  # torch.device
    dist: Any  # distributed.Dist
    on_event: Callable | None
    say: Callable[[str], None]
    source_name: str = ""  # the checkpoint a new run starts from
    overrides: list[str] = field(default_factory=list)
    force: bool = False  # --resume --force: resume despite changed settings or data


def train(config: str | None = None, *, overrides: list[str] | tuple = (), out: str | None = None,
          resume: str | None = None, init: str | None = None, partial: bool = False, force: bool = False,
          epochs: int | None = None, seed: int | None = None, device: str | None = None,
          on_event: Callable | None = None, on_message: Callable[[str], None] | None = None,
          dist=None) -> RunResult:
    """Run one training: claim the run folder, resume or initialise, train, write checkpoints.

    ``on_message`` receives the run's information lines (device, run folder, data, model,
    notes); ``on_event`` the loop's progress events. Errors are nnctl's exception types.
    """
    say = on_message or (lambda text: None)
    if resume and init:
        raise UsageError("--resume continues a run; --init starts a new one from weights: use one")
    if config is None and not resume:
        raise UsageError("give a CONFIG to train, or --resume RUN_FOLDER_OR_CHECKPOINT")
    if partial and not init:
        raise UsageError("--partial applies to --init WEIGHTS; there is no --init here")
    if force and not resume:
        raise UsageError("--force applies to --resume; there is no --resume here")
    overrides = list(overrides)
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    if seed is not None:
        overrides.append(f"seed={seed}")
    if device is not None:
        overrides.append(f"train.device={device}")
    cfg = doc = checked = None
    if config is not None:
        checked = CHK.load_checked(config, overrides, purpose="train")  # every config mistake at once, first
        cfg, doc = checked.cfg, checked.doc
    # a worker restarted by torchrun (--max-restarts) continues from its run's last checkpoint
    if (resume is None and out and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
            and RunDir(out).last.exists()):
        resume, init = out, None


    dist = dist or DIST.dist_from_env()
    source = resume_source(resume, out) if resume else None
    claim: Claim | None = None
    if source is not None and source.continue_in is not None and dist.main:
        claim = claim_existing(source.continue_in)  # locked before the checkpoint is read
    try:
        return _train_locked(Request(cfg, doc, checked, overrides, out, source, init, partial, force, on_event,
                                     say, dist, claim))
    except BaseException:
        if claim is not None:
            claim.release()
        raise


def _train_locked(req: Request) -> RunResult:
    """The run folder is locked (or not yet claimed): check a resume, build the model, pick the device,
    freeze, claim a new run's folder, then fit with the run's record."""
    cfg, doc, checked, overrides, source, force, dist = (req.cfg, req.doc, req.checked, req.overrides, req.source,
                                                         req.force, req.dist)
    state = None
    if source is not None:
        state, cfg, doc, checked = accepted_resume(source, cfg, doc, checked, overrides, force)
    # the check pipeline (nnctl.checking) has refused what it finds; what needs the samples follows in _fit
    # resuming: the checkpoint's weights replace any pretrained ones, so the hub cache is not needed
    model, plan = M.build(cfg, doc, pretrained=False if state is not None else None, checked=checked.plan)
    notes: list[str] = []
    if dist.main:
        notes += [p.format().replace(": ", ": warning: ", 1) for p in checked.warnings]
        if cfg.train.loss_name == "l2":
            notes.append(f"note: {losses.L2_NOTE}")
    if state is not None:
        missing, unexpected, wrong = W.compare(model, F.strip_prefixes(dict(state["model"])))
        if missing or unexpected or wrong:
            raise CheckpointError(f"{source.checkpoint} holds another model's weights: "
                                  f"{W.mismatch_text(plan, missing, unexpected, wrong, 4)}")

    dev = _device(cfg, dist)
    check_same_run(cfg, dist)  # every rank the same config and data: before a folder is claimed or a step taken
    freezing, init_report = _freeze(model, plan, state, cfg.freeze, req)
    if dist.enabled and not dist.main and state is None:  # dropout and noise: a stream of its own per rank
        torch.manual_seed(rank_seed(cfg.seed, dist.rank))
    continuing = source is not None and source.continue_in is not None
    run_dir, claim = (source.continue_in, req.claim) if continuing else _claim_new(cfg, req)
    spec = RunSpec(cfg, doc, model, plan, state, run_dir, claim, continuing, freezing, init_report, notes, dev,
                   dist, req.on_event, req.say, str(source.checkpoint) if source is not None else "", overrides,
                   force)
    try:
        return _fit_recorded(spec)
    except BaseException as exc:
        if claim is not None and not continuing:
            claim.abandon(exc)  # nothing was saved: the folder is the failed run's record, reused by the next run
        raise


def _device(cfg, dist: DIST.Dist) -> torch.device:
    """train.device, or this rank's GPU under torch.distributed; the process group joined."""
    dev = DIST.select_device(cfg.train.device)
    if dist.enabled and dev.type == "cuda":
        if dist.local_rank >= torch.cuda.device_count():
            raise UsageError(f"local rank {dist.local_rank} has no GPU: this machine has "
                             f"{torch.cuda.device_count()}; use --nproc-per-node {torch.cuda.device_count()}")
        dev = torch.device("cuda", dist.local_rank)
    if cfg.train.threads and dev.type == "cpu":
        torch.set_num_threads(cfg.train.threads)
    DIST.init_distributed(dist, dev)
    return dev


def _freeze(model, plan, state: dict | None, selection, req: Request) -> tuple[dict | None, str | None]:
    """(the freeze record, --init's report): a checkpoint's freezing, or --init's weights and the config's."""
    if state is not None:
        freezing = state.get("freeze")
        if freezing:
            F.apply(model, freezing)
        return freezing, None
    freezing = init_report = None
    if req.init:
        init_report, freezing = W.init_from(model, plan, req.init, partial=req.partial)
    freezing = F.apply_config(model, selection, inherited=freezing)  # the config's selection (freeze:) wins
    return freezing, init_report


def _claim_new(cfg, req: Request) -> tuple[Path, Claim | None]:
    """A new run's folder: claimed by rank 0 (--out or runs/<name>-N), its name shared with every rank."""
    run_dir, claim = None, None
    if req.dist.main:
        claim = claim_new(cfg.name, req.out, input_dirs=read_paths(cfg)[1])  # never inside the data it reads
        run_dir = claim.folder
    if req.dist.enabled:
        run_dir = Path(req.dist.gather(str(run_dir) if req.dist.main else None)[0])
    return run_dir, claim


def _load_checked(spec: RunSpec):
    """The run's data, with what needs the samples checked (the check pipeline's data step, and a
    resumed run's data against its checkpoint's): ConfigError / UsageError before anything trains."""
    cfg, dist = spec.cfg, spec.dist
    try:
        data = D.load_data(cfg, spec.dev, rank=dist.rank, world_size=dist.world_size,
                           weights=pretrained_preprocessing(cfg))
    except D.ShapeMismatch as exc:  # at the line of the key to change, as the check pipeline reports
        raise ConfigError([spec.doc.problem(exc.key, str(exc))]) from None
    problems = CHK.check_data(cfg, spec.doc, spec.plan, data)
    if problems:
        raise ConfigError(problems)
    _same_data(spec, data)
    return data


def _fit(spec: RunSpec, data=None) -> RunResult:
    """Load and check the data (unless given), tell the run's facts (rank 0), train, plot the curves."""
    cfg, dist, run_dir = spec.cfg, spec.dist, spec.run_dir
    if data is None:
        data = _load_checked(spec)
    outputs = spec.plan.output_shape[-1] if spec.plan.output_shape else None
    if dist.main:
        _tell(spec, data)
    options = T.FitOptions(resume=spec.state, on_event=spec.on_event, freezing=spec.freezing, dist=dist,
                           outputs=int(outputs) if outputs else None)
    try:
        result = T.fit(cfg, spec.model, data, spec.dev, run_dir, options)
    except (Interrupted, Pruned):  # what was trained is kept: its curves too
        if dist.main:
            plot_quietly(run_dir, cfg.name)
        raise
    with files.deferred_signals():  # a signal during the plot is delivered after it, not swallowed by it
        plot = plot_quietly(run_dir, cfg.name) if dist.main else None
    if dist.enabled:  # every rank leaves together: none tears the process group down while rank 0 still plots
        dist.any(False, spec.dev)
    if spec.claim is not None:
        spec.claim.release()
    return RunResult(run_dir, result, plot, name=cfg.name)


def _same_data(spec: RunSpec, data) -> None:
    """A resumed run reads the data its checkpoint was trained on: the validation split is derived from
    the data, so a file added since would move training samples into "val" (and best.pt would be chosen
    on them). Refused, naming what changed, unless --force (then a note says it)."""
    then = ((spec.state or {}).get("preprocessing") or {}).get("data") if spec.state is not None else None
    now = data.preprocessing
    change = data_changes(then, now.data if now is not None else None, now.classes if now is not None else None)
    if change is None:
        return
    if not spec.force:
        raise UsageError(f"the data changed since {spec.source_name or 'the checkpoint'} was written ({change}); "
                         f"{changed_split(then)}, and the resumed run would validate, and choose best.pt, on it. "
                         "Restore the data, or start a new run from these weights (--init); --force resumes anyway")
    data.notes.append(f"the data changed since the checkpoint ({change}); resumed anyway (--force): the "
                      "validation split is not the one the run validated on before")


def _tell(spec: RunSpec, data) -> None:
    """The run's information lines: device, run folder (and what it resumes), data, model, notes."""
    dev, dist, state, say, model = spec.dev, spec.dist, spec.state, spec.say, spec.model
    threads = f", {torch.get_num_threads()} CPU threads" if dev.type == "cpu" else ""
    engine = "FSDP2" if spec.cfg.train.distributed.strategy == "fsdp" else "DistributedDataParallel"
    say(f"device: {dev}{threads}" + (f", {dist.world_size} processes ({engine}, "
                                     f"{'nccl' if dev.type == 'cuda' else 'gloo'})" if dist.enabled else ""))
    resumed = ""
    if state is not None:
        step = f", step {state['step_in_epoch']}" if state.get("step_in_epoch") else ""
        what = "resuming from" if spec.continuing else "a new run from"
        resumed = f" ({what} epoch {state['epoch']}{step}" + \
                  ("" if spec.continuing else f" of {spec.source_name}") + ")"
    say(f"run: {spec.run_dir}{resumed}")
    say(f"data: {data.description}")
    for note in getattr(data, "notes", None) or []:
        say(f"note: {note}")
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"model: {n_params:,} parameters ({n_train:,} trainable)")
    if n_train < n_params:  # name what is frozen, as nnctl freeze does
        rows = [r for r in F.children_rows(model.module if hasattr(model, "module") else model)
                if r["status"] in ("frozen", "partial")]
        say("frozen: " + ", ".join(f"{r['name']} ({r['type']}{', partly' if r['status'] == 'partial' else ''})"
                                   for r in rows) + f"; {n_params - n_train:,} parameters")
    for note in spec.notes:
        say(note)
    if spec.init_report:
        say(spec.init_report)


def _fit_recorded(spec: RunSpec) -> RunResult:
    """_fit, with the run's record (rank 0): config.yaml first, then RUN/status.json and, with train.log:
    tensorboard / mlflow, TensorBoard and MLflow follow its events; the end state (finished, interrupted,
    failed with the error) is recorded before the run lock is released."""
    if not spec.dist.main:
        return _fit(spec)
    cfg, run_dir, state = spec.cfg, spec.run_dir, spec.state
    # a continued run's record is rewritten only once its resume is accepted: a refusal that needs the
    # samples (changed data, targets the model cannot use) leaves config.yaml and status.json as they were
    data = _load_checked(spec) if spec.continuing else None
    # before the data is loaded: a run failing there still leaves its record; a continued run's config.yaml
    # is rewritten too, so that it shows what the run now trains with (--epochs N, --set ...)
    text = yaml.safe_dump(C.resolved(cfg), sort_keys=False).encode()
    K.atomic_write(RunDir(run_dir).config, lambda fh: fh.write(text), run_file=True)
    resume_epoch = int(state.get("epoch", 0)) if state is not None else 0
    params = list(spec.model.parameters())
    record = StatusRecorder(run_dir, config_name=cfg.name, epochs_total=cfg.train.epochs,
                            parameters=(sum(p.numel() for p in params),
                                        sum(p.numel() for p in params if p.requires_grad)),
                            overrides=spec.overrides, continuing=spec.continuing, resume_epoch=resume_epoch,
                            best=state.get("best") if state is not None else None,
                            source="" if spec.continuing else spec.source_name)
    record.begin()
    loggers: list = []  # TensorBoard, MLflow: on_event(event), end(state, result=None, error=None)
    try:
        if TB.wanted(cfg):
            loggers.append(TB.TensorBoardLogger(run_dir, cfg, spec.model, spec.dev, continuing=spec.continuing,
                                                resume_epoch=resume_epoch, history=(state or {}).get("history"),
                                                say=spec.say))
        if MLF.wanted(cfg):
            loggers.append(MLF.MlflowLogger(run_dir, cfg, continuing=spec.continuing,
                                            history=(state or {}).get("history"), say=spec.say))
        result = _fit(replace(spec, claim=None, on_event=_recording(spec, record, loggers)), data)
        record.end("finished", result=result.fit)
        for logger in loggers:
            logger.end("finished", result=result.fit)
        if spec.claim is not None:
            spec.claim.release()
        return result
    except BaseException as exc:
        ended = _ended(exc, record, loggers, run_dir)
        if ended is exc:
            raise
        raise ended from None


def _ended(exc: BaseException, record: StatusRecorder, loggers: list, run_dir: Path) -> BaseException:
    """The run's end state for an exception, recorded (status.json, TensorBoard, MLflow); what the caller raises.

    A signal after the run's last checkpoint (its last epoch's, or the one early stopping ended it at),
    whatever it interrupted (validation, the plot, the record itself), leaves the run finished, as its
    checkpoint says: recorded so, and raised as Interrupted(finished=True) (exit 128 + signal)."""
    signum = signal_of(exc)
    if signum is None or not record.complete:
        end = state_of_exception(exc)
        record.end(end, error=exc)
        for logger in loggers:
            logger.end(end, error=exc)
        return exc
    record.end("finished")
    for logger in loggers:
        logger.end("finished")
    if isinstance(exc, Interrupted) and exc.finished:
        return exc
    return Interrupted(signum, str(RunDir(run_dir).last), finished=True)


def _recording(spec: RunSpec, record: StatusRecorder, loggers: list) -> Callable:
    """The fit's events, to status.json, the loggers (TensorBoard, MLflow) and spec.on_event."""

    def events(event) -> None:
        if event.kind == "epoch_end" and record.monitor is None and event.row is not None:
            record.set_monitor(*monitor_for(spec.cfg, any(k.startswith("val_") for k in event.row)))
        record.on_event(event)
        for logger in loggers:
            logger.on_event(event)
        if spec.on_event is not None:
            spec.on_event(event)

    return events
