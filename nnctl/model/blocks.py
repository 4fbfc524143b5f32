"""The container blocks a config can name beside torch.nn: Residual and Concat."""

from __future__ import annotations

import re
from typing import Any
import torch
from torch import nn


_PROBES: dict[str, nn.Module] = {}


_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Residual(nn.Module):
    """``after(body(x) + shortcut(x))``: the residual block of ResNet and of the CycleGAN generator.

    The body's layers, the shortcut (a projection, default identity) and the ``after``
    layers (default none) are all the block's own children, under their names, so a
    block written ``{layers: [conv1, bn1, relu, conv2, bn2], shortcut: downsample}``
    has torchvision's BasicBlock keys (``conv1.weight``, ``downsample.0.weight``).
    ``Residual(OrderedDict(...))`` or ``Residual(m0, m1, ...)`` alone is ``x + body(x)``
    with the children ``0``, ``1``, ... as a hand-written ``nn.Sequential`` body.
    """

    def __init__(self, *body: Any, shortcut: tuple[str, nn.Module] | None = None,
                 after: "dict[str, nn.Module] | None" = None):
        super().__init__()
        if len(body) == 1 and isinstance(body[0], dict):
            items = list(body[0].items())
        else:
            items = [(str(i), m) for i, m in enumerate(body)]
        self._nnctl_body = [name for name, _ in items]
        for name, module in items:
            self.add_module(name, module)
        self._nnctl_shortcut = None
        if shortcut is not None:
            self._nnctl_shortcut = shortcut[0]
            self.add_module(shortcut[0], shortcut[1])
        self._nnctl_after = []
        for name, module in (after or {}).items():
            self._nnctl_after.append(name)
            self.add_module(name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        # the shortcut first: a body that begins with an in-place layer cannot change its input
        s = x if self._nnctl_shortcut is None else self._modules[self._nnctl_shortcut](x)
        y = x
        for name in self._nnctl_body:
            y = self._modules[name](y)
        y = y + s
        for name in self._nnctl_after:
            y = self._modules[name](y)
        return y

    def __getitem__(self, index: int | str) -> nn.Module:
        if isinstance(index, str):
            return self._modules[index]
        return list(self._modules.values())[index]

    def __len__(self) -> int:
        return len(self._modules)

    def parts(self) -> dict[str, Any]:
        """The child names of the body, the shortcut (None: identity) and the after layers."""
        return {"body": list(self._nnctl_body), "shortcut": self._nnctl_shortcut, "after": list(self._nnctl_after)}


class Concat(nn.Module):
    """``torch.cat([branch(x) for branch in branches], dim)``: Inception, DenseNet, U-Net skips.

    Each branch is an ``nn.Sequential`` child named by its index (``0``, ``1``, ...); an
    empty one is the identity (an empty ``nn.Sequential`` returns its input).
    ``dim`` counts the batch dimension, as ``torch.cat`` does (1 = channels).
    """

    def __init__(self, branches: "dict[str, nn.Module] | list[nn.Module]", dim: int = 1):
        super().__init__()
        items = branches.items() if isinstance(branches, dict) else ((str(i), b) for i, b in enumerate(branches))
        for name, module in items:
            self.add_module(name, module)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.cat([branch(x) for branch in self._modules.values()], dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


CONTAINERS = ("Sequential", "Residual", "Concat")


def child_name_problem(name: Any, container: str = "Sequential") -> str | None:
    """Why torch.nn.Module.add_module would refuse this child name in this container, or None."""
    if isinstance(name, bool) or not isinstance(name, (str, int)):
        return f"a child name is a string (or an integer such as 0), got {name!r}"
    name = str(name)
    if not name:
        return "a child name cannot be empty (torch.nn.Module.add_module refuses it)"
    if "." in name:
        return (f"a child name cannot contain '.' (torch.nn.Module.add_module refuses it: dotted names are "
                f"paths to grandchildren), got {name!r}")
    if container not in _PROBES:
        _PROBES[container] = {"Sequential": nn.Sequential, "Residual": Residual,
                              "Concat": lambda: Concat([])}[container]()
    probe = _PROBES[container]
    if hasattr(probe, name):
        return (f"child name {name!r} clashes with the attribute {container}.{name} "
                "(torch.nn.Module.add_module refuses it); choose another name")
    return None
