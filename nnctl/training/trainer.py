"""The training loop: devices, losses, optimizers, ``train_one_epoch``, ``evaluate``, ``fit``.

Read it top to bottom as torchvision's reference ``train.py``. What it keeps
off the hot path: no per-step host synchronisation (loss sums stay on the
device and are read once an epoch, or when a progress display asks), batches
come preloaded on the device, ``zero_grad(set_to_none=True)``.

Exactness: the data order of an epoch depends only on (seed, epoch), the
global RNG state is saved in every checkpoint, and an interrupted epoch saves
its step and running sums, so a resumed run is bit-identical on the CPU.
"""

from __future__ import annotations

import copy
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable
import torch
from torch import nn
from nnctl.runs import checkpoint as ckpt
from nnctl.config.schema import Config, resolved
from nnctl.errors import NnctlError, UsageError
from nnctl.config.yamlio import Document
from nnctl.training.loop import Context, EpochSums, acc_dtype, evaluate, train_one_epoch
from nnctl.training.distributed import Dist
from nnctl.training.policy import Diverged, EXPLODE_FACTOR, NonFiniteLoss, NonFiniteValidation, _non_finite_inputs, _state_finite, improves, monitor_for, stopping_for
from nnctl.training.signals import Interrupted, _StopFlag
from nnctl.optim.optimizers import _resume_optimizer, make_optimizer, make_scheduler
from nnctl.runs.rundir import RunDir
from nnctl.seeds import rank_seed
from nnctl.optim.losses import make_loss, task_of
from nnctl.runs.checkpoint import prune_epoch_checkpoints
from nnctl.runs.metrics import write_metrics

# --- fit ------------------------------------------------------------------------------

@dataclass
class Event:
    """What fit() reports to whoever displays progress (the CLI)."""

    kind: str  # "start" | "epoch_start" | "step" | "epoch_end" | "best" | "stop"
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    sums: EpochSums | None = None
    row: dict | None = None
    message: str = ""


@dataclass
class FitResult:
    history: list[dict]
    best: dict
    best_state: dict[str, torch.Tensor] | None
    last_path: str
    best_path: str | None
    stopped_early: bool = False
    epochs_run: int = 0
    seconds: float = 0.0
    final: dict = field(default_factory=dict)


def _frozen_modules(model: nn.Module) -> list[nn.Module]:
    """Modules whose own parameters are all frozen (kept in eval mode during training)."""
    out = []
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own and not any(p.requires_grad for p in own):
            out.append(module)
    return out


def fit(cfg: Config, doc: Document, model: nn.Module, data, device: torch.device, run_dir,
        resume: dict | None = None, on_event: Callable[[Event], None] | None = None,
        freezing: dict | None = None, write_checkpoints: bool = True, dist: Dist | None = None,
        outputs: int | None = None) -> FitResult:
    """Train the model as the config says, writing checkpoints into run_dir. Returns the history.

    ``outputs``: the model's output width (class scores), for ``weight: balanced``; default:
    the data's number of classes.

    Under torch.distributed (dist.enabled) the model is wrapped in DistributedDataParallel,
    losses and validation metrics are reduced across ranks, every rank takes the same
    decisions (best, early stopping, stop on a signal), and only rank 0 writes.
    """
    from pathlib import Path

    t = cfg.train
    run_dir = Path(run_dir)
    dist = dist or Dist()
    write_checkpoints = write_checkpoints and dist.main
    emit = (on_event or (lambda e: None)) if dist.main else (lambda e: None)
    if t.threads:
        torch.set_num_threads(t.threads)

    model.to(device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise UsageError("every parameter is frozen: nothing to train")
    frozen_modules = [] if (freezing or {}).get("train_frozen_norm") else _frozen_modules(model)

    def set_train_mode():
        model.train()
        for m in frozen_modules:
            m.eval()

    optimizer = make_optimizer(t.optimizer, trainable)
    steps = len(data.train)
    updates = -(-steps // t.accumulate)  # optimizer steps an epoch
    scheduler = make_scheduler(t.scheduler, optimizer, t.epochs, updates, t.scheduler_interval)
    plateau = scheduler is not None and isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    scaler = torch.amp.GradScaler(device.type) if t.precision == "fp16" else None
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
    if amp_dtype is not None:
        autocast = lambda: torch.autocast(device_type=device.type, dtype=amp_dtype)
    else:
        autocast = nullcontext
    runner = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        runner = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if t.compile:
        runner = torch.compile(runner)
    task = task_of(cfg)
    classification = task == "classification"
    labels = classes = None
    if any(v == "balanced" for v in t.loss_args.values()):
        labels = data.train.store.y[data.train.indices]
        classes = outputs or data.num_classes
    loss_fn = make_loss(t, labels=labels, classes=classes).to(device)
    ctx = Context(runner, loss_fn, optimizer, scheduler, scaler, device, autocast, t.grad_clip,
                  scheduler is not None and t.scheduler_interval == "step" and not plateau,
                  t.channels_last, classification, trainable, set_train_mode, t.accumulate)

    metric, mode = monitor_for(cfg, data.val is not None)
    watch = stopping_for(cfg, data.val is not None)
    min_delta = t.early_stopping.min_delta if t.early_stopping is not None else 0.0
    for name in {metric, *(watch[:1] if watch else ())}:
        if name == "val_top5_accuracy" and (outputs or data.num_classes or 0) <= 5:
            raise UsageError(f"{name}: top-5 accuracy needs more than 5 classes; this model has "
                             f"{outputs or data.num_classes}")
    history: list[dict] = []
    best = {"metric": metric, "mode": mode, "value": None, "epoch": None}
    # early stopping's own reference (its metric and min_delta may differ from best.pt's)
    stopping = {"metric": watch[0], "mode": watch[1], "value": None, "epoch": None} if watch else None
    start_epoch, start_step, global_step = 0, 0, 0
    partial = None
    bad_epochs = 0
    loss_reference: float | None = None  # the run's first step loss (the divergence rule)
    if resume is not None:
        model.load_state_dict(resume["model"])
        _resume_optimizer(cfg, resume.get("config") or {}, resume, optimizer, scheduler, steps)
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        start_epoch = int(resume.get("epoch", 0))
        start_step = int(resume.get("step_in_epoch", 0))
        global_step = int(resume.get("global_step", 0))
        history = list(resume.get("history") or [])
        best = dict(resume.get("best") or best)
        bad_epochs = int(resume.get("bad_epochs", 0))
        if watch is not None:
            saved_stop = resume.get("stopping")
            if saved_stop and saved_stop.get("metric") == watch[0]:
                stopping = dict(saved_stop)
            elif best.get("metric") == watch[0]:  # an older checkpoint: early stopping watched best.pt's metric
                stopping = {**best, "mode": watch[1]}
        partial = resume.get("partial")
        loss_reference = resume.get("loss_reference")
        if not isinstance(loss_reference, float) and history and isinstance(history[0].get("train_loss"), float):
            loss_reference = history[0]["train_loss"]  # a checkpoint of an older nnctl: the first epoch's loss
        ranks = resume.get("rng_ranks")
        if dist.enabled and ranks and len(ranks) == dist.world_size:
            ckpt.set_rng_state(ranks[dist.rank])
        elif dist.enabled and not dist.main:  # another process count: a fresh stream per rank
            torch.manual_seed(rank_seed(cfg.seed, dist.rank, start_epoch))
        else:
            ckpt.set_rng_state(resume.get("rng"))
    best_state = None
    best_path = str(RunDir(run_dir).best) if RunDir(run_dir).best.exists() else None
    last_path = str(RunDir(run_dir).last)
    resolved_cfg = resolved(cfg)

    def payload(kind: str, epoch: int, step_in_epoch: int, sums: EpochSums | None, state=None,
                rng_ranks=None) -> dict:
        return ckpt.make_payload(  # the one place the checkpoint's fields are assembled
            kind, resolved_cfg, state if state is not None else model.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict() if scheduler is not None else None,
            scaler=scaler.state_dict() if scaler is not None else None,
            epoch=epoch, step_in_epoch=step_in_epoch, global_step=global_step,
            rng=ckpt.rng_state(), rng_ranks=rng_ranks, world_size=dist.world_size,
            best=dict(best), bad_epochs=bad_epochs, history=list(history), freeze=freezing,
            partial=None if sums is None else sums.state(),
            input_shape=list(cfg.model.input_shape),
            preprocessing=data.preprocessing.to_dict() if getattr(data, "preprocessing", None) else None,
            loss_reference=loss_reference, stopping=dict(stopping) if stopping else None,
        )

    emit(Event("start", epochs=t.epochs, steps=steps, message=str(device)))
    stopped_early = False
    began = time.perf_counter()
    with _StopFlag() as stop:
        for epoch in range(start_epoch, t.epochs):
            tick = time.perf_counter()
            sums = EpochSums.from_state(partial if start_step > 0 else None, device)
            partial = None
            emit(Event("epoch_start", epoch=epoch, epochs=t.epochs, step=start_step, steps=steps))

            done = start_step  # steps of this epoch completed (a consistent state to save)

            def on_step(step: int, s: EpochSums) -> bool:
                nonlocal global_step, done
                global_step += 1
                done = step
                emit(Event("step", epoch=epoch, epochs=t.epochs, step=step, steps=steps, sums=s))
                if dist.enabled:  # every rank must stop at the same step: agree every 8 steps
                    return step % 8 == 0 and dist.any(stop.signum is not None, device)
                return stop.signum is not None

            try:
                step = train_one_epoch(ctx, data.train, epoch, start_step, sums, on_step)
            except NnctlError as exc:
                # a DataLoader worker killed by the same stop signal (SIGTERM to the process group): the
                # batch was being fetched, between two steps, so the state after step `done` is saved
                from nnctl.data.store import LoaderStopped

                if not (isinstance(exc, LoaderStopped) and stop.signum is not None):
                    raise
                step = done
            except RuntimeError as exc:
                # torch's SIGCHLD handler saw a worker die at some point inside a step: the state is not
                # consistent, so nothing is saved; the previous checkpoint stays
                if stop.signum is None or "DataLoader worker" not in str(exc):
                    raise
                raise Interrupted(stop.signum, last_path if write_checkpoints and Path(last_path).exists()
                                  else None) from None
            start_step = 0
            if step < steps:  # stopped by a signal at a step boundary
                _, first_bad = sums.reduce(dist.all_reduce if dist.enabled else None)
                if first_bad != -1 or not _state_finite(model):  # never save a diverged state
                    raise NonFiniteLoss(f"stopped by a signal in epoch {epoch + 1}, step {step}, but the training "
                                        "had diverged (a non-finite loss or weights): nothing saved. "
                                        + (f"The last good checkpoint is {last_path}" if Path(last_path).exists()
                                           else "No checkpoint was written before this."))
                rng_ranks = dist.gather(ckpt.rng_state()) if dist.enabled else None
                path = None
                if write_checkpoints:
                    ckpt.save(last_path, payload("last", epoch, step, sums, rng_ranks=rng_ranks))
                    path = last_path
                raise Interrupted(stop.signum or signal.SIGTERM, path)
            train_loss, first_bad = sums.reduce(dist.all_reduce if dist.enabled else None)
            if first_bad != -1 or not math.isfinite(train_loss):
                where = f"epoch {epoch + 1}" + (f", step {first_bad + 1}" if first_bad >= 0 else
                                                 ", on another rank" if first_bad == -2 else "")
                raise NonFiniteLoss(f"the training loss became non-finite at {where} (of {steps} steps an epoch); "
                                    f"lower the learning rate, clip gradients (train.grad_clip) or check the data. "
                                    + (f"The last good checkpoint is {last_path}" if Path(last_path).exists()
                                       else "No checkpoint was written before this."))
            kept = (f"The last good checkpoint is {last_path}" if Path(last_path).exists()
                    else "No checkpoint was written before this.")
            if loss_reference is None and sums.losses:  # the first step of the run: the scale of its loss
                first = sums.losses[0].detach().float().reshape(1).to(acc_dtype(device))
                if dist.enabled:
                    dist.all_reduce(first)
                    first /= dist.world_size
                loss_reference = float(first)
            limit = EXPLODE_FACTOR * max(loss_reference or 0.0, 1.0)
            if train_loss > limit:
                raise Diverged(f"the training loss exploded at epoch {epoch + 1}: {train_loss:.4g}, over "
                               f"{EXPLODE_FACTOR:.0e} x max(first step's loss {loss_reference:.4g}, 1); lower the "
                               f"learning rate or clip gradients (train.grad_clip). Nothing saved. {kept}")
            if not _state_finite(model):
                raise Diverged(f"the weights became non-finite (NaN or infinite) during epoch {epoch + 1}, although "
                               "every step's loss was finite (the last update overflowed); lower the learning rate "
                               f"or clip gradients (train.grad_clip). Nothing saved. {kept}")
            row: dict[str, Any] = {"epoch": epoch + 1, "step": global_step, "train_loss": train_loss}
            if data.val is not None:
                ev = evaluate(runner, ctx.loss_fn, data.val, task, autocast, t.channels_last, device,
                              dist.all_reduce if dist.enabled else None)
                row.update({f"val_{k}": v for k, v in ev.items()})
                bad = [f"val_{k} {v}" for k, v in ev.items() if not math.isfinite(v)]
                if bad:
                    split = "test" if cfg.data.split == "test" else "validation"
                    where = getattr(data, "where", "") or cfg.data.source
                    n_bad = _non_finite_inputs(data.val)
                    if dist.enabled:
                        n_bad = int(dist.any(n_bad > 0, device))
                    cause = (f"the {split} data holds non-finite values (NaN or infinite; {n_bad:,} in this "
                             "process's share); clean the data" if n_bad else
                             f"the {split} data is finite, so the model diverged (its outputs overflow although "
                             "its weights are finite); lower the learning rate or clip gradients")
                    raise NonFiniteValidation(f"{', '.join(bad)} at epoch {epoch + 1} on the {split} split of "
                                              f"{where}: {cause}. Nothing saved. {kept}")
            for name in [metric] + ([stopping["metric"]] if stopping else []):
                if name not in row:  # a safety net behind the config's checks: never watch a missing column
                    raise UsageError(f"the run monitors {name}, but its metrics are {', '.join(sorted(row))}: "
                                     "set train.checkpoint.monitor / train.early_stopping.monitor to one of them")
            row["lr"] = optimizer.param_groups[0]["lr"]
            if scheduler is not None and t.scheduler_interval == "epoch":
                if plateau:
                    scheduler.step(row.get("val_loss", train_loss))
                else:
                    scheduler.step()
            row["seconds"] = time.perf_counter() - tick
            history.append(row)
            improved = improves(row.get(metric), best["value"], mode)
            if improved:
                best.update(value=row[metric], epoch=epoch + 1)
                best_state = copy.deepcopy(model.state_dict())
            if stopping is not None:
                if improves(row.get(stopping["metric"]), stopping["value"], stopping["mode"], min_delta):
                    stopping.update(value=row[stopping["metric"]], epoch=epoch + 1)
                    bad_epochs = 0
                else:
                    bad_epochs += 1
            else:
                bad_epochs = 0 if improved else bad_epochs + 1
            rng_ranks = dist.gather(ckpt.rng_state()) if dist.enabled else None
            if write_checkpoints:
                if improved:
                    best_path = str(RunDir(run_dir).best)
                    ckpt.save(best_path, payload("best", epoch + 1, 0, None, best_state, rng_ranks))
                ckpt.save(last_path, payload("last", epoch + 1, 0, None, rng_ranks=rng_ranks))
                if t.checkpoint.every and (epoch + 1) % t.checkpoint.every == 0:
                    target = RunDir(run_dir).epoch(epoch + 1)
                    if target.is_symlink() or (target.exists() and not target.is_file()):
                        # never written over, never a reason to fail the epoch (last.pt is saved)
                        emit(Event("note", epoch=epoch, message=f"note: {target} exists and is not a regular "
                                                                 "file: this epoch's checkpoint was not kept"))
                    else:
                        ckpt.save(target, payload("epoch", epoch + 1, 0, None, rng_ranks=rng_ranks))
                        prune_epoch_checkpoints(run_dir, t.checkpoint.keep)
                write_metrics(run_dir, history)
            emit(Event("epoch_end", epoch=epoch, epochs=t.epochs, row=row, message="best" if improved else ""))
            if dist.any(stop.signum is not None, device):  # a signal during validation: the epoch is saved
                raise Interrupted(stop.signum or signal.SIGTERM, last_path if write_checkpoints else None)
            if t.early_stopping and bad_epochs >= t.early_stopping.patience and epoch + 1 < t.epochs:
                stopped_early = True
                watched = stopping["metric"] if stopping else metric
                emit(Event("stop", epoch=epoch, message=f"early stopping: {watched} did not improve by more than "
                                                        f"{min_delta:g} for {bad_epochs} epochs"))
                break
    return FitResult(history, best, best_state, last_path, best_path, stopped_early,
                     len(history), time.perf_counter() - began, history[-1] if history else {})
