"""The layer registry: torch.nn module classes by exact name, and nothing else.

A closed name -> class table (as timm's registries), built from ``torch.nn``
itself, so a config can name any ``torch.nn`` module (Conv2d, BatchNorm2d,
ConvTranspose2d, ...) and never an import path. Arguments are checked against
PyTorch's own signatures and annotations; omitted ``in_channels`` /
``in_features`` / ``num_features`` are inferred from the incoming shape.
"""

from __future__ import annotations

import inspect
import typing
from functools import lru_cache
from typing import Any
import torch
from torch import nn
from nnctl.config.schema import suggest

# containers that take modules (not plain values) as arguments, and the base class
EXCLUDED = frozenset({"Module", "ModuleList", "ModuleDict", "ParameterList", "ParameterDict", "Sequential", "Container"})
INFERRED = ("in_channels", "in_features", "num_features")
HIDDEN = frozenset({"device", "dtype"})  # factory kwargs: nnctl places the model itself


# torch.nn modules that cannot be one child of a Sequential: their forward returns a tuple,
# or takes more than one tensor. Named in a config, they get this reason, located.
TUPLE_OUTPUT = {
    "RNN": "(output, h_n)",
    "GRU": "(output, h_n)",
    "LSTM": "(output, (h_n, c_n))",
    "LSTMCell": "(h_1, c_1)",
    "MultiheadAttention": "(attn_output, attn_weights)",
    "AdaptiveLogSoftmaxWithLoss": "(output, loss)",
}
MULTI_INPUT = {
    "Bilinear": "input1, input2",
    "CosineSimilarity": "x1, x2",
    "PairwiseDistance": "x1, x2",
    "Transformer": "src, tgt",
    "TransformerDecoder": "tgt, memory",
    "TransformerDecoderLayer": "tgt, memory",
}
# containers and wrappers of other modules
WRAPPERS = frozenset({"DataParallel"})


def _public_classes() -> dict[str, type]:
    out = {}
    for name in dir(nn):
        if name.startswith("_"):
            continue
        obj = getattr(nn, name)
        if inspect.isclass(obj) and issubclass(obj, nn.Module) and obj.__module__.startswith("torch.nn"):
            out[name] = obj
    return out


def _is_loss(name: str, cls: type) -> bool:
    return name.endswith("Loss") or issubclass(cls, nn.modules.loss._Loss)


def _listable(cls: type) -> bool:
    """Can the constructor's arguments be read from its signature?

    A class that keeps nn.Module's own ``__init__`` takes no arguments (Tanh, Sigmoid);
    ``Identity`` documents that it ignores any. Otherwise a constructor of only
    ``*args, **kwargs`` (RNN, LSTM, GRU) hides its arguments: nnctl could not check them.
    """
    if cls.__init__ is nn.Module.__init__ or cls is nn.Identity:
        return True
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return False
    rest = list(sig.parameters.values())[1:]
    return not rest or any(p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in rest)


@lru_cache(maxsize=1)
def registry() -> dict[str, type[nn.Module]]:
    """Every torch.nn module class a config may name as a layer, by its exact name.

    Left out: containers, losses (``*Loss``: a config names its loss in ``train.loss``),
    modules that return a tuple or take several inputs, and classes whose arguments
    cannot be read from their signature.
    """
    out = {}
    for name, obj in _public_classes().items():
        if (name in EXCLUDED or name in WRAPPERS or name in TUPLE_OUTPUT or name in MULTI_INPUT
                or _is_loss(name, obj) or not _listable(obj)):
            continue
        out[name] = obj
    return out


def refusal(name: str) -> str | None:
    """Why a torch.nn class that exists is not a layer nnctl accepts, or None."""
    if name in TUPLE_OUTPUT:
        return (f"{name} returns a tuple {TUPLE_OUTPUT[name]}; nnctl's layer lists need one tensor from each "
                f"layer (each feeds the next, as in nn.Sequential): {name} is not supported")
    if name in MULTI_INPUT:
        return (f"{name} takes several inputs ({MULTI_INPUT[name]}); in nnctl's layer lists each layer takes "
                f"the previous layer's one output: {name} is not supported")
    cls = _public_classes().get(name)
    if cls is None:
        return None
    if _is_loss(name, cls):
        return (f"{name} is a loss, not a layer: name the loss in train.loss (cross_entropy, nll, mse, l1 or l2), "
                "not in the model's layers")
    if name in EXCLUDED or name in WRAPPERS:
        return (f"unknown layer type {name!r}: {name} is not a layer but holds other modules; write nested "
                "layers with Sequential: [...] or Residual: [...] instead")
    if not _listable(cls):
        return (f"{name}'s arguments cannot be read from its signature (it takes *args, **kwargs), so nnctl "
                f"cannot check them: {name} is not supported")
    return None


@lru_cache(maxsize=None)
def params_of(cls: type) -> tuple[inspect.Parameter, ...]:
    """The constructor's arguments a config may set, in PyTorch's order."""
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return ()
    out = []
    for p in list(sig.parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in HIDDEN:
            continue
        out.append(p)
    return tuple(out)


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # annotations that do not evaluate: no type checks for this class
        return {}


def annotation_text(ann: Any) -> str:
    if ann is inspect.Parameter.empty:
        return ""
    if ann is type(None):
        return "None"
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin is typing.Union or (origin is not None and getattr(origin, "__name__", "") == "UnionType"):
        return " | ".join(annotation_text(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (tuple, list):
        name = origin.__name__
        if args and args[-1] is Ellipsis:
            return f"{name}[{annotation_text(args[0])}, ...]"
        return f"{name}[{', '.join(annotation_text(a) for a in args)}]" if args else name
    if isinstance(ann, type):
        return ann.__name__
    return str(ann).replace("typing.", "")


def fits(value: Any, ann: Any) -> bool | None:
    """Does a plain YAML value fit an annotation? None when it cannot be told."""
    if ann is inspect.Parameter.empty or ann is Any:
        return None
    if ann is type(None):
        return value is None
    if ann is bool:
        return isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if ann is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if ann is str:
        return isinstance(value, str)
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin is typing.Union or (origin is not None and getattr(origin, "__name__", "") == "UnionType"):
        results = [fits(value, a) for a in args]
        if any(r is True for r in results):
            return True
        return False if all(r is False for r in results) else None
    if origin is typing.Literal:
        return value in args
    if origin in (tuple, list):
        if not isinstance(value, tuple | list):
            return False
        if not args:
            return True
        if args[-1] is Ellipsis:
            results = [fits(v, args[0]) for v in value]
        elif len(args) != len(value):
            return False
        else:
            results = [fits(v, a) for v, a in zip(value, args)]
        if all(r is True for r in results):
            return True
        return False if any(r is False for r in results) else None
    return None


def to_torch_value(value: Any) -> Any:
    """YAML lists become tuples, as PyTorch's own size arguments are."""
    if isinstance(value, list):
        return tuple(to_torch_value(v) for v in value)
    return value


def bind(cls: type, args: Any) -> tuple[dict[str, Any], list[tuple[tuple, str]]]:
    """Map a config's args (None, scalar, list or mapping) onto the constructor.

    Returns the keyword arguments and a list of (sub-path, message) problems.
    """

    params = params_of(cls)
    names = [p.name for p in params]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    problems: list[tuple[tuple, str]] = []
    kwargs: dict[str, Any] = {}
    if args is None:
        pass
    elif isinstance(args, dict):
        for key, value in args.items():
            if key not in names:
                hint = suggest(str(key), names) or (f" ({cls.__name__} takes: {', '.join(names)})" if names else
                                                    f" ({cls.__name__} takes no arguments)")
                problems.append(((key,), f"unknown argument {key!r} for {cls.__name__}{hint}"))
                continue
            kwargs[key] = value
    elif isinstance(args, list) and not (len(positional) == 1 and len(params) == 1):
        if len(args) > len(positional):
            problems.append(((), f"{cls.__name__} takes at most {len(positional)} positional arguments "
                                 f"({', '.join(p.name for p in positional)}), got {len(args)}"))
        for p, value in zip(positional, args):
            kwargs[p.name] = value
    else:  # a scalar, or a list for a layer that takes one argument only
        if not positional:
            problems.append(((), f"{cls.__name__} takes no positional arguments; "
                                 f"write a mapping of {', '.join(names) or 'nothing'}"))
        else:
            kwargs[positional[0].name] = args
    hints = _hints(cls)
    for key, value in list(kwargs.items()):
        sub = (key,) if isinstance(args, dict) else ((list(kwargs).index(key),) if isinstance(args, list) and
                                                      not (len(positional) == 1 and len(params) == 1) else ())
        if isinstance(value, dict):
            problems.append((sub, f"{cls.__name__}.{key}: a mapping is not a valid argument value"))
            continue
        value = to_torch_value(value)
        kwargs[key] = value
        ann = hints.get(key, inspect.Parameter.empty)
        if fits(value, ann) is False:
            problems.append((sub, f"{cls.__name__}.{key} expects {annotation_text(ann)}, got {value!r}"))
    return kwargs, problems


def expected_size(name: str, in_shape: tuple[int, ...]) -> tuple[int, str] | None:
    """What an inferable size argument must be for an input of this shape."""
    if not in_shape:
        return None
    if name == "in_features":
        return in_shape[-1], f"the input's last dimension is {in_shape[-1]}"
    if name in ("in_channels", "num_features"):
        return in_shape[0], f"the input has {in_shape[0]} channels"
    return None


def missing_required(cls: type, kwargs: dict) -> list[str]:
    return [p.name for p in params_of(cls) if p.default is inspect.Parameter.empty and p.name not in kwargs]


def describe(cls: type) -> dict:
    """A layer's arguments as `nnctl layers` shows them."""
    hints = _hints(cls)
    args = []
    for p in params_of(cls):
        args.append({
            "name": p.name,
            "type": annotation_text(hints.get(p.name, p.annotation)),
            "default": None if p.default is inspect.Parameter.empty else repr(p.default),
            "required": p.default is inspect.Parameter.empty,
            "inferred": p.name in INFERRED,
        })
    doc = (inspect.getdoc(cls) or "").strip().splitlines()
    return {"name": cls.__name__, "summary": doc[0] if doc else "", "arguments": args}


def meta_input(shape: tuple[int, ...], batch: int = 2) -> torch.Tensor:
    return torch.empty((batch, *shape), device="meta")
