"""Structural validation of a config document: pydantic errors located at their YAML lines, cross-field checks."""

from __future__ import annotations

import copy
import math
import os
import re
import typing
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any
from pydantic import BaseModel, ValidationError
from nnctl.errors import ConfigError, Problem
from nnctl.config.yamlio import Document
from nnctl.config.schema import _CrossProblems, _describe, suggest
from nnctl.config.schema import Config, DataSection, FreezeSection, ModelSection, TrainSection



# --- turning pydantic's errors into located, actionable problems -------------------

def _model_at(path: tuple) -> type[BaseModel] | None:
    cls: Any = Config
    for part in path:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return None
        ann = cls.model_fields[part].annotation
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        cls = args[0] if args and not (isinstance(ann, type) and issubclass(ann, BaseModel)) else ann
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None








def _problem_from(err: dict, data: Any, doc: Document) -> Problem:
    loc = tuple(err["loc"])
    kind = err["type"]
    path: list = []
    cur = data
    missing_key = None
    for i, part in enumerate(loc):
        if isinstance(cur, dict) and part in cur:
            path.append(part)
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            path.append(part)
            cur = cur[part]
        elif kind == "missing" and i == len(loc) - 1:
            missing_key = part
        # else: a union member tag or similar; not a place in the file
    msg = err["msg"]
    value = err.get("input")
    if kind == "missing":
        msg = f"missing required key {missing_key!r}"
    elif kind == "extra_forbidden":
        model = _model_at(tuple(path[:-1]))
        fields = list(model.model_fields) if model else []
        key = path[-1] if path else "?"
        msg = f"unknown key {key!r}" + (suggest(key, fields) or (f" (expected one of: {', '.join(fields)})" if fields else ""))
    elif kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        msg = f"{_describe(value)} is not one of {expected}" + suggest(str(value), [e.strip(" '") for e in expected.replace(" or ", ",").split(",")])
    elif kind == "bool_type":
        msg = f"expected true or false, got {_describe(value)}"
        if isinstance(value, str) and value.lower() in ("yes", "no", "on", "off", "y", "n"):
            msg += f" (nnctl reads YAML 1.2: {value!r} is a string here; write {'true' if value.lower() in ('yes', 'on', 'y') else 'false'})"
    elif kind in ("int_type", "int_from_float"):
        msg = f"expected an integer, got {_describe(value)}"
    elif kind in ("float_type", "float_parsing"):
        msg = f"expected a number, got {_describe(value)}"
    elif kind == "string_type":
        msg = f"expected a string, got {_describe(value)}"
    elif kind in ("list_type",):
        msg = f"expected a list, got {_describe(value)}"
    elif kind in ("dict_type", "model_type", "model_attributes_type"):
        msg = f"expected a mapping, got {_describe(value)}"
    elif kind == "string_pattern_mismatch":
        msg = f"{_describe(value)} is not valid here (must match {err.get('ctx', {}).get('pattern')})"
    elif kind == "value_error":
        msg = str(err.get("ctx", {}).get("error", msg))
    elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than",
                  "too_short", "too_long", "finite_number"):
        msg = f"{msg}, got {_describe(value)}"
    return doc.problem(tuple(path), msg)


def default_name(file: str) -> str:
    """The run name of a config without ``name:``: its file name, made a valid name."""
    stem = os.path.splitext(os.path.basename(str(file)))[0]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("._-")[:100]
    return name or "model"


FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_SMALLEST = 1.401298464324817e-45  # the smallest float32 above 0 (a subnormal); below it: 0


def beyond_float32(data: Any, path: tuple = ()) -> list[tuple[tuple, float]]:
    """(path, value) of every number in a document that float32 cannot hold: beyond its range (it
    becomes infinity) or, not 0, below its smallest number (it becomes 0: an lr of 1e-46 trains
    nothing, silently). nnctl computes in float32 (inputs, weights, normalisation, augmentation,
    optimizer state), where a run would fail at its first step as "non-finite" or train on garbage (a
    rotation by 1e39 degrees is a blank image). One rule for every number, wherever it is."""
    if isinstance(data, dict):
        return [found for k, v in data.items() for found in beyond_float32(v, path + (k,))]
    if isinstance(data, list):
        return [found for i, v in enumerate(data) for found in beyond_float32(v, path + (i,))]
    if isinstance(data, int | float) and not isinstance(data, bool) and (isinstance(data, int) or math.isfinite(data)) \
            and (abs(data) > FLOAT32_MAX or 0 < abs(data) < FLOAT32_SMALLEST):
        return [(path, data)]
    return []


def _range_problems(doc: Document) -> list[Problem]:
    return [doc.problem(path, f"{value:g} is beyond float32's range (about 3.4e38): nnctl computes in float32"
                        if abs(value) > FLOAT32_MAX else
                        f"{value:g} is below float32's smallest number (about 1.4e-45): it would be 0 in float32, "
                        "where nnctl computes; write 0 if 0 is meant")
            for path, value in beyond_float32(doc.data)]


def validate(doc: Document) -> Config:
    """Validate the structure of a loaded document; raise ConfigError with every problem."""
    data = doc.data
    if data is None:
        raise ConfigError([doc.problem((), "the document is empty: expected a mapping with at least 'model' "
                                            "(and 'data' and 'train' to train)")])
    if not isinstance(data, dict):
        raise ConfigError([doc.problem((), f"a config must be a mapping with at least 'model' (and 'data' and "
                                             f"'train' to train), not {type(data).__name__}")])
    data = copy.deepcopy(data)
    if "name" not in data:
        data["name"] = default_name(doc.file)
    problems: list[Problem] = _range_problems(doc)
    try:
        cfg = Config.model_validate(data)
        if not problems:
            return cfg
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            cross = err.get("ctx", {}).get("error")
            if isinstance(cross, _CrossProblems):
                problems.extend(doc.problem(p, m) for p, m in cross.problems)
            else:
                problems.append(_problem_from(err, data, doc))
    # one problem per place and message, in file order
    unique = {(p.line, p.column, p.path, p.message): p for p in problems}
    ordered = sorted(unique.values(), key=lambda p: (p.line or 0, p.column or 0))
    raise ConfigError(ordered) from None


def require_data(cfg: Config, doc: Document, what: str = "training") -> DataSection:
    """The data section, or a located ConfigError saying that `what` needs one.

    Only ``train`` and ``eval`` need data; ``check``, ``summary``, ``layers``, ``freeze``
    and ``export-weights`` work on a config that has only ``model:``.
    """
    if cfg.data is None:
        raise ConfigError([Problem(f"no data: section: {what} needs one; add for example "
                                   "`data: {source: digits}`", "data", doc.file)])
    return cfg.data


@dataclass
class Sections:
    """Every structural problem of a document, and the sections that are valid on their own.

    ``cfg`` is the whole validated config (None when anything is wrong); ``model``, ``train``
    and ``freeze`` are those sections when they validate alone, so that the model can still be
    planned (and its layer, shape and freeze problems reported) while another section is broken.
    (The whole check pipeline's result is ``nnctl.checking.Checked``.)
    """

    cfg: Config | None
    model: ModelSection | None
    train: TrainSection | Any | None  # with only optimizer and scheduler when the rest is broken
    problems: list[Problem]
    freeze: FreezeSection | None = None


def validate_all(doc: Document) -> Sections:
    """Like :func:`validate`, but never raises: every problem, plus the sections that are valid."""
    try:
        cfg = validate(doc)
        return Sections(cfg, cfg.model, cfg.train, [], cfg.freeze)
    except ConfigError as exc:
        problems = list(exc.problems)
    data = doc.data
    sections: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, cls in (("model", ModelSection), ("train", TrainSection), ("freeze", FreezeSection)):
            value = data.get(key, {} if key == "train" else None)
            if value is None:
                continue
            try:
                sections[key] = cls.model_validate(copy.deepcopy(value))
            except ValidationError:
                if key == "train" and isinstance(value, dict):
                    sections[key] = _classes_only(value)
    return Sections(None, sections.get("model"), sections.get("train"), problems, sections.get("freeze"))


def _classes_only(train: dict) -> Any:
    """A broken train section's optimizer and scheduler, when those two are well formed.

    Lets ``nnctl check`` check the optimizer's class and arguments while, say, ``epochs``
    is wrong (each problem is then reported once, in the same pass).
    """
    try:
        optimizer = TrainSection._optimizer(train.get("optimizer", {"Adam": {"lr": 0.001}}))
        scheduler = TrainSection._scheduler(train.get("scheduler"))
    except ValueError:
        return None
    return SimpleNamespace(optimizer=optimizer, scheduler=scheduler)
