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
import os
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, UsageError

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


def read_weights(path: str) -> tuple[dict[str, torch.Tensor], dict | None, str]:
    """An nnctl checkpoint, a .safetensors file or a .pt/.pth state_dict -> (state_dict, freeze selection, kind)."""
    from . import checkpoint as K

    if os.path.isdir(path):
        path = str(K.resolve(path, "best" if os.path.exists(os.path.join(path, "best.pt")) else "last"))
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: no such weights file")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load

        from .files import read_input

        data = read_input(path, "weights file", CheckpointError)  # a regular file only: never blocks on a FIFO
        try:
            return load(data), None, "safetensors"
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"{path}: not a readable .safetensors file: {' '.join(str(exc).split())[:200]}"
                                  ) from None
    state = K.read_state(path)  # read through files.read_input as well
    if isinstance(state, dict) and state.get("format") == K.FORMAT:
        state = K.load(path)
        return state["model"], state.get("freeze"), "nnctl checkpoint"
    if isinstance(state, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state_dict (expected a mapping of parameter names to tensors)")
    return state, None, "state_dict"


def compare(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list[tuple]]:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, wrong


def mismatch_text(plan, missing, unexpected, wrong, limit: int = 12) -> str:
    lines = []
    where = (lambda k: f" [{plan.where(k)}]") if plan is not None else (lambda k: "")
    for title, items in (("missing", missing), ("unexpected", unexpected)):
        if items:
            shown = "; ".join(f"{k}{where(k)}" for k in items[:limit])
            lines.append(f"{len(items)} {title}: {shown}{' ...' if len(items) > limit else ''}")
    if wrong:
        shown = "; ".join(f"{k} {list(s)} in the file, {list(o)} in the model{where(k)}" for k, s, o in wrong[:limit])
        lines.append(f"{len(wrong)} wrong shape: {shown}{' ...' if len(wrong) > limit else ''}")
    return " | ".join(lines)


def load_weights(model: nn.Module, plan, state: dict[str, torch.Tensor], source: str,
                 partial: bool = False) -> str:
    """Load a state_dict into the model. Strict unless partial; returns a one-line report."""
    state = strip_prefixes(dict(state))
    missing, unexpected, wrong = compare(model, state)
    if (missing or unexpected or wrong) and not partial:
        raise CheckpointError(f"{source} does not fit this model: {mismatch_text(plan, missing, unexpected, wrong)}"
                              " (use --partial to load the keys that fit)")
    skip = {k for k, _, _ in wrong}
    usable = {k: v for k, v in state.items() if k not in skip and k not in unexpected}
    if not usable:
        raise CheckpointError(f"{source}: no key fits this model; nothing to load "
                              f"({mismatch_text(plan, missing, unexpected, wrong, 4)})")
    with torch.no_grad():
        model.load_state_dict(usable, strict=False)
    loaded = len(usable)
    if missing or unexpected or wrong:
        return (f"loaded {loaded} of {len(model.state_dict())} tensors from {source}; skipped: "
                f"{mismatch_text(plan, missing, unexpected, wrong)}")
    return f"loaded all {loaded} tensors from {source}"


def init_from(model: nn.Module, plan, path: str, partial: bool = False) -> tuple[str, dict | None]:
    """--init: load weights (and an nnctl checkpoint's freeze selection). Returns (report, freeze selection)."""
    state, freezing, kind = read_weights(path)
    report = load_weights(model, plan, state, f"{path} ({kind})", partial)
    if freezing:
        params = {n for n, _ in model.named_parameters()}
        if not set(freezing.get("frozen") or []) <= params:
            freezing = None
    return "init: " + report, freezing
