"""Reading a ``POST /predict`` request: its query, its JSON tensors or its multipart image files, as the
inputs ``nnctl.predict`` takes (``nnctl.use.inputs`` groups, named as ``nnctl predict`` names them).

``json_inputs`` and ``form_inputs`` run in the app's thread pool, never on the event loop: the body is
in memory already (read whole by the app, bounded by ``--max-body``). Every input it cannot use is a
``Refused`` (status, one-line reason), never a raise of anything else.

JSON ``{"inputs": [...], "top_k": k, "dtype": "float32" | "uint8"}``: each input a tensor (nested lists
of numbers) of the recorded input shape, or a batch of them. The lists become one float64 array (numpy
reads nested lists of numbers about 3x faster than ``torch.tensor``), then the dtype's checks, then
``nnctl.use.inputs.tensor_group`` (the shape, NaN and infinity: what ``nnctl.predict`` checks). Text,
null and true/false are refused, not read as numbers, 1 and 0 (numpy would): the lists are walked for
true/false only when the body holds the word (a JSON value can only be one where the text has it).

Multipart: python-multipart's parser (the one Starlette uses) with the parts kept as bytes (no spooled
temporary file a part, as Starlette's form does); fields ``files`` or ``file`` (image files) and
``top_k``; images decoded by the one decoder (``nnctl.use.inputs.image_group``).
"""

from __future__ import annotations

import json
from urllib.parse import parse_qsl

import numpy as np
import torch
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from nnctl.use.inputs import _Group, image_group, tensor_group
from nnctl.use.predict import Predictor

JSON_FIELDS = ("inputs", "top_k", "dtype")
FORM_FIELDS = ("files", "file", "top_k")
MAX_FILES, MAX_FIELDS = 10_000, 100
_WORDS = (b"true", b"false")  # JSON booleans: looked for in the lists only where the text has one


class Refused(Exception):
    """An input the server cannot use: (status, one-line reason)."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def one_line(text, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


# --- the query ---------------------------------------------------------------------------------------

def query(raw: bytes) -> tuple[int | None, str]:
    """``?top_k=K&format=json|jsonl`` -> (top_k or None, format); other parameters are ignored."""
    top_k, fmt = None, "json"
    for key, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
        if key == "top_k":
            top_k = _top_k(value, "top_k: must be")
        elif key == "format":
            if value not in ("json", "jsonl"):
                raise Refused(422, f"format: must be json or jsonl, not {value[:40]!r}")
            fmt = value
    return top_k, fmt


def _top_k(value, prefix: str = "top_k must be") -> int | None:
    if value is None:
        return None
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise Refused(422, f"{prefix} a whole number, not {str(value)[:40]!r}") from None
    if isinstance(value, bool) or str(k) != str(value).strip() or k < 1:
        raise Refused(422, f"{prefix} a whole number of at least 1, not {str(value)[:40]!r}")
    return k


# --- JSON tensors --------------------------------------------------------------------------------------

def json_inputs(body: bytes, predictor: Predictor) -> tuple[list[_Group], int | None]:
    """A JSON body -> its inputs as groups (``tensor#k``, as ``nnctl.predict`` names tensors) and its top_k."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Refused(422, f"the body is not JSON ({one_line(exc, 120)})") from None
    if not isinstance(data, dict):
        raise Refused(422, 'the body must be a JSON object: {"inputs": [...], "top_k": k}')
    unknown = sorted(set(map(str, data)) - set(JSON_FIELDS))
    if unknown:
        raise Refused(422, f"unknown field {unknown[0]!r}: the body takes {', '.join(JSON_FIELDS)}")
    top_k = _top_k(data.get("top_k"))
    dtype = data.get("dtype", "float32")
    if dtype not in ("float32", "uint8"):
        raise Refused(422, f"dtype must be float32 (model-scale values) or uint8 (raw values), not {dtype!r}")
    inputs = data.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise Refused(422, '"inputs" must be a non-empty list of tensors (nested lists of numbers)')
    shape = list(predictor.pre.input_shape or [])
    words = any(w in body for w in _WORDS)
    return [_tensor(f"tensor#{k}", value, dtype, shape, words) for k, value in enumerate(inputs)], top_k


def _tensor(name: str, value, dtype: str, shape: list[int], words: bool) -> _Group:
    if not isinstance(value, list):
        raise Refused(422, f"{name}: a {type(value).__name__}, not a tensor (a nested list of numbers)")
    if words and any(isinstance(v, bool) for v in _leaves(value)):
        raise Refused(422, f"{name}: holds true/false values; give numbers")
    try:
        a = np.array(value)  # numbers: int64 or float64; text: a str array; null, objects, huge whole numbers: object
        if a.dtype.kind == "O":
            others = [v for v in _leaves(value) if not isinstance(v, (int, float))]
            if others:
                what = "null" if others[0] is None else f"a {type(others[0]).__name__}"
                raise Refused(422, f"{name}: not a tensor of numbers (it holds {what})")
            a = np.array(value, dtype=np.float64)
        elif a.dtype.kind not in "iuf":
            raise Refused(422, f"{name}: not a tensor of numbers (it holds {'text' if a.dtype.kind in 'US' else a.dtype})")
        a = a.astype(np.float64, copy=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise Refused(422, f"{name}: not a tensor of numbers ({one_line(exc, 120)})") from None
    if dtype == "uint8":
        if not np.isfinite(a).all() or (a != np.round(a)).any() or (a < 0).any() or (a > 255).any():
            raise Refused(422, f"{name}: dtype uint8 takes whole numbers from 0 to 255")
        t = torch.from_numpy(a.astype(np.uint8))
    else:
        t = torch.from_numpy(a)
    g = tensor_group(name, t, shape)
    if g.error is not None:
        raise Refused(422, f"{name}: {g.error}")
    return g


def _leaves(value):
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        else:
            yield v


# --- multipart image files -----------------------------------------------------------------------------

def form_inputs(body: bytes, content_type: str, predictor: Predictor) -> tuple[list[_Group], int | None]:
    """A multipart/form-data body -> its image files decoded as groups (named by their file names) and its
    top_k."""
    files, top_k = [], None
    for name, filename, data in _parts(body, content_type):
        if name not in FORM_FIELDS:
            raise Refused(422, f"unknown field {name!r}: the form takes files (image files) and top_k")
        if name == "top_k":
            top_k = _top_k(_text(data) if filename is None else None)
        elif filename is None:
            raise Refused(422, f"field {name!r} must be a file, not text")
        else:
            files.append((filename or f"{name}#{len(files)}", bytes(data)))
    if not files:
        raise Refused(422, "no image file in the form (field files)")
    groups = [image_group(data, predictor.pre, name=name) for name, data in files]
    for g in groups:
        if g.error is not None:
            raise Refused(422, f"{g.name}: {g.error}")
    return groups, top_k


def _parts(body: bytes, content_type: str) -> list[tuple[str, str | None, bytearray]]:
    """The form's parts: (field name, file name or None for a text field, content)."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise Refused(422, "not a readable multipart form (no boundary in its Content-Type)")
    parts: list[list] = []
    header = [b"", b"", b""]  # the current header's name and value, and the current part's Content-Disposition
    counts = {False: 0, True: 0}  # files, text fields

    def part_begin():
        header[2] = b""
        parts.append([None, None, bytearray()])

    def header_field(data, start, end):
        header[0] += data[start:end]

    def header_value(data, start, end):
        header[1] += data[start:end]

    def header_end():
        if header[0].lower() == b"content-disposition":
            header[2] = header[1]
        header[0] = header[1] = b""

    def headers_finished():
        _, options = parse_options_header(header[2])
        if b"name" not in options:
            raise Refused(422, "not a readable multipart form (a part without a name in its Content-Disposition)")
        part = parts[-1]
        part[0] = _text(options[b"name"])
        part[1] = _text(options[b"filename"]) if b"filename" in options else None
        counts[part[1] is None] += 1
        if counts[False] > MAX_FILES or counts[True] > MAX_FIELDS:
            raise Refused(422, f"not a readable multipart form (more than {MAX_FILES:,} files or {MAX_FIELDS} "
                               "fields)")

    def part_data(data, start, end):
        parts[-1][2] += data[start:end]

    callbacks = {"on_part_begin": part_begin, "on_part_data": part_data, "on_header_field": header_field,
                 "on_header_value": header_value, "on_header_end": header_end,
                 "on_headers_finished": headers_finished}
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:
        raise Refused(422, f"not a readable multipart form ({one_line(exc, 120)})") from None
    return [p for p in parts if p[0] is not None]


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")
