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
    from nnctl.model.plan import Plan

__all__ = ["Row", "Summary", "summarize", "flop_counts_by_module"]


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
    name: str | None = None  # the config's name (nnctl summary's title; not in to_dict), None: a bare model
    inputs: str | None = None  # a trained model's inputs, from its preprocessing record (Preprocessing.describe)
    lines_of: str | None = None  # the YAML file the rows' line numbers are in (a run's: RUN/config.yaml)
    per_rank: dict | None = None  # training state one rank holds: {strategy, processes, parameters, gradients, ...}

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
            "inputs": self.inputs,
            "lines_of": self.lines_of,
            "per_rank": self.per_rank,
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
              device: str | torch.device | None = None, augment: str | None = None) -> Summary:
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
        augment=augment,
    )


