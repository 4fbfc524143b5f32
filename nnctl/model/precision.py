"""train.precision on the device a run trains on: autocast, the grad scaler, bfloat16 weights, the notes.

The names are Lightning's (``nnctl.config.compute``): ``32-true`` (float32), ``bf16-mixed`` (float32
weights, bfloat16 autocast), ``16-mixed`` (float32 weights, float16 autocast and a GradScaler on CUDA /
MPS), ``bf16-true`` (the model's floating parameters and buffers, and the inputs, in bfloat16; no autocast,
no float32 master copy: the checkpoint holds the bfloat16 weights the model trains, and the loss is
taken in float32 from the output).

On a CPU, ``16-mixed`` runs as ``bf16-mixed`` (float16 autocast is slow there and the GradScaler is a
CUDA tool) and says so; a bfloat16 precision on a CPU without native bfloat16 is slow and says why
(oneDNN's check, ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``: AVX512 BW, VL and DQ on x86). The
trainer emits these as run-log notes; ``nnctl check`` reports them at ``train.precision``'s line.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

NOTE_16_ON_CPU = ("16-mixed on a CPU runs as bf16-mixed: float16 autocast is slow on CPUs and its GradScaler is a "
                  "CUDA tool; bfloat16 keeps float32's range and needs no loss scaling")


def slow_bf16_warning(runs_as: str) -> str:
    return (f"{runs_as} on this CPU is slow: it has no native bfloat16 (torch.ops.mkldnn._is_mkldnn_bf16_supported() "
            "is False: no AVX512 BW/VL/DQ), so bfloat16 is emulated through float32 conversions, 10-23x slower "
            "than 32-true (measured on an AVX2 CPU); use precision: 32-true on this machine")


@dataclass(frozen=True)
class Precision:
    """What a precision means on one device: what runs, with which dtypes, and what to tell the user."""

    name: str  # the config's (canonical) name
    runs_as: str  # what runs here: 16-mixed on a CPU runs as bf16-mixed
    autocast: torch.dtype | None  # mixed precision's autocast dtype (None: no autocast)
    weights: torch.dtype  # the parameters' (and the inputs') dtype: float32, or bfloat16 for bf16-true
    scaler: bool  # a GradScaler (16-mixed on CUDA and MPS)
    messages: tuple[tuple[str, str], ...] = ()  # ("warning" | "note", text), for the run log and check

    def notes(self) -> list[str]:
        """The messages as run-log lines ("warning: ...", "note: ...")."""
        return [f"{kind}: {text}" for kind, text in self.messages]


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bfloat16 natively (torch's own test: oneDNN available and its bf16 check)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def planned_device_type(spec: str) -> str:
    """The device type train.device names on this machine (cuda, mps, cpu), for ``check``; asking for an
    absent device is training's error (nnctl.training.distributed.select_device), not this one's."""
    spec = (spec or "auto").strip()
    if spec != "auto":
        return spec.split(":", 1)[0]
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def resolve(name: str, device_type: str) -> Precision:
    """A canonical precision name on a device type (cpu, cuda, mps)."""
    messages: list[tuple[str, str]] = []
    runs_as = name
    if name == "16-mixed" and device_type == "cpu":
        runs_as = "bf16-mixed"
        messages.append(("note", NOTE_16_ON_CPU))
    if runs_as.startswith("bf16") and device_type == "cpu" and not cpu_bf16_native():
        messages.append(("warning", slow_bf16_warning(runs_as)))
    autocast = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(runs_as)
    weights = torch.bfloat16 if runs_as == "bf16-true" else torch.float32
    return Precision(name, runs_as, autocast, weights, runs_as == "16-mixed", tuple(messages))


def autocast(precision: Precision, device: torch.device) -> Callable[[], Any]:
    """The forward's context: autocast to the mixed precision's dtype, or nothing."""
    if precision.autocast is None:
        return nullcontext
    return partial(torch.autocast, device_type=device.type, dtype=precision.autocast)


def grad_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler | None:
    return torch.amp.GradScaler(device.type) if precision.scaler else None


def cast_model(model: nn.Module, precision: Precision) -> None:
    """bf16-true: the model's floating parameters and buffers in bfloat16 (in place, before the optimizer)."""
    if precision.weights != torch.float32:
        model.to(precision.weights)


def input_dtype(precision: Precision) -> torch.dtype | None:
    """The dtype floating inputs are cast to before the forward (bf16-true), or None."""
    return precision.weights if precision.weights != torch.float32 else None
