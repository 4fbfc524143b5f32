"""Build the model: a plan checked on the meta device, then the real nn.Sequential.

``plan()`` walks ``model.layers`` (expanding ``blocks``, ``repeat``, nested
``Sequential`` and ``Residual``), binds each layer's arguments, infers omitted
sizes and propagates ``input_shape`` by running each layer on the ``meta``
device: no memory is spent, so a config asking for 10^12 features is refused
before anything is allocated. Every problem is collected and reported at once.
``instantiate()`` then builds the real modules in YAML order, so a seeded build
initialises exactly as the same model written by hand.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import layers as L
from .config import CLASSIFICATION_LOSSES, Config, ModelSection, suggest
from .errors import ConfigError, Problem
from .yamlio import Document, format_path

RESERVED = ("name", "repeat")
MAX_PARAMS = 10**10  # 40 GB of fp32 weights
MAX_ACTIVATION = 1 << 31  # values in one layer's output for one sample
MAX_REPEAT = 1000
SMALL_PARAMS = 1 << 22  # layers this small are probed on real CPU zeros
SMALL_INPUT = 1 << 18  # values a sample
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
_PROBES: dict[str, nn.Module] = {}


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


class _Planner:
    def __init__(self, model: ModelSection, doc: Document):
        self.doc = doc
        self.blocks = model.blocks
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self.total_params = 0
        self.registry = L.registry()

    def fail(self, path: tuple, message: str) -> None:
        self.problems.append(self.doc.problem(path, message))

    # -- entries ------------------------------------------------------------------
    def sequence(self, entries: Any, path: tuple, shape: tuple | None, stack: tuple) -> tuple[list, tuple | None]:
        """Plan a list of entries; returns [(child name, node)] and the output shape."""
        if not isinstance(entries, list) or not entries:
            self.fail(path, "expected a non-empty list of layers")
            return [], None
        children: list[tuple[str, Node]] = []
        used: dict[str, tuple] = {}
        for i, entry in enumerate(entries):
            got, shape = self.entry(entry, path + (i,), shape, stack)
            for name, node in got:
                if name is None:
                    name = str(len(children))
                if name in used:
                    self.fail(node.path + ("name",), f"duplicate child name {name!r} (also {format_path(used[name])})")
                    continue
                used[name] = node.path
                children.append((name, node))
        return children, shape

    def entry(self, entry: Any, path: tuple, shape: tuple | None, stack: tuple) -> tuple[list, tuple | None]:
        name = None
        repeat = 1
        if isinstance(entry, str):
            type_name, args = entry, None
        elif isinstance(entry, dict):
            keys = [k for k in entry if k not in RESERVED]
            if len(keys) != 1:
                if keys:
                    self.fail(path, f"a layer entry has one type key, found {len(keys)}: {', '.join(map(str, keys))} "
                                    "(is an argument mapping missing its indentation?)")
                else:
                    self.fail(path, "a layer entry needs a type, e.g. Conv2d: {out_channels: 8, kernel_size: 3}")
                return [], None
            type_name = keys[0]
            args = entry[type_name]
            if "name" in entry:
                name = entry["name"]
                if not isinstance(name, str) or not _NAME.match(name):
                    self.fail(path + ("name",), f"a child name must be an identifier (letters, digits, _; "
                                                f"no dots), got {name!r}")
                    name = None
            if "repeat" in entry:
                repeat = entry["repeat"]
                if isinstance(repeat, bool) or not isinstance(repeat, int) or not 1 <= repeat <= MAX_REPEAT:
                    self.fail(path + ("repeat",), f"repeat must be an integer from 1 to {MAX_REPEAT}, got {repeat!r}")
                    return [], None
        else:
            self.fail(path, f"a layer is a type name or a mapping {{Type: args}}, not {entry!r}")
            return [], None
        if not isinstance(type_name, str):
            self.fail(path, f"a layer type must be a name, got {type_name!r}")
            return [], None
        tpath = path + (type_name,)
        copies: list[Node] = []
        for _ in range(repeat):
            node, shape = self.typed(type_name, args, path, tpath, shape, stack)
            if node is None:
                return [], None
            copies.append(node)
        if repeat > 1 and name is not None:
            seq = Node("sequential", "Sequential", path, children=[(str(i), n) for i, n in enumerate(copies)],
                       in_shape=copies[0].in_shape, out_shape=shape)
            seq.params = sum(n.params for n in copies)
            return [(name, seq)], shape
        return [(name if repeat == 1 else None, n) for n in copies], shape

    def typed(self, type_name: str, args: Any, path: tuple, tpath: tuple, shape: tuple | None,
              stack: tuple) -> tuple[Node | None, tuple | None]:
        if type_name in ("Sequential", "Residual"):
            kind = type_name.lower()
            children, out = self.sequence(args, tpath, shape, stack)
            node = Node(kind, type_name, path, children=children, in_shape=shape, out_shape=out)
            node.params = sum(c.params for _, c in children)
            if kind == "residual" and shape is not None and out is not None and tuple(out) != tuple(shape):
                self.fail(tpath, f"Residual adds its input to its body's output, but the body maps "
                                 f"{list(shape)} to {list(out)}; the shapes must be equal")
                out = None
            return node, (out if kind == "sequential" else shape if out is not None else None)
        if type_name in self.blocks:
            if type_name in stack:
                self.fail(tpath, f"block {type_name!r} uses itself ({' -> '.join(stack + (type_name,))})")
                return None, None
            if args is not None:
                self.fail(tpath, f"block {type_name!r} takes no arguments (it is defined under model.blocks)")
            definition = self.blocks[type_name]
            bpath = ("model", "blocks", type_name)
            if isinstance(definition, dict) and any(k in definition for k in RESERVED):
                self.fail(bpath, "a block definition cannot carry name or repeat; set them where the block is used")
                return None, None
            got, out = self.entry(definition, bpath, shape, stack + (type_name,))
            if not got:
                return None, None
            node = got[0][1]
            node.block = type_name
            node.path = path
            return node, out
        cls = self.registry.get(type_name)
        if cls is None and L.refusal(type_name):
            self.fail(tpath if args is not None else path, L.refusal(type_name))
            return None, None
        if cls is None:
            choices = list(self.registry) + list(self.blocks) + ["Sequential", "Residual"]
            hint = suggest(type_name, choices)
            if "." in type_name:
                hint = (hint or "") + " (a config names torch.nn classes only; no import paths)"
            self.fail(tpath if args is not None else path,
                      f"unknown layer type {type_name!r}{hint.replace('; did', ': did') if hint else ''}")
            return None, None
        return self.layer(cls, args, path, tpath, shape)

    # -- one torch.nn layer -------------------------------------------------------
    def layer(self, cls: type, args: Any, path: tuple, tpath: tuple, shape: tuple | None) -> tuple[Node | None, tuple | None]:
        kwargs, problems = L.bind(cls, args)
        for sub, message in problems:
            self.fail(tpath + sub, message)
        if problems:
            return Node("layer", cls.__name__, path, cls, kwargs, in_shape=shape), None
        where = f"{cls.__name__} at {format_path(path)}"
        for pname in L.INFERRED:
            if pname not in {p.name for p in L.params_of(cls)} or shape is None:
                continue
            want = L.expected_size(pname, shape)
            if want is None:
                continue
            value, reason = want
            if pname not in kwargs:
                kwargs[pname] = value
            elif kwargs[pname] != value:
                sub = (pname,) if isinstance(args, dict) else ()
                self.fail(tpath + sub, f"{where}: {pname}={kwargs[pname]!r} but {reason} "
                                       f"(input shape {list(shape)}); expected {pname}={value}")
                return Node("layer", cls.__name__, path, cls, kwargs, in_shape=shape), None
        missing = L.missing_required(cls, kwargs)
        if shape is None:  # an earlier layer failed: shapes are unknown from here on
            missing = [m for m in missing if m not in L.INFERRED]
            if not missing:
                return Node("layer", cls.__name__, path, cls, kwargs), None
        if missing:
            form = "{" + ", ".join(f"{m}: ..." for m in missing) + "}"
            self.fail(tpath, f"{cls.__name__} needs {', '.join(missing)} (write {cls.__name__}: {form}; "
                             f"a scalar is its first argument, {L.params_of(cls)[0].name if L.params_of(cls) else '-'})")
            return Node("layer", cls.__name__, path, cls, kwargs, in_shape=shape), None
        node = Node("layer", cls.__name__, path, cls, kwargs, in_shape=shape)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with torch.device("meta"):
                    module = cls(**kwargs)
            except Exception as exc:  # torch's own argument checks
                self.fail(tpath, f"{cls.__name__}({_kw(kwargs)}) is invalid: {_short(exc)}")
                return node, None
            node.params = sum(p.numel() for p in module.parameters())
            self.total_params += node.params
            if node.params > MAX_PARAMS or self.total_params > MAX_PARAMS:
                self.fail(tpath, f"{cls.__name__}({_kw(kwargs)}) brings the model to {self.total_params:,} "
                                 f"parameters, more than {MAX_PARAMS:,}; refused before allocating")
                return node, None
            if shape is None:
                return node, None
            module.eval()
            try:
                if node.params <= SMALL_PARAMS and math.prod(shape) <= SMALL_INPUT:
                    # small: a real forward on zeros is milliseconds, while the meta kernels of
                    # convolutions pull in sympy (0.5 s) the first time
                    with torch.random.fork_rng(devices=[]), torch.no_grad():
                        out = cls(**kwargs).eval()(torch.zeros((2, *shape)))
                else:  # large: shapes on the meta device, nothing allocated
                    out = module(L.meta_input(shape))
            except Exception as exc:
                self.fail(tpath, f"{where} cannot take an input of shape {list(shape)}: {_short(exc)}")
                return node, None
        for w in caught:
            self.warnings.append(self.doc.problem(tpath, f"warning from {cls.__name__}: {w.message}"))
        if not isinstance(out, torch.Tensor):
            self.fail(tpath, f"{cls.__name__} returns {type(out).__name__}, not a tensor: it cannot be a child "
                             "of a Sequential")
            return node, None
        if out.dim() < 1 or out.shape[0] != 2:
            self.fail(tpath, f"{cls.__name__} changes the batch dimension (output shape {list(out.shape)} "
                             "for a batch of 2); it cannot be a layer of a Sequential")
            return node, None
        node.out_shape = tuple(out.shape[1:])
        if math.prod(node.out_shape) > MAX_ACTIVATION:
            self.fail(tpath, f"{cls.__name__} outputs {math.prod(node.out_shape):,} values a sample "
                             f"(shape {list(node.out_shape)}), more than {MAX_ACTIVATION:,}; refused")
            return node, None
        return node, node.out_shape


def _kw(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def plan(cfg: Config | ModelSection, doc: Document) -> Plan:
    """Check the model section on the meta device. Raises ConfigError with every problem.

    ``cfg`` is a whole config or its model section alone (which is all planning needs).
    """
    model = cfg if isinstance(cfg, ModelSection) else cfg.model
    planner = _Planner(model, doc)
    for bname in model.blocks:
        if bname in planner.registry or bname in ("Sequential", "Residual"):
            planner.fail(("model", "blocks", bname), f"block name {bname!r} hides torch.nn.{bname}; choose another name")
        elif not _NAME.match(str(bname)):
            planner.fail(("model", "blocks", bname), f"a block name must be an identifier, got {bname!r}")
    shape = tuple(model.input_shape)
    children, out = planner.sequence(model.layers, ("model", "layers"), shape, ())
    root = Node("sequential", "Sequential", ("model", "layers"), children=children, in_shape=shape, out_shape=out)
    root.params = sum(c.params for _, c in children)
    if planner.problems:
        unique = {(p.file, p.line, p.column, p.path, p.message): p for p in planner.problems}
        raise ConfigError(list(unique.values()))
    return Plan(root, shape, planner.warnings, doc)


def instantiate(node: Node) -> nn.Module:
    """The real module for a planned node (parameters initialised by PyTorch as usual)."""
    if node.kind == "layer":
        return node.cls(**node.kwargs)
    from collections import OrderedDict

    kids = OrderedDict((name, instantiate(child)) for name, child in node.children)
    return Residual(kids) if node.kind == "residual" else nn.Sequential(kids)


def build(cfg: Config, doc: Document, seed: int | None = None) -> tuple[nn.Sequential, Plan]:
    """Plan and build the model on the CPU; seeded with cfg.seed unless told otherwise."""
    p = plan(cfg, doc)
    torch.manual_seed(cfg.seed if seed is None else seed)
    return instantiate(p.root), p


def lint(cfg: Config, p: Plan) -> list[Problem]:
    """Warnings, not errors: likely mistakes that still run."""
    out = list(p.warnings)
    leaves = [(name, n) for name, n in p.root.walk() if n.kind == "layer"]
    if not leaves:
        return out
    last_name, last = leaves[-1]
    loss = cfg.train.loss

    def warn(node: Node, message: str) -> None:
        out.append(p.doc.problem(node.path, message))

    if last.type_name == "Softmax" and loss == "cross_entropy":
        warn(last, "the model ends in Softmax but cross_entropy expects raw logits (CrossEntropyLoss applies "
                   "log-softmax itself); remove the Softmax")
    if last.type_name == "LogSoftmax" and loss == "cross_entropy":
        warn(last, "the model ends in LogSoftmax with cross_entropy: did you mean loss: nll? (CrossEntropyLoss "
                   "would apply log-softmax twice)")
    if loss == "nll" and last.type_name not in ("LogSoftmax",):
        warn(last, "loss nll (NLLLoss) expects log-probabilities: end the model with LogSoftmax: {dim: 1}, "
                   "or use cross_entropy on raw logits")
    if last.type_name in ("Softmax", "LogSoftmax") and last.kwargs.get("dim") is None:
        warn(last, f"{last.type_name} without dim: PyTorch guesses the dimension (deprecated); write "
                   f"{last.type_name}: {{dim: 1}}")
    if last.type_name.startswith("Dropout") or last.type_name.startswith("AlphaDropout"):
        warn(last, f"{last.type_name} is the last layer: it drops outputs, not features; move it before the last "
                   "Linear/Conv layer")
    target = cfg.data.target if cfg.data is not None else "label"
    if loss in CLASSIFICATION_LOSSES and p.output_shape is not None and len(p.output_shape) != 1 \
            and target == "label":
        warn(last, f"a classification loss usually takes outputs of shape [classes]; this model outputs "
                   f"{list(p.output_shape)} (a Flatten may be missing)")
    if target == "input" and p.output_shape is not None and tuple(p.output_shape) != p.input_shape:
        out.append(p.doc.problem(("data", "target"), f"target: input needs the output shape to equal the input "
                                 f"shape {list(p.input_shape)}, but the model outputs {list(p.output_shape)}"))
    return out


@dataclass
class Checked:
    """Everything ``nnctl check`` finds in one pass: problems of every kind, and what was valid."""

    cfg: Config | None  # the whole config, when its structure is valid
    plan: Plan | None  # the model's plan, when the model section plans without problems
    problems: list[Problem]  # structural, layer, shape, optimizer and scheduler problems, in file order
    warnings: list[Problem]  # lint (only when there are no problems)


def _in_file_order(problems: list[Problem], file: str) -> list[Problem]:
    """One problem per place and message: the file's in line order, then those of --set options."""
    unique = {(p.file, p.line, p.column, p.path, p.message): p for p in problems}
    return sorted(unique.values(), key=lambda p: (p.file != file, p.line or 0, p.column or 0))


def check(doc: Document) -> Checked:
    """Validate a loaded document completely, reporting every mistake at once.

    The structure (pydantic) is validated first; the model section is then planned
    even when another section (a missing or broken ``data:``) fails, and the train
    section's optimizer and scheduler are checked when that section is valid on its
    own, so that structural and layer / shape problems come in one report.
    """
    from . import config as C
    from .train import validate as validate_train  # the module (nnctl.train is also an API function)

    checked = C.validate_all(doc)
    problems = list(checked.problems)
    plan_ = None
    if checked.model is not None:
        try:
            plan_ = plan(checked.model, doc)
        except ConfigError as exc:
            problems += exc.problems
    if checked.train is not None:
        problems += validate_train(checked.train, doc)
    warnings_ = lint(checked.cfg, plan_) if checked.cfg is not None and plan_ is not None and not problems else []
    return Checked(checked.cfg, plan_, _in_file_order(problems, doc.file), warnings_)


def load_checked(source: str, overrides: list[str] | None = None) -> tuple[Config, Document, Plan]:
    """Load a config file and check all of it (structure, layers, shapes, optimizer) at once.

    Raises ConfigError with every problem; returns the config, its document and the plan.
    For ``train``: follow with ``config.require_data(cfg, doc)``.
    """
    from . import config as C

    doc = C.load_document(source, overrides)
    result = check(doc)
    if result.problems:
        raise ConfigError(result.problems)
    return result.cfg, doc, result.plan
