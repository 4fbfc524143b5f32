"""The trainer: a ``TrainState`` and the epoch loop over it (``fit``).

``Trainer.run`` reads top to bottom as torchvision's reference ``train.py``: for each
epoch, train one epoch -> evaluate -> the policies (diverged? a new best? stop early?,
``policy.py``) -> save (best / last / epoch-N, one payload builder) -> metrics row -> event. Off the
hot path: no per-step host sync (loss sums stay on the device, read once an epoch or for a progress
display), batches preloaded on the device, ``zero_grad(set_to_none=True)``.

Exactness: an epoch's data order depends only on (seed, epoch), the RNG state is in every checkpoint,
and an interrupted epoch saves its step and running sums: a resumed run is bit-identical on the CPU.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nnctl.config.schema import Config, resolved
from nnctl.data.store import LoaderStopped
from nnctl.errors import NnctlError, Pruned, UsageError
from nnctl.model import compiling as COMPILE
from nnctl.model import precision as PREC
from nnctl.optim.losses import make_loss
from nnctl.optim.optimizers import _resume_optimizer, make_optimizer, make_scheduler
from nnctl.runs import checkpoint as ckpt
from nnctl.runs.checkpoint import prune_epoch_checkpoints
from nnctl.runs.metrics import write_metrics
from nnctl.runs.rundir import RunDir
from nnctl.seeds import rank_seed
from nnctl.training import policy
from nnctl.training import sharding as SH
from nnctl.training.distributed import Dist
from nnctl.training.loop import NOTHING_COUNTED, Context, EpochSums, acc_dtype, evaluate, train_one_epoch
from nnctl.training.signals import Interrupted, _StopFlag

# --- what fit takes and gives ----------------------------------------------------------


@dataclass
class Event:
    """What fit() reports to whoever displays progress (the CLI)."""

    kind: str  # "start" | "epoch_start" | "step" | "stopping" | "epoch_end" | "best" | "stop" | "note"
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    sums: EpochSums | None = None
    row: dict | None = None
    message: str = ""
    stopped: bool = False  # epoch_end: early stopping ends the run at this epoch (its checkpoint says so)


@dataclass
class FitOptions:
    """How fit runs, beyond the config (every field optional)."""

    resume: dict | None = None  # a checkpoint's payload to continue from (its full training state)
    on_event: Callable[[Event], None] | None = None  # progress events (rank 0 only)
    freezing: dict | None = None  # the freeze record, saved with every checkpoint
    write_checkpoints: bool = True  # False: nothing is written (api.fit without a run folder)
    dist: Dist | None = None  # this process's rank (default: a single process)
    outputs: int | None = None  # the model's output width (weight: balanced, top-5); default: the data's classes


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
    first_epoch: int = 1  # the first epoch this fit ran (a resumed run: the one after its checkpoint's)


@dataclass
class TrainState:
    """The training state as one value: what every checkpoint saves and a resume restores.

    ``epoch`` counts the finished epochs (the next one to run, 0-based); ``step_in_epoch`` the
    steps done of that one and ``sums`` its running losses (an epoch in progress or interrupted;
    0 and None between epochs); ``global_step`` every step of the run. ``best`` is best.pt's
    reference ``{metric, mode, value, epoch}`` and ``best_weights`` its weights (in memory); ``stopping``
    early stopping's own reference and ``bad_epochs`` its counter; ``loss_reference`` the first step's loss
    (the divergence rule's scale); ``stopped_early`` is set in the epoch early stopping ends the run at.
    The random state (torch's generators) is saved by ``payload``, set back by ``resume`` (per rank).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    best: dict
    stopping: dict | None = None
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    sums: EpochSums | None = None
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    loss_reference: float | None = None
    best_weights: dict[str, torch.Tensor] | None = None
    stopped_early: dict | None = None  # {"epoch", "reason"}: early stopping ended the run (a resume refuses it)


def fit(cfg: Config, model: nn.Module, data, device: torch.device, run_dir,
        options: FitOptions | None = None) -> FitResult:
    """Train the model as the config says, writing checkpoints into run_dir. Returns the history. Under
    torch.distributed the model is in DDP, or sharded (FSDP2, train.distributed), losses and metrics are
    reduced across ranks, every rank takes the same decisions, and only rank 0 writes."""
    return Trainer(cfg, model, data, device, run_dir, options or FitOptions()).run()


# --- set-up: the model on its device, the optimizer, the loss, the step's Context -------------

def _frozen_modules(model: nn.Module) -> list[nn.Module]:
    """Modules whose own parameters are all frozen (kept in eval mode during training)."""
    out = []
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own and not any(p.requires_grad for p in own):
            out.append(module)
    return out


def _train_mode(model: nn.Module, frozen: list[nn.Module]) -> None:
    model.train()
    for m in frozen:
        m.eval()


def _runner(model: nn.Module, device: torch.device, dist: Dist, compile_, dtype: torch.dtype | None) -> nn.Module:
    """What runs forward: the model (compiled with train.compile, before DDP wraps it, as torch advises), in
    DDP under torch.distributed, in a Runner when inputs are cast or graphs counted."""
    inner = COMPILE.compiled(model, compile_)
    ddp = dist.enabled and not SH.is_sharded(model) and \
        DistributedDataParallel(inner, device_ids=[device.index] if device.type == "cuda" else None)
    return COMPILE.runner(ddp or inner, compile_, dtype)


def _loss(cfg: Config, data, device: torch.device, outputs: int | None) -> nn.Module:
    """The config's loss; ``weight: balanced`` counts the training split's labels."""
    labels = classes = None
    if any(v == "balanced" for v in cfg.train.loss_args.values()):
        labels = data.train.store.y[data.train.indices]
        classes = outputs or data.num_classes
    return make_loss(cfg.train, labels=labels, classes=classes).to(device)


def _context(cfg: Config, model: nn.Module, data, device: torch.device, options: FitOptions,
             dist: Dist) -> tuple[Context, PREC.Precision]:
    """The model on its device (in its precision), the optimizer, scheduler, scaler and loss: what every
    step needs; and the precision as it runs on this device."""
    t = cfg.train
    precision = PREC.resolve(t.precision, device.type)
    model.to(device)
    PREC.cast_model(model, precision)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    if dist.enabled and t.distributed.strategy == "fsdp":  # before the optimizer: it takes the shards
        SH.shard(model, dist, device, reshard_after_forward=t.distributed.reshard_after_forward,
                 cpu_offload=t.distributed.cpu_offload)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise UsageError("every parameter is frozen: nothing to train")
    frozen = [] if (options.freezing or {}).get("train_frozen_norm") else _frozen_modules(model)
    optimizer = make_optimizer(t.optimizer, trainable)
    updates = -(-len(data.train) // t.accumulate)  # optimizer steps an epoch
    scheduler = make_scheduler(t.scheduler, optimizer, t.epochs, updates, t.scheduler_interval)
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    runner = _runner(model, device, dist, t.compile, PREC.input_dtype(precision))
    loss_fn = _loss(cfg, data, device, options.outputs)
    return Context(runner, loss_fn, optimizer, scheduler, PREC.grad_scaler(precision, device), device,
                   PREC.autocast(precision, device), t.grad_clip,
                   scheduler is not None and t.scheduler_interval == "step" and not plateau,
                   t.channels_last, trainable, partial(_train_mode, model, frozen), t.accumulate), precision


def _check_top5(cfg: Config, names: set[str], classes: int | None) -> None:
    for name in names:
        if name == "val_top5_accuracy" and name not in cfg.task.metrics(classes):
            raise UsageError(f"{name}: top-5 accuracy needs more than 5 classes; this model has {classes}")


# --- the trainer -----------------------------------------------------------------------------

class Trainer:
    """One fit: set up once (the Context, the TrainState, resumed or fresh), then ``run``."""

    def __init__(self, cfg: Config, model: nn.Module, data, device: torch.device, run_dir,
                 options: FitOptions):
        t = cfg.train
        self.cfg, self.data, self.device, self.freezing = cfg, data, device, options.freezing
        self.run_dir = RunDir(run_dir)
        self.dist = options.dist or Dist()
        self.writes = options.write_checkpoints and self.dist.main
        self.on_event = options.on_event if self.dist.main else None
        if t.threads:
            torch.set_num_threads(t.threads)
        self.ctx, self.precision = _context(cfg, model, data, device, options, self.dist)
        self.steps = len(data.train)
        has_val = data.val is not None
        self.metric, self.mode = policy.monitor_for(cfg, has_val)
        watch = policy.stopping_for(cfg, has_val)
        self.min_delta = t.early_stopping.min_delta if t.early_stopping is not None else 0.0
        _check_top5(cfg, {self.metric, *(watch[:1] if watch else ())}, options.outputs or data.num_classes)
        self.state = TrainState(
            model, self.ctx.optimizer, self.ctx.scheduler, self.ctx.scaler,
            best={"metric": self.metric, "mode": self.mode, "value": None, "epoch": None},
            # early stopping's own reference (its metric and min_delta may differ from best.pt's)
            stopping={"metric": watch[0], "mode": watch[1], "value": None, "epoch": None} if watch else None)
        if options.resume is not None:
            self.resume(options.resume, watch)
        self.last_path = str(self.run_dir.last)
        self.best_path = str(self.run_dir.best) if self.run_dir.best.exists() else None
        self.resolved_cfg = resolved(cfg)
        self.stop = _StopFlag()

    def emit(self, event: Event) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def all_reduce(self) -> Callable[[torch.Tensor], None] | None:
        return self.dist.all_reduce if self.dist.enabled else None

    # --- the epoch loop ------------------------------------------------------------------

    def run(self) -> FitResult:
        """The epochs, top to bottom. SIGINT / SIGTERM stop at a step boundary and save (Interrupted)."""
        t, s = self.cfg.train, self.state
        self.emit(Event("start", epochs=t.epochs, steps=self.steps, message=str(self.device)))
        for note in self.precision.notes():  # 16-mixed on a CPU; bfloat16 on a CPU without it
            self.emit(Event("note", message=note))
        began, first = time.perf_counter(), s.epoch + 1
        with self.stop, closing(self.data):  # the data's workers end with the fit, however it ends
            while s.epoch < t.epochs:
                epoch, tick = s.epoch, time.perf_counter()
                sums = self.train_epoch(epoch)  # a signal mid-epoch: last.pt at the step boundary, Interrupted
                train_loss = self.check_divergence(epoch, sums)  # diverged: nothing is saved
                row = self.evaluate(epoch, train_loss)  # the metrics row: train loss, validation metrics
                if epoch + 1 == first and (note := COMPILE.note(self.ctx.model, epoch)):
                    self.emit(Event("note", epoch=epoch, message=note))  # compile: graphs, recompilations
                self.step_scheduler(row, train_loss)
                row["seconds"] = time.perf_counter() - tick
                improved = self.apply_policies(epoch, row)  # a new best? early stopping's counter; stop early?
                self.save(epoch, improved)  # best.pt, last.pt, epoch-N.pt, metrics.csv
                self.epoch_end(epoch, row, improved)  # the event; a search's pruning stops every rank here
                if s.stopped_early:
                    self.emit(Event("stop", epoch=epoch, message=s.stopped_early["reason"]))
                if self.dist.any(self.stop.signum is not None, self.device):  # a signal during validation
                    raise Interrupted(self.stop.signum or signal.SIGTERM, self.last_path if self.writes else None,
                                      finished=bool(s.stopped_early) or s.epoch >= t.epochs)
                if s.stopped_early:
                    break
        return FitResult(s.history, s.best, s.best_weights, self.last_path, self.best_path, bool(s.stopped_early),
                         len(s.history), time.perf_counter() - began, s.history[-1] if s.history else {}, first)

    def epoch_end(self, epoch: int, row: dict, improved: bool) -> None:
        """The epoch_end event (rank 0), after its checkpoint is saved. A hyperparameter search may answer
        it with ``Pruned`` (its pruner stopped the trial): raised on every rank together under DDP."""
        pruned = None
        try:
            self.emit(Event("epoch_end", epoch=epoch, epochs=self.cfg.train.epochs, row=row,
                            message="best" if improved else "", stopped=bool(self.state.stopped_early)))
        except Pruned as exc:
            pruned = exc
        if self.dist.any(pruned is not None, self.device):  # one process: the flag itself
            raise pruned or Pruned(epoch + 1, self.metric, float(row.get(self.metric) or float("nan")))

    # --- one epoch's steps, and a stop between two of them -------------------------------------

    def train_epoch(self, epoch: int) -> EpochSums:
        """The epoch's steps from state.step_in_epoch (a resumed epoch continues its running sums)."""
        s = self.state
        s.sums = sums = s.sums or EpochSums()
        self.emit(Event("epoch_start", epoch=epoch, epochs=self.cfg.train.epochs, step=s.step_in_epoch,
                        steps=self.steps))
        try:
            step = train_one_epoch(self.ctx, self.data.train, epoch, s.step_in_epoch, sums, self.on_step)
        except NnctlError as exc:
            # a DataLoader worker killed by the same stop signal (SIGTERM to the process group): the
            # batch was being fetched, between two steps, so the state after the last step is saved
            if not (isinstance(exc, LoaderStopped) and self.stop.signum is not None):
                raise
            step = s.step_in_epoch
        except RuntimeError as exc:
            # torch's SIGCHLD handler saw a worker die at some point inside a step: the state is not
            # consistent, so nothing is saved; the previous checkpoint stays
            if self.stop.signum is None or "DataLoader worker" not in str(exc):
                raise
            raise Interrupted(self.stop.signum, self.last_path if self.writes and Path(self.last_path).exists()
                              else None) from None
        if step < self.steps:  # stopped by a signal at a step boundary
            s.step_in_epoch = step
            self.save_interrupted(epoch, sums)
        return sums

    def on_step(self, step: int, sums: EpochSums) -> bool:
        """After each step: count and report it; True stops the epoch at this step boundary (a signal)."""
        s = self.state
        s.global_step += 1
        s.step_in_epoch = step
        self.emit(Event("step", epoch=s.epoch, epochs=self.cfg.train.epochs, step=step, steps=self.steps,
                        sums=sums))
        if self.dist.enabled:  # every rank must stop at the same step: agree every 8 steps
            return step % 8 == 0 and self.dist.any(self.stop.signum is not None, self.device)
        return self.stop.signum is not None

    def save_interrupted(self, epoch: int, sums: EpochSums) -> None:
        """last.pt of the epoch in progress (its step and running sums), then Interrupted."""
        _, first_bad = sums.reduce(self.all_reduce())
        if first_bad not in (-1, NOTHING_COUNTED) or not policy.state_finite(self.state.model):  # never a diverged one
            raise policy.NonFiniteLoss(
                f"stopped by a signal in epoch {epoch + 1}, step {self.state.step_in_epoch}, but the training had "
                f"diverged (a non-finite loss or weights): nothing saved. {self.last_good()}")
        rng_ranks = self.dist.gather(ckpt.rng_state()) if self.dist.enabled else None
        path, gathered = None, self.gathered()
        if self.writes:
            ckpt.save(self.last_path, self.payload("last", rng_ranks=rng_ranks, gathered=gathered))
            path = self.last_path
        raise Interrupted(self.stop.signum or signal.SIGTERM, path)

    def last_good(self) -> str:
        """Where a failure leaves the run: the last good checkpoint, if one was written."""
        if Path(self.last_path).exists():
            return f"The last good checkpoint is {self.last_path}"
        return "No checkpoint was written before this."

    # --- after the epoch's steps: divergence, evaluation, the policies ---------------------------

    def check_divergence(self, epoch: int, sums: EpochSums) -> float:
        """The epoch's mean training loss, once the divergence rule (policy.py) has passed it."""
        s = self.state
        train_loss, first_bad = sums.reduce(self.all_reduce())
        kept = self.last_good()
        cause = policy.non_finite_loss(epoch, self.steps, train_loss, first_bad, kept)
        if cause is None:
            self.note_loss_reference(sums)
            cause = policy.explosion(epoch, train_loss, s.loss_reference, kept)
        if cause is None and not policy.state_finite(s.model):
            cause = policy.weights_divergence(epoch, kept)
        if cause is not None:
            raise cause
        return train_loss

    def note_loss_reference(self, sums: EpochSums) -> None:
        """The run's first step: the scale of its loss (the mean over the ranks), kept for the run."""
        if self.state.loss_reference is None and sums.losses:
            first = sums.losses[0].detach().float().reshape(1).to(acc_dtype(self.device))
            if self.dist.enabled:
                self.dist.all_reduce(first)
                first /= self.dist.world_size
            self.state.loss_reference = float(first)

    def evaluate(self, epoch: int, train_loss: float) -> dict[str, Any]:
        """The epoch's metrics row: epoch, step, train loss, the validation metrics, lr."""
        row: dict[str, Any] = {"epoch": epoch + 1, "step": self.state.global_step, "train_loss": train_loss}
        if self.data.val is not None:
            ev = evaluate(self.ctx.model, self.ctx.loss_fn, self.data.val, self.cfg.task, self.ctx.forward(),
                          self.all_reduce())
            row.update({f"val_{k}": v for k, v in ev.items()})
            self.check_validation(epoch, ev)
        stopping = self.state.stopping
        policy.check_monitored(row, [self.metric] + ([stopping["metric"]] if stopping else []))
        row["lr"] = self.state.optimizer.param_groups[0]["lr"]
        return row

    def check_validation(self, epoch: int, metrics: dict[str, float]) -> None:
        """A non-finite validation metric: the data's fault or the model's (NonFiniteValidation)."""
        if all(math.isfinite(v) for v in metrics.values()):
            return
        n_bad = policy.non_finite_inputs(self.data.val)
        if self.dist.enabled:
            n_bad = int(self.dist.any(n_bad > 0, self.device))
        split = "test" if self.cfg.data.split == "test" else "validation"
        where = getattr(self.data, "where", "") or self.cfg.data.source
        raise policy.validation_divergence(metrics, epoch, split, where, n_bad, self.last_good())

    def step_scheduler(self, row: dict[str, Any], train_loss: float) -> None:
        """An epoch-interval scheduler steps once an epoch (ReduceLROnPlateau on the validation loss)."""
        scheduler = self.state.scheduler
        if scheduler is not None and self.cfg.train.scheduler_interval == "epoch":
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(row.get("val_loss", train_loss))
            else:
                scheduler.step()

    def apply_policies(self, epoch: int, row: dict[str, Any]) -> bool:
        """The epoch is done: its row joins the history, best and early stopping move on. True: a new best."""
        s = self.state
        s.epoch, s.step_in_epoch, s.sums = epoch + 1, 0, None
        s.history.append(row)
        improved = policy.improves(row.get(self.metric), s.best["value"], self.mode)
        if improved:
            s.best = {**s.best, "value": row[self.metric], "epoch": epoch + 1}
            s.best_weights = SH.model_state(s.model, copy=True)  # gathered on rank 0 when sharded
        s.stopping, s.bad_epochs = policy.early_stopping(row, s.stopping, s.bad_epochs, improved, self.min_delta,
                                                         epoch + 1)
        if policy.stops_early(self.cfg.train.early_stopping, s.bad_epochs, epoch, self.cfg.train.epochs):
            s.stopped_early = {"epoch": epoch + 1, "reason": self.stop_message()}  # saved: a resume refuses it
            self.emit(Event("stopping", epoch=epoch))  # recorded before the save: a kill after it leaves it finished
        return improved

    def stop_message(self) -> str:
        s = self.state
        watched = s.stopping["metric"] if s.stopping else self.metric
        return (f"early stopping: {watched} did not improve by more than {self.min_delta:g} for {s.bad_epochs} "
                "epochs")

    # --- checkpoints --------------------------------------------------------------------------

    def payload(self, kind: str, weights: dict[str, torch.Tensor] | None = None, rng_ranks: list | None = None,
                gathered: tuple[dict, dict] | None = None) -> dict:
        """The checkpoint of the TrainState as it is now: the one place its fields are gathered."""
        s = self.state
        model_state, optim_state = gathered or (s.model.state_dict(), s.optimizer.state_dict())
        return ckpt.make_payload(
            kind, self.resolved_cfg, weights if weights is not None else model_state, optimizer=optim_state,
            scheduler=s.scheduler.state_dict() if s.scheduler is not None else None,
            scaler=s.scaler.state_dict() if s.scaler is not None else None,
            epoch=s.epoch, step_in_epoch=s.step_in_epoch, global_step=s.global_step,
            rng=ckpt.rng_state(), rng_ranks=rng_ranks, world_size=self.dist.world_size,
            best=dict(s.best), bad_epochs=s.bad_epochs, history=list(s.history), freeze=self.freezing,
            partial=None if s.sums is None else s.sums.state(),
            input_shape=list(self.cfg.model.input_shape),
            preprocessing=self.data.preprocessing.to_dict() if getattr(self.data, "preprocessing", None) else None,
            loss_reference=s.loss_reference, stopping=dict(s.stopping) if s.stopping else None,
            stopped_early=dict(s.stopped_early) if s.stopped_early else None,
        )

    def save(self, epoch: int, improved: bool) -> None:
        """After an epoch: best.pt (a new best), last.pt, epoch-N.pt (train.checkpoint.every), metrics.csv."""
        rng_ranks = self.dist.gather(ckpt.rng_state()) if self.dist.enabled else None  # every rank takes part
        gathered = self.gathered()  # sharded: a collective too
        if not self.writes:
            return
        if improved:
            self.best_path = str(self.run_dir.best)
            ckpt.save(self.best_path, self.payload("best", self.state.best_weights, rng_ranks, gathered))
        ckpt.save(self.last_path, self.payload("last", rng_ranks=rng_ranks, gathered=gathered))
        every = self.cfg.train.checkpoint.every
        if every and (epoch + 1) % every == 0:
            self.save_epoch_checkpoint(epoch, rng_ranks, gathered)
        write_metrics(self.run_dir, self.state.history)

    def gathered(self) -> tuple[dict, dict]:  # the model's and optimizer's full states (sharded: gathered)
        return SH.model_state(self.state.model), SH.optimizer_state(self.state.model, self.state.optimizer)
    def save_epoch_checkpoint(self, epoch: int, rng_ranks: list | None, gathered: tuple | None = None) -> None:
        target = self.run_dir.epoch(epoch + 1)
        if target.is_symlink() or (target.exists() and not target.is_file()):
            # never written over, never a reason to fail the epoch (last.pt is saved)
            self.emit(Event("note", epoch=epoch, message=f"note: {target} exists and is not a regular "
                                                         "file: this epoch's checkpoint was not kept"))
            return
        ckpt.save(target, self.payload("epoch", rng_ranks=rng_ranks, gathered=gathered))
        prune_epoch_checkpoints(self.run_dir, self.cfg.train.checkpoint.keep)

    # --- resuming -----------------------------------------------------------------------------

    def resume(self, saved: dict, watch: tuple[str, str] | None) -> None:
        """The TrainState from a checkpoint: weights, optimizer, counters, references, the RNG."""
        s, cfg = self.state, self.cfg
        SH.load_model_state(s.model, saved["model"])  # into each rank's shards when sharded
        _resume_optimizer(cfg, saved.get("config") or {}, saved, s.optimizer, s.scheduler, self.steps,
                          load=SH.optimizer_loader(s.model, s.optimizer))
        if s.scaler is not None and saved.get("scaler"):
            s.scaler.load_state_dict(saved["scaler"])
        s.epoch = int(saved.get("epoch", 0))
        s.step_in_epoch = int(saved.get("step_in_epoch", 0))
        s.global_step = int(saved.get("global_step", 0))
        s.history = list(saved.get("history") or [])
        s.best = dict(saved.get("best") or s.best)
        s.bad_epochs = int(saved.get("bad_epochs", 0))
        s.stopping = policy.saved_stopping(saved, s.best, watch, s.stopping)
        # the running sums of an interrupted epoch
        s.sums = EpochSums.from_state(saved.get("partial"), self.device) if s.step_in_epoch > 0 else None
        s.loss_reference = policy.saved_loss_reference(saved, s.history)
        ranks = saved.get("rng_ranks")
        if self.dist.enabled and ranks and len(ranks) == self.dist.world_size:
            ckpt.set_rng_state(ranks[self.dist.rank])
        elif self.dist.enabled and not self.dist.main:  # another process count: a fresh stream per rank
            torch.manual_seed(rank_seed(cfg.seed, self.dist.rank, s.epoch))
        else:
            ckpt.set_rng_state(saved.get("rng"))

