"""Read YAML safely, keeping the line and column of every value.

What this guards against (configs may come from strangers):
- tags outside the core schema (``!!python/object``, ``!!binary``, ...) are refused,
  so no constructor beyond plain scalars, lists and mappings ever runs;
- duplicate keys are errors, not a silent "last one wins";
- alias bombs (billion laughs) and self-referential aliases are refused while
  walking the composed node graph, before any Python object is built;
- huge files, deep nesting, multiple documents and non-UTF-8 bytes are refused
  with a located message.

Scalars follow the YAML 1.2 core schema rather than PyYAML's YAML 1.1 one:
``1e-3`` is a float, ``no`` / ``on`` / ``yes`` / ``off`` are strings (a typed
field then rejects them with a hint), ``0755`` is the integer 755 and
``12:30`` is the string "12:30" (never the sexagesimal 750), dates stay strings.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any
import yaml
from nnctl.errors import ConfigError, Problem
from nnctl.errors import UsageError
from nnctl.files import read_input

MAX_BYTES = 1 << 20  # a config is text a person writes; 1 MiB is far beyond that
MAX_NODES = 100_000  # after alias expansion
MAX_DEPTH = 64

Path = tuple  # of str | int


def format_path(path: Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


@dataclass
class Document:
    """Plain Python data plus where each value came from."""

    data: Any
    file: str
    marks: dict[Path, tuple[int, int]] = field(default_factory=dict)  # 1-based line, column
    overridden: dict[Path, str] = field(default_factory=dict)  # path -> "--set key=value"

    def locate(self, path: Path) -> tuple[int | None, int | None]:
        p = tuple(path)
        while True:
            if p in self.marks:
                return self.marks[p]
            if not p:
                return (None, None)
            p = p[:-1]

    def problem(self, path: Path, message: str) -> Problem:
        path = tuple(path)
        for i in range(len(path), 0, -1):
            if path[:i] in self.overridden:
                return Problem(message, format_path(path), self.overridden[path[:i]])
        line, col = self.locate(path)
        return Problem(message, format_path(path), self.file, line, col)


# --- YAML 1.2 core schema scalars -------------------------------------------------

_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT10 = re.compile(r"^[-+]?[0-9]+$")
_INT8 = re.compile(r"^0o[0-7]+$")
_INT16 = re.compile(r"^0x[0-9a-fA-F]+$")
_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$")
_INF = re.compile(r"^[-+]?\.(?:inf|Inf|INF)$")
_NAN = re.compile(r"^\.(?:nan|NaN|NAN)$")

_CORE_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:seq",
    "tag:yaml.org,2002:map",
}
_PLAIN_TAG = "!plain"  # what our resolver gives untagged plain scalars


def scalar_value(text: str) -> Any:
    """The value of an untagged plain scalar under the YAML 1.2 core schema."""
    if _NULL.match(text):
        return None
    if _BOOL.match(text):
        return text.lower() == "true"
    if _INT10.match(text):
        return int(text)
    if _INT8.match(text):
        return int(text[2:], 8)
    if _INT16.match(text):
        return int(text[2:], 16)
    if _FLOAT.match(text):
        return float(text)
    if _INF.match(text):
        return -math.inf if text.startswith("-") else math.inf
    if _NAN.match(text):
        return math.nan
    return text


class _Resolver(yaml.resolver.BaseResolver):
    """Resolve nothing implicitly: plain scalars get one tag, valued by scalar_value."""


_Resolver.add_implicit_resolver(_PLAIN_TAG, re.compile(r"^.*$", re.S), None)


class _Loader(
    yaml.reader.Reader,
    yaml.scanner.Scanner,
    yaml.parser.Parser,
    yaml.composer.Composer,
    _Resolver,
):
    def __init__(self, stream: str):
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        _Resolver.__init__(self)


def _mark(node: yaml.Node) -> tuple[int, int]:
    return (node.start_mark.line + 1, node.start_mark.column + 1)


class _Walker:
    """Turn a composed node graph into plain data, refusing anything unsafe."""

    def __init__(self, doc: Document):
        self.doc = doc
        self.count = 0
        self.active: set[int] = set()
        self.problems: list[Problem] = []

    def fail(self, node: yaml.Node, path: Path, message: str) -> None:
        line, col = _mark(node)
        self.problems.append(Problem(message, format_path(path), self.doc.file, line, col))

    def walk(self, node: yaml.Node, path: Path, depth: int = 0) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise _Abort(node, path, f"the document expands to more than {MAX_NODES:,} values "
                         "(an alias bomb?); refused before building it")
        if depth > MAX_DEPTH:
            raise _Abort(node, path, f"nesting deeper than {MAX_DEPTH} levels is refused")
        if id(node) in self.active:
            raise _Abort(node, path, "a self-referential alias (an anchor used inside itself) is refused")
        self.doc.marks.setdefault(path, _mark(node))
        if isinstance(node, yaml.ScalarNode):
            if node.tag == _PLAIN_TAG:
                return scalar_value(node.value)
            if node.tag not in _CORE_TAGS:
                self.fail(node, path, f"the YAML tag {node.tag!r} is not allowed: a config holds "
                          "only plain values, lists and mappings, never code or objects")
                return None
            return self._tagged_scalar(node, path)
        if node.tag not in _CORE_TAGS:
            self.fail(node, path, f"the YAML tag {node.tag!r} is not allowed: a config holds "
                      "only plain values, lists and mappings, never code or objects")
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                if node.tag != "tag:yaml.org,2002:seq":
                    self.fail(node, path, f"tag {node.tag!r} cannot mark a list")
                return [self.walk(child, path + (i,), depth + 1) for i, child in enumerate(node.value)]
            if node.tag != "tag:yaml.org,2002:map":
                self.fail(node, path, f"tag {node.tag!r} cannot mark a mapping")
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    self.fail(key_node, path, "a mapping key must be a plain name, not a list or mapping")
                    continue
                if key_node.tag == "tag:yaml.org,2002:merge" or (key_node.tag == _PLAIN_TAG and key_node.value == "<<"):
                    self.fail(key_node, path, "merge keys ('<<') are not supported: write the keys out")
                    continue
                key = self.walk(key_node, path + ("<key>",), depth + 1)
                if not isinstance(key, str | int) or isinstance(key, bool):
                    key = str(key) if key is not None else "null"
                if key in out:
                    self.fail(key_node, path + (key,), f"duplicate key {key!r} (first at line "
                              f"{self.doc.marks.get(path + (key,), ('?',))[0]})")
                    continue
                self.doc.marks[path + (key,)] = _mark(value_node)
                out[key] = self.walk(value_node, path + (key,), depth + 1)
            self.doc.marks.pop(path + ("<key>",), None)
            return out
        finally:
            self.active.discard(id(node))

    def _tagged_scalar(self, node: yaml.ScalarNode, path: Path) -> Any:
        text = node.value
        tag = node.tag.rsplit(":", 1)[-1]
        if tag == "str":
            return text
        value = scalar_value(text) if node.style is None else text
        want = {"int": int, "float": (int, float), "bool": bool, "null": type(None)}[tag]
        if tag == "float" and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, want) and not (tag == "int" and isinstance(value, bool)):
            return value
        self.fail(node, path, f"{text!r} is not a valid !!{tag}")
        return None


class _Abort(Exception):
    def __init__(self, node: yaml.Node, path: Path, message: str):
        super().__init__(message)
        self.node, self.path, self.message = node, path, message


_EMPTY = "the file is empty: expected a mapping with at least 'model' (and 'data' and 'train' to train)"


def _reader_problem(exc: "yaml.reader.ReaderError", text: str, file: str) -> Problem:
    """A located problem for a character YAML does not allow (control characters and the like)."""
    pos = exc.position if isinstance(exc.position, int) and 0 <= exc.position <= len(text) else None
    line = col = None
    if pos is not None:
        line = text.count("\n", 0, pos) + 1
        col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    char = exc.character
    what = f"U+{char:04X}" if isinstance(char, int) else repr(char)
    return Problem(f"the character {what} is not allowed in a YAML file (control characters are refused)",
                   "", file, line, col)


def _open_flow_mark(exc: "yaml.MarkedYAMLError", text: str):
    """The mark of the innermost '[' or '{' still open where the parser gave up, or None."""
    if (exc.context or "").startswith("while parsing a flow") and exc.context_mark is not None:
        return exc.context_mark
    # a scanner error: replay the tokens up to it, keeping the open flow collections
    stack = []
    try:
        scanner = _Loader(text)
    except yaml.YAMLError:
        return None
    try:
        while True:
            token = scanner.get_token()
            if token is None or isinstance(token, yaml.StreamEndToken):
                break
            if isinstance(token, yaml.FlowSequenceStartToken | yaml.FlowMappingStartToken):
                stack.append(token.start_mark)
            elif isinstance(token, yaml.FlowSequenceEndToken | yaml.FlowMappingEndToken) and stack:
                stack.pop()
    except (yaml.YAMLError, RecursionError):
        pass
    finally:
        scanner.dispose()
    return stack[-1] if stack else None


_BARE_ITEM = re.compile(r"^(\s*)-\s+([A-Za-z_][A-Za-z0-9_]*)\s*(#.*)?$")
_KEY_LINE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*:")


def _bare_item_before(text: str, line: int) -> tuple[int, int, str] | None:
    """(line, column, name) of a `- Name` list item just before 0-based `line`, if there is one."""
    lines = text.splitlines()
    for i in range(min(line, len(lines)) - 1, -1, -1):
        stripped = lines[i].strip()
        if not stripped or stripped.startswith("#"):
            continue
        m = _BARE_ITEM.match(lines[i])
        return (i + 1, m.start(2) + 1, m.group(2)) if m else None
    return None


def _syntax_problem(exc: "yaml.MarkedYAMLError", text: str, file: str) -> Problem:
    """A located YAML syntax error, blamed where the mistake is rather than where the parser gave up."""
    mark = exc.problem_mark or exc.context_mark
    message = exc.problem or exc.context or str(exc)
    if "expected a single document" in str(exc):
        message = "more than one YAML document ('---') in the file: a config is one document"
    line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
    where = f"line {line}, column {col}" if line else "the end"
    opened = _open_flow_mark(exc, text) if "expected a single document" not in str(exc) else None
    if opened is not None:
        index = opened.index if 0 <= opened.index < len(text) else None
        char = text[index] if index is not None and text[index] in "[{" else "["
        close, what = ("]", "list") if char == "[" else ("}", "mapping")
        return Problem(f"YAML syntax error: unclosed {char!r}: the flow {what} opened here has no matching "
                       f"{close!r} before the parser stopped at {where} ({message})", "", file,
                       opened.line + 1, opened.column + 1)
    # `- ResBlock` then an indented `repeat: 9`: the item is a bare name, so it cannot take keys
    if mark is not None and ("mapping values are not allowed" in message or "expected <block end>" in message):
        item = _bare_item_before(text, mark.line)
        lines = text.splitlines()
        key = _KEY_LINE.match(lines[mark.line]) if mark.line < len(lines) else None
        if item is not None and key is not None:
            iline, icol, name = item
            k = key.group(1)
            return Problem(f"YAML syntax error: `- {name}` is a bare name, so the `{k}:` under it cannot belong to "
                           f"it; to give a layer keys such as {k}, make it a mapping: write `- {name}:` (a colon, "
                           f"nothing after it) and put `{k}: ...` on the next line, lined up under `{name}` "
                           f"(the parser stopped at {where}: {message})", "", file, iline, icol)
    return Problem(f"YAML syntax error: {message}", "", file, line, col)


def load_text(text: str, file: str = "<config>") -> Document:
    """Parse one YAML document. Raises ConfigError with every problem found."""
    doc = Document(None, file)
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise ConfigError([Problem(f"the file is larger than {MAX_BYTES // 1024} KiB; refused", "", file, 1)])
    if not text.strip() or all(
        not line.strip() or line.lstrip().startswith("#") for line in text.splitlines()
    ):
        raise ConfigError([Problem(_EMPTY, "", file, 1, 1)])
    try:
        # the Reader checks for control characters as it is built: inside the try, so that
        # a stray byte such as \x08 is a located ConfigError, never a traceback
        loader = _Loader(text)
    except yaml.reader.ReaderError as exc:
        raise ConfigError([_reader_problem(exc, text, file)]) from None
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        raise ConfigError([_syntax_problem(exc, text, file)]) from None
    except yaml.reader.ReaderError as exc:  # control characters met while reading on
        raise ConfigError([_reader_problem(exc, text, file)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(f"YAML error: {exc}", "", file, None, None)]) from None
    except RecursionError:
        raise ConfigError([Problem(f"nesting deeper than {MAX_DEPTH} levels is refused", "", file)]) from None
    finally:
        loader.dispose()
    if node is None:
        raise ConfigError([Problem(_EMPTY, "", file, 1, 1)])
    walker = _Walker(doc)
    try:
        doc.data = walker.walk(node, ())
    except _Abort as abort:
        line, col = _mark(abort.node)
        raise ConfigError([Problem(abort.message, format_path(abort.path), file, line, col)]) from None
    except RecursionError:
        raise ConfigError([Problem(f"nesting deeper than {MAX_DEPTH} levels is refused", "", file)]) from None
    if walker.problems:
        raise ConfigError(walker.problems)
    return doc


def load_file(path: str) -> Document:
    """Read and parse a config file; every failure is a located ConfigError.

    The file is read with ``files.read_input``, which refuses a FIFO, a device or a socket
    without blocking on it.
    """

    try:
        raw = read_input(path, "file", limit=MAX_BYTES)
    except UsageError as exc:
        message = str(exc)
        prefix = f"{path}: "
        raise ConfigError([Problem(message[len(prefix):] if message.startswith(prefix) else message,
                                   "", path)]) from None
    if len(raw) > MAX_BYTES:
        raise ConfigError([Problem(f"the file is larger than {MAX_BYTES // 1024} KiB; refused", "", path, 1)])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError([Problem(f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})", "", path, line, col)]) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise ConfigError([Problem("the file holds NUL bytes: not a text config", "", path, line, None)])
    return load_text(text, path)
