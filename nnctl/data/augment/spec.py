"""data.augment entries: names, arguments and their checks (torchvision's signatures), descriptions."""

from __future__ import annotations

import inspect
import math
import re
from typing import Any

from nnctl.config.schema import suggest

SEED_SALT = 0xA06

# name -> the arguments nnctl's batch version implements (a subset of torchvision's signature)
SUPPORTED: dict[str, tuple[str, ...]] = {
    "RandomCrop": ("size", "padding", "pad_if_needed", "fill", "padding_mode"),
    "RandomHorizontalFlip": ("p",),
    "RandomVerticalFlip": ("p",),
    "RandomResizedCrop": ("size", "scale", "ratio", "interpolation"),
    "RandomRotation": ("degrees", "interpolation", "center", "fill"),
    "RandomAffine": ("degrees", "translate", "scale", "shear", "interpolation", "fill", "center"),
    "ColorJitter": ("brightness", "contrast", "saturation", "hue"),
    "RandomErasing": ("p", "scale", "ratio", "value"),
    "RandomGrayscale": ("p",),
}
# why an argument torchvision has is not taken
_REFUSED = {
    "antialias": "nnctl's batch RandomResizedCrop interpolates without antialiasing (see nnctl.augment)",
    "expand": "expand changes the image's size; augmentation must keep the sample shape (model.input_shape)",
    "inplace": "nnctl's batch RandomErasing never works in place; remove inplace",
}
_INTERPOLATIONS = ("nearest", "bilinear")


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _tv(name: str) -> type:
    import torchvision.transforms.v2 as T

    return getattr(T, name)


def _signature(name: str) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(_tv(name)).parameters)


def _fmt(v: Any) -> str:
    if isinstance(v, tuple | list):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    return repr(v)


# --- checking the spec --------------------------------------------------------------------

def _entry(value: Any) -> tuple[str, dict] | None:
    """``Name`` or ``{Name: {args}}`` / ``{Name: null}``; None when malformed (the config reports it)."""
    if isinstance(value, str):
        return value, {}
    if isinstance(value, dict) and len(value) == 1:
        (name, args), = value.items()
        if isinstance(name, str) and (args is None or isinstance(args, dict)):
            return name, dict(args or {})
    return None


def _suggest(name: str) -> str:
    """'; did you mean X?': a supported name that holds the word's letters in order (RandomFlip ->
    RandomHorizontalFlip), else the closest by spelling."""

    def within(word: str, full: str) -> bool:
        letters = iter(full.lower())
        return all(ch in letters for ch in word.lower())

    hits = [n for n in SUPPORTED if len(name) >= 4 and within(name, n)]
    return f"; did you mean {hits[0]!r}?" if hits else suggest(name, list(SUPPORTED))


def _own_checks(name: str, kwargs: dict) -> list[tuple[tuple, str]]:
    """Ranges torchvision's constructors leave to the first call (or never check)."""
    out = []
    for key in ("size", "padding"):
        if key not in kwargs:
            continue
        v = kwargs[key]
        flat = v if isinstance(v, tuple) else (v,)
        least = 1 if key == "size" else 0
        if not all(isinstance(x, int) and not isinstance(x, bool) and least <= x for x in flat):
            out.append(((key,), f"{name}.{key} must be {'a positive' if key == 'size' else 'a non-negative'} "
                                f"integer or a list of them, got {_fmt(v)}"))
        elif max(flat, default=0) > _MAX_PIXELS:  # the sample's own bound is checked with its shape
            out.append(((key,), f"{name}.{key} {max(flat)} is out of range: at most {_MAX_PIXELS}"))
    for key in ("scale", "ratio"):
        if key not in kwargs or kwargs[key] is None or (name, key) not in _RANGES:
            continue
        v = kwargs[key]
        least, what = _RANGES[name, key]
        if not (isinstance(v, tuple) and len(v) == 2):
            out.append(((key,), f"{name}.{key} must be [min, max] ({what}), got {_fmt(v)}"))
        elif not all(math.isfinite(x) and (x > 0 if least == ">0" else x >= 0) for x in v):
            out.append(((key,), f"{name}.{key} values must be {'positive' if least == '>0' else 'non-negative'} "
                                f"and finite ({what}), got {_fmt(v)}"))
        elif v[0] > v[1]:
            out.append(((key,), f"{name}.{key} must be [min, max] with min <= max, got {_fmt(v)}"))
    return out


_MAX_PIXELS = 1 << 16  # a sanity bound on size and padding where the sample's shape is not known
# (transform, argument) -> (lower bound, what the range means) for the [min, max] ranges checked here
_RANGES = {
    ("RandomResizedCrop", "scale"): (">=0", "the crop's share of the image area"),
    ("RandomResizedCrop", "ratio"): (">0", "the crop's width / height"),
    ("RandomErasing", "scale"): (">=0", "the box's share of the image area"),
    ("RandomErasing", "ratio"): (">0", "the box's width / height"),
    ("RandomAffine", "scale"): (">0", "the scaling factor"),
}


def _parse_one(name: str, args: dict, shape: tuple[int, ...] | None) -> tuple[Any, list[tuple[tuple, str]]]:
    """One entry -> (the torchvision transform built from its args, or None; [(sub-path, message)])."""

    if name not in SUPPORTED:
        import torchvision.transforms.v2 as T

        known = ", ".join(SUPPORTED)
        if isinstance(getattr(T, name, None), type):
            return None, [((), f"torchvision's {name} is not one of the augmentations nnctl applies to batches "
                               f"(supported: {known})")]
        return None, [((), f"unknown augmentation {name!r}{_suggest(name)} (supported: {known})")]
    params = _signature(name)
    allowed = SUPPORTED[name]
    problems: list[tuple[tuple, str]] = []
    kwargs: dict[str, Any] = {}
    for key, value in args.items():
        if key not in params:
            hint = suggest(str(key), list(allowed)) or f" ({name} takes: {', '.join(allowed)})"
            problems.append(((key,), f"unknown argument {key!r} for {name}{hint}"))
            continue
        if key not in allowed:
            problems.append(((key,), f"{name}.{key} is not supported: "
                                     f"{_REFUSED.get(key, 'not implemented by nnctl')}"))
            continue
        if value is None and params[key].default is None:  # null: torchvision's own default (no translate, ...)
            kwargs[key] = None
            continue
        flat = value if isinstance(value, list) else [value]
        if isinstance(value, dict) or any(isinstance(v, list | dict) for v in flat):
            problems.append(((key,), f"{name}.{key}: {value!r} is not a valid value (a number, a list of numbers"
                                     f"{' or a string' if key in ('padding_mode', 'interpolation', 'value') else ''})"))
            continue
        if any(isinstance(v, float) and not math.isfinite(v) for v in flat):
            problems.append(((key,), f"{name}.{key} must be finite, got {value!r}"))
            continue
        if key == "interpolation":
            if not isinstance(value, str) or value.lower() not in _INTERPOLATIONS:
                problems.append(((key,), f"{name}.interpolation must be nearest or bilinear, got {value!r}"))
                continue
            value = value.lower()
        elif key == "padding_mode":
            if value not in ("constant", "reflect", "edge"):
                problems.append(((key,), f"RandomCrop.padding_mode must be constant, reflect or edge, got {value!r}"
                                         + ("; symmetric is not supported" if value == "symmetric" else "")))
                continue
        elif key == "value" and isinstance(value, str):
            if value != "random":
                problems.append(((key,), f"RandomErasing.value must be a number, a list (one a channel) or "
                                         f"random, got {value!r}"))
                continue
        elif key in ("pad_if_needed",):
            if not isinstance(value, bool):
                problems.append(((key,), f"{name}.{key} must be true or false, got {value!r}"))
                continue
        elif not all(_number(v) for v in flat):
            problems.append(((key,), f"{name}.{key} must be a number or a list of numbers, got {value!r}"))
            continue
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    for pname, p in params.items():
        if p.default is inspect.Parameter.empty and pname not in args:
            problems.append(((), f"{name} needs {pname}"))
    problems += _own_checks(name, kwargs)
    if problems:
        return None, problems
    try:
        tv = _tv(name)(**kwargs)
    except (TypeError, ValueError) as exc:
        text = " ".join(str(exc).split())
        named = [k for k in kwargs if re.search(rf"\b{re.escape(k)}\b", text)]
        return None, [((named[0],) if len(named) == 1 else (), f"{name}: {text}")]
    problems += _shape_problems(name, tv, kwargs, shape)
    return (tv if not problems else None), problems


def _shape_problems(name: str, tv: Any, kwargs: dict, shape: tuple[int, ...] | None) -> list[tuple[tuple, str]]:
    if shape is None or len(shape) != 3:
        return []
    c, h, w = shape
    out = []
    if name in ("RandomCrop", "RandomResizedCrop") and tuple(tv.size) != (h, w):
        out.append((("size",), f"{name} gives {tv.size[0]}x{tv.size[1]} images but the samples are {h}x{w} "
                               f"(model.input_shape {list(shape)}): augmentation must keep the sample shape, since "
                               f"validation is not augmented; set size: {h if h == w else [h, w]}"
                               + (" and padding to crop at shifted positions" if name == "RandomCrop" else "")))
    if name == "RandomCrop" and tv.padding is not None and max(tv.padding) > max(h, w):
        out.append((("padding",), f"RandomCrop.padding {max(tv.padding)} is larger than the image ({h}x{w}); "
                                  f"at most {max(h, w)} (each padding value at most the sample's larger side)"))
    elif name == "RandomCrop" and tv.padding_mode == "reflect" and tv.padding is not None:
        left, right, top, bottom = tv.padding
        if max(left, right) >= w or max(top, bottom) >= h:
            out.append((("padding",), f"reflect padding must be smaller than the image ({h}x{w})"))
    for key in ("fill", "value"):
        v = kwargs.get(key)
        if isinstance(v, tuple) and len(v) not in (1, c):
            out.append(((key,), f"{name}.{key} has {len(v)} values; the images have {c} channels: give 1 or {c}"))
    return out


def problems(spec: list, input_shape: tuple[int, ...] | list[int] | None) -> list[tuple[tuple, str]]:
    """Every problem of a ``data.augment`` list, as (path under data.augment, message) pairs.

    Malformed entries (neither a name nor a one-key mapping) are left to the config's structural check.
    """
    shape = tuple(int(v) for v in input_shape) if input_shape else None
    out: list[tuple[tuple, str]] = []
    for i, value in enumerate(spec or []):
        parsed = _entry(value)
        if parsed is None:
            continue
        name, args = parsed
        _, found = _parse_one(name, args, shape)
        base = (i, name) if isinstance(value, dict) else (i,)
        out += [(base + sub, msg) for sub, msg in found]
    return out


def check(doc) -> list:
    """Problems (nnctl.errors.Problem, located at their YAML lines) of the document's ``data.augment``."""
    data = doc.data if isinstance(doc.data, dict) else {}
    section = data.get("data")
    if not isinstance(section, dict) or not isinstance(section.get("augment"), list):
        return []
    model = data.get("model")
    shape = model.get("input_shape") if isinstance(model, dict) else None
    if not (isinstance(shape, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in shape)):
        shape = None
    return [doc.problem(("data", "augment") + sub, msg) for sub, msg in problems(section["augment"], shape)]


def describe(spec: list) -> str:
    """The pipeline in one line, without torchvision (for summaries): ``RandomCrop(size=32, padding=4), ...``."""
    parts = []
    for value in spec or []:
        parsed = _entry(value)
        if parsed is None:
            continue
        name, args = parsed
        parts.append(f"{name}({', '.join(f'{k}={_fmt(v)}' for k, v in args.items())})")
    return ", ".join(parts)
