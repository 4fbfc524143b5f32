"""A picture of the model graph (matplotlib, no pyplot)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from torch import nn
if TYPE_CHECKING:  # pragma: no cover
    from nnctl.model.plan import Plan
from nnctl import files
from nnctl.model.summary import summarize
from nnctl.model.blocks import Concat, Residual

# --- the graph picture (nnctl summary --graph OUT.png / .svg) ------------------------

@dataclass
class _GNode:
    """One element of the picture: a box, a chain, or parallel branches joined by a merge node."""

    kind: str  # "box" | "chain" | "parallel" | "identity"
    label: str = ""
    items: list["_GNode"] = field(default_factory=list)  # chain: in order; parallel: the branches
    merge: str = ""  # parallel: "+" or "cat"
    w: float = 0.0
    h: float = 0.0


def _graph_parts(module: nn.Module) -> tuple[str, list, Any, list] | None:
    """How a branching module computes: (merge, [(name, branch module or None)], None, [after names]).

    nnctl's Residual and Concat, and torchvision's BasicBlock / Bottleneck (their ``downsample``
    is the shortcut). None for a plain chain.
    """

    if isinstance(module, Residual):
        parts = module.parts()
        return "+", parts["body"], parts["shortcut"], parts["after"]
    if isinstance(module, Concat):
        return "cat", list(module._modules), None, []
    names = list(module._modules)
    if type(module).__name__ in ("BasicBlock", "Bottleneck") and "conv1" in names:
        body = [n for n in names if n not in ("downsample", "relu")]
        return "+", body, ("downsample" if module._modules.get("downsample") is not None else None), []
    return None


def _graph(module: nn.Module, name: str, shapes: dict, depth: int, max_depth: int) -> _GNode:
    def box(n: str, mod: nn.Module) -> _GNode:
        shape = shapes.get(n)
        head = f"{n}: {type(mod).__name__}" if n else type(mod).__name__
        return _GNode("box", head + (f"\n{list(shape)}" if shape is not None else ""))

    def full(child: str) -> str:
        return f"{name}.{child}" if name else child

    kids = [(c, m) for c, m in module.named_children() if m is not None]
    if not kids or (max_depth and depth >= max_depth):
        return box(name, module)
    parts = _graph_parts(module)
    if parts is None:
        return _GNode("chain", items=[_graph(m, full(c), shapes, depth + 1, max_depth) for c, m in kids])
    merge, first, second, after = parts
    if merge == "+":
        body = _GNode("chain", items=[_graph(module._modules[c], full(c), shapes, depth + 1, max_depth)
                                      for c in first])
        short = (_GNode("identity", "identity") if second is None else
                 _graph(module._modules[second], full(second), shapes, depth + 1, max_depth))
        branches = [body, short]
    else:
        branches = []
        for c in first:
            mod = module._modules[c]
            if isinstance(mod, nn.Sequential) and len(mod) == 0:
                branches.append(_GNode("identity", "identity"))
            else:
                branches.append(_graph(mod, full(c), shapes, depth + 1, max_depth))
    shape = shapes.get(name)
    label = f"{'+' if merge == '+' else 'cat'}  {name}: {type(module).__name__}" + (
        f"\n{list(shape)}" if shape is not None and not after else "")
    par = _GNode("parallel", label, items=branches, merge=merge)
    if not after:
        return par
    return _GNode("chain", items=[par] + [_graph(module._modules[c], full(c), shapes, depth + 1, max_depth)
                                          for c in after])


_BOX_W, _BOX_H, _GAP = 2.4, 0.62, 0.38


def _measure(g: _GNode) -> None:
    if g.kind == "box":
        g.w, g.h = _BOX_W, _BOX_H
    elif g.kind == "identity":
        g.w, g.h = 0.9, 0.0
    elif g.kind == "chain":
        for it in g.items:
            _measure(it)
        g.w = max(it.w for it in g.items)
        g.h = sum(it.h for it in g.items) + _GAP * (len(g.items) - 1)
    else:
        for it in g.items:
            _measure(it)
        g.w = sum(it.w for it in g.items) + 0.3 * (len(g.items) - 1)
        g.h = _GAP + max(it.h for it in g.items) + _GAP + _BOX_H


def _draw(ax, g: _GNode, x: float, y: float) -> tuple[tuple, tuple]:
    """Draw g with its top-centre at (x, y) (y grows downwards); returns its entry and exit points."""
    from matplotlib.patches import FancyBboxPatch

    def arrow(a, b, color="#444"):
        ax.annotate("", xy=b, xytext=a, arrowprops=dict(arrowstyle="->", color=color, lw=1.0,
                                                        shrinkA=0, shrinkB=0))

    def rect(cx, top, label, face):
        ax.add_patch(FancyBboxPatch((cx - _BOX_W / 2, top), _BOX_W, _BOX_H, boxstyle="round,pad=0.02,rounding_size=0.08",
                                    facecolor=face, edgecolor="#333", lw=0.8))
        ax.text(cx, top + _BOX_H / 2, label, ha="center", va="center", fontsize=7, family="monospace")

    if g.kind == "box":
        rect(x, y, g.label, "#dbe9f6")
        return (x, y), (x, y + g.h)
    if g.kind == "identity":
        return (x, y), (x, y)
    if g.kind == "chain":
        entry, prev, top = None, None, y
        for it in g.items:
            a, b = _draw(ax, it, x, top)
            if prev is not None:
                arrow(prev, a)
            entry = entry or a
            prev = b
            top += it.h + _GAP
        return entry, prev
    # parallel: the branches side by side, joined by a merge node
    left = x - g.w / 2
    inner_h = max(it.h for it in g.items)
    merge_top = y + _GAP + inner_h + _GAP
    ax.plot([x], [y], marker="o", color="#444", ms=3)
    for it in g.items:
        cx = left + it.w / 2
        if it.kind == "identity":
            ax.plot([x, cx, cx], [y, y + _GAP / 2, merge_top - _GAP / 2], color="#888", lw=1.0, ls="--")
            arrow((cx, merge_top - _GAP / 2), (x, merge_top), "#888")
            ax.text(cx + 0.05, y + _GAP + inner_h / 2, "identity", fontsize=6, color="#666", rotation=90, va="center")
        else:
            a, b = _draw(ax, it, cx, y + _GAP)
            ax.plot([x, a[0]], [y, y + _GAP / 2], color="#444", lw=1.0)
            arrow((a[0], y + _GAP / 2), a)
            ax.plot([b[0], b[0]], [b[1], merge_top - _GAP / 2], color="#444", lw=1.0)
            arrow((b[0], merge_top - _GAP / 2), (x, merge_top))
        left += it.w + 0.3
    rect(x, merge_top, g.label, "#f8dfc4" if g.merge == "+" else "#d9f0d3")
    return (x, y), (x, merge_top + _BOX_H)


def draw_graph(model: nn.Module, input_shape: Any, path: str, title: str = "", max_depth: int = 0,
               plan: "Plan | None" = None, inputs: tuple | list = (), input_dirs: tuple | list = ()) -> str:
    """Draw the model as a graph (PNG, SVG or PDF by the file's suffix): one box per layer with its
    output shape, Residual shortcuts and Concat branches side by side; returns the path written.

    Written through ``files.save_figure`` (atomically; never over ``inputs``, the files the command
    read, nor inside ``input_dirs``, the data folders, nor over a run's own files, a link, a FIFO or a
    device): refused before anything is drawn.
    Uses matplotlib only (headless Agg backend). ``max_depth`` limits how deep containers open
    (0: all the way down to the layers).
    """
    files.check_output(path, inputs, what="--graph", input_dirs=input_dirs)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = summarize(model, plan, input_shape, depth=0)
    shapes = {r.name: r.output_shape for r in summ.rows}
    shapes[""] = summ.output_shape
    inp = _GNode("box", f"input\n{list(summ.input_shape)}")
    body = _graph(model, "", shapes, 0, max_depth)
    out = _GNode("box", f"output\n{summ.output_shape}")
    g = _GNode("chain", items=[inp] + (body.items if body.kind == "chain" else [body]) + [out])
    _measure(g)
    width, height = g.w + 0.6, g.h + 0.8
    scale = 0.9
    with plt.rc_context({"svg.fonttype": "none"}):  # SVG text stays text (searchable, selectable)
        fig = plt.figure(figsize=(max(width * scale, 3.5), max(height * scale, 2.0)))
        try:
            ax = fig.add_axes([0, 0, 1, 1])
            ax.set_xlim(-width / 2, width / 2)
            ax.set_ylim(height - 0.4, -0.6)
            ax.axis("off")
            if title:
                ax.text(0, -0.35, files.display_name(title), ha="center", va="center", fontsize=9, weight="bold")
            _draw(ax, g, 0.0, 0.0)
            files.save_figure(fig, path, dpi=110, inputs=inputs, input_dirs=input_dirs)
        finally:
            plt.close(fig)
    return path
