"""Children, freeze selections, and loading weights into a config's model.

A freeze selection (``freezing``) is plain data (it travels in checkpoints)::

    {"frozen": ["0.weight", "0.bias", ...],          # parameter names with requires_grad False
     "train_frozen_norm": False,                      # keep frozen norm layers in eval mode (default)
     "spec": {"first": 2, "children": None, "names": None, "unfreeze": None}}

Selectors: ``first`` (the first N of ``model.children()``), ``children``
(indices), ``names`` (dotted module or parameter names, ``fnmatch`` globs
allowed: ``features``, ``classifier.1``, ``features.*.weight``), then
``unfreeze`` (names / globs made trainable again).
"""

from __future__ import annotations

import fnmatch
from typing import Any
import torch
from torch import nn
from nnctl.config.yamlio import Document
from nnctl.errors import CheckpointError, Problem, UsageError
from nnctl.model.nodes import Plan, instantiate

PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP and torch.compile wrappers


def children_rows(model: nn.Module) -> list[dict]:
    """One row per top-level child: index, name, type, params, status."""
    rows = []
    for i, (name, child) in enumerate(model.named_children()):
        params = list(child.parameters())
        n = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        status = "-" if n == 0 else "trainable" if trainable == n else "frozen" if trainable == 0 else "partial"
        rows.append({"index": i, "name": name, "type": type(child).__name__, "params": n,
                     "trainable": trainable, "status": status})
    return rows


def _match(model: nn.Module, patterns: list[str], what: str, where: tuple, problems: list) -> set[str]:
    """Parameter names under the modules or parameters that the patterns name; a pattern that
    names nothing adds (where + (index,), message) to ``problems``."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    out: set[str] = set()
    for index, pattern in enumerate(patterns):
        pattern = pattern.strip()
        hit = False
        for mname in modules:
            if mname and fnmatch.fnmatchcase(mname, pattern):
                prefix = mname + "."
                got = {p for p in params if p.startswith(prefix)}
                out |= got
                hit = True
        for pname in params:
            if fnmatch.fnmatchcase(pname, pattern):
                out.add(pname)
                hit = True
        if not hit:
            tops = ", ".join(n for n, _ in model.named_children())
            message = f"{what} {pattern!r} matches no module or parameter of the model (its children: {tops})"
            problems.append((where + (index,), message))
    return out


def _select(model: nn.Module, first: int | None, children: list[int] | None, names: list[str] | None,
            unfreeze: list[str] | None, first_label: str) -> tuple[list[str], list[tuple[tuple, str]]]:
    """The frozen parameter names of a selection, and every problem of it as (path in freeze:, message).

    The one resolver of freeze selections: ``make_freeze`` (nnctl freeze, train, build) raises the
    first problem; ``check_selection`` (the check pipeline) reports them all at their YAML lines.
    """
    kids = list(model.named_children())
    has = f"the model has {len(kids)} children (0 to {len(kids) - 1})"
    frozen: set[str] = set()
    problems: list[tuple[tuple, str]] = []
    if first is not None:
        if first < 1 or first > len(kids):
            problems.append((("first",), f"{first_label} {first}: {has}"))
        else:
            for name, child in kids[:first]:
                frozen |= {f"{name}.{p}" for p, _ in child.named_parameters()}
    for i, index in enumerate(children or []):
        if not 0 <= index < len(kids):
            problems.append((("children", i), f"child {index} does not exist: {has}"))
            continue
        name, child = kids[index]
        frozen |= {f"{name}.{p}" for p, _ in child.named_parameters()}
    if names:
        frozen |= _match(model, names, "freeze name", ("names",), problems)
    if unfreeze:
        frozen -= _match(model, unfreeze, "unfreeze name", ("unfreeze",), problems)
    all_params = [n for n, _ in model.named_parameters()]
    if not problems:
        if not frozen and (first or children or names):
            problems.append(((), "the freeze selection matches no parameters (the selected children have none)"))
        elif all_params and frozen >= set(all_params):
            message = ("the freeze selection freezes every parameter: nothing would train "
                       "(freeze fewer children, or --unfreeze the head)")
            problems.append(((), message))
    return [n for n in all_params if n in frozen], problems


def make_freeze(model: nn.Module, first: int | None = None, children: list[int] | None = None,
              names: list[str] | None = None, unfreeze: list[str] | None = None,
              train_frozen_norm: bool = False) -> dict:
    """Resolve selectors into the frozen parameter names. Errors when nothing or everything is frozen."""
    frozen, problems = _select(model, first, children, names, unfreeze, "--first")
    if problems:
        raise UsageError(problems[0][1])
    return {"frozen": frozen, "train_frozen_norm": bool(train_frozen_norm),
            "spec": {"first": first, "children": children, "names": names, "unfreeze": unfreeze}}


def freeze_from_config(model: nn.Module, section) -> dict:
    return make_freeze(model, section.first, section.children, section.names, section.unfreeze,
                     section.train_frozen_norm)


def apply_config(model: nn.Module, section, inherited: dict | None = None) -> dict | None:
    """The config's ``freeze:`` section applied to a fresh model, as every entry point applies it
    (nnctl.build, train, prepare, eval --init): the section's selection, else ``inherited`` (the
    selection that --init weights carry). Returns the freezing a run records, or None."""
    freezing = freeze_from_config(model, section) if section is not None else inherited
    if freezing:
        apply(model, freezing)
    return freezing or None


def meta_model(plan: Plan) -> nn.Module:
    """The planned model on the meta device (no memory, no initialisation cost): names and shapes only."""
    net = (plan.torchvision or {}).get("meta_model")
    if net is not None:
        return net
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return instantiate(plan.root)


def check_selection(plan: Plan, section, doc: Document) -> list[Problem]:
    """The config's ``freeze:`` selection against the planned model, without building or training it:
    every selector that names nothing (or beyond the children), located at its YAML line."""
    if section is None:
        return []
    model = meta_model(plan)
    _, problems = _select(model, section.first, section.children, section.names, section.unfreeze, "first")
    return [doc.problem(("freeze",) + path, message) for path, message in problems]


def apply(model: nn.Module, plan: dict) -> None:
    """Set requires_grad from the plan: frozen names off, every other parameter on."""
    frozen = set(plan.get("frozen") or [])
    params = dict(model.named_parameters())
    unknown = frozen - set(params)
    if unknown:
        raise CheckpointError(f"the freeze selection names parameters this model does not have: "
                              f"{', '.join(sorted(unknown)[:5])}")
    for name, p in params.items():
        p.requires_grad_(name not in frozen)


# --- weights ------------------------------------------------------------------------

def strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    """Remove the wrappers' key prefixes (module., _orig_mod.) where every key has them."""
    for prefix in PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return {k.replace("._orig_mod.", ".").replace(".module.", "."): v for k, v in state.items()}
