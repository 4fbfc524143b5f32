"""Training policies: the monitor, best and early stopping decisions, divergence."""

from __future__ import annotations

import math
import torch
from torch import nn
from nnctl.config.schema import Config, mode_of
from nnctl.errors import NnctlError
from nnctl.optim.losses import task_of

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


def _state_finite(model: nn.Module) -> bool:
    """True when every floating parameter and buffer is finite (one host sync)."""
    flags = [torch.isfinite(v).all() for v in model.state_dict().values()
             if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _non_finite_inputs(batches) -> int:
    """How many non-finite values the split's finished batches (x, and float targets) hold."""
    bad = 0
    for x, y in batches.epoch(0):
        bad += int((~torch.isfinite(x)).sum())
        if y.is_floating_point():
            bad += int((~torch.isfinite(y)).sum())
    return bad


def monitor_for(cfg: Config, has_val: bool) -> tuple[str, str]:
    """(metric, mode) that best.pt tracks: train.checkpoint.monitor, else val accuracy for
    classification, else val loss; train loss without validation data."""
    c = cfg.train.checkpoint
    if c.monitor is not None and (has_val or not c.monitor.startswith("val_")):
        return c.monitor, c.mode or mode_of(c.monitor)
    if not has_val:
        return "train_loss", c.mode or "min"
    metric = "val_accuracy" if task_of(cfg) == "classification" else "val_loss"
    return metric, c.mode or mode_of(metric)


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
