"""Weights in: reading a checkpoint, safetensors or state_dict file into a planned model (--init)."""

from __future__ import annotations

import os
import torch
from torch import nn
from nnctl.errors import CheckpointError
from nnctl.model.freeze import strip_prefixes
from nnctl.runs.rundir import RunDir
from nnctl.runs import checkpoint as K
from safetensors import SafetensorError
from safetensors.torch import load
from nnctl.files import read_input

def read_weights(path: str) -> tuple[dict[str, torch.Tensor], dict | None, str]:
    """An nnctl checkpoint, a .safetensors file or a .pt/.pth state_dict -> (state_dict, freeze selection, kind)."""

    if os.path.isdir(path):
        path = str(K.resolve(path, "best" if RunDir(path).best.exists() else "last"))
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: no such weights file")
    if path.endswith(".safetensors"):


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
