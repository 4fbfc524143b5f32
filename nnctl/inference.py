"""Prediction: inputs -> the recorded preprocessing -> batched inference -> answers.

Inputs are image files (PNG, JPEG, BMP, GIF, WebP, TIFF through PIL, as in training),
folders of them (recursively, sorted, never following a folder link, ``glob`` to choose),
tensors files (``.pt`` read with weights_only, ``.npz`` without pickle, ``.safetensors``:
key ``x``, or the only tensor), and, from Python, tensors. An input that cannot be read
is reported with the reason; the others are still predicted.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .errors import UsageError
from .preprocess import Preprocessing, missing_note

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TENSOR_SUFFIXES = (".pt", ".pth", ".npz", ".safetensors")
MAX_SAMPLES_PER_FILE = 10_000_000


@dataclass
class Prediction:
    """One input's answer: top-k classes with names and probabilities, or regression values."""

    input: str
    classes: list[int] | None = None
    names: list[str] | None = None
    probabilities: list[float] | None = None
    values: list[float] | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"input": self.input}
        if self.error is not None:
            d["error"] = self.error
        elif self.classes is not None:
            d.update(classes=self.classes, names=self.names, probabilities=self.probabilities)
        else:
            d["values"] = self.values
        return d


@dataclass
class Predictions:
    rows: list[Prediction]
    task: str
    top_k: int
    notes: list[str] = field(default_factory=list)
    outputs: torch.Tensor | None = None  # the raw model outputs of the readable inputs, in order

    @property
    def failed(self) -> list[Prediction]:
        return [r for r in self.rows if r.error is not None]

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class _Item:
    name: str
    x: torch.Tensor | None = None  # one raw sample
    image: bool = False
    error: str | None = None


# --- reading inputs ------------------------------------------------------------------------

def _walk(folder: Path, pattern: str | None, notes: list[str]) -> list[Path]:
    """Files under folder, sorted; folder links are not followed (no loops, no escapes)."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
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
            except OSError as exc:
                notes.append(f"skipped {p}: {exc.strerror or exc}")
                continue
            if not stat.S_ISREG(mode):
                notes.append(f"skipped {p}: not a regular file")
                continue
            found.append(p)
    return sorted(found)


def decode_image(path: str | os.PathLike, pre: Preprocessing) -> torch.Tensor:
    """An image file -> uint8 (C, H, W) in the recorded colour mode and size, as training decoded it."""
    import io
    import warnings

    import numpy as np
    from PIL import Image

    from .files import read_input

    data = read_input(path, "image file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:
                img = img.convert(pre.color_mode or ("L" if (pre.input_shape or [3])[0] == 1 else "RGB"))
                size = pre.resize or (list(pre.input_shape[1:3]) if len(pre.input_shape) == 3 else None)
                if size is not None and (img.height, img.width) != tuple(size):
                    img = img.resize((int(size[1]), int(size[0])), Image.BILINEAR)
                arr = np.asarray(img, dtype=np.uint8)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise UsageError(f"refused: {' '.join(str(exc).split())[:160]}") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise UsageError(f"not a readable image ({' '.join(str(exc).split())[:160]})") from None
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def read_tensors(path: str | os.PathLike) -> torch.Tensor:
    """A tensors file -> its samples (key ``x``, or its only tensor)."""
    import io

    from .files import read_input

    p = Path(path)
    data = read_input(p, "tensors file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npz":
            import numpy as np

            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                obj: Any = {k: torch.from_numpy(np.array(z[k])) for k in z.files}
        elif suffix == ".safetensors":
            from safetensors.torch import load as st_load

            obj = st_load(data)
        else:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # every reader's own failure: a damaged or hostile file
        raise UsageError(f"not a readable {suffix} tensors file ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:160]})") from None
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


def _samples(name: str, t: torch.Tensor, shape: list[int]) -> list[_Item]:
    """A tensor -> one item a sample: (N, *shape) or one sample of the input shape."""
    if list(t.shape) == list(shape):
        t = t.unsqueeze(0)
    if t.dim() != len(shape) + 1 or list(t.shape[1:]) != list(shape):
        return [_Item(name, error=f"shape {list(t.shape)}: the model takes samples of shape {shape} "
                                  f"(a batch: [N, {', '.join(map(str, shape))}])")]
    if t.dtype.is_complex:
        return [_Item(name, error=f"holds complex values ({t.dtype}); the model takes real ones")]
    if not (t.dtype.is_floating_point or t.dtype == torch.uint8):
        t = t.to(torch.float32)  # integer or bool samples: taken as values, not as raw uint8 pixels
    if t.dtype.is_floating_point and not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        return [_Item(name, error=f"holds {bad} non-finite values (NaN or infinity)")]
    if len(t) > MAX_SAMPLES_PER_FILE:
        return [_Item(name, error=f"{len(t):,} samples, more than {MAX_SAMPLES_PER_FILE:,}")]
    if len(t) == 1:
        return [_Item(name, t[0])]
    return [_Item(f"{name}[{i}]", t[i]) for i in range(len(t))]


def gather(inputs: Iterable[Any], pre: Preprocessing, glob: str | None = None) -> tuple[list[_Item], list[str]]:
    """Every input -> raw samples (or the reason it cannot be read), in order."""
    items: list[_Item] = []
    notes: list[str] = []
    shape = list(pre.input_shape)
    for k, inp in enumerate(inputs):
        if isinstance(inp, torch.Tensor):
            items += _samples(f"tensor#{k}", inp.detach().cpu(), shape)
            continue
        p = Path(inp)
        if p.is_dir():
            files = _walk(p, glob, notes)
            if not files:
                items.append(_Item(str(p), error="no image or tensors file in this folder"
                                   + (f" matching {glob!r}" if glob else "")))
        else:
            files = [p]
        for f in files:
            try:
                if f.suffix.lower() in TENSOR_SUFFIXES:
                    items += _samples(str(f), read_tensors(f), shape)
                else:
                    items.append(_Item(str(f), decode_image(f, pre), image=True))
            except UsageError as exc:
                text = " ".join(str(exc).split())
                prefix = f"{f}: "
                items.append(_Item(str(f), error=text[len(prefix):] if text.startswith(prefix) else text))
    return items, notes


# --- predicting ----------------------------------------------------------------------------

def _record_for(model, cfg_dict: dict | None) -> tuple[Preprocessing, list[str]]:
    meta = getattr(model, "nnctl_meta", None) or {}
    pre = meta.get("preprocessing")
    notes: list[str] = []
    cfg = meta.get("config") or cfg_dict or {}
    if not isinstance(pre, Preprocessing):
        pre = Preprocessing.from_dict(pre) if isinstance(pre, dict) else None
    if pre is None:
        notes.append(missing_note(meta.get("checkpoint") or "this model"))
        shape = list(((cfg.get("model") or {}).get("input_shape")) or [])
        loss = (cfg.get("train") or {}).get("loss", "cross_entropy")
        target = (cfg.get("data") or {}).get("target", "label")
        task = "classification" if loss in ("cross_entropy", "nll") and target == "label" else "regression"
        pre = Preprocessing(task=task, input_shape=shape, scale=None, image_scale=255.0)
    return pre, notes


def predict(model_or_run: Any, inputs: Iterable[Any], *, which: str = "best", device: str = "cpu",
            batch_size: int = 256, top_k: int = 5, glob: str | None = None,
            on_progress: Callable[[int, int], None] | None = None) -> Predictions:
    from . import api

    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if top_k < 1:
        raise UsageError("--top-k must be at least 1")
    if isinstance(model_or_run, torch.nn.Module):
        model = model_or_run
        from .train import select_device

        model = model.to(select_device(device)).eval()
    else:
        model = api.load(model_or_run, which=which, device=device)
    pre, notes = _record_for(model, None)
    cfg = (getattr(model, "nnctl_meta", None) or {}).get("config") or {}
    loss = (cfg.get("train") or {}).get("loss", "cross_entropy")
    items, walk_notes = gather(inputs, pre, glob)
    notes += walk_notes
    good = [i for i in items if i.error is None]
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    outputs: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, len(good), batch_size):
            chunk = good[start:start + batch_size]
            xs = [pre.from_raw(i.x.unsqueeze(0), image=i.image) for i in chunk]
            x = torch.cat(xs).to(dev)
            out = model(x)
            if isinstance(out, (tuple, list)):
                out = out[0]
            outputs.append(out.float().cpu())
            if on_progress is not None:
                on_progress(min(start + batch_size, len(good)), len(good))
    out_all = torch.cat(outputs) if outputs else None
    rows: list[Prediction] = []
    j = 0
    for item in items:
        if item.error is not None:
            rows.append(Prediction(item.name, error=item.error))
            continue
        o = out_all[j]
        j += 1
        if pre.task == "classification" and o.dim() == 1:
            probs = o.exp() if loss == "nll" else torch.softmax(o, dim=0)
            k = min(top_k, probs.numel())
            p, idx = probs.topk(k)
            rows.append(Prediction(item.name, classes=idx.tolist(), names=[pre.class_name(i) for i in idx.tolist()],
                                   probabilities=[float(v) for v in p]))
        else:
            rows.append(Prediction(item.name, values=[float(v) for v in o.reshape(-1)]))
    return Predictions(rows, pre.task, top_k, notes, out_all)
