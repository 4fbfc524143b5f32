"""What ``nnctl predict`` reads: files, folders (a glob), tensors files and in-memory tensors, each as a
group of samples checked against the model's input (shape, finite values, a size limit), images decoded
by the one decoder with the run's preprocessing; a file it cannot use is a note, never a crash."""

from __future__ import annotations

import fnmatch
import io
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load

from nnctl.data.decode import IMAGE_SUFFIXES, decode_image
from nnctl.data.record import Preprocessing, raw_dtype_problem
from nnctl.errors import NnctlError, UsageError
from nnctl.files import _kind, display_name, read_input

TENSOR_SUFFIXES = (".pt", ".pth", ".npz", ".safetensors")
MAX_SAMPLES_PER_FILE = 10_000_000


class _Group:
    """One input (an image file, a tensors file, a tensor) and, after inference, its results.

    ``x`` holds its raw samples (N, ...) until they are predicted; then ``out`` the model's
    outputs (N, ...), and for classification ``top_i`` / ``top_p`` (N, k), for multilabel
    ``values`` (the sigmoid of each output).
    """

    __slots__ = ("name", "x", "image", "error", "single", "n", "outs", "out", "top_i", "top_p", "values", "bad",
                 "adapted")

    def __init__(self, name: str, x: torch.Tensor | None = None, *, image: bool = False,
                 error: str | None = None):
        self.name = name
        self.x = x
        self.image = image
        self.error = error
        self.n = 1 if x is None else len(x)
        self.single = x is None or (len(x) == 1)
        self.outs: list[torch.Tensor] = []
        self.out: torch.Tensor | None = None
        self.top_i: torch.Tensor | None = None
        self.top_p: torch.Tensor | None = None
        self.values: torch.Tensor | None = None  # the answers where they are not the outputs (sigmoid per label)
        self.bad: list[int] = []  # rows whose output is not finite: an error each, never an answer
        self.adapted: list[str] = []  # what was changed so the model takes it (resized from 28x28 to 8x8, ...)

    def row_name(self, i: int) -> str:
        return self.name if self.single else f"{self.name}[{i}]"


# --- reading inputs ------------------------------------------------------------------------

def _walk(folder: Path, pattern: str | None, notes: list[str]) -> list[tuple[Path, str | None]]:
    """The input files under folder, sorted, each with the reason it cannot be read (or None).

    Folder links are not followed (no loops, no escapes): they are not inputs, a note says so.
    A file that matches (the glob, or an image / tensors suffix) but is not a regular file (a
    FIFO, a device, a dangling link) is an input that fails, as it would be given directly.
    """

    found: list[tuple[Path, str | None]] = []

    def unlistable(exc: OSError) -> None:
        found.append((Path(exc.filename or folder), f"cannot list this folder: {exc.strerror or exc}"))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unlistable, followlinks=False):
        for d in list(dirnames):
            if os.path.islink(os.path.join(dirpath, d)):
                notes.append(f"skipped {os.path.join(dirpath, d)}: a link to a folder (not followed)")
                dirnames.remove(d)
        dirnames.sort()
        for f in filenames:
            p = Path(dirpath) / f
            rel = str(p.relative_to(folder))
            if pattern is not None:
                if not (fnmatch.fnmatch(rel, pattern) or fnmatch.fnmatch(f, pattern)):
                    continue
            elif p.suffix.lower() not in IMAGE_SUFFIXES + TENSOR_SUFFIXES:
                continue
            try:
                mode = os.stat(p).st_mode
            except FileNotFoundError:
                found.append((p, "a symbolic link to nothing (dangling)" if os.path.islink(p) else "vanished"))
                continue
            except OSError as exc:
                found.append((p, f"cannot read: {exc.strerror or exc}"))
                continue
            if not stat.S_ISREG(mode):
                what = "image" if p.suffix.lower() in IMAGE_SUFFIXES else "tensors" if (
                    p.suffix.lower() in TENSOR_SUFFIXES) else "input"
                found.append((p, f"is {_kind(mode)}, not a regular {what} file; refused"))
                continue
            found.append((p, None))
    return sorted(found, key=lambda e: e[0])


def read_tensors(path: str | os.PathLike) -> torch.Tensor:
    """A tensors file -> its samples (key ``x``, or its only tensor)."""


    p = Path(path)
    data = read_input(p, "tensors file")
    suffix = p.suffix.lower()
    if not data:
        raise UsageError(f"{p}: an empty file, not a {suffix} tensors file")
    try:
        if suffix == ".npz":

            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                obj: Any = {k: torch.from_numpy(np.array(z[k])) for k in z.files}
        elif suffix == ".safetensors":

            obj = st_load(data)
        else:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except NnctlError:  # a stop signal while reading: not the file's fault
        raise
    except Exception as exc:  # every reader's own failure: a damaged or hostile file
        raise UsageError(f"not a readable {suffix} tensors file ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:160]})") from None
    finally:
        del data
    if isinstance(obj, dict):
        if "x" in obj:
            obj = obj["x"]
        elif len(obj) == 1:
            obj = next(iter(obj.values()))
        else:
            raise UsageError(f"holds {len(obj)} arrays ({', '.join(sorted(map(str, obj))[:5])}) and no 'x'")
    if not isinstance(obj, torch.Tensor):
        raise UsageError(f"holds a {type(obj).__name__}, not a tensor")
    return obj


def tensor_group(name: str, t: torch.Tensor, shape: list[int]) -> _Group:
    """A tensor -> its samples: (N, *shape) or one sample of the input shape; without a shape,
    a batch as given (2 or more dimensions) or one sample (1 dimension)."""
    problem = raw_dtype_problem(t.dtype)
    if problem is not None:
        return _Group(name, error=problem)
    if shape:
        if list(t.shape) == list(shape):
            t = t.unsqueeze(0)
        if t.dim() != len(shape) + 1 or list(t.shape[1:]) != list(shape):
            return _Group(name, error=f"shape {list(t.shape)}: the model takes samples of shape {shape} "
                                      f"(a batch: [N, {', '.join(map(str, shape))}])")
    elif t.dim() == 0:
        return _Group(name, error="a single number: give a sample (1 dimension) or a batch [N, ...]")
    elif t.dim() == 1:
        t = t.unsqueeze(0)
    if len(t) == 0:
        return _Group(name, error=f"holds no samples (shape {list(t.shape)})")
    if len(t) > MAX_SAMPLES_PER_FILE:
        return _Group(name, error=f"{len(t):,} samples, more than {MAX_SAMPLES_PER_FILE:,}")
    if t.dtype.is_floating_point:
        if t.dtype != torch.float32:
            t = t.to(torch.float32)
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            return _Group(name, error=f"holds {bad:,} non-finite values (NaN or infinity)")
    return _Group(name, t)


def image_group(source: Path | bytes, pre: Preprocessing, name: str | None = None) -> _Group:
    """An image file (or its bytes: an upload to ``nnctl serve``, named ``name``) -> one sample decoded as
    training decoded its images (the one decoder, ``nnctl.data.decode.decode_image``, with the record's mode
    and size), checked against the input shape; an image it cannot use is the group's error, never a raise."""
    label = name if name is not None else str(source)
    shape = list(pre.input_shape or [])
    if not shape:
        return _Group(label, error="an image needs the model's input shape and colour mode, and this model "
                                   "has no preprocessing record: give tensors")
    mode = pre.color_mode if pre.color_mode in ("L", "RGB") else ("L" if shape[0] == 1 else "RGB")
    size = pre.image_size()
    facts: dict = {}
    try:
        t = decode_image(source, mode, tuple(size) if size else None, name=name, facts=facts)
    except UsageError as exc:
        return _Group(label, error=_strip(str(exc), label))
    if list(t.shape) != shape:
        return _Group(label, error=f"an image decodes to {list(t.shape)}; the model takes {shape}")
    group = _Group(label, t.unsqueeze(0), image=True)
    h, w = facts.get("size") or (t.shape[-2], t.shape[-1])
    if (h, w) != tuple(t.shape[-2:]):
        group.adapted.append(f"resized from {w}x{h} to {t.shape[-1]}x{t.shape[-2]}, the size the model was "
                             "trained on")
    if facts.get("mode") and facts["mode"] != mode:  # RGBA and LA lose their alpha, 16-bit its low byte, ...
        what = _CONVERSIONS.get(facts["mode"], "")
        group.adapted.append(f"converted from {facts['mode']}{what} to {mode}, the colour mode the model was "
                             "trained on")
    return group


# what a conversion to the model's L or RGB does, said beside the mode's name
_CONVERSIONS = {"RGBA": " (its alpha dropped)", "LA": " (its alpha dropped)", "La": " (its alpha dropped)",
                "RGBa": " (its alpha dropped)", "PA": " (its alpha dropped)", "P": " (a palette)",
                "CMYK": " (colours approximated)", "I;16": " (16-bit, scaled to 8)", "I;16B": " (16-bit, scaled to 8)",
                "I;16L": " (16-bit, scaled to 8)", "I": " (32-bit, scaled to 8)", "F": " (float, scaled to 8-bit)",
                "1": " (1-bit)", "YCbCr": "", "LAB": " (colours approximated)", "HSV": ""}


def _channels(pil_mode: str) -> str:
    """The mode an image's channels make: L for one channel (1, L, I;16, I, F, LA), RGB for colour."""
    return "L" if pil_mode in ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F") else "RGB"


def adapted_notes(groups: list) -> list[str]:
    """One note per kind of change made to images so the model can take them (issue 24: 28x28 MNIST PNGs
    given to the 8x8 digits model were resized without a word): how many, from what to what."""
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for g in groups:
        for change in getattr(g, "adapted", ()):
            counts[change] = counts.get(change, 0) + 1
            first.setdefault(change, g.name)
    images = sum(1 for g in groups if g.image)
    return [f"{n} of {images} image{'s' if images > 1 else ''}: {change} "
            f"({'the first: ' if n > 1 else ''}{display_name(first[change])})" for change, n in counts.items()]


def _one_input(inputs: Any) -> bool:
    if isinstance(inputs, (str, bytes, os.PathLike, torch.Tensor)):
        return True
    return type(inputs).__module__ == "numpy" and hasattr(inputs, "dtype")


def _strip(text: str, f: Path | str) -> str:
    """A file's error without the file's name in front (the row names it): ``<f>: ``, or the
    decoder's ``cannot read image <f>: `` / ``image <f>: ``."""
    text = " ".join(str(text).split())
    for prefix in (f"{f}: ", f"cannot read image {f}: ", f"image {f}: "):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def gather(inputs: Any, pre: Preprocessing, glob: str | None = None) -> tuple[list[_Group], list[str], list[str]]:
    """Every input -> its raw samples (or the reason it cannot be used), in order; the notes; the files read.

    ``inputs``: one input (a str, an os.PathLike, a tensor, a numpy array) or an iterable of them.
    """
    if _one_input(inputs):
        inputs = [inputs]
    try:
        it = iter(inputs)
    except TypeError:
        raise UsageError(f"inputs must be a path, a tensor, or an iterable of them, not a "
                         f"{type(inputs).__name__}") from None
    groups: list[_Group] = []
    notes: list[str] = []
    files: list[str] = []
    shape = list(pre.input_shape or [])
    for k, inp in enumerate(it):
        if type(inp).__module__ == "numpy" and hasattr(inp, "dtype"):
            try:
                inp = torch.as_tensor(inp)
            except (TypeError, ValueError, RuntimeError) as exc:
                groups.append(_Group(f"array#{k}", error=f"not a numeric array ({' '.join(str(exc).split())[:120]})"))
                continue
        if isinstance(inp, torch.Tensor):
            groups.append(tensor_group(f"tensor#{k}", inp.detach().cpu(), shape))
            continue
        if isinstance(inp, bytes):
            inp = os.fsdecode(inp)
        if not isinstance(inp, (str, os.PathLike)):
            groups.append(_Group(f"input#{k}", error=f"a {type(inp).__name__} is not an input: give a path "
                                                     "(image, folder, tensors file) or a tensor"))
            continue
        p = Path(inp)
        if p.is_dir():
            entries = _walk(p, glob, notes)
            if not entries:
                groups.append(_Group(str(p), error="no image or tensors file in this folder"
                                     + (f" matching {glob!r}" if glob else "")))
        else:
            entries = [(p, None)]
        for f, problem in entries:
            files.append(str(f))
            if problem is not None:
                groups.append(_Group(str(f), error=problem))
                continue
            try:
                if f.suffix.lower() in TENSOR_SUFFIXES:
                    groups.append(tensor_group(str(f), read_tensors(f), shape))
                else:
                    groups.append(image_group(f, pre))
            except UsageError as exc:
                groups.append(_Group(str(f), error=_strip(str(exc), f)))
    return groups, notes + adapted_notes(groups), files
