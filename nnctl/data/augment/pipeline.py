"""A checked ``data.augment`` list as one pipeline: ``build(spec, input_shape)`` -> ``Augment``, called on a
float batch with the batch's generator; each name maps to its vectorised function (ops, colour)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from nnctl.config.yamlio import format_path
from nnctl.data.augment.colour import _color_jitter, _random_grayscale
from nnctl.data.augment.ops import (
    _horizontal_flip,
    _random_affine,
    _random_crop,
    _random_erasing,
    _random_resized_crop,
    _random_rotation,
    _vertical_flip,
)
from nnctl.data.augment.spec import SEED_SALT, _entry, _fmt, _parse_one
from nnctl.errors import UsageError
from nnctl.seeds import derive


@dataclass
class _Op:
    name: str
    args: dict          # as the user wrote them (for the description)
    tv: Any             # torchvision's transform, built from them (its normalised attributes)

    def apply(self, x: Tensor, g: torch.Generator) -> Tensor:
        return _APPLY[self.name](self.tv, x, g)

    def describe(self) -> str:
        return f"{self.name}({', '.join(f'{k}={_fmt(v)}' for k, v in self.args.items())})"


# name -> f(torchvision's transform, x, generator): module functions, so that a pipeline pickles (DataLoader
# workers started by spawn or forkserver)
_APPLY: dict[str, Callable[[Any, Tensor, torch.Generator], Tensor]] = {
    "RandomCrop": _random_crop,
    "RandomHorizontalFlip": _horizontal_flip,
    "RandomVerticalFlip": _vertical_flip,
    "RandomResizedCrop": _random_resized_crop,
    "RandomRotation": _random_rotation,
    "RandomAffine": _random_affine,
    "ColorJitter": _color_jitter,
    "RandomErasing": _random_erasing,
    "RandomGrayscale": _random_grayscale,
}


class Augment:
    """A checked ``data.augment`` pipeline: call it on a float batch (N, C, H, W) with a CPU generator."""

    def __init__(self, ops: list[_Op]):
        self.ops = ops

    def __len__(self) -> int:
        return len(self.ops)

    def __bool__(self) -> bool:
        return bool(self.ops)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"augmentation takes a float batch of images (N, C, H, W), got {x.dtype} "
                             f"{list(x.shape)}")
        if generator.device.type != "cpu":
            raise ValueError("augmentation draws its parameters from a CPU generator (see nnctl.augment)")
        if len(x) == 0:
            return x
        for op in self.ops:
            x = op.apply(x, generator)
        return x.contiguous()

    def describe(self) -> str:
        """``RandomCrop(size=32, padding=4), RandomHorizontalFlip()``."""
        return ", ".join(op.describe() for op in self.ops)

    @staticmethod
    def generator(seed: int, epoch: int, step: int, rank: int = 0) -> torch.Generator:
        """The generator of training batch ``step`` of ``epoch`` on ``rank``: (seed, epoch, step) decide it all."""
        return torch.Generator().manual_seed(derive(seed, epoch, step, rank, SEED_SALT))


def build(spec: list, input_shape: tuple[int, ...] | list[int] | None = None) -> Augment:
    """A ``data.augment`` list -> an ``Augment``; a UsageError listing every problem when it is wrong."""

    shape = tuple(int(v) for v in input_shape) if input_shape else None
    if shape is not None and len(shape) != 3:
        raise UsageError(f"data.augment needs image samples (channels, height, width); these have shape "
                         f"{list(shape)}")
    ops, found = [], []
    for i, value in enumerate(spec or []):
        parsed = _entry(value)
        if parsed is None:
            found.append(((i,), "expected an augmentation name, alone or with a mapping of its arguments, such as "
                                "{RandomCrop: {size: 32, padding: 4}}"))
            continue
        name, args = parsed
        tv, problems_ = _parse_one(name, args, shape)
        found += [((i, name) + sub if isinstance(value, dict) else (i,) + sub, msg) for sub, msg in problems_]
        if tv is not None:
            ops.append(_Op(name, args, tv))
    if found:
        raise UsageError("; ".join(f"{format_path(('data', 'augment') + p)}: {m}" for p, m in found))
    return Augment(ops)
