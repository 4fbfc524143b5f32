"""Training policies: the monitor, best and early stopping decisions, divergence."""

from __future__ import annotations

import math
from typing import Any
import torch
import torch.distributed as tdist
from torch import nn
from nnctl.config.schema import Config
from nnctl.errors import NnctlError, UsageError
from nnctl.tasks import mode_of
from nnctl.training.loop import NOTHING_COUNTED

class Diverged(NnctlError):
    """Training diverged: a non-finite loss or weights, or an exploding loss (exit 1). Nothing is saved."""


class NonFiniteLoss(Diverged):
    """The loss became NaN or infinite (exit 1)."""


class NonFiniteValidation(NnctlError):
    """A validation metric is NaN or infinite: the validation data holds such values, or the model diverged."""


# The divergence rule (README, Training): after each epoch the run stops with exit 1, saving nothing, when
# any step's loss is non-finite, when a weight or floating buffer is non-finite, or when the epoch's mean
# training loss exceeds EXPLODE_FACTOR x max(loss of the run's first step, 1).
EXPLODE_FACTOR = 1e6


def state_finite(model: nn.Module) -> bool:
    """True when every floating parameter and buffer is finite (one host sync). A sharded model (FSDP2:
    DTensor parameters) is checked shard by shard and the ranks agree (a collective: every rank calls it)."""
    flags, sharded = [], False
    for v in model.state_dict().values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            if hasattr(v, "to_local"):  # a DTensor: this rank's shard
                v, sharded = v.to_local(), True
            flags.append(torch.isfinite(v).all())
    finite = bool(torch.stack(flags).all()) if flags else True
    if sharded:
        bad = torch.tensor([0.0 if finite else 1.0], device=flags[0].device)
        tdist.all_reduce(bad)
        finite = float(bad) == 0.0
    return finite


def non_finite_inputs(batches) -> int:
    """How many non-finite values the split's finished batches (x, and float targets) hold."""
    bad = 0
    for x, y in batches.epoch(0):
        bad += int((~torch.isfinite(x)).sum())
        if y.is_floating_point():
            bad += int((~torch.isfinite(y)).sum())
    return bad


def monitor_for(cfg: Config, has_val: bool) -> tuple[str, str]:
    """(metric, mode) that best.pt tracks: train.checkpoint.monitor, else the task's default monitor
    (val accuracy for classification, else val loss); train loss without validation data."""
    c = cfg.train.checkpoint
    if c.monitor is not None and (has_val or not c.monitor.startswith("val_")):
        return c.monitor, c.mode or mode_of(c.monitor)
    if not has_val:
        return "train_loss", c.mode or "min"
    task = cfg.task
    return task.monitor, c.mode or task.mode


def stopping_for(cfg: Config, has_val: bool) -> tuple[str, str] | None:
    """(metric, mode) that early stopping watches (default: best.pt's), or None without early stopping."""
    e = cfg.train.early_stopping
    if e is None:
        return None
    if e.monitor is None:
        metric, mode = monitor_for(cfg, has_val)
        return metric, e.mode or mode
    return e.monitor, e.mode or mode_of(e.monitor)


def improves(value: float | None, reference: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """The rule of best.pt (min_delta 0) and of early stopping: better than the reference by more than
    min_delta (Keras's EarlyStopping rule); the first finite value always improves."""
    if value is None or not math.isfinite(value):
        return False
    if reference is None:
        return True
    return value < reference - min_delta if mode == "min" else value > reference + min_delta


# --- the decisions after an epoch (Trainer.run): pure functions of the epoch's numbers -----------

def early_stopping(row: dict, stopping: dict | None, bad_epochs: int, improved: bool, min_delta: float,
                   epoch: int) -> tuple[dict | None, int]:
    """(early stopping's reference, its count of epochs without improvement) after this epoch's row.

    With its own reference (``stopping``: {metric, mode, value, epoch}) an epoch counts as an
    improvement when its metric improves by more than min_delta; without one, when best.pt improved.
    """
    if stopping is None:
        return None, 0 if improved else bad_epochs + 1
    value = row.get(stopping["metric"])
    if improves(value, stopping["value"], stopping["mode"], min_delta):
        return {**stopping, "value": value, "epoch": epoch}, 0
    return stopping, bad_epochs + 1


def stops_early(early_stopping_cfg: Any, bad_epochs: int, epoch: int, epochs: int) -> bool:
    """Early stopping's decision after epoch (0-based): patience spent, and epochs remain to skip."""
    return bool(early_stopping_cfg) and bad_epochs >= early_stopping_cfg.patience and epoch + 1 < epochs


def check_monitored(row: dict, names: list[str]) -> None:
    """A safety net behind the config's checks: never watch a column the metrics row lacks."""
    for name in names:
        if name not in row:
            raise UsageError(f"the run monitors {name}, but its metrics are {', '.join(sorted(row))}: "
                             "set train.checkpoint.monitor / train.early_stopping.monitor to one of them")


def non_finite_loss(epoch: int, steps: int, train_loss: float, first_bad: int, kept: str) -> NnctlError | None:
    """The divergence rule, first part: a step's loss (``first_bad``: its index; -2 on another rank; -1
    none) or the epoch's mean is non-finite. ``kept``: where the last good checkpoint is. An epoch whose
    every target was the loss's ignore_index (NOTHING_COUNTED) has no mean: not a divergence, said plainly."""
    if first_bad == NOTHING_COUNTED:
        return NnctlError(f"every training target of epoch {epoch + 1} ({steps} steps) is the loss's ignore_index: "
                          f"there is nothing to learn from; check the labels and train.loss ignore_index. {kept}")
    if first_bad == -1 and math.isfinite(train_loss):
        return None
    where = f"epoch {epoch + 1}" + (f", step {first_bad + 1}" if first_bad >= 0 else
                                     ", on another rank" if first_bad == -2 else "")
    if epoch == 0 and first_bad == 0:  # before any update: neither the learning rate nor clipping is the cause
        return NonFiniteLoss(f"the training loss was non-finite at {where}, the run's first step, before any "
                             "update: check the data (NaN or infinite values, or inputs and targets so large "
                             f"that the loss overflows float32) and the model's output for them. {kept}")
    return NonFiniteLoss(f"the training loss became non-finite at {where} (of {steps} steps an epoch); lower the "
                         f"learning rate, clip gradients (train.grad_clip) or check the data. {kept}")


def explosion(epoch: int, train_loss: float, reference: float | None, kept: str) -> Diverged | None:
    """The divergence rule, second part: the epoch's mean loss over EXPLODE_FACTOR x max(first step's loss, 1)."""
    if not train_loss > EXPLODE_FACTOR * max(reference or 0.0, 1.0):
        return None
    return Diverged(f"the training loss exploded at epoch {epoch + 1}: {train_loss:.4g}, over "
                    f"{EXPLODE_FACTOR:.0e} x max(first step's loss {reference:.4g}, 1); lower the "
                    f"learning rate or clip gradients (train.grad_clip). Nothing saved. {kept}")


def weights_divergence(epoch: int, kept: str) -> Diverged:
    """The divergence rule, third part: a weight became non-finite although every loss was finite."""
    return Diverged(f"the weights became non-finite (NaN or infinite) during epoch {epoch + 1}, although "
                    "every step's loss was finite (the last update overflowed); lower the learning rate "
                    f"or clip gradients (train.grad_clip). Nothing saved. {kept}")


def validation_divergence(metrics: dict[str, float], epoch: int, split: str, where: str, n_bad: int,
                          kept: str) -> NonFiniteValidation:
    """A non-finite validation metric: the data's fault (``n_bad`` non-finite inputs) or the model's."""
    bad = [f"val_{k} {v}" for k, v in metrics.items() if not math.isfinite(v)]
    cause = (f"the {split} data holds non-finite values (NaN or infinite; {n_bad:,} in this "
             "process's share); clean the data" if n_bad else
             f"the {split} data is finite, so the model diverged (its outputs overflow although "
             "its weights are finite); lower the learning rate or clip gradients")
    return NonFiniteValidation(f"{', '.join(bad)} at epoch {epoch + 1} on the {split} split of "
                               f"{where}: {cause}. Nothing saved. {kept}")


# --- what a resumed run takes from its checkpoint ---------------------------------------------

def saved_stopping(saved: dict, best: dict, watch: tuple[str, str] | None, fresh: dict | None) -> dict | None:
    """Early stopping's reference in a checkpoint (an older one: best.pt's, when it watched the same metric)."""
    if watch is None:
        return fresh
    stopping = saved.get("stopping")
    if stopping and stopping.get("metric") == watch[0]:
        return dict(stopping)
    if best.get("metric") == watch[0]:  # an older checkpoint: early stopping watched best.pt's metric
        return {**best, "mode": watch[1]}
    return fresh


def saved_loss_reference(saved: dict, history: list[dict]) -> float | None:
    reference = saved.get("loss_reference")
    if not isinstance(reference, float) and history and isinstance(history[0].get("train_loss"), float):
        reference = history[0]["train_loss"]  # a checkpoint of an older nnctl: the first epoch's loss
    return reference
