"""Losses: the registry, class weights, checks of loss arguments against the model and the targets."""

from __future__ import annotations

from typing import Any
import torch
from torch import nn
from nnctl.config.schema import Config
from nnctl.errors import Problem, UsageError
from nnctl.config.yamlio import Document
from nnctl.tasks import Task

L2_NOTE = "PyTorch has no L2Loss: loss l2 is MSELoss (mean squared error)"


# --- losses, optimizers, schedulers --------------------------------------------------

LOSS_CLASSES = {
    "cross_entropy": nn.CrossEntropyLoss,
    "nll": nn.NLLLoss,
    "mse": nn.MSELoss,
    "l2": nn.MSELoss,
    "l1": nn.L1Loss,
    "bce_with_logits": nn.BCEWithLogitsLoss,
    "huber": nn.HuberLoss,
    "smooth_l1": nn.SmoothL1Loss,
}


def balanced_weights(labels: torch.Tensor, classes: int) -> list[float]:
    """scikit-learn's "balanced" class weights: n / (classes x count of the class), from the training
    labels. A class with no training sample gets 1.0 (it never appears as a training target)."""
    counts = torch.bincount(labels.reshape(-1).long().cpu(), minlength=classes)[:classes].double()
    n = float(counts.sum())
    return [n / (classes * float(c)) if c > 0 else 1.0 for c in counts]


class IgnoringLoss(nn.Module):
    """cross_entropy / nll with ``ignore_index``: PyTorch's loss, whose mean is over the targets that are not
    ignore_index. A batch whose targets are all ignored has no mean (PyTorch gives 0/0 = NaN): its loss is 0
    (no gradient from it) and it counts for nothing in the epoch's mean, which weights each batch by its
    counted targets (``counted``). Telling the two apart costs one host sync a step, only with ignore_index."""

    def __init__(self, inner: nn.Module, ignore_index: int):
        super().__init__()
        self.inner = inner
        self.ignore_index = ignore_index

    def kept(self, y: torch.Tensor) -> torch.Tensor:
        return y != self.ignore_index

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if bool(self.kept(y).any()):
            return self.inner(out, y)
        return out.sum() * 0.0  # nothing to learn from: a zero loss, zero gradients


def kept(loss_fn: nn.Module, y: torch.Tensor) -> torch.Tensor | None:
    """Which targets the loss counts (a bool mask; None: every one)."""
    return loss_fn.kept(y) if isinstance(loss_fn, IgnoringLoss) else None


def counted(loss_fn: nn.Module, y: torch.Tensor, batch: int) -> int:
    """The targets a batch's mean loss is over: the batch size, or with ignore_index the targets kept."""
    mask = kept(loss_fn, y)
    return batch if mask is None else int(mask.sum())


def make_loss(spec: Any, *, labels: torch.Tensor | None = None, classes: int | None = None) -> nn.Module:
    """The loss module of ``train.loss``: a name, ``{name: {args}}`` or a TrainSection.

    ``weight: balanced`` needs the training split's ``labels`` and the number of ``classes``
    (the model's output width). List arguments become float32 tensors (buffers: ``.to(device)``).
    """
    if hasattr(spec, "loss_name"):
        name, args = spec.loss_name, spec.loss_args
    elif isinstance(spec, dict):
        (name, args), = spec.items()
    else:
        name, args = spec, {}
    kwargs: dict[str, Any] = {}
    for key, value in (args or {}).items():
        if key in ("weight", "pos_weight"):
            if value == "balanced":
                if labels is None or not classes:
                    raise UsageError("train.loss weight: balanced needs the training labels")
                value = balanced_weights(labels, classes)
            value = torch.tensor(value if isinstance(value, list) else [value], dtype=torch.float32)
        kwargs[key] = value
    loss = LOSS_CLASSES[name](**kwargs)
    return IgnoringLoss(loss, int(kwargs["ignore_index"])) if "ignore_index" in kwargs else loss


def check_loss(cfg: Config, doc: Document, outputs: int | None) -> list[Problem]:
    """Loss arguments that do not fit the model's output width (class weights, pos_weight), located."""
    if not outputs:
        return []
    t = cfg.train
    problems = []
    for key in ("weight", "pos_weight"):
        value = t.loss_args.get(key)
        if not isinstance(value, list):
            continue
        fits = len(value) == outputs if (key == "weight" or t.loss_name != "bce_with_logits") \
            else len(value) in (1, outputs)
        if not fits:
            per = "class" if cfg.task.has_classes else "output"
            problems.append(doc.problem(("train", "loss", t.loss_name, key),
                                        f"{key} has {len(value)} values but the model gives {outputs} outputs: "
                                        f"give one value per {per}"))
    return problems


def check_loss_targets(cfg: Config, doc: Document, data) -> list[Problem]:
    """Targets the loss cannot use: bce_with_logits (multilabel) needs float targets from 0 to 1."""
    if data.task != Task.MULTILABEL:
        return []
    y = data.train.store.y
    if not y.is_floating_point() or not len(y):
        return []
    lo, hi = float(y.min()), float(y.max())
    if lo < 0.0 or hi > 1.0:
        return [doc.problem(("train", "loss"), f"bce_with_logits needs targets from 0 to 1 (one probability or "
                                               f"0/1 label per output); the targets of {data.where or 'the data'} "
                                               f"range from {lo:.4g} to {hi:.4g}: use mse, l1, huber or smooth_l1 "
                                               "for regression")]
    return []
