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
    def sequence(self, entries: Any, path: tuple, shape: tuple | None, stack: tuple,
                 container: str = "Sequential", children: list | None = None,
                 used: dict | None = None) -> tuple[list, tuple | None]:
        """Plan a list of entries; returns [(child name, node)] and the output shape.

        ``children`` / ``used`` let several lists (a Residual's layers and after) share one
        container's child names; an entry without a name is named by its position there.
        """
        children = [] if children is None else children
        used = {} if used is None else used
        if not isinstance(entries, list) or not entries:
            self.fail(path, "expected a non-empty list of layers")
            return children, None
        for i, entry in enumerate(entries):
            got, shape = self.entry(entry, path + (i,), shape, stack, container)
            for name, node in got:
                self.add_child(children, used, name, node, container)
        return children, shape

    def add_child(self, children: list, used: dict, name: str | None, node: "Node", container: str) -> None:
        if name is None:
            name = str(len(children))
            if name in used:
                self.fail(node.path, f"this entry's default name {name!r} (its position) is taken by "
                                     f"{format_path(used[name])}; give it a name")
                return
        if name in used:
            self.fail(node.path + ("name",), f"duplicate child name {name!r} (also {format_path(used[name])})")
            return
        used[name] = node.path
        children.append((name, node))

    def entry(self, entry: Any, path: tuple, shape: tuple | None, stack: tuple,
              container: str = "Sequential") -> tuple[list, tuple | None]:
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
                why = child_name_problem(name, container)
                if why:
                    self.fail(path + ("name",), why)
                    name = None
                else:
                    name = str(name)
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

    def _line(self, path: tuple) -> str:
        line, _ = self.doc.locate(path)
        return f"line {line}" if line else format_path(path)

    def residual(self, args: Any, path: tuple, tpath: tuple, shape: tuple | None,
                 stack: tuple) -> tuple["Node | None", tuple | None]:
        """``Residual: [...]`` (x + body(x)) or ``Residual: {layers, shortcut, after}``."""
        if isinstance(args, list):
            body, shortcut, after, lpath = args, None, None, tpath
        elif isinstance(args, dict):
            unknown = [k for k in args if k not in ("layers", "shortcut", "after")]
            for k in unknown:
                self.fail(tpath + (k,), f"unknown key {k!r} in Residual{suggest(str(k), ['layers', 'shortcut', 'after'])}"
                                        " (Residual takes layers, shortcut and after)")
            if unknown:
                return None, None
            if "layers" not in args:
                self.fail(tpath, "Residual needs layers: the body's list of layers")
                return None, None
            body, shortcut, after, lpath = args["layers"], args.get("shortcut"), args.get("after"), tpath + ("layers",)
        else:
            self.fail(tpath, "Residual takes a list of layers (x + body(x)) or a mapping {layers: [...], "
                             "shortcut: ..., after: [...]}")
            return None, None
        children: list = []
        used: dict = {}
        _, body_out = self.sequence(body, lpath, shape, stack, "Residual", children, used)
        body_names = [n for n, _ in children]
        short_name, short_out, spath = None, shape, None
        if shortcut is not None:
            spath = tpath + ("shortcut",)
            if isinstance(shortcut, list):
                kids, short_out = self.sequence(shortcut, spath, shape, stack)
                snode = Node("sequential", "Sequential", spath, children=kids, in_shape=shape, out_shape=short_out)
                snode.params = sum(c.params for _, c in kids)
                got = [("shortcut", snode)] if kids else []
            else:
                got, short_out = self.entry(shortcut, spath, shape, stack, "Residual")
                if len(got) > 1:  # repeat: N copies in a Sequential
                    snode = Node("sequential", "Sequential", spath, children=[(str(i), n) for i, (_, n) in enumerate(got)],
                                 in_shape=shape, out_shape=short_out)
                    snode.params = sum(n.params for _, n in got)
                    got = [(None, snode)]
            if got:
                short_name = got[0][0] or "shortcut"
                self.add_child(children, used, short_name, got[0][1], "Residual")
            else:
                short_out = None
        out = None
        if shape is not None and body_out is not None and short_out is not None:
            if tuple(body_out) != tuple(short_out):
                body_where = self._line(lpath if isinstance(args, dict) else tpath)
                if shortcut is None:
                    hint = ""
                    if len(shape) == 3 and len(body_out) == 3 and shape[1] % max(body_out[1], 1) == 0:
                        stride = shape[1] // max(body_out[1], 1)
                        hint = (f"; a downsampling block needs a projection shortcut, e.g. shortcut: {{Sequential: "
                                f"[{{Conv2d: {{out_channels: {body_out[0]}, kernel_size: 1, stride: {stride}, "
                                f"bias: false}}}}, BatchNorm2d], name: downsample}}")
                    self.fail(tpath, f"Residual adds its input to its body's output, but the body ({body_where}) maps "
                                     f"{list(shape)} to {list(body_out)} while the shortcut is the identity "
                                     f"({list(shape)}); the shapes must be equal{hint}")
                else:
                    self.fail(spath, f"Residual computes body(x) + shortcut(x), but the body ({body_where}) gives "
                                     f"{list(body_out)} and the shortcut ({self._line(spath)}) gives "
                                     f"{list(short_out)} for the input {list(shape)}; the two shapes must be equal")
            else:
                out = tuple(body_out)
        after_names: list[str] = []
        if after is not None:
            n0 = len(children)
            _, out = self.sequence(after, tpath + ("after",), out, stack, "Residual", children, used)
            after_names = [n for n, _ in children[n0:]]
        node = Node("residual", "Residual", path, children=children, in_shape=shape, out_shape=out,
                    kwargs={"body": body_names, "shortcut": short_name, "after": after_names})
        node.params = sum(c.params for _, c in children)
        return node, out

    def concat(self, args: Any, path: tuple, tpath: tuple, shape: tuple | None,
               stack: tuple) -> tuple["Node | None", tuple | None]:
        """``Concat: {dim: 1, branches: [[...], [], ...]}``: torch.cat of the branches' outputs."""
        if not isinstance(args, dict):
            self.fail(tpath, "Concat takes a mapping {dim: 1, branches: [[...layers...], [], ...]} "
                             "(each branch a list of layers; an empty list is the identity)")
            return None, None
        unknown = [k for k in args if k not in ("dim", "branches")]
        for k in unknown:
            self.fail(tpath + (k,), f"unknown key {k!r} in Concat{suggest(str(k), ['dim', 'branches'])} "
                                    "(Concat takes dim and branches)")
        dim = args.get("dim", 1)
        if isinstance(dim, bool) or not isinstance(dim, int):
            self.fail(tpath + ("dim",), f"Concat.dim must be an integer (1 = channels; the batch is 0), got {dim!r}")
            return None, None
        branches = args.get("branches")
        if not isinstance(branches, list) or len(branches) < 2:
            self.fail(tpath + ("branches",) if "branches" in args else tpath,
                      "Concat needs branches: a list of two or more branches, each a list of layers "
                      "([] is the identity)")
            return None, None
        if unknown:
            return None, None
        children, outs, ok = [], [], True
        for i, branch in enumerate(branches):
            bpath = tpath + ("branches", i)
            if branch == [] or branch is None:
                kids, bout = [], shape
            elif not isinstance(branch, list):
                self.fail(bpath, f"a Concat branch is a list of layers ([] for the identity), not {branch!r}")
                ok = False
                continue
            else:
                kids, bout = self.sequence(branch, bpath, shape, stack)
            bnode = Node("sequential", "Sequential", bpath, children=kids, in_shape=shape, out_shape=bout)
            bnode.params = sum(c.params for _, c in kids)
            children.append((str(i), bnode))
            outs.append((bpath, bout))
        node = Node("concat", "Concat", path, children=children, in_shape=shape, kwargs={"dim": dim})
        node.params = sum(c.params for _, c in children)
        if not ok or shape is None or any(o is None for _, o in outs):
            return node, None
        rank = len(outs[0][1])
        d = dim + rank + 1 if dim < 0 else dim
        if not 1 <= d <= rank:
            self.fail(tpath + ("dim",), f"Concat.dim {dim} is not a dimension of the branches' outputs "
                                        f"{list(outs[0][1])} (with the batch first: 1 to {rank}, or -1 to -{rank}; "
                                        "0 is the batch)")
            return node, None
        first_path, first = outs[0]
        for bpath, o in outs[1:]:
            if len(o) != rank or any(a != b for j, (a, b) in enumerate(zip(o, first)) if j != d - 1):
                self.fail(bpath, f"Concat along dim {dim}: branch {bpath[-1]} ({self._line(bpath)}) gives "
                                 f"{list(o)} but branch 0 ({self._line(first_path)}) gives {list(first)}; "
                                 f"all sizes but dim {dim} (batch first) must be equal")
                return node, None
        out = list(first)
        out[d - 1] = sum(o[d - 1] for _, o in outs)
        node.out_shape = tuple(out)
        if math.prod(out) > MAX_ACTIVATION:
            self.fail(tpath, f"Concat outputs {math.prod(out):,} values a sample, more than {MAX_ACTIVATION:,}; refused")
            return node, None
        return node, node.out_shape

    def typed(self, type_name: str, args: Any, path: tuple, tpath: tuple, shape: tuple | None,
              stack: tuple) -> tuple[Node | None, tuple | None]:
        if type_name == "Sequential":
            children, out = self.sequence(args, tpath, shape, stack)
            node = Node("sequential", type_name, path, children=children, in_shape=shape, out_shape=out)
            node.params = sum(c.params for _, c in children)
            return node, out
        if type_name == "Residual":
            return self.residual(args, path, tpath, shape, stack)
        if type_name == "Concat":
            return self.concat(args, path, tpath, shape, stack)
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
            choices = list(self.registry) + list(self.blocks) + list(CONTAINERS)
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
    shape = tuple(model.input_shape)
    if model.torchvision is not None:
        root, extra = plan_torchvision(model, planner, shape)
    else:
        for bname in model.blocks:
            if bname in planner.registry or bname in CONTAINERS:
                planner.fail(("model", "blocks", bname), f"block name {bname!r} hides "
                                                         f"{'torch.nn.' if bname in planner.registry else ''}{bname}; "
                                                         "choose another name")
            elif not _NAME.match(str(bname)):
                planner.fail(("model", "blocks", bname), f"a block name must be an identifier, got {bname!r}")
        children, out = planner.sequence(model.layers, ("model", "layers"), shape, ())
        root = Node("sequential", "Sequential", ("model", "layers"), children=children, in_shape=shape,
                    out_shape=out)
        root.params = sum(c.params for _, c in children)
        extra = {}
    if planner.problems:
        unique = {(p.file, p.line, p.column, p.path, p.message): p for p in planner.problems}
        raise ConfigError(list(unique.values()))
    result = Plan(root, shape, planner.warnings, doc)
    result.torchvision = extra
    return result


def instantiate(node: Node) -> nn.Module:
    """The real module for a planned node (parameters initialised by PyTorch as usual)."""
    if node.kind == "layer":
        return node.cls(**node.kwargs)
    from collections import OrderedDict

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


def build(cfg: Config, doc: Document, seed: int | None = None,
          pretrained: bool | None = None, checked: Plan | None = None) -> tuple[nn.Module, Plan]:
    """Plan and build the model on the CPU; seeded with cfg.seed unless told otherwise.

    A torchvision model (``model.torchvision``) is built by torchvision's own builder and
    its ``weights`` are read from the local torch hub cache (never downloaded).
    ``pretrained=False`` skips reading them (the caller loads a checkpoint's weights over
    them anyway); the default (None) reads them unless the document is a checkpoint's
    recorded config (its file ends in .pt / .pth / .ckpt). ``checked``: the plan that
    ``load_checked`` already made for this very config (planning is not repeated).
    """
    p = checked if checked is not None else plan(cfg, doc)
    torch.manual_seed(cfg.seed if seed is None else seed)
    if cfg.model.torchvision is not None:
        if pretrained is None:
            pretrained = not str(doc.file).endswith((".pt", ".pth", ".ckpt"))
        return build_torchvision(cfg.model, p, doc, pretrained), p
    return instantiate(p.root), p


# --- torchvision models as a model source ------------------------------------------------
#
# model: {torchvision: resnet18, weights: IMAGENET1K_V1, args: {...}, replace: {fc: {Linear: ...}}}
# Only names in torchvision.models.list_models() (classification: one tensor out), arguments
# checked against the builder's signature (and its model class's), weights from torchvision's
# own registry, read from the local torch hub cache with torch.load(weights_only=True): no
# download, no code from the config or from the weights file.

TV_PATH = ("model", "torchvision")


def _tv():
    import torchvision.models as TVM

    return TVM


def torchvision_models() -> list[str]:
    """The torchvision classification models a config may name."""
    TVM = _tv()
    return sorted(TVM.list_models(module=TVM))


def resolve_weights(model_name: str, value: str):
    """(weights enum member, None) or (None, why not): IMAGENET1K_V1, DEFAULT or ResNet18_Weights.IMAGENET1K_V1."""
    TVM = _tv()
    enum_cls = TVM.get_model_weights(model_name)
    members = [m for m in enum_cls.__members__ if m != "DEFAULT"]
    listed = f"{model_name}'s weights are {', '.join(members)} (or DEFAULT); null means random init"
    if not isinstance(value, str):
        return None, f"weights is a name, got {value!r}; {listed}"
    text = value
    if "." in text:
        cls_name, _, text = text.partition(".")
        if cls_name != enum_cls.__name__:
            return None, f"weights {value!r} are not {model_name}'s ({enum_cls.__name__}); {listed}"
    if text == "DEFAULT":
        return enum_cls.DEFAULT, None
    if text in enum_cls.__members__:
        return enum_cls[text], None
    hint = suggest(text, members + ["DEFAULT"])
    return None, f"{model_name} has no weights {value!r}{hint}{' ' if hint else '; '}{listed}"


def weights_file(weights) -> str:
    """Where torch.hub keeps these weights: <torch.hub.get_dir()>/checkpoints/<file name of the URL>."""
    import os
    from urllib.parse import urlparse

    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))


def weights_preprocessing(weights) -> dict:
    """The weights' recorded preprocessing (their transforms() and meta): resize, crop, mean, std, classes."""
    out: dict[str, Any] = {"weights": f"{type(weights).__name__}.{weights.name}"}
    try:
        t = weights.transforms()
    except Exception:  # noqa: BLE001 - a weights entry without image transforms
        t = None
    for key in ("resize_size", "crop_size", "mean", "std"):
        value = getattr(t, key, None)
        out[key] = [float(v) if key in ("mean", "std") else int(v) for v in value] if value is not None else None
    interp = getattr(t, "interpolation", None)
    out["interpolation"] = getattr(interp, "value", None)
    cats = weights.meta.get("categories")
    out["classes"] = list(cats) if cats else None
    return out


def _offline_loader(url: str, *args: Any, **kwargs: Any) -> dict:
    """torchvision's load_state_dict_from_url, offline: the hub cache or a clear error; weights_only."""
    import os
    from urllib.parse import urlparse

    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _no_download(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("nnctl never downloads weights; put the file in the torch hub cache")


def _builder_args(model_name: str) -> tuple[Any, list[str], dict]:
    """The builder, the keyword arguments a config may give it, and their annotations."""
    import inspect
    import typing

    TVM = _tv()
    builder = TVM.get_model_builder(model_name)
    fn = inspect.unwrap(builder)
    sig = inspect.signature(fn)
    names, hints = [], {}
    var_kw = False
    for p in sig.parameters.values():
        if p.kind == p.VAR_KEYWORD:
            var_kw = True
        elif p.kind != p.VAR_POSITIONAL and p.name not in ("weights", "progress"):
            names.append(p.name)
    if var_kw:
        try:
            cls = typing.get_type_hints(fn).get("return")
        except Exception:  # noqa: BLE001
            cls = None
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            hints = dict(L._hints(cls))
            for p in L.params_of(cls):
                text = str(hints.get(p.name, p.annotation))
                if p.name not in names and not any(w in text for w in ("Callable", "type[", "Type[", "Module")):
                    names.append(p.name)  # never a class or a function: a config cannot give one
    return builder, names, hints


def _shapes(module: nn.Module, shape: tuple, train: bool = False) -> tuple[dict, dict, Any]:
    """Input and output shapes (one sample) of every submodule, by a forward pass on the meta device."""
    ins: dict[str, tuple | None] = {}
    outs: dict[str, tuple | None] = {}

    def shp(t):
        return tuple(t.shape[1:]) if isinstance(t, torch.Tensor) and t.dim() >= 1 else None

    handles = []
    for name, mod in module.named_modules():
        def pre(_m, args, name=name):
            ins.setdefault(name, shp(args[0]) if args else None)

        def post(_m, _a, out, name=name):
            outs.setdefault(name, shp(out))

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    try:
        module.train(train)
        with torch.no_grad():
            y = module(L.meta_input(shape))
    finally:
        for h in handles:
            h.remove()
    return ins, outs, y


def plan_torchvision(model: ModelSection, planner: "_Planner", shape: tuple) -> tuple[Node, dict]:
    """Plan a torchvision model on the meta device: name, arguments, weights, replacements, shapes."""
    import inspect

    TVM = _tv()
    name = model.torchvision
    root = Node("module", str(name), TV_PATH, in_shape=shape)
    fail = planner.fail
    if name not in torchvision_models():
        if name in TVM.list_models():
            fail(TV_PATH, f"torchvision model {name!r} is not a classification model (its forward returns "
                          "detections, masks or a dict); nnctl trains models that return one tensor: choose one "
                          "of torchvision.models.list_models(module=torchvision.models)")
        else:
            fail(TV_PATH, f"unknown torchvision model {name!r}{suggest(str(name), torchvision_models())} "
                          "(the names of torchvision.models.list_models(), e.g. resnet18, vgg11, mobilenet_v3_small)")
        return root, {}
    builder, allowed, hints = _builder_args(name)
    ok = True
    for key, value in model.args.items():
        apath = ("model", "args", key)
        if key not in allowed:
            fail(apath, f"unknown argument {key!r} for torchvision.models.{name}{suggest(str(key), allowed)} "
                        f"(it takes: {', '.join(allowed) or 'nothing'})")
            ok = False
        elif isinstance(value, dict):
            fail(apath, f"{name}.{key}: a mapping is not a valid argument value")
            ok = False
        elif key in hints and L.fits(L.to_torch_value(value), hints[key]) is False:
            fail(apath, f"{name}.{key} expects {L.annotation_text(hints[key])}, got {value!r}")
            ok = False
    weights = None
    if model.weights is not None:
        weights, why = resolve_weights(name, model.weights)
        if why:
            fail(("model", "weights"), why)
            ok = False
    if not ok:
        return root, {}
    kwargs = {k: L.to_torch_value(v) if isinstance(v, list) and k != "replace_stride_with_dilation" else v
              for k, v in model.args.items()}
    if weights is not None:
        n = len(weights.meta.get("categories") or [])
        if n and kwargs.get("num_classes", n) != n:
            fail(("model", "args", "num_classes"), f"the {model.weights} weights of {name} have {n} classes, "
                                                   f"not {kwargs['num_classes']}: keep num_classes and give the "
                                                   "model a new head with replace (e.g. replace: {fc: {Linear: "
                                                   "{out_features: N}}})")
            return root, {}
        if n:
            kwargs["num_classes"] = n
    import warnings as _w

    with _w.catch_warnings():
        _w.simplefilter("ignore")
        try:
            with torch.device("meta"):
                net = builder(weights=None, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the builder's own argument checks
            fail(("model", "args") if model.args else TV_PATH,
                 f"torchvision.models.{name}({_kw(kwargs)}) is invalid: {_short(exc)}")
            return root, {}
    total = sum(p.numel() for p in net.parameters())
    planner.total_params += total
    if total > MAX_PARAMS:
        fail(TV_PATH, f"{name} has {total:,} parameters, more than {MAX_PARAMS:,}; refused before allocating")
        return root, {}
    try:
        ins, _, _ = _shapes(net, shape)
    except Exception as exc:  # noqa: BLE001
        fail(("model", "input_shape"), f"torchvision.models.{name} cannot take an input of shape {list(shape)}: "
                                       f"{_short(exc)}")
        return root, {}
    modules = dict(net.named_modules())
    replaced: dict[str, Node] = {}
    for dotted, entry in model.replace.items():
        rpath = ("model", "replace", dotted)
        if not isinstance(dotted, str) or not dotted or dotted not in modules:
            tops = [n for n, _ in net.named_children()]
            fail(rpath, f"replace: {dotted!r} is not a module of {name}{suggest(str(dotted), list(modules)[1:])} "
                        f"(its children: {', '.join(tops)}; deeper modules by dotted name, e.g. "
                        f"{next((n for n in modules if n.count('.') == 2), tops[-1])})")
            continue
        got, _ = planner.entry(entry, rpath, ins.get(dotted), ())
        if not got:
            continue
        if len(got) > 1:
            node = Node("sequential", "Sequential", rpath, children=[(str(i), n) for i, (_, n) in enumerate(got)],
                        in_shape=got[0][1].in_shape, out_shape=got[-1][1].out_shape)
            node.params = sum(n.params for _, n in got)
        else:
            node = got[0][1]
        replaced[dotted] = node
    if planner.problems:
        return root, {}
    for dotted, node in replaced.items():
        parent, _, last = dotted.rpartition(".")
        with torch.device("meta"):
            new = instantiate(node)
        try:
            setattr(net.get_submodule(parent) if parent else net, last, new)
        except AttributeError as exc:
            fail(("model", "replace", dotted), f"replace: cannot replace {dotted!r}: {_short(exc)}")
            return root, {}
    where = ("model", "replace") if replaced else ("model", "input_shape")
    try:
        _, outs, y = _shapes(net, shape)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"it returns {type(y).__name__}, not a tensor")
        _, _, y_train = _shapes(net, shape, train=True)
        if not isinstance(y_train, torch.Tensor):
            fail(TV_PATH, f"{name} returns {type(y_train).__name__} in training mode (auxiliary outputs), not one "
                          "tensor: set args: {aux_logits: false}")
            return root, {}
    except Exception as exc:  # noqa: BLE001
        what = f"with {', '.join(replaced)} replaced, " if replaced else ""
        fail(where, f"{what}torchvision.models.{name} cannot take an input of shape {list(shape)}: {_short(exc)}")
        return root, {}
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in net.named_modules()}

    def tree(mod: nn.Module, prefix: str) -> list:
        kids = []
        for cname, child in mod.named_children():
            full = f"{prefix}{cname}"
            if full in replaced:
                node = replaced[full]
            else:
                has_kids = next(child.children(), None) is not None
                node = Node("module" if has_kids else "layer", type(child).__name__, TV_PATH, cls=type(child),
                            in_shape=ins.get(full), out_shape=outs.get(full), params=params[full])
                node.children = tree(child, full + ".")
            kids.append((cname, node))
        return kids

    root = Node("module", type(net).__name__, TV_PATH, cls=type(net), children=tree(net, ""), in_shape=shape,
                out_shape=tuple(y.shape[1:]), params=params[""])
    extra = {"model": name, "weights": None if weights is None else f"{type(weights).__name__}.{weights.name}",
             "weights_file": None if weights is None else weights_file(weights),
             "replace": list(replaced), "replace_nodes": replaced,
             "preprocessing": None if weights is None else weights_preprocessing(weights)}
    return root, extra


def offline_weights_message(weights) -> str:
    import os

    path = weights_file(weights)
    return (f"the weights {type(weights).__name__}.{weights.name} are not in the local torch hub cache: nnctl "
            f"never downloads; put the file {os.path.basename(path)} (from {weights.url}) in the folder "
            f"{os.path.dirname(path)} (torch.hub.get_dir()/checkpoints; set TORCH_HOME to use another), "
            "or write weights: null for random init")


def build_torchvision(model: ModelSection, p: Plan, doc: Document, pretrained: bool = True) -> nn.Module:
    """The real torchvision model of a plan: torchvision's builder, the cached weights, the replacements."""
    from unittest import mock

    name = model.torchvision
    builder, _, _ = _builder_args(name)
    kwargs = {k: L.to_torch_value(v) if isinstance(v, list) and k != "replace_stride_with_dilation" else v
              for k, v in model.args.items()}
    weights = resolve_weights(name, model.weights)[0] if model.weights is not None else None
    import warnings as _w

    with _w.catch_warnings():
        _w.simplefilter("ignore", FutureWarning)
        if weights is not None and pretrained:
            import torchvision.models._api as api

            try:
                with mock.patch.object(api, "load_state_dict_from_url", _offline_loader), \
                        mock.patch.object(torch.hub, "download_url_to_file", _no_download):
                    net = builder(weights=weights, progress=False, **kwargs)
            except FileNotFoundError:
                raise ConfigError([doc.problem(("model", "weights"), offline_weights_message(weights))]) from None
            except Exception as exc:  # noqa: BLE001 - a file that is not these weights
                raise ConfigError([doc.problem(("model", "weights"), f"{weights_file(weights)} does not hold the "
                                                                     f"weights of {name}: {_short(exc)}")]) from None
        else:
            if weights is not None:
                n = len(weights.meta.get("categories") or [])
                if n:
                    kwargs["num_classes"] = n
            net = builder(weights=None, **kwargs)
    for dotted, node in (p.torchvision.get("replace_nodes") or {}).items():
        parent, _, last = dotted.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, last, instantiate(node))
    return net


def lint(cfg: Config, p: Plan) -> list[Problem]:
    """Warnings, not errors: likely mistakes that still run."""
    out = list(p.warnings)
    leaves = [(name, n) for name, n in p.root.walk() if n.kind == "layer"]
    if not leaves:
        return out
    last_name, last = leaves[-1]
    loss = cfg.train.loss_name

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
    from .augment import check as augment_problems  # data.augment's names and arguments (torchvision's)
    from .loop import validate as validate_train  # the module (nnctl.train is also an API function)

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
    problems += augment_problems(doc)
    if checked.cfg is not None and plan_ is not None and plan_.output_shape:
        from .loop import check_loss  # loss arguments against the model's output width (class weights)

        problems += check_loss(checked.cfg, doc, int(plan_.output_shape[-1]))
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
