"""One training epoch and one evaluation pass."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable
import torch
from torch import nn
from nnctl.errors import NnctlError
from nnctl.optim.losses import counted, kept
from nnctl.tasks import Task

# --- one epoch, evaluation ------------------------------------------------------------

@dataclass
class Forward:
    """How a batch goes through the model: mixed precision (``autocast``), channels_last, the device."""

    autocast: Callable[[], Any] = nullcontext
    channels_last: bool = False
    device: torch.device | None = None  # None: the model's


@dataclass
class Context:
    """What the step needs, built once by the trainer."""

    model: nn.Module  # what runs forward (possibly compiled)
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    device: torch.device
    autocast: Callable[[], Any]
    grad_clip: float | None
    step_scheduler: bool
    channels_last: bool
    trainable: list[nn.Parameter]
    set_train_mode: Callable[[], None]
    accumulate: int = 1  # batches per optimizer step (gradient accumulation)

    def forward(self) -> Forward:
        return Forward(self.autocast, self.channels_last, self.device)


def _prepare(ctx: Context, x: torch.Tensor) -> torch.Tensor:
    if ctx.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def acc_dtype(device: torch.device) -> torch.dtype:
    """Accumulate sums in float64, except on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


NOTHING_COUNTED = -3  # EpochSums.reduce: every target of the epoch was the loss's ignore_index


@dataclass
class EpochSums:
    """The epoch's per-step losses, kept on the device; read (one sync) at the end of the epoch.

    Appending the detached loss costs no kernel and no host sync per step. ``sizes``: the targets each
    step's mean loss is over (the batch size; with ignore_index, the targets that count, 0 for a batch with
    none), so the epoch's mean counts only those.
    """

    losses: list[torch.Tensor] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    @property
    def seen(self) -> int:
        return sum(self.sizes)

    def last(self) -> float | None:
        """The latest step's loss (a host sync: for displays that refresh a few times a second)."""
        return float(self.losses[-1]) if self.losses else None

    def reduce(self, all_reduce: Callable[[torch.Tensor], None] | None = None) -> tuple[float, int]:
        """(mean loss weighted by batch size, index of the first non-finite step or -1; NOTHING_COUNTED:
        steps ran but no target counted, every one ignore_index).

        all_reduce (distributed runs) sums the loss and sample counts of every rank.
        """
        if not self.losses:
            return math.nan, -1
        values = torch.stack([v.float() for v in self.losses])
        values = values.to(acc_dtype(values.device))
        sizes = torch.tensor(self.sizes, dtype=values.dtype, device=values.device)
        totals = torch.stack([(values * sizes).sum(), sizes.sum(), (~torch.isfinite(values)).sum().to(values.dtype)])
        if all_reduce is not None:
            all_reduce(totals)
        bad = (~torch.isfinite(values.cpu())).nonzero()
        loss_sum, seen, n_bad = totals.tolist()
        first_bad = int(bad[0]) if len(bad) else (-2 if n_bad else -1)  # -2: on another rank
        if first_bad == -1 and not seen:
            return math.nan, NOTHING_COUNTED
        return loss_sum / seen, first_bad

    def state(self) -> dict:
        return {"losses": torch.stack([v.float() for v in self.losses]).cpu() if self.losses else torch.zeros(0),
                "sizes": list(self.sizes)}

    @classmethod
    def from_state(cls, state: dict | None, device: torch.device) -> "EpochSums":
        if not state:
            return cls()
        return cls([v.to(device) for v in state["losses"]], list(state["sizes"]))


def _update(ctx: Context) -> None:
    """The optimizer step at the end of an accumulation group (gradients clipped, fp16 unscaled first)."""
    if ctx.scaler is not None:
        if ctx.grad_clip:
            ctx.scaler.unscale_(ctx.optimizer)
            torch.nn.utils.clip_grad_norm_(ctx.trainable, ctx.grad_clip)
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    else:
        if ctx.grad_clip:
            torch.nn.utils.clip_grad_norm_(ctx.trainable, ctx.grad_clip)
        try:
            ctx.optimizer.step()
        except RuntimeError as exc:  # Adam's lr / bias correction beyond float32 (lr 1e38): the arithmetic
            if "overflow" not in str(exc):
                raise
            lr = ctx.optimizer.param_groups[0].get("lr")
            raise NnctlError(f"the optimizer's update overflowed float32 ({type(ctx.optimizer).__name__}, lr "
                             f"{lr:g}: {' '.join(str(exc).split())[:120]}); lower the learning rate. Nothing "
                             "saved for this step") from None
    if ctx.step_scheduler:
        ctx.scheduler.step()


def train_one_epoch(ctx: Context, batches, epoch: int, start_step: int, sums: EpochSums,
                    on_step: Callable[[int, EpochSums], bool] | None = None) -> int:
    """Train over one epoch's batches from start_step. Returns the next step index.

    on_step(step, sums) is called after each step; returning True stops at that step boundary
    (with gradient accumulation, at the end of the accumulation group: gradients in flight are
    never dropped, so a stopped epoch resumes exactly).

    Gradient accumulation (``ctx.accumulate = N``): batches ``k*N .. k*N+N-1`` of an epoch form
    one group and one optimizer step. Each batch's mean loss is weighted by its share of the
    group's samples, so the summed gradients equal those of one batch of the whole group (the
    same samples: the epoch order does not depend on the batch size).
    """
    ctx.set_train_mode()
    step = start_step
    world = batches.world_size
    n = len(batches)
    acc = max(1, ctx.accumulate)
    group_total = 0
    for x, y in batches.epoch(epoch, start_step):
        first = step % acc == 0 or step == start_step
        last = (step + 1) % acc == 0 or step + 1 == n
        if first:
            group_start = step - step % acc
            group_total = sum(batches.global_size(s) for s in range(group_start, min(group_start + acc, n)))
            ctx.optimizer.zero_grad(set_to_none=True)
        x = _prepare(ctx, x)
        sync = nullcontext() if last or not hasattr(ctx.model, "no_sync") else ctx.model.no_sync()
        with sync:
            with ctx.autocast():
                out = ctx.model(x)
                loss = ctx.loss_fn(out.float() if out.dtype != torch.float32 else out, y)
            objective = loss
            # the mean over this batch, weighted by its share of the group's samples over every rank
            # (DDP averages the ranks' gradients, hence x world)
            scale = x.shape[0] * world / group_total
            if scale != 1.0:
                objective = loss * scale
            if ctx.scaler is not None:
                ctx.scaler.scale(objective).backward()
            else:
                objective.backward()
        if last:
            _update(ctx)
        sums.losses.append(loss.detach())
        sums.sizes.append(counted(ctx.loss_fn, y, x.shape[0]))
        step += 1
        if on_step is not None and on_step(step, sums) and last:
            break
    return step


@torch.inference_mode()
def evaluate(model: nn.Module, loss_fn: nn.Module, batches, task: Task | str, forward: Forward | None = None,
             all_reduce: Callable[[torch.Tensor], None] | None = None) -> dict[str, float]:
    """Loss and the task's metrics over a split, in eval mode: exactly ``task.metrics(outputs, "")``
    (``nnctl.tasks.Task``, or its name). One host sync at the end.

    Class scores (classification): accuracy, and top5_accuracy when the output has more than 5
    classes; labels (multilabel): accuracy, the share of labels whose logit's sign matches the 0/1
    target; values (regression, reconstruction): mse, mae (per sample over its elements).
    ``forward``: autocast, channels_last and the device (default: none, no, the model's).
    all_reduce (distributed runs) sums the totals of every rank's shard in place.
    """
    task = Task(task)
    forward = forward or Forward()
    autocast, channels_last, device = forward.autocast, forward.channels_last, forward.device
    was_training = model.training
    model.eval()
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    # loss sum, correct (or squared error sum), absolute error sum, counted targets (samples; with
    # ignore_index the targets kept), top-5 correct, top-5 seen, samples
    sums = torch.zeros(7, device=device, dtype=acc_dtype(device))
    try:
        for x, y in batches.epoch(0):
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                out = model(x)
            out = out.float()
            keep = kept(loss_fn, y)
            n_kept = x.shape[0] if keep is None else keep.sum()
            sums[0] += loss_fn(out, y).to(sums.dtype) * n_kept
            if task.answer == "classes":
                keep = torch.ones_like(y, dtype=torch.bool) if keep is None else keep
                sums[1] += ((out.argmax(dim=1) == y) & keep).sum()
                if out.dim() == 2 and "top5_accuracy" in task.metrics(out.shape[1], prefix=""):
                    sums[4] += ((out.topk(5, dim=1).indices == y.unsqueeze(1)).any(dim=1) & keep).sum()
                    sums[5] += n_kept
            elif task.answer == "labels":
                sums[1] += ((out > 0) == (y > 0.5)).to(sums.dtype).reshape(x.shape[0], -1).mean(dim=1).sum()
            else:
                diff = (out - y.to(out.dtype)).to(sums.dtype).reshape(x.shape[0], -1)
                sums[1] += diff.pow(2).mean(dim=1).sum()
                sums[2] += diff.abs().mean(dim=1).sum()
            sums[3] += n_kept
            sums[6] += x.shape[0]
    finally:
        model.train(was_training)
    if all_reduce is not None:
        all_reduce(sums)
    loss, second, third, n, top5, n5, samples = sums.tolist()
    if n == 0 and samples:
        raise NnctlError(f"every target of the {samples:.0f} samples evaluated is the loss's ignore_index "
                         f"({loss_fn.ignore_index}): there is nothing to measure; check the labels and "
                         "train.loss ignore_index")
    if n == 0:
        return {}
    values = {"loss": loss / n, "accuracy": second / n, "top5_accuracy": top5 / n5 if n5 else None,
              "mse": second / n, "mae": third / n}
    # the task's metrics, top-5 accuracy where it was counted (on any rank: all_reduce summed n5)
    return {name: values[name] for name in task.metrics(math.inf, prefix="") if values[name] is not None}
