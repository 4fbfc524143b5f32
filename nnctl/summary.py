"""Summary rows and totals for a model: collected here, formatted by the CLI.

torchinfo's split: :func:`summarize` runs ONE forward pass of a batch of one
sample (zeros, eval mode, ``torch.inference_mode()``) with forward hooks on
every module (output shapes, activation sizes) inside
``torch.utils.flop_counter.FlopCounterMode`` (multiply-accumulates), and
returns a :class:`Summary` of plain values. Nothing is printed; the caller
renders ``Summary.rows`` / ``Summary.to_dict()``.

The hooks are the truth: the same code works for a model rebuilt from a
checkpoint without a plan. A :class:`nnctl.model.Plan` only adds what the
model itself does not know: the named block a child came from (its ``type``
reads ``"ResBlock (Residual)"``) and the YAML line of its layer entry.

MACs (multiply-accumulates) are PyTorch's ``flop_counter`` flops // 2 for one
sample. flop_counter counts matrix products and convolutions only (``mm``,
``addmm``, ``bmm``, ``convolution``, attention, ...): a bias addition,
normalisation, activation, pooling and the Residual's ``x + body(x)`` count 0.
torchinfo 1.8 differs in two places: its "mult-adds" add one per output
element for a Conv/Linear bias (``Conv2d``: ``C_out*C_in/groups*kh*kw*H*W +
C_out*H*W``; ``Linear``: ``in*out + out``), and it also charges normalisation
layers with affine parameters; it also scales by the batch size. Without bias
the two agree on Conv2d and Linear.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .model import Plan

__all__ = ["Row", "Summary", "summarize", "flop_counts_by_module", "draw_graph"]


@dataclass
class Row:
    """One module of the model (a top-level child, or deeper with ``depth``)."""

    name: str  # dotted child name, e.g. "3" or "features.0"
    depth: int  # 0 for the top-level children
    type: str  # class name; "ResBlock (Residual)" for a child built from a named block
    output_shape: list[int] | None  # one sample, no batch dim; None if not a tensor / never called
    params: int  # parameters of this module, recursive
    trainable: int  # of which requires_grad
    macs: int  # multiply-accumulates for ONE sample, recursive (flop_counter flops // 2)
    status: str  # "trainable" | "frozen" | "partial" | "-" (no parameters)
    line: int | None  # YAML line of the layer entry, None if unknown (no plan)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Summary:
    """Rows and totals for one model and one input shape (one sample, no batch dim).

    Sizes, all in bytes:

    * ``param_bytes``: sum of ``numel * element_size`` over the model's
      parameters (each shared parameter once). Buffers (BatchNorm running
      statistics, ...) are NOT included here; they are ``buffer_bytes``.
      The weights file is roughly ``param_bytes + buffer_bytes``.
    * ``activation_bytes``: an estimate of the activation memory for ONE
      sample in a training step: the sum over LEAF modules (no children) of
      their output's ``numel * element_size``, as the forward pass produced
      it (every leaf output counted once, as if autograd saved all of them).
      It ignores in-place sharing (``ReLU(inplace=True)``), the input itself,
      what autograd saves beyond the outputs (dropout masks, pooling indices)
      and gradients / optimizer state. Multiply by the batch size for a
      batch.
    """

    rows: list[Row]
    input_shape: list[int]
    output_shape: list[int] | None
    total_params: int
    trainable_params: int
    frozen_params: int
    param_bytes: int
    buffer_bytes: int
    activation_bytes: int
    total_macs: int
    depth: int = 1  # the depth the rows were collected with (0 = all levels)
    warnings: list[str] = field(default_factory=list)
    augment: str | None = None  # the training batches' augmentation in one line (augment.describe), None: none

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``json.dumps`` works): the same content as the table."""
        return {
            "input_shape": list(self.input_shape),
            "output_shape": None if self.output_shape is None else list(self.output_shape),
            "depth": self.depth,
            "rows": [r.to_dict() for r in self.rows],
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "frozen_params": self.frozen_params,
            "param_bytes": self.param_bytes,
            "buffer_bytes": self.buffer_bytes,
            "activation_bytes": self.activation_bytes,
            "total_macs": self.total_macs,
            "warnings": list(self.warnings),
            "augment": self.augment,
        }


# --- flop_counter ---------------------------------------------------------------------

def flop_counts_by_module(counts: dict[str, dict[Any, int]], root: nn.Module) -> tuple[dict[str, int], int]:
    """Map ``FlopCounterMode.get_flop_counts()`` to ``{dotted child name: flops}`` and the total.

    On torch 2.x the keys are ``"Global"`` (everything), ``"<RootClassName>"``
    for the root and ``"<RootClassName>.<dotted child name>"`` for submodules
    (``"Sequential.0"``, ``"Sequential.2.1"``): the module tracker names the
    root by ``type(root).__name__`` and its descendants by
    ``named_children()``. Flops are recursive (a parent includes its
    children). The root is returned under ``""``. Keys that do not start with
    the root's class name (a different naming in some torch version) are
    taken as ``"<something>.<dotted name>"``, the first component dropped.
    """
    prefix = type(root).__name__
    out: dict[str, int] = {}
    total = None
    for key, ops in counts.items():
        flops = int(sum(int(v) for v in ops.values()))
        if key == "Global":
            total = flops
            continue
        if key == prefix:
            name = ""
        elif key.startswith(prefix + "."):
            name = key[len(prefix) + 1:]
        elif "." in key:
            name = key.split(".", 1)[1]
        else:
            name = ""
        # a module reached twice under two names keeps the larger count (shared modules)
        out[name] = max(out.get(name, 0), flops)
    if total is None:
        total = out.get("", 0)
    return out, total


# --- helpers ----------------------------------------------------------------------

def _unique_params(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters())  # parameters() already yields each shared tensor once


def _status(params: int, trainable: int) -> str:
    if params == 0:
        return "-"
    if trainable == params:
        return "trainable"
    if trainable == 0:
        return "frozen"
    return "partial"


def _first_tensor(module: nn.Module) -> torch.Tensor | None:
    for t in module.parameters():
        return t
    for t in module.buffers():
        return t
    return None


def _input_dtype(module: nn.Module) -> torch.dtype:
    for t in module.parameters():
        if t.is_floating_point():
            return t.dtype
    for t in module.buffers():
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def _plan_info(plan: Any, name: str, module: nn.Module) -> tuple[str | None, int | None]:
    """(type label, YAML line) from the plan's node for this child, if it matches the module."""
    if plan is None:
        return None, None
    try:
        node = plan.node_for(name)
    except Exception:  # a foreign object: ignore the plan
        return None, None
    if node is None:
        return None, None
    cls_name = type(module).__name__
    expected = {"sequential": "Sequential", "residual": "Residual", "concat": "Concat"}.get(node.kind)
    if expected is None:
        expected = node.cls.__name__ if node.cls is not None else node.type_name
    if expected != cls_name:  # the model is not the plan's here: trust the model
        return None, None
    label = f"{node.block} ({cls_name})" if node.block else None
    line = None
    try:
        line, _ = plan.doc.locate(node.path)
    except Exception:
        line = None
    return label, line


# --- the summary --------------------------------------------------------------------

def summarize(model: nn.Module, plan: "Plan | None", input_shape: Any = None, depth: int = 1,
              device: str | torch.device | None = None, augment: list | None = None) -> Summary:
    """Collect the summary of ``model`` for one sample of ``input_shape`` (no batch dim).

    ``depth=1`` lists the top-level children, ``depth=2`` also their children,
    and so on; ``depth=0`` lists every level. Rows come in module order,
    parents before children. ``plan`` (from ``nnctl.model.build``) may be
    None: rows then have ``line=None`` and ``type`` the class name.
    ``input_shape`` defaults to the plan's. ``device`` is where the zero input
    is made; by default the device of the model's first parameter (CPU for a
    model without any). The model is not moved or changed: its train/eval
    modes are restored after the pass.
    """
    if input_shape is None:
        if plan is None:
            raise ValueError("summarize needs input_shape when there is no plan")
        input_shape = plan.input_shape
    shape = [int(d) for d in input_shape]
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"input_shape must be one or more positive sizes (no batch dimension), got {list(input_shape)}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be 0 (all levels) or a positive integer, got {depth!r}")
    if device is None:
        first = _first_tensor(model)
        device = first.device if first is not None else torch.device("cpu")

    # every module under its dotted name; shared modules once, under their first name
    named = [(name, mod) for name, mod in model.named_modules() if name]
    outputs: dict[str, list[int] | None] = {}
    leaf_bytes: dict[str, int] = {}
    leaves = {name for name, mod in named if next(mod.children(), None) is None}

    def hook_for(name: str):
        def hook(_mod, _inp, out):
            if name in outputs:  # called twice: keep the first call
                return
            if isinstance(out, torch.Tensor):
                outputs[name] = list(out.shape[1:]) if out.dim() >= 1 else []
                if name in leaves:
                    leaf_bytes[name] = out.numel() * out.element_size()
            else:
                outputs[name] = None
        return hook

    handles = [mod.register_forward_hook(hook_for(name)) for name, mod in named]
    modes = {mod: mod.training for mod in model.modules()}
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        x = torch.zeros((1, *shape), dtype=_input_dtype(model), device=device)
        with torch.inference_mode(), counter:
            y = model(x)
    finally:
        for h in handles:
            h.remove()
        for mod, was in modes.items():
            mod.training = was
    out_shape = list(y.shape[1:]) if isinstance(y, torch.Tensor) and y.dim() >= 1 else None
    flops, total_flops = flop_counts_by_module(counter.get_flop_counts(), model)

    rows: list[Row] = []
    warnings: list[str] = []
    for name, mod in named:
        level = name.count(".")
        if depth and level >= depth:
            continue
        params = _unique_params(mod)
        n = sum(p.numel() for p in params)
        t = sum(p.numel() for p in params if p.requires_grad)
        label, line = _plan_info(plan, name, mod)
        if name not in outputs:
            warnings.append(f"{name} ({type(mod).__name__}) was not called by the forward pass")
        rows.append(Row(
            name=name,
            depth=level,
            type=label or type(mod).__name__,
            output_shape=outputs.get(name),
            params=n,
            trainable=t,
            macs=flops.get(name, 0) // 2,
            status=_status(n, t),
            line=line,
        ))

    all_params = _unique_params(model)
    total = sum(p.numel() for p in all_params)
    trainable = sum(p.numel() for p in all_params if p.requires_grad)
    return Summary(
        rows=rows,
        input_shape=shape,
        output_shape=out_shape,
        total_params=total,
        trainable_params=trainable,
        frozen_params=total - trainable,
        param_bytes=sum(p.numel() * p.element_size() for p in all_params),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        activation_bytes=sum(leaf_bytes.values()),
        total_macs=total_flops // 2,
        depth=depth,
        warnings=warnings,
        augment=_describe_augment(augment),
    )


def _describe_augment(spec: list | None) -> str | None:
    """``data.augment`` in one line, as the text summary prints it; None without augmentation."""
    if not spec:
        return None
    from .augment import describe

    return describe(spec)


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
    from .model import Concat, Residual

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
               plan: "Plan | None" = None) -> str:
    """Draw the model as a graph (PNG, SVG or PDF by the file's suffix): one box per layer with its
    output shape, Residual shortcuts and Concat branches side by side; returns the path written.

    Uses matplotlib only (headless Agg backend). ``max_depth`` limits how deep containers open
    (0: all the way down to the layers).
    """
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
                ax.text(0, -0.35, title, ha="center", va="center", fontsize=9, weight="bold")
            _draw(ax, g, 0.0, 0.0)
            fig.savefig(path, dpi=110)
        finally:
            plt.close(fig)
    return path
