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
from torch import nn
from nnctl.errors import CheckpointError, UsageError

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


def _match(model: nn.Module, patterns: list[str], what: str) -> set[str]:
    """Parameter names under the modules or parameters that the patterns name."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    out: set[str] = set()
    for pattern in patterns:
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
            raise UsageError(f"{what} {pattern!r} matches no module or parameter of the model "
                             f"(its children: {tops})")
    return out


def make_freeze(model: nn.Module, first: int | None = None, children: list[int] | None = None,
              names: list[str] | None = None, unfreeze: list[str] | None = None,
              train_frozen_norm: bool = False) -> dict:
    """Resolve selectors into the frozen parameter names. Errors when nothing or everything is frozen."""
    kids = list(model.named_children())
    frozen: set[str] = set()
    if first is not None:
        if first < 1 or first > len(kids):
            raise UsageError(f"--first {first}: the model has {len(kids)} children (0 to {len(kids) - 1})")
        for name, child in kids[:first]:
            frozen |= {f"{name}.{p}" for p, _ in child.named_parameters()}
    for index in children or []:
        if not 0 <= index < len(kids):
            raise UsageError(f"child {index} does not exist: the model has {len(kids)} children "
                             f"(0 to {len(kids) - 1})")
        name, child = kids[index]
        frozen |= {f"{name}.{p}" for p, _ in child.named_parameters()}
    if names:
        frozen |= _match(model, names, "freeze name")
    if unfreeze:
        frozen -= _match(model, unfreeze, "unfreeze name")
    all_params = [n for n, _ in model.named_parameters()]
    if not frozen and (first or children or names):
        raise UsageError("the freeze selection matches no parameters (the selected children have none)")
    if all_params and frozen >= set(all_params):
        raise UsageError("the freeze selection freezes every parameter: nothing would train "
                         "(freeze fewer children, or --unfreeze the head)")
    return {"frozen": [n for n in all_params if n in frozen], "train_frozen_norm": bool(train_frozen_norm),
            "spec": {"first": first, "children": children, "names": names, "unfreeze": unfreeze}}


def freeze_from_config(model: nn.Module, section) -> dict:
    return make_freeze(model, section.first, section.children, section.names, section.unfreeze,
                     section.train_frozen_norm)


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
