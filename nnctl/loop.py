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
import inspect
import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from . import checkpoint as ckpt
from .config import CLASSIFICATION_LOSSES, Config, mode_of, resolved, suggest
from .errors import NnctlError, Problem, UsageError
from .yamlio import Document

L2_NOTE = "PyTorch has no L2Loss: loss l2 is MSELoss (mean squared error)"


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


# The scheduler owns these param_group entries during a run: a resume keeps the restored values.
_SCHEDULER_KEYS = ("lr", "initial_lr")
_CYCLE_KEYS = ("momentum", "betas", "max_lr", "min_lr", "max_momentum", "base_momentum")


def _resume_optimizer(cfg: Config, saved: dict, resume: dict, optimizer, scheduler, steps: int) -> None:
    """Load the optimizer and scheduler state of a resumed run, with the config's hyperparameters.

    The rule (README, Training, Config changes): the optimizer class and the scheduler (class,
    arguments, interval) must be those of the checkpoint's run; a change is refused (UsageError),
    because the restored state would silently override it. Every other optimizer hyperparameter
    of the config (lr, weight_decay, momentum, betas, eps, ...) is applied to every param group
    after the state is loaded, so the value recorded in the checkpoint's config is the value used.
    With a scheduler, the learning rate (and for OneCycleLR / CyclicLR with cycle_momentum the
    momentum or betas) belongs to the scheduler: changing train.optimizer's lr is refused then.
    A schedule whose length was fixed from train.epochs (OneCycleLR's total_steps) cannot be
    stretched: a resume with other epochs is refused.
    """
    t = cfg.train
    saved_train = (saved or {}).get("train") or {}
    (name, args), = t.optimizer.items()
    old_opt = saved_train.get("optimizer") or {}
    old_name = next(iter(old_opt), None)
    old_args = dict(old_opt.get(old_name) or {})
    fix = ("resume with the checkpoint's setting, or start a new run from these weights with "
           "`nnctl train CONFIG --init RUN_FOLDER`")
    if old_name is not None and old_name != name:
        raise UsageError(f"train.optimizer is {name} but the checkpoint's run used {old_name}: {old_name}'s "
                         f"state (its step counts and moment estimates) cannot continue as {name}; {fix}")
    new_sched = dict(t.scheduler or {})
    old_sched = dict(saved_train.get("scheduler") or {})
    if saved_train and (next(iter(new_sched), None) != next(iter(old_sched), None)):
        raise UsageError(f"train.scheduler is {next(iter(new_sched), 'none')} but the checkpoint's run used "
                         f"{next(iter(old_sched), 'none')}; a schedule cannot change in the middle of a run; {fix}")
    if saved_train and new_sched and new_sched != old_sched:
        (sname, sargs), = new_sched.items()
        changed = sorted(k for k in set(sargs) | set(old_sched[sname]) if sargs.get(k) != old_sched[sname].get(k))
        raise UsageError(f"train.scheduler.{sname} changed ({', '.join(changed)}): the restored scheduler state "
                         f"would override the new values; {fix}")
    if saved_train and new_sched and saved_train.get("scheduler_interval", t.scheduler_interval) != \
            t.scheduler_interval:
        raise UsageError(f"train.scheduler_interval changed from {saved_train.get('scheduler_interval')} to "
                         f"{t.scheduler_interval}; a schedule cannot change in the middle of a run; {fix}")
    owned: tuple[str, ...] = ()
    if scheduler is not None:
        owned = _SCHEDULER_KEYS
        if getattr(scheduler, "cycle_momentum", False):
            owned += _CYCLE_KEYS
        for key in owned:
            if key in args or key in old_args:
                if old_name is not None and args.get(key) != old_args.get(key):
                    sname = next(iter(new_sched))
                    raise UsageError(f"train.optimizer.{name}.{key} changed from {old_args.get(key)} to "
                                     f"{args.get(key)}, but train.scheduler {sname} sets the {key} during a run "
                                     f"and its restored state continues from the old value; {fix}")
    state = resume.get("scheduler")
    if scheduler is not None and isinstance(state, dict) and "total_steps" in state \
            and getattr(scheduler, "total_steps", None) != state["total_steps"]:
        sname = next(iter(new_sched))
        old_epochs = saved_train.get("epochs", "?")
        raise UsageError(f"train.scheduler {sname}: its schedule spans the whole run, {state['total_steps']} steps "
                         f"({old_epochs} epochs), fixed when the run began; {t.epochs} epochs would need "
                         f"{scheduler.total_steps}, and stretching the schedule midway would change learning rates "
                         f"already used. Resume with --epochs {old_epochs}, or start a new run from these weights "
                         "with `nnctl train CONFIG --init RUN_FOLDER` and its own schedule")
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if resume.get("optimizer"):
        try:
            optimizer.load_state_dict(resume["optimizer"])
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise UsageError(f"the checkpoint's optimizer state does not fit this run's trainable parameters "
                             f"(were other parameters frozen?): {' '.join(str(exc).split())[:160]}; {fix}") from None
    if scheduler is not None and resume.get("scheduler"):
        try:
            scheduler.load_state_dict(resume["scheduler"])
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise UsageError(f"the checkpoint's scheduler state does not fit this run's scheduler: "
                             f"{' '.join(str(exc).split())[:160]}; {fix}") from None
    for group, values in zip(optimizer.param_groups, fresh):
        for key, value in values.items():
            if key not in owned:
                group[key] = value


class Interrupted(NnctlError):
    """SIGINT / SIGTERM: the run saved a checkpoint and stopped (exit 128 + signal)."""

    def __init__(self, signum: int, checkpoint: str | None):
        self.signum = signum
        self.exit_code = 128 + signum
        self.checkpoint = checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}; " + (f"saved {checkpoint}; resume with --resume" if checkpoint
                                                   else "nothing saved"))


# --- devices ------------------------------------------------------------------------

def select_device(spec: str) -> torch.device:
    """auto: CUDA, else MPS, else CPU. Asking for an absent device is an error, never a fallback."""
    spec = (spec or "auto").strip()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise UsageError("device mps requested but MPS is not available on this machine "
                             "(Apple silicon with a MPS-enabled PyTorch); use --device cpu or auto")
        return torch.device("mps")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"device {spec} requested but CUDA is not available "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                             "use --device cpu or auto")
        index = int(spec.split(":", 1)[1]) if ":" in spec else 0
        count = torch.cuda.device_count()
        if index >= count:
            raise UsageError(f"device {spec} requested but this machine has {count} CUDA device(s) "
                             f"(cuda:0 to cuda:{count - 1})")
        return torch.device("cuda", index)
    raise UsageError(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps")


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
    return LOSS_CLASSES[name](**kwargs)


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
            per = "class" if t.loss_name in CLASSIFICATION_LOSSES else "output"
            problems.append(doc.problem(("train", "loss", t.loss_name, key),
                                        f"{key} has {len(value)} values but the model gives {outputs} outputs: "
                                        f"give one value per {per}"))
    return problems


def check_loss_targets(cfg: Config, doc: Document, data) -> list[Problem]:
    """Targets the loss cannot use: bce_with_logits needs float targets from 0 to 1."""
    if cfg.train.loss_name != "bce_with_logits" or data.task == "classification":
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


def task_of(cfg: Config) -> str:
    """classification (class labels), multilabel (bce_with_logits on 0/1 targets) or regression."""
    name = cfg.train.loss_name
    if name in CLASSIFICATION_LOSSES and (cfg.data is None or cfg.data.target == "label"):
        return "classification"
    return "multilabel" if name == "bce_with_logits" else "regression"


def _optim_registry() -> dict[str, type]:
    return {n: c for n, c in vars(torch.optim).items()
            if inspect.isclass(c) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer}


def _scheduler_registry() -> dict[str, type]:
    sched = torch.optim.lr_scheduler
    base = getattr(sched, "LRScheduler", None) or sched._LRScheduler
    skip = {"LRScheduler", "_LRScheduler", "LambdaLR", "MultiplicativeLR", "SequentialLR", "ChainedScheduler"}
    out = {n: c for n, c in vars(sched).items()
           if inspect.isclass(c) and (issubclass(c, base) or n == "ReduceLROnPlateau") and n not in skip
           and not n.startswith("_")}
    return out


def _check_class_args(kind: str, registry: dict[str, type], spec: dict, path: tuple, doc: Document,
                      skip: tuple[str, ...]) -> list[Problem]:
    (name, args), = spec.items()
    cls = registry.get(name)
    if cls is None:
        return [doc.problem(path + (name,), f"unknown {kind} {name!r}{suggest(name, list(registry))} "
                                            f"(torch.{'optim' if kind == 'optimizer' else 'optim.lr_scheduler'} "
                                            "classes only)")]
    params = [p for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
              if p.name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    names = [p.name for p in params]
    problems = []
    for key, value in args.items():
        if key not in names:
            problems.append(doc.problem(path + (name, key), f"unknown argument {key!r} for {name}"
                                                           f"{suggest(str(key), names) or ' (takes: ' + ', '.join(names) + ')'}"))
            continue
        flat = value if isinstance(value, list) else [value]
        for v in flat:
            if isinstance(v, float) and not math.isfinite(v):
                problems.append(doc.problem(path + (name, key), f"{name}.{key} must be finite, got {v}"))
            elif isinstance(v, int | float) and not isinstance(v, bool) and abs(v) > 3.4e38:
                # the optimizer keeps it in float32 tensors: a larger value overflows there
                problems.append(doc.problem(path + (name, key), f"{name}.{key} = {v:g} is beyond float32's range "
                                                               "(about 3.4e38)"))
            elif isinstance(v, dict) or (isinstance(v, str) and key not in ("mode", "anneal_strategy", "threshold_mode", "scale_mode")):
                problems.append(doc.problem(path + (name, key), f"{name}.{key}: {v!r} is not a valid value"))
    for p in params:
        if p.default is inspect.Parameter.empty and p.name not in args and p.name not in ("total_steps", "epochs", "steps_per_epoch"):
            problems.append(doc.problem(path + (name,), f"{name} needs {p.name}"))
    return problems


def validate(cfg: Config | Any, doc: Document) -> list[Problem]:
    """Problems in the train section that need torch to find (optimizer and scheduler classes).

    ``cfg`` is a whole config or its train section alone (``config.TrainSection``).
    """
    t = getattr(cfg, "train", cfg)
    problems = _check_class_args("optimizer", _optim_registry(), t.optimizer, ("train", "optimizer"), doc, ("params",))
    if t.scheduler:
        problems += _check_class_args("scheduler", _scheduler_registry(), t.scheduler, ("train", "scheduler"), doc,
                                      ("optimizer",))
    return problems


def make_optimizer(spec: dict, params) -> torch.optim.Optimizer:
    (name, args), = spec.items()
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    return _optim_registry()[name](params, **args)


def make_scheduler(spec: dict | None, optimizer, epochs: int, steps_per_epoch: int, interval: str):
    if not spec:
        return None
    (name, args), = spec.items()
    args = dict(args)
    cls = _scheduler_registry()[name]
    sig = inspect.signature(cls.__init__).parameters
    if "total_steps" in sig and "total_steps" not in args and "epochs" not in args:
        args["total_steps"] = epochs * (steps_per_epoch if interval == "step" else 1)
    return cls(optimizer, **args)


# --- one epoch, evaluation ------------------------------------------------------------

@dataclass
class Context:
    """What the step needs, built once by fit()."""

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
    classification: bool
    trainable: list[nn.Parameter]
    set_train_mode: Callable[[], None]
    accumulate: int = 1  # batches per optimizer step (gradient accumulation)


def _prepare(ctx: Context, x: torch.Tensor) -> torch.Tensor:
    if ctx.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def acc_dtype(device: torch.device) -> torch.dtype:
    """Accumulate sums in float64, except on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass
class EpochSums:
    """The epoch's per-step losses, kept on the device; read (one sync) at the end of the epoch.

    Appending the detached loss costs no kernel and no host sync per step.
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
        """(mean loss weighted by batch size, index of the first non-finite step or -1).

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
        return loss_sum / seen, first_bad

    def state(self) -> dict:
        return {"losses": torch.stack([v.float() for v in self.losses]).cpu() if self.losses else torch.zeros(0),
                "sizes": list(self.sizes)}

    @classmethod
    def from_state(cls, state: dict | None, device: torch.device) -> "EpochSums":
        if not state:
            return cls()
        return cls([v.to(device) for v in state["losses"]], list(state["sizes"]))


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
            if ctx.scaler is not None:
                if ctx.grad_clip:
                    ctx.scaler.unscale_(ctx.optimizer)
                    torch.nn.utils.clip_grad_norm_(ctx.trainable, ctx.grad_clip)
                ctx.scaler.step(ctx.optimizer)
                ctx.scaler.update()
            else:
                if ctx.grad_clip:
                    torch.nn.utils.clip_grad_norm_(ctx.trainable, ctx.grad_clip)
                ctx.optimizer.step()
            if ctx.step_scheduler:
                ctx.scheduler.step()
        sums.losses.append(loss.detach())
        sums.sizes.append(x.shape[0])
        step += 1
        if on_step is not None and on_step(step, sums) and last:
            break
    return step


@torch.inference_mode()
def evaluate(model: nn.Module, loss_fn: nn.Module, batches, classification: bool | str,
             autocast: Callable[[], Any] = nullcontext, channels_last: bool = False,
             device: torch.device | None = None, all_reduce: Callable[[torch.Tensor], None] | None = None,
             ) -> dict[str, float]:
    """Loss and metrics over a split, in eval mode. One host sync at the end.

    ``classification``: True or "classification" (accuracy, and top5_accuracy when the output
    has more than 5 classes), "multilabel" (accuracy: the share of labels whose logit's sign
    matches the 0/1 target), False or "regression" (mse, mae).
    all_reduce (distributed runs) sums the totals of every rank's shard in place.
    """
    task = {True: "classification", False: "regression"}.get(classification, classification)
    was_training = model.training
    model.eval()
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    # loss sum, correct (or squared error sum), absolute error sum, samples, top-5 correct, top-5 seen
    sums = torch.zeros(6, device=device, dtype=acc_dtype(device))
    try:
        for x, y in batches.epoch(0):
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                out = model(x)
            out = out.float()
            sums[0] += loss_fn(out, y).to(sums.dtype) * x.shape[0]
            if task == "classification":
                sums[1] += (out.argmax(dim=1) == y).sum()
                if out.dim() == 2 and out.shape[1] > 5:
                    sums[4] += (out.topk(5, dim=1).indices == y.unsqueeze(1)).any(dim=1).sum()
                    sums[5] += x.shape[0]
            elif task == "multilabel":
                sums[1] += ((out > 0) == (y > 0.5)).to(sums.dtype).reshape(x.shape[0], -1).mean(dim=1).sum()
            else:
                diff = (out - y.to(out.dtype)).to(sums.dtype).reshape(x.shape[0], -1)
                sums[1] += diff.pow(2).mean(dim=1).sum()
                sums[2] += diff.abs().mean(dim=1).sum()
            sums[3] += x.shape[0]
    finally:
        model.train(was_training)
    if all_reduce is not None:
        all_reduce(sums)
    loss, second, third, n, top5, n5 = sums.tolist()
    if n == 0:
        return {}
    result = {"loss": loss / n}
    if task in ("classification", "multilabel"):
        result["accuracy"] = second / n
        if n5:
            result["top5_accuracy"] = top5 / n5
    else:
        result["mse"] = second / n
        result["mae"] = third / n
    return result


# --- distributed ----------------------------------------------------------------------

@dataclass
class Dist:
    """This process's place in a torch.distributed run (world_size 1: a plain run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(t)

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when flag is True on any rank (a collective: every rank must call it)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        self.all_reduce(t)
        return bool(t.item() > 0)

    def gather(self, obj: Any) -> list:
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def dist_from_env() -> Dist:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK, or a single process."""
    import os

    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return Dist()
    return Dist(rank, world, local) if world > 1 else Dist()


def init_distributed(d: Dist, device: torch.device) -> None:
    """One process group: gloo on the CPU, nccl on CUDA (one device a rank)."""
    import datetime

    import torch.distributed as dist

    if not d.enabled or dist.is_initialized():
        return
    import os

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(minutes=10)
    # torchrun's store outlives a restart (--max-restarts): keys of the earlier attempt's
    # process group would be read again, so each attempt gets a prefix of its own
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    store = dist.PrefixStore(f"nnctl-attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)


def close_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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


class _StopFlag:
    """SIGINT / SIGTERM set a flag; the loop stops at the next step boundary."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


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
            torch.manual_seed(cfg.seed + 1_000_003 * dist.rank + start_epoch)
        else:
            ckpt.set_rng_state(resume.get("rng"))
    best_state = None
    best_path = str(run_dir / ckpt.NAMES["best"]) if (run_dir / ckpt.NAMES["best"]).exists() else None
    last_path = str(run_dir / ckpt.NAMES["last"])
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
                from .data import LoaderStopped

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
                    best_path = str(run_dir / ckpt.NAMES["best"])
                    ckpt.save(best_path, payload("best", epoch + 1, 0, None, best_state, rng_ranks))
                ckpt.save(last_path, payload("last", epoch + 1, 0, None, rng_ranks=rng_ranks))
                if t.checkpoint.every and (epoch + 1) % t.checkpoint.every == 0:
                    target = run_dir / epoch_name(epoch + 1)
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


def epoch_name(epoch: int) -> str:
    """The file name of the checkpoint kept after ``epoch`` (train.checkpoint.every)."""
    return f"epoch-{epoch}.pt"


def _is_checkpoint_file(path) -> bool:
    """A regular file (not a link) in torch's zip format: what nnctl's epoch checkpoints are."""
    import os
    import stat

    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return False
        with open(path, "rb") as fh:
            return fh.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def prune_epoch_checkpoints(run_dir, keep: int | None) -> list[str]:
    """Remove all but the ``keep`` newest epoch-N.pt checkpoints of a run folder (None: keep all).

    Only regular files in torch's checkpoint format are counted and removed: a folder, a link or a
    file that is not a checkpoint is never touched. A failure to remove one is not an error (the
    epoch is saved). Returns the removed names.
    """
    import os
    import re
    from pathlib import Path

    if not keep:
        return []
    try:
        names = os.listdir(run_dir)
    except OSError:
        return []
    found = sorted((int(m.group(1)), name) for name in names
                   if (m := re.fullmatch(r"epoch-(\d+)\.pt", name)) and _is_checkpoint_file(Path(run_dir) / name))
    removed = []
    for _, name in found[:-keep]:
        try:
            os.unlink(Path(run_dir) / name)
            removed.append(name)
        except OSError:
            pass
    return removed


def write_metrics(run_dir, history: list[dict]) -> None:
    """metrics.csv: one row an epoch (rewritten atomically from the history)."""
    import csv
    import io
    from pathlib import Path

    if not history:
        return
    columns: list[str] = []
    for row in history:
        for key in row:
            if key not in columns:
                columns.append(key)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    ckpt.atomic_write(Path(run_dir) / "metrics.csv", lambda fh: fh.write(buf.getvalue().encode()), run_file=True)


def plot_curves(run_dir, history: list[dict], title: str) -> str | None:
    """curves.png: losses (left) and the validation metric (right) by epoch."""
    from pathlib import Path

    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    metric_keys = [k for k in ("val_accuracy", "val_mae") if k in history[0]]
    fig, axes = plt.subplots(1, 2 if metric_keys else 1, figsize=(10 if metric_keys else 5.5, 3.6), squeeze=False)
    ax = axes[0][0]
    for key in ("train_loss", "val_loss"):
        if key in history[0]:
            ax.plot(epochs, [r.get(key) for r in history], marker="o", ms=3, label=key.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if metric_keys:
        ax2 = axes[0][1]
        key = metric_keys[0]
        ax2.plot(epochs, [r.get(key) for r in history], marker="o", ms=3, color="tab:green")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel(key.replace("_", " "))
        ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(run_dir) / "curves.png"
    ckpt.atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110), run_file=True)
    plt.close(fig)
    return str(path)
