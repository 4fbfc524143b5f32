"""Loading a config: a file or text into a Document, --set overrides, relative paths resolved."""

from __future__ import annotations

import copy
import re
from typing import Any
from nnctl.errors import ConfigError, Problem
from nnctl.config.yamlio import Document, format_path, load_file, load_text, scalar_value
from nnctl.config.schema import Config
from nnctl.config.structure import validate
import os


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A resolved config as dotted keys (list items as key[i]), the way --set names them."""
    out: dict[str, Any] = {}
    if isinstance(value, dict):
        if not value and prefix:
            out[prefix] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
        if not value:
            out[prefix] = []
    else:
        out[prefix] = value
    return out


# --- paths: relative to the config file's folder --------------------------------------

# every path-valued key of the config
PATH_KEYS: tuple[tuple[str, ...], ...] = (("data", "root"), ("data", "path"), ("data", "val_root"), ("data", "test_root"))


def _resolve_path(value: Any, base: str) -> Any:

    if not isinstance(value, str) or not value.strip():
        return value  # not a path: validation reports it
    value = os.path.expanduser(value)
    return os.path.normpath(os.path.join(base, value)) if not os.path.isabs(value) else value


def resolve_paths(doc: Document, base: str, only_overridden: bool = False) -> None:
    """Make the path-valued keys absolute: relative ones against ``base``, ``~`` expanded.

    A config file's paths resolve against the file's folder; ``--set`` values against the
    current directory (``only_overridden=True`` with base = the current directory).
    """
    data = doc.data
    for keys in PATH_KEYS:
        if only_overridden != any(keys[:i] in doc.overridden for i in range(1, len(keys) + 1)):
            continue
        cur = data
        for k in keys[:-1]:
            cur = cur.get(k) if isinstance(cur, dict) else None
        if isinstance(cur, dict) and keys[-1] in cur:
            cur[keys[-1]] = _resolve_path(cur[keys[-1]], base)
    # a search's choices for those keys are paths of the same file: resolved as the key itself would be
    tune = data.get("tune") if isinstance(data, dict) else None
    params = tune.get("params") if isinstance(tune, dict) else None
    if not isinstance(params, dict):
        return
    for keys in PATH_KEYS:
        name = ".".join(keys)
        spec = params.get(name)
        from_set = any(p in doc.overridden for p in (("tune",), ("tune", "params"), ("tune", "params", name)))
        if only_overridden == from_set and isinstance(spec, dict) and isinstance(spec.get("choice"), list):
            spec["choice"] = [_resolve_path(v, base) for v in spec["choice"]]


# --- overrides: --set train.optimizer.Adam.lr=0.01 ---------------------------------

def _split_key(key: str) -> list[str | int]:

    parts: list[str | int] = []
    for token in re.findall(r"[^.\[\]]+|\[\d+\]", key):
        if token.startswith("["):
            parts.append(int(token[1:-1]))
        elif token.isdigit():
            parts.append(int(token))
        else:
            parts.append(token)
    return parts


def apply_overrides(doc: Document, overrides: list[str]) -> None:
    """Apply `key.path=value` overrides in place; values are parsed as YAML."""
    problems = []
    for item in overrides:
        # an option may hold newlines or control characters; the location stays one line
        where = "--set " + re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], item)
        if "=" not in item:
            problems.append(Problem("expected key.path=value, e.g. train.optimizer.Adam.lr=0.01", "", where))
            continue
        key, raw = item.split("=", 1)
        parts = _split_key(key.strip())
        if not parts:
            problems.append(Problem("empty key", "", where))
            continue
        try:
            value = load_text(raw, where).data if raw.strip() else None
        except ConfigError:
            value = scalar_value(raw)
        if doc.data is None:
            doc.data = {}
        cur = doc.data
        ok = True
        for i, part in enumerate(parts[:-1]):
            nxt = parts[i + 1]
            if isinstance(cur, dict):
                if part not in cur or cur[part] is None:
                    cur[part] = [] if isinstance(nxt, int) else {}
                cur = cur[part]
            elif isinstance(cur, list) and isinstance(part, int) and part < len(cur):
                cur = cur[part]
            else:
                problems.append(Problem(f"cannot set {format_path(tuple(parts[:i + 1]))}: "
                                        f"the config has no such place", "", where))
                ok = False
                break
        if not ok:
            continue
        last = parts[-1]
        if isinstance(cur, dict):
            cur[last] = value
        elif isinstance(cur, list) and isinstance(last, int) and last < len(cur):
            cur[last] = value
        else:
            problems.append(Problem(f"cannot set {key}: the config has no such place", "", where))
            continue
        # locate anything under the override at the override itself
        doc.marks = {p: m for p, m in doc.marks.items() if p[: len(parts)] != tuple(parts)}
        doc.overridden[tuple(parts)] = where
    if problems:
        raise ConfigError(problems)


def load(source: str, overrides: list[str] | None = None) -> tuple[Config, Document]:
    """Load, override and validate a config file. Raises ConfigError."""
    doc = load_document(source, overrides)
    return validate(doc), doc


def load_document(source: str, overrides: list[str] | None = None) -> Document:
    """Read a config file and apply overrides, with its paths resolved; not yet validated.

    Paths in the file resolve against the file's folder; paths given with ``--set``
    against the current directory.
    """

    doc = load_file(source)
    resolve_paths(doc, os.path.dirname(os.path.abspath(source)))
    if overrides:
        apply_overrides(doc, overrides)
        resolve_paths(doc, os.getcwd(), only_overridden=True)
    return doc


def from_dict(data: dict, file: str = "<checkpoint>") -> tuple[Config, Document]:
    """Validate a config carried inside a checkpoint."""
    doc = Document(copy.deepcopy(data), file)
    return validate(doc), doc
