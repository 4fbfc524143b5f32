"""torchvision models as a model source: builders, weights from the local hub cache, their preprocessing."""

from __future__ import annotations

import inspect
import os
import re
import typing
import warnings
from typing import Any
from urllib.parse import urlparse
import torch
from torch import nn
from nnctl.model import registry as L
from nnctl.config.schema import Config, ModelSection
from nnctl.config.schema import suggest
from nnctl.errors import ConfigError
from nnctl.config.yamlio import Document
from nnctl.model.nodes import MAX_PARAMS, Node, Plan, _kw, _short, instantiate


def pretrained_preprocessing(cfg: Config) -> dict | None:
    """A torchvision source's pretrained weights' own preprocessing (mean, std, crop size, categories), or None."""
    model = cfg.model
    if getattr(model, "torchvision", None) is None or getattr(model, "weights", None) is None:
        return None
    member, _ = resolve_weights(model.torchvision, model.weights)
    return weights_preprocessing(member) if member is not None else None


# --- torchvision models as a model source ------------------------------------------------
#
# model: {torchvision: resnet18, weights: IMAGENET1K_V1, args: {...}, replace: {fc: {Linear: ...}}}
# Only names in torchvision.models.list_models() (classification: one tensor out), arguments
# checked against the builder's signature (and its model class's), weights from torchvision's
# own registry, read from the local torch hub cache with torch.load(weights_only=True): no
# download, no code from the config or from the weights file.

TV_PATH = ("model", "torchvision")


def _tv():
    import torchvision.models as TVM  # lazy: configs without a torchvision model never import torchvision

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


# --- pretrained weights: torchvision's builder with weights=None, the file read by nnctl -----------
#
# torchvision's builders, given weights, complete their own keyword arguments, read the file with
# torch.hub.load_state_dict_from_url(..., weights_only=False) (a pickle may run code) and download it
# when it is missing. nnctl calls the builder with weights=None and the same completed arguments (so the
# model, and the random numbers its construction draws, are those of builder(weights=...)), refuses a
# missing file, reads the cached one through the public torch.hub.load_state_dict_from_url with
# weights_only=True, and loads it strictly. What each builder family does itself when given weights
# (torchvision/models/<family>.py, its _ovewrite_named_param calls and the lines around load_state_dict):
#   every family: num_classes = the weights' category count (the planner refuses another value)
#   googlenet, inception: transform_input (unless given), aux_logits and init_weights False while loading,
#     then the auxiliary heads are dropped unless the config asked for them (googlenet's default: no,
#     inception_v3's: yes). torchvision refuses aux_logits: false with weights; nnctl drops them instead.
#   vgg: init_weights False; vision_transformer: image_size, maxvit: input_size = the weights' min_size
#   densenet: old checkpoint keys (denselayer1.norm.1) renamed (denselayer1.norm1)

_AUX_HEADS = {"googlenet": (False, ("aux1", "aux2")), "inception": (True, ("AuxLogits",))}
_DENSENET_OLD_KEY = re.compile(  # torchvision/models/densenet.py's _load_state_dict
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _family(builder) -> str:
    """The torchvision module that defines a builder: resnet, googlenet, vision_transformer, ..."""
    return builder.__module__.rpartition(".")[2]


def pretrained_args(builder, weights, kwargs: dict) -> tuple[dict, tuple[str, str] | None]:
    """The builder's keyword arguments as torchvision's builder completes them for these weights.

    Returns (arguments, None), or (arguments, (argument, why)) when the config gives an argument the weights
    cannot take (torchvision's builder would raise).
    """
    family, out = _family(builder), dict(kwargs)
    cats = weights.meta.get("categories")
    if cats:
        out["num_classes"] = len(cats)
    if family in _AUX_HEADS:
        out.setdefault("transform_input", True)
        out["aux_logits"], out["init_weights"] = True, False
    elif family == "vgg":
        out["init_weights"] = False
    sizes = {"vision_transformer": "image_size", "maxvit": "input_size"}
    if family in sizes:
        key, size = sizes[family], weights.meta["min_size"]
        size = size[0] if key == "image_size" else tuple(size)
        given = kwargs.get(key, size)
        if (tuple(given) if isinstance(given, list) else given) != size:
            shown = list(size) if isinstance(size, tuple) else size
            why = f"the {type(weights).__name__}.{weights.name} weights need {key} {shown}, not {given!r}: leave {key} out"
            return out, (key, why)
        out[key] = size
    return out, None


def construct(builder, weights, kwargs: dict, state: dict | None = None) -> nn.Module:
    """The model of ``builder(weights=weights, **kwargs)`` without torchvision reading the weights.

    ``kwargs``: the config's arguments (``pretrained_args`` completes them when ``weights`` is given);
    ``state``: the weights' state dict, loaded strictly (None: the architecture only, e.g. on the meta device).
    """
    if weights is None:
        return builder(weights=None, **kwargs)
    args, _ = pretrained_args(builder, weights, kwargs)
    net = builder(weights=None, **args)
    family = _family(builder)
    if state is not None:
        if family == "densenet":
            state = {(m.group(1) + m.group(2) if (m := _DENSENET_OLD_KEY.match(k)) else k): v
                     for k, v in state.items()}
        net.load_state_dict(state)
    if family in _AUX_HEADS:
        default, heads = _AUX_HEADS[family]
        if not kwargs.get("aux_logits", default):
            net.aux_logits = False
            for head in heads:
                setattr(net, head, None)
    return net


def load_cached(weights) -> dict:
    """The weights' state dict from the local torch hub cache (weights_only); FileNotFoundError when missing.

    ``torch.hub.load_state_dict_from_url`` reads the cached file and downloads only a missing one, so the file
    is checked first: nnctl never downloads.
    """
    path = weights_file(weights)
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    return torch.hub.load_state_dict_from_url(weights.url, map_location="cpu", progress=False, check_hash=True,
                                              weights_only=True)


def _builder_args(model_name: str) -> tuple[Any, list[str], dict]:
    """The builder, the keyword arguments a config may give it, and their annotations."""
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


def plan_torchvision(model: ModelSection, planner: Any, shape: tuple) -> tuple[Node, dict]:
    """Plan a torchvision model on the meta device: name, arguments, weights, replacements, shapes."""

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
        _, conflict = pretrained_args(builder, weights, kwargs)
        if conflict:
            fail(("model", "args", conflict[0]), conflict[1])
            return root, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                net = construct(builder, weights, kwargs)  # the architecture build_torchvision makes
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
             "preprocessing": None if weights is None else weights_preprocessing(weights),
             "meta_model": net}  # the planned model on the meta device (names for freeze checks)
    return root, extra


def weights_problems(p, doc: Document) -> list:
    """``nnctl check``'s share of what ``train`` and ``freeze`` refuse when they build the model: pretrained
    weights the plan names that are not in the local hub cache (the file is looked for, not read)."""
    extra = getattr(p, "torchvision", None) or {}
    path = extra.get("weights_file")
    if not path or os.path.isfile(path):
        return []
    model = doc.data.get("model") if isinstance(doc.data, dict) else None
    name = model.get("torchvision") if isinstance(model, dict) else None
    weights = resolve_weights(name, model.get("weights"))[0] if name else None
    return [doc.problem(("model", "weights"), offline_weights_message(weights))] if weights is not None else []


def offline_weights_message(weights) -> str:
    path = weights_file(weights)
    return (f"the weights {type(weights).__name__}.{weights.name} are not in the local torch hub cache: nnctl "
            f"never downloads; put the file {os.path.basename(path)} (from {weights.url}) in the folder "
            f"{os.path.dirname(path)} (torch.hub.get_dir()/checkpoints; set TORCH_HOME to use another), "
            "or write weights: null for random init")


def build_torchvision(model: ModelSection, p: Plan, doc: Document, pretrained: bool = True) -> nn.Module:
    """The real torchvision model of a plan: torchvision's builder, the cached weights, the replacements.

    ``pretrained=False`` builds the same architecture without reading the weights (a checkpoint's replace them).
    """
    name = model.torchvision
    builder, _, _ = _builder_args(name)
    kwargs = {k: L.to_torch_value(v) if isinstance(v, list) and k != "replace_stride_with_dilation" else v
              for k, v in model.args.items()}
    weights = resolve_weights(name, model.weights)[0] if model.weights is not None else None
    state = None
    if weights is not None and pretrained:
        try:
            state = load_cached(weights)
        except FileNotFoundError:
            raise ConfigError([doc.problem(("model", "weights"), offline_weights_message(weights))]) from None
        except Exception as exc:  # noqa: BLE001 - a file that is no state dict (or not weights_only)
            raise ConfigError([doc.problem(("model", "weights"), f"{weights_file(weights)} does not hold the "
                                                                 f"weights of {name}: {_short(exc)}")]) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            net = construct(builder, weights, kwargs, state)
        except Exception as exc:  # keys or shapes that are not this model's
            if state is None:
                raise
            raise ConfigError([doc.problem(("model", "weights"), f"{weights_file(weights)} does not hold the "
                                                                 f"weights of {name}: {_short(exc)}")]) from None
    for dotted, node in (p.torchvision.get("replace_nodes") or {}).items():
        parent, _, last = dotted.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, last, instantiate(node))
    return net
