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
import warnings
from typing import Any
import torch
from torch import nn
from nnctl.model import registry as L
from nnctl.config.schema import Config, ModelSection
from nnctl.tasks import Task
from nnctl.config.schema import suggest
from nnctl.errors import ConfigError, Problem
from nnctl.config.yamlio import Document, format_path
from nnctl.model.blocks import CONTAINERS, _NAME, child_name_problem
from nnctl.model.tv import build_torchvision, plan_torchvision
from nnctl.model.nodes import _short, MAX_ACTIVATION, MAX_PARAMS, MAX_REPEAT, Node, Plan, RESERVED, SMALL_INPUT, SMALL_PARAMS, _kw, instantiate







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
                # `Linear: 4` meant as 4 outputs: a scalar is the first argument, in_features
                scalar = not isinstance(args, (dict, list, tuple)) and L.params_of(cls) and \
                    L.params_of(cls)[0].name == pname
                hint = (f"; a scalar is {pname}: for {args!r} outputs write {cls.__name__}: "
                        f"{{{L.params_of(cls)[1].name}: {args!r}}}" if scalar and len(L.params_of(cls)) > 1 else "")
                self.fail(tpath + sub, f"{where}: {pname}={kwargs[pname]!r} but {reason} "
                                       f"(input shape {list(shape)}); expected {pname}={value}{hint}")
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
            if "Implicit dimension choice" in str(w.message):  # said once, in nnctl's words, with the fix
                text = (f"{cls.__name__} without dim: PyTorch guesses the dimension (deprecated); write "
                        f"{cls.__name__}: {{dim: 1}}")
            else:
                text = f"warning from {cls.__name__}: {w.message}"
            self.warnings.append(self.doc.problem(tpath, text))
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
    if last.type_name.startswith("Dropout") or last.type_name.startswith("AlphaDropout"):
        warn(last, f"{last.type_name} is the last layer: it drops outputs, not features; move it before the last "
                   "Linear/Conv layer")
    target = cfg.data.target if cfg.data is not None else "label"
    if cfg.task is Task.CLASSIFICATION and p.output_shape is not None and len(p.output_shape) != 1:
        warn(last, f"a classification loss usually takes outputs of shape [classes]; this model outputs "
                   f"{list(p.output_shape)} (a Flatten may be missing)")
    if target == "input" and p.output_shape is not None and tuple(p.output_shape) != p.input_shape:
        out.append(p.doc.problem(("data", "target"), f"target: input needs the output shape to equal the input "
                                 f"shape {list(p.input_shape)}, but the model outputs {list(p.output_shape)}"))
    return out
