"""The ``tune:`` section of a config: what ``nnctl tune`` searches, checked without torch or Optuna.

Only ``nnctl tune`` reads it (``nnctl train`` ignores it; ``nnctl check`` checks it at its lines)::

    tune:
      metric: val_accuracy          # default: the config's monitor
      direction: maximize           # default: from the metric
      trials: 20
      timeout: 1h                   # optional: 90s, 30m, 1h30m or seconds
      sampler: tpe                  # tpe | random | grid | cmaes | gp, or {tpe: {seed: 0}}
      pruner: {median: {warmup_epochs: 2}}
      storage: postgresql://...     # default: a journal file in the search's folder
      params:                       # dotted config paths, as --set names them
        train.optimizer.Adam.lr: {float: [1e-4, 1e-1], log: true}
        train.batch_size: {choice: [32, 64, 128]}
        model.layers.0.Conv2d.out_channels: {int: [16, 64], step: 16}
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from nnctl.config.base import _CrossProblems, _one_key, _Section
from nnctl.tasks import MONITORS

SAMPLERS: dict[str, tuple[str, ...]] = {
    # nnctl's argument names -> Optuna's (tune.study maps them); seed defaults to the config's seed
    "tpe": ("seed", "startup_trials", "multivariate"),
    "random": ("seed",),
    "grid": ("seed",),
    "cmaes": ("seed", "sigma0", "startup_trials"),
    "gp": ("seed", "startup_trials"),
}
PRUNERS: dict[str, tuple[str, ...]] = {
    "none": (),
    "median": ("startup_trials", "warmup_epochs", "interval_epochs"),
    "percentile": ("percentile", "startup_trials", "warmup_epochs", "interval_epochs"),
    "hyperband": ("min_epochs", "reduction_factor"),
    "successive_halving": ("min_epochs", "reduction_factor", "min_early_stopping_rate"),
}
KINDS = ("float", "int", "choice")
_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m)?\s*(?:(\d+(?:\.\d+)?)\s*s)?\s*$")


def seconds_of(value: Any) -> float:
    """A duration: seconds as a number, or text such as 90s, 30m, 1h, 1h30m (ValueError otherwise)."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or text such as 90s, 30m, 1h30m")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m or not any(m.groups()):
            raise ValueError(f"{value!r} is not a duration: write seconds, or text such as 90s, 30m, 1h30m")
        h, mi, s = (float(g) if g else 0.0 for g in m.groups())
        seconds = h * 3600 + mi * 60 + s
    if not math.isfinite(seconds) or seconds <= 0 or seconds > 366 * 86400:
        raise ValueError(f"a duration must be more than 0 and at most a year, not {value!r}")
    return seconds


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def param_problem(spec: Any) -> str | None:
    """What is wrong with one search parameter's spec, or None."""
    if not isinstance(spec, dict) or not spec:
        return "a parameter is {float: [low, high]}, {int: [low, high]} or {choice: [a, b, ...]}"
    kinds = [k for k in KINDS if k in spec]
    if len(kinds) != 1:
        return f"give exactly one of float, int or choice, not {sorted(spec) if kinds else list(spec)}"
    kind = kinds[0]
    extra = sorted(set(spec) - {kind, "log", "step"})
    if kind == "choice":
        extra = sorted(set(spec) - {"choice"})
    if extra:
        allowed = "none" if kind == "choice" else "log, step"
        return f"unknown key{'s' if len(extra) > 1 else ''} {', '.join(map(str, extra))} (allowed beside {kind}: " \
               f"{allowed})"
    value = spec[kind]
    if kind == "choice":
        if not isinstance(value, list) or not value:
            return "choice takes a non-empty list of values"
        labels = [choice_label(v) for v in value]
        if len(set(labels)) != len(labels):
            return "choice lists a value twice"
        return None
    if not (isinstance(value, list) and len(value) == 2 and all(_number(v) for v in value)):
        return f"{kind} takes [low, high], two finite numbers"
    lo, hi = value
    if kind == "int" and not all(float(v).is_integer() for v in value):
        return "int takes whole numbers [low, high]"
    if lo > hi:
        return f"low {lo} is above high {hi}"
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        return "log is true or false"
    if step is not None and (not _number(step) or step <= 0 or (kind == "int" and not float(step).is_integer())):
        return f"step must be a positive {'whole ' if kind == 'int' else ''}number"
    if log and lo <= 0:
        return f"log: true needs low > 0, not {lo}"
    if log and kind == "int" and step not in (None, 1):
        return "an int parameter with log: true takes step 1 (Optuna's rule)"
    if log and step is not None and kind == "float":
        return "a float parameter takes log or step, not both (Optuna's rule)"
    if kind == "float" and (abs(lo) > 3.4e38 or abs(hi) > 3.4e38):
        return "beyond float32's range (3.4e38)"
    return None


def choice_label(value: Any) -> str:
    """A choice as Optuna stores it: a short YAML flow text ([], [RandomHorizontalFlip], 64, adam)."""
    return value if isinstance(value, str) else json.dumps(value, separators=(", ", ": "), sort_keys=True)


def ends(spec: dict) -> list[Any]:
    """The values a parameter's check tries: a range's two ends (snapped to its step), or every choice."""
    if "choice" in spec:
        return list(spec["choice"])
    kind = "int" if "int" in spec else "float"
    lo, hi = spec[kind]
    step = spec.get("step")
    if step is not None:
        hi = lo + math.floor((hi - lo) / step + 1e-9) * step
    return [int(lo), int(hi)] if kind == "int" else [float(lo), float(hi)]


def flow(value: Any) -> str:
    """A value as one ``--set`` token's right side (YAML flow: [], [RandomHorizontalFlip], 0.001)."""
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value) if not isinstance(value, str) else json.dumps(value)


def installed(module: str) -> bool:
    """Whether a package can be imported, without importing it (a broken or blocked one: no)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing(cfg: Any, doc: Any) -> list:
    """[the located problem] when a search is configured and Optuna (or its sampler's package) is not
    installed, else [] (the check pipeline's environment step: exit 1, with the pip command)."""
    t = cfg.tune
    needs = [("optuna", "pip install 'nnctl[tune]'")]
    sampler = next(iter(t.sampler))
    if sampler == "cmaes":
        needs.append(("cmaes", "pip install 'nnctl[tune]' (or pip install cmaes)"))
    if sampler == "gp":
        needs.append(("scipy", "pip install scipy"))
    for module, command in needs:
        if not installed(module):
            what = "nnctl tune" if module == "optuna" else f"the {sampler} sampler"
            return [doc.problem(("tune",), f"{what} needs {module}, which is not installed: {command}")]
    return []


class TuneSection(_Section):
    metric: str | None = Field(None, description="the metric the search optimises: any monitor (val_accuracy, "
                                                 "val_loss, ...); default: the config's monitor")
    direction: Literal["maximize", "minimize"] | None = Field(None, description="default: from the metric")
    trials: int = Field(20, ge=1, le=100_000, description="trials to complete (pruned and failed ones count; "
                                                          "a trial whose process died is run again)")
    timeout: Any = Field(None, description="stop starting trials after this long: 90s, 30m, 1h30m or seconds")
    sampler: Any = Field("tpe", description="tpe | random | grid | cmaes | gp, or {tpe: {seed: 0, ...}}; "
                                            "seed defaults to the config's seed")
    pruner: Any = Field("median", description="none | median | percentile | hyperband | successive_halving, "
                                              "or {median: {warmup_epochs: 2}}")
    storage: str | None = Field(None, description="default: a journal file in the search folder; "
                                                  "postgresql://user@host/db to share one study between machines; "
                                                  "sqlite:///file.db (one writer at a time)")
    params: dict[str, Any] = Field(min_length=1, description="dotted config paths, as --set names them, to "
                                                             "{float: [lo, hi], log: true}, {int: [lo, hi], "
                                                             "step: 16} or {choice: [a, b]}")

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str | None) -> str | None:
        if v is not None and v not in MONITORS:
            raise ValueError(f"unknown metric {v!r}: choose one of {', '.join(MONITORS)}")
        return v

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: Any) -> Any:
        if v is not None:
            seconds_of(v)
        return v

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, v: Any) -> dict:
        return {_choice(v, SAMPLERS, "sampler")[0]: _choice(v, SAMPLERS, "sampler")[1]}

    @field_validator("pruner")
    @classmethod
    def _pruner(cls, v: Any) -> dict:
        name, args = _choice("none" if v is None else v, PRUNERS, "pruner")
        if name == "percentile" and "percentile" not in args:
            raise ValueError("percentile needs {percentile: P}, P between 0 and 100")
        return {name: args}

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        if v is not None and "://" in v and not re.match(r"^(sqlite|postgresql|mysql)(\+\w+)?://", v):
            raise ValueError(f"storage {v.split('://')[0]}:// is not one Optuna keeps studies in: postgresql://, "
                             "mysql://, sqlite:///, or a journal file's path")
        return v

    @field_validator("params")
    @classmethod
    def _params(cls, v: dict[str, Any]) -> dict[str, Any]:
        problems = []
        for path, spec in v.items():
            problem = param_problem(spec)
            if problem is not None:
                problems.append((("tune", "params", path), problem))
            elif path.split(".")[0] in ("tune", "name"):
                problems.append((("tune", "params", path), f"{path}: the search cannot change "
                                                           f"{path.split('.')[0]}"))
        if problems:
            raise _CrossProblems(problems)
        return v

    @model_validator(mode="after")
    def _grid(self) -> "TuneSection":
        problems = []
        grid = "grid" in self.sampler
        for path, spec in self.params.items():
            if grid and isinstance(spec, dict) and "float" in spec and spec.get("step") is None:
                problems.append((("tune", "params", path), "the grid sampler needs a finite grid: give this float "
                                                           "parameter a step, or list its values with choice"))
        if problems:
            raise _CrossProblems(problems)
        return self

    @property
    def timeout_seconds(self) -> float | None:
        return None if self.timeout is None else seconds_of(self.timeout)


def _choice(value: Any, known: dict[str, tuple[str, ...]], what: str) -> tuple[str, dict]:
    name, args = _one_key(value, what)
    if name not in known:
        raise ValueError(f"unknown {what} {name!r}: choose one of {', '.join(known)}")
    unknown = sorted(set(args) - set(known[name]))
    if unknown:
        allowed = ", ".join(known[name]) or "none"
        raise ValueError(f"{what} {name} takes {allowed}; not {', '.join(map(str, unknown))}")
    for key, v in args.items():
        if key == "multivariate":
            if not isinstance(v, bool):
                raise ValueError("multivariate is true or false")
        elif not _number(v) or v < 0 or (key not in ("percentile", "sigma0") and not float(v).is_integer()):
            raise ValueError(f"{what} {name}: {key} must be a {'' if key in ('percentile', 'sigma0') else 'whole '}"
                             "number, 0 or more")
        elif key == "percentile" and not 0 < v < 100:
            raise ValueError("percentile must be between 0 and 100")
        elif key == "reduction_factor" and v < 2:
            raise ValueError("reduction_factor must be 2 or more")
    return name, dict(args)


# --- what a search reads and writes on this machine (checked by nnctl check and by nnctl tune) ----------

JOURNAL = "study.journal"  # the study's file in the search folder when tune.storage is not given


def storage_file(url: str | None, folder: Path) -> Path:
    """The local file a search's study is written to: its journal, or an sqlite database's file."""
    if url and url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):])
    if url and "://" in url:
        return folder / JOURNAL  # a server's database: nothing local but the folder
    return Path(url) if url else folder / JOURNAL


def searched_folders(cfg) -> list[str]:
    """The data folders a trial may read beyond the config's own: the choices of a searched data.root,
    data.val_root or data.test_root (absolute: the loader resolved them against the config file's folder,
    as the key itself, or against the current folder for a --set value)."""
    out = []
    for path, spec in cfg.tune.params.items():
        if path in ("data.root", "data.val_root", "data.test_root") and "choice" in spec:
            out += [os.path.abspath(os.path.expanduser(v)) for v in spec["choice"] if isinstance(v, str)]
    return out
