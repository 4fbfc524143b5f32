"""The plan's data: a Node a layer, the Plan of a model, the limits, and instantiate (a node -> its module)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from torch import nn
from nnctl.errors import Problem
from nnctl.config.yamlio import Document, format_path
from nnctl.model.blocks import Concat, Residual
from collections import OrderedDict


RESERVED = ("name", "repeat")



MAX_PARAMS = 10**10  # 40 GB of fp32 weights



MAX_ACTIVATION = 1 << 31  # values in one layer's output for one sample



MAX_REPEAT = 1000



SMALL_PARAMS = 1 << 22  # layers this small are probed on real CPU zeros



SMALL_INPUT = 1 << 18  # values a sample



@dataclass
class Node:
    """One child in the plan: a torch.nn layer, a Sequential or a Residual."""

    kind: str  # "layer" | "sequential" | "residual" | "concat" | "module" (a torchvision container)
    type_name: str  # the torch.nn class name, "Sequential", "Residual" or "Concat"
    path: tuple  # the YAML path of the entry
    cls: type | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # residual: body/shortcut/after names; concat: dim
    children: list[tuple[str, "Node"]] = field(default_factory=list)
    block: str | None = None  # the named block this came from
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    params: int = 0

    def walk(self, prefix: str = ""):
        """(dotted name, node) for every node under this one, depth first."""
        for name, child in self.children:
            full = f"{prefix}.{name}" if prefix else name
            yield full, child
            yield from child.walk(full)

    def label(self) -> str:
        return self.block or self.type_name



@dataclass
class Plan:
    root: Node
    input_shape: tuple[int, ...]
    warnings: list[Problem]
    doc: Document
    torchvision: dict = field(default_factory=dict)  # a torchvision source: builder, weights, replacements

    @property
    def output_shape(self) -> tuple[int, ...] | None:
        return self.root.out_shape

    def node_for(self, dotted: str) -> Node | None:
        for name, node in self.root.walk():
            if name == dotted:
                return node
        return None

    def where(self, param_key: str) -> str:
        """The config layer a state_dict key belongs to, e.g. 'model.layers[3] (Conv2d, line 12)'."""
        parts = param_key.split(".")
        best = None
        for i in range(len(parts), 0, -1):
            node = self.node_for(".".join(parts[:i]))
            if node is not None:
                best = node
                break
        if best is None:
            return "no layer of this config"
        line, _ = self.doc.locate(best.path)
        return f"{format_path(best.path)} ({best.label()}{f', line {line}' if line else ''})"



def _kw(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())



def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."



def instantiate(node: Node) -> nn.Module:
    """The real module for a planned node (parameters initialised by PyTorch as usual)."""
    if node.kind == "layer":
        return node.cls(**node.kwargs)

    kids = OrderedDict((name, instantiate(child)) for name, child in node.children)
    if node.kind == "residual":
        parts = node.kwargs or {"body": list(kids), "shortcut": None, "after": []}
        body = OrderedDict((n, kids[n]) for n in parts["body"])
        short = (parts["shortcut"], kids[parts["shortcut"]]) if parts.get("shortcut") else None
        after = OrderedDict((n, kids[n]) for n in parts.get("after") or [])
        return Residual(body, shortcut=short, after=after)
    if node.kind == "concat":
        return Concat(kids, dim=node.kwargs.get("dim", 1))
    return nn.Sequential(kids)

