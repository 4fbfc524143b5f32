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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from nnctl import checking as CHK
from nnctl.errors import CheckpointError, UsageError
from nnctl.runs.rundir import RunDir
from nnctl.seeds import rank_seed
from nnctl.runs.claim import Claim, claim_existing, claim_new
from nnctl.runs.plots import plot_quietly
from nnctl.optim import losses
from nnctl.model.tv import pretrained_preprocessing

# config keys a resume may change without --force
# (data.cache and data.preload change no batch: a cache hit equals a fresh decode, and both data paths
# give the same batches; tests/test_cache.py and tests/test_train_safety.py check it)
RESUME_MAY_CHANGE = {"train.epochs", "train.device", "data.num_workers", "data.root", "data.download",
                     "train.log", "data.cache", "data.preload"}


# --- resume --------------------------------------------------------------------------------

@dataclass
class ResumeSource:
    """What --resume names: a checkpoint, and the run folder to continue in (None: a new folder)."""

    checkpoint: Path
    continue_in: Path | None


def resume_source(resume: str | os.PathLike, out: str | os.PathLike | None) -> ResumeSource:
    from nnctl.runs import records as RS
    from nnctl import files as files

    p = Path(resume)
    if p.is_dir():
        folder = p
        ckpt = RunDir(folder).last
        if not ckpt.exists():
            RS.resolve(folder, "last")  # raises the message that leads somewhere (no checkpoint yet, or best only)
    else:
        if not p.exists():
            raise CheckpointError(f"{p}: no such checkpoint or run folder")
        ckpt = p
        folder = p.parent if (p == RunDir(p.parent).last and RunDir(p.parent).is_run()) else None
    if folder is not None and out is not None and os.path.abspath(out) != os.path.abspath(folder):
        folder = None  # --resume RUN --out NEW: a new run from RUN's state; RUN is only read
    return ResumeSource(ckpt, folder)


def config_diff(a: Any, b: Any, prefix: tuple = ()) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            out += config_diff(a.get(k), b.get(k), prefix + (str(k),))
        return out
    return [] if a == b else [".".join(prefix)]


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

    from nnctl.training import distributed as DIST

    dist = dist or DIST.dist_from_env()
    source = resume_source(resume, out) if resume else None
    claim: Claim | None = None
    if source is not None and source.continue_in is not None and dist.main:
        claim = claim_existing(source.continue_in)  # locked before the checkpoint is read
    try:
        return _train_locked(cfg, doc, checked, overrides, out, source, init, partial, force, on_event, say,
                             dist, claim)
    except BaseException:
        if claim is not None:
            claim.release()
        raise


def _train_locked(cfg, doc, checked, overrides, out, source, init, partial, force, on_event, say, dist,
                  claim: Claim | None) -> RunResult:
    """``checked``: the check pipeline's result for the config file (None: the checkpoint's config, checked here)."""
    from nnctl.config import loader as CL
    from nnctl import files as files
    from nnctl.runs import checkpoint as K
    from nnctl.config import schema as C
    from nnctl.model import freeze as F
    from nnctl.model import weights as W
    from nnctl.model import plan as M
    from nnctl.training import distributed as DIST

    state = None
    if source is not None:
        state = K.load(source.checkpoint)
        saved, saved_doc = CL.from_dict(state["config"], str(source.checkpoint))
        if cfg is None:
            if overrides:
                CL.apply_overrides(saved_doc, overrides)
            checked = CHK.check(saved_doc, purpose="train").refuse()
            cfg, doc = checked.cfg, checked.doc
        diff = [k for k in config_diff(C.resolved(saved), C.resolved(cfg)) if k not in RESUME_MAY_CHANGE]
        if diff and not force:
            raise UsageError(f"the config differs from the checkpoint's in {', '.join(diff[:8])}"
                             f"{' ...' if len(diff) > 8 else ''}; resuming would not continue the same run "
                             "(use --force to resume anyway, or start a new run)")
        if state.get("epoch", 0) >= cfg.train.epochs and not state.get("step_in_epoch"):
            raise UsageError(f"{source.checkpoint}: the run already finished {state['epoch']} of "
                             f"{cfg.train.epochs} epoch{'' if cfg.train.epochs == 1 else 's'}; pass --epochs N with a larger N to train further")
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

    dev = DIST.select_device(cfg.train.device)
    if dist.enabled and dev.type == "cuda":
        import torch

        if dist.local_rank >= torch.cuda.device_count():
            raise UsageError(f"local rank {dist.local_rank} has no GPU: this machine has "
                             f"{torch.cuda.device_count()}; use --nproc-per-node {torch.cuda.device_count()}")
        dev = torch.device("cuda", dist.local_rank)
    if cfg.train.threads and dev.type == "cpu":
        import torch

        torch.set_num_threads(cfg.train.threads)
    DIST.init_distributed(dist, dev)
    freezing = None
    init_report = None
    if state is not None:
        freezing = state.get("freeze")
        if freezing:
            F.apply(model, freezing)
    else:
        if init:
            init_report, freezing = W.init_from(model, plan, init, partial=partial)
        freezing = F.apply_config(model, cfg.freeze, inherited=freezing)  # the config's selection wins
    if dist.enabled and not dist.main:  # dropout and noise: a stream of its own per rank
        if state is None:
            import torch

            torch.manual_seed(rank_seed(cfg.seed, dist.rank))

    continuing = source is not None and source.continue_in is not None
    if continuing:
        run_dir = source.continue_in
    else:
        run_dir = None
        if dist.main:
            claim = claim_new(cfg.name, out)
            run_dir = claim.folder
        if dist.enabled:
            run_dir = Path(dist.gather(str(run_dir) if dist.main else None)[0])
    try:
        return _fit_recorded(cfg, doc, model, plan, state, run_dir, claim, continuing, freezing, init_report,
                             notes, dev, dist, on_event, say, str(source.checkpoint) if source is not None else "",
                             overrides)
    except BaseException as exc:
        if claim is not None and not continuing:
            claim.abandon(exc)  # nothing was saved: the folder is the failed run's record, reused by the next run
        raise


def _fit(cfg, doc, model, plan, state, run_dir: Path, claim, continuing, freezing, init_report, notes, dev,
         dist, on_event, say, source_name: str = "") -> RunResult:
    from nnctl.training import signals as SIG
    import torch

    from nnctl.data import loading as D
    from nnctl.training import trainer as T
    from nnctl.errors import ConfigError

    data = D.load_data(cfg, dev, rank=dist.rank, world_size=dist.world_size,
                       weights=pretrained_preprocessing(cfg))
    outputs = plan.output_shape[-1] if plan.output_shape else None
    # what needs the samples (the check pipeline, nnctl.checking, ran everything else before the run folder)
    problems = D.check_targets(cfg, doc, plan, data) + losses.check_loss_targets(cfg, doc, data)
    if problems:
        raise ConfigError(problems)
    if dist.main:
        threads = f", {torch.get_num_threads()} CPU threads" if dev.type == "cpu" else ""
        say(f"device: {dev}{threads}" + (f", {dist.world_size} processes (DistributedDataParallel, "
                                         f"{'nccl' if dev.type == 'cuda' else 'gloo'})" if dist.enabled else ""))
        resumed = ""
        if state is not None:
            step = f", step {state['step_in_epoch']}" if state.get("step_in_epoch") else ""
            what = "resuming from" if continuing else "a new run from"
            resumed = f" ({what} epoch {state['epoch']}{step}" + \
                      ("" if continuing else f" of {source_name}") + ")"
        say(f"run: {run_dir}{resumed}")
        say(f"data: {data.description}")
        for note in getattr(data, "notes", None) or []:
            say(f"note: {note}")
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        say(f"model: {n_params:,} parameters ({n_train:,} trainable)")
        for note in notes:
            say(note)
        if init_report:
            say(init_report)
    try:
        result = T.fit(cfg, doc, model, data, dev, run_dir, resume=state, on_event=on_event,
                       freezing=freezing, dist=dist, outputs=int(outputs) if outputs else None)
    except SIG.Interrupted:
        if dist.main:
            plot_quietly(run_dir, cfg.name)
        raise
    plot = plot_quietly(run_dir, cfg.name) if dist.main else None
    if claim is not None:
        claim.release()
    return RunResult(run_dir, result, plot, name=cfg.name)


def _fit_recorded(cfg, doc, model, plan, state, run_dir: Path, claim, continuing, freezing, init_report, notes,
                  dev, dist, on_event, say, source_name: str = "", overrides=()) -> RunResult:
    """_fit, with the run's record (rank 0): config.yaml first, then RUN/status.json and, with train.log:
    tensorboard, RUN/tensorboard/ follow its events; the end state (finished, interrupted, failed with the
    error) is recorded before the run lock is released."""
    if not dist.main:
        return _fit(cfg, doc, model, plan, state, run_dir, claim, continuing, freezing, init_report, notes, dev,
                    dist, on_event, say, source_name)
    import yaml

    from nnctl import files as files
    from nnctl.runs import checkpoint as K
    from nnctl.config import schema as C
    from nnctl.runs import tensorboard as TB
    from nnctl.runs.status import StatusRecorder, state_of_exception

    # before the data is loaded: a run failing there still leaves its record; a continued run's config.yaml
    # is rewritten too, so that it shows what the run now trains with (--epochs N, --set ...)
    text = yaml.safe_dump(C.resolved(cfg), sort_keys=False).encode()
    K.atomic_write(RunDir(run_dir).config, lambda fh: fh.write(text), run_file=True)
    resume_epoch = int(state.get("epoch", 0)) if state is not None else 0
    params = list(model.parameters())
    record = StatusRecorder(run_dir, config_name=cfg.name, epochs_total=cfg.train.epochs,
                            parameters=(sum(p.numel() for p in params),
                                        sum(p.numel() for p in params if p.requires_grad)),
                            overrides=overrides, continuing=continuing, resume_epoch=resume_epoch,
                            best=state.get("best") if state is not None else None,
                            source="" if continuing else source_name)
    record.begin()
    board = None

    def events(event) -> None:
        from nnctl.training import policy as POL
        if event.kind == "epoch_end" and record.monitor is None and event.row is not None:
            record.set_monitor(*POL.monitor_for(cfg, any(k.startswith("val_") for k in event.row)))
        record.on_event(event)
        if board is not None:
            board.on_event(event)
        if on_event is not None:
            on_event(event)

    try:
        if TB.wanted(cfg):
            board = TB.TensorBoardLogger(run_dir, cfg, model, dev, continuing=continuing, resume_epoch=resume_epoch,
                                         history=(state or {}).get("history"), say=say)
        result = _fit(cfg, doc, model, plan, state, run_dir, None, continuing, freezing, init_report, notes, dev,
                      dist, events, say, source_name)
    except BaseException as exc:
        end = state_of_exception(exc)
        record.end(end, error=exc)
        if board is not None:
            board.end(end)
        raise
    record.end("finished", result=result.fit)
    if board is not None:
        board.end("finished", result=result.fit)
    if claim is not None:
        claim.release()
    return result
