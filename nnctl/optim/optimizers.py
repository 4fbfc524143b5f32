"""Optimizers and schedulers: the registries, their checks at YAML lines, construction, resume rules."""

from __future__ import annotations

import inspect
import math
from typing import Any
import torch
from nnctl.config.schema import Config
from nnctl.config.schema import suggest
from nnctl.errors import Problem, UsageError
from nnctl.config.yamlio import Document

# The scheduler owns these param_group entries during a run: a resume keeps the restored values.
_SCHEDULER_KEYS = ("lr", "initial_lr")
_CYCLE_KEYS = ("momentum", "betas", "max_lr", "min_lr", "max_momentum", "base_momentum")


def _resume_optimizer(cfg: Config, saved: dict, resume: dict, optimizer, scheduler, steps: int,
                      load=None) -> None:
    """Load the optimizer and scheduler state of a resumed run, with the config's hyperparameters.

    The rule (README, Training, Config changes): the optimizer class and the scheduler (class,
    arguments, interval) must be those of the checkpoint's run; a change is refused (UsageError),
    because the restored state would silently override it. Every other optimizer hyperparameter
    of the config (lr, weight_decay, momentum, betas, eps, ...) is applied to every param group
    after the state is loaded, so the value recorded in the checkpoint's config is the value used.
    With a scheduler, the learning rate (and for OneCycleLR / CyclicLR with cycle_momentum the
    momentum or betas) belongs to the scheduler: changing train.optimizer's lr is refused then.
    A schedule whose length was fixed from train.epochs (OneCycleLR's total_steps) cannot be
    stretched: a resume with other epochs is refused. ``load``: how the optimizer takes the saved
    state (default ``optimizer.load_state_dict``; a sharded model's: ``training.sharding``).
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
            (load or optimizer.load_state_dict)(resume["optimizer"])
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
            # a number beyond float32's range: the structure's one rule (config.structure.beyond_float32)
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


# tensors of the parameter's size that each optimizer keeps a parameter (its state), by class
_SLOTS = {"Adam": 2, "AdamW": 2, "Adamax": 2, "NAdam": 2, "RAdam": 2, "Adadelta": 2, "Adagrad": 1, "ASGD": 2,
          "Rprop": 2, "LBFGS": 0, "SparseAdam": 2, "Adafactor": 2, "Muon": 1}


def state_slots(optimizer: dict) -> int:
    """How many tensors of a parameter's size the config's optimizer keeps a parameter (Adam: its two
    moments; SGD: one with momentum, none without; RMSprop: one, two with momentum or centered)."""
    (name, args), = optimizer.items()
    args = args or {}
    if name == "SGD":
        return 1 if args.get("momentum") else 0
    if name == "RMSprop":
        return 1 + bool(args.get("momentum")) + bool(args.get("centered"))
    return _SLOTS.get(name, 2)
