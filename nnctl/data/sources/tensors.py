"""Tensors files (.pt, .safetensors, .npz) and synthetic data."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load
from torch import Tensor

from nnctl.config.schema import Config
from nnctl.data.store import _Store
from nnctl.errors import NnctlError, UsageError
from nnctl.files import read_input
from nnctl.tasks import Task


def _read_tensors(path: Path) -> dict[str, Any]:
    """The file's tensors; read through files.read_input (a regular file only, never a FIFO)."""
    ext = path.suffix.lower()
    if ext in (".pt", ".pth", ".npz", ".safetensors"):
        data = read_input(path, "data file")
    if ext in (".pt", ".pth"):
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if not isinstance(obj, dict):
            raise UsageError(f"{path} holds a {type(obj).__name__}, not a dict with 'x' and 'y' tensors")
        return obj
    if ext == ".npz":
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: torch.from_numpy(np.array(npz[k])) for k in npz.files}
    if ext == ".safetensors":

        return load(data)
    raise UsageError(f"data.path {path}: unsupported file type {ext or '(none)'!r}; "
                     f"use .pt, .pth, .npz or .safetensors with x and y")


def _tensors(cfg: Config) -> _Store:
    """A file with x and y: integer y is class labels, float y regression targets (N -> N x 1)."""
    path = Path(os.path.expanduser(cfg.data.path))
    if not path.exists():
        raise UsageError(f"data.path {path} does not exist (expected a .pt, .npz or .safetensors file with x and y)")
    try:
        obj = _read_tensors(path)
    except NnctlError:  # a refused file, or a stop signal while reading (not corrupt data)
        raise
    except Exception as exc:
        raise UsageError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    missing = [k for k in ("x", "y") if k not in obj]
    if missing:
        raise UsageError(f"{path} has no {' or '.join(repr(m) for m in missing)} (keys: {sorted(map(str, obj))})")
    x, y = obj["x"], obj["y"]
    for k, v in (("x", x), ("y", y)):
        if not isinstance(v, Tensor):
            raise UsageError(f"{path}: {k!r} is a {type(v).__name__}, not a tensor")
    if x.ndim < 2:
        raise UsageError(f"{path}: x must have a sample dimension first, shape (N, ...), got {list(x.shape)}")
    if y.ndim < 1 or len(y) != len(x):
        raise UsageError(f"{path}: x has {len(x)} samples but y has shape {list(y.shape)}")
    if x.dtype == torch.bool or x.is_complex() or y.dtype == torch.bool or y.is_complex():
        raise UsageError(f"{path}: x and y must be real numbers (x: {x.dtype}, y: {y.dtype})")
    x = x.to(torch.float32).contiguous()
    _refuse_non_finite(path, "x", x)
    num_classes = None
    if y.is_floating_point():
        y = y.to(torch.float32)
        _refuse_non_finite(path, "y", y)
        if y.ndim == 1:
            y = y.unsqueeze(1)
    else:
        if y.ndim != 1:
            raise UsageError(f"{path}: integer y (class labels) must have shape (N,), got {list(y.shape)}")
        y = y.to(torch.int64)
        if len(y) and int(y.min()) < 0:
            raise UsageError(f"{path}: class labels in y must be >= 0, found {int(y.min())}")
        num_classes = int(y.max()) + 1 if len(y) else 0
    return _Store(y=y.contiguous(), sample_shape=tuple(x.shape[1:]), x=x, num_classes=num_classes)


def _refuse_non_finite(path: Path, key: str, t: Tensor) -> None:
    """NaN or infinite values (after the conversion to float32) would train on garbage: refused at load."""
    if not t.numel():
        return
    low, high = torch.aminmax(t)  # one pass, no copy; NaN propagates to both (the count below: only if bad)
    if not (math.isfinite(float(low)) and math.isfinite(float(high))):
        bad = int((~torch.isfinite(t)).sum())
        first = int((~torch.isfinite(t.reshape(len(t), -1))).any(1).nonzero()[0])
        raise UsageError(f"{path}: {key} holds {bad:,} non-finite values (NaN or infinite, or beyond float32's "
                         f"range) of {t.numel():,}, the first in sample {first}; clean the data")


SYNTHETIC_SIZE = 1024  # synthetic's samples without data.size


def _synthetic(cfg: Config) -> _Store:
    """Seeded random data: x ~ N(0, 1); labels uniform in [0, classes), or for a regression
    loss y = x.flatten() @ w + 0.01 * N(0, 1) with a fixed random w of shape (features, 1)."""
    d = cfg.data
    shape = tuple(d.shape or cfg.model.input_shape)
    n = d.size or SYNTHETIC_SIZE
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn((n, *shape), generator=g)
    if cfg.task is Task.CLASSIFICATION:
        classes = d.classes or 1
        return _Store(y=torch.randint(0, classes, (n,), generator=g), sample_shape=shape, x=x, num_classes=classes)
    features = math.prod(shape)
    w = torch.randn((features, 1), generator=g) / math.sqrt(features)
    y = x.reshape(n, -1) @ w + 0.01 * torch.randn((n, 1), generator=g)
    return _Store(y=y, sample_shape=shape, x=x)
