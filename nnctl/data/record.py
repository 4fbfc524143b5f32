"""The preprocessing record: what turns a raw input into the model's input, and an output into an answer.

Every checkpoint written by training carries one (field ``preprocessing``), and every
export carries it too (safetensors and ``.npz`` metadata, ONNX ``metadata_props``), so a
model used outside nnctl gets the same inputs it was trained on. Like torchvision's
``weights.transforms()`` and ``weights.meta["categories"]``.

Fields (all plain JSON values):

- ``task``: the name of the run's ``nnctl.tasks.Task``: ``classification``, ``multilabel``
  (``bce_with_logits``), ``regression`` or ``reconstruction`` (``data.target: input``). Records
  written before multilabel was named say ``regression`` for a ``bce_with_logits`` run; nnctl
  decides the task from the recorded config (``nnctl.tasks.task_of_config``), the record's
  name only where a model carries no config
- ``source``: the data source it was computed on (``digits``, ``image_folder``, ...)
- ``input_shape``: one sample, ``[C, H, W]`` or any shape for tensors
- ``color_mode``: ``L`` (one channel) or ``RGB`` for image data, else null
- ``resize``: ``[H, W]`` every image file is resized to (bilinear), or null
- ``scale``: a uint8 value of the source's own raw data is divided by this (16 for the
  built-in digits, 255 for images); null for float data and for ``tensors`` (training used
  its values as they are, uint8 included)
- ``image_scale``: an image file's 0..255 pixels are divided by this (always 255: the
  model sees values in [0, 1], as in training) when the record is an image source
  (``color_mode`` set, ``is_image``)

Raw inputs (``from_raw``): an image file's pixels are divided by ``image_scale`` only when
the record is an image source; for any other record (``tensors``, ``synthetic``, no record)
an image's uint8 pixels are raw values like a uint8 tensor's, divided by ``scale`` (or 1:
as is). uint8 tensors are divided by ``scale`` (or 1); float tensors are taken as already
on the model's scale. Other integer types and bool are refused (``RawInputError``): their
scale is ambiguous (is int64 ``16`` a raw digit pixel or a value?), so give uint8 raw values
or float32 model-scale values.
- ``mean``, ``std``: per-channel normalisation after scaling (computed on the training
  split), or null
- ``classes``: the class names, index = class id (image_folder's folder names, MNIST's
  '0'..'9', Fashion-MNIST's and CIFAR's names, ``label_map``'s merged names), or null
- ``data``: the training data's fingerprint (``_Store.fingerprint``): ``samples``, ``per_class``
  and a ``digest`` of the samples' identities in order. The validation split is derived from the
  data (seed, val_fraction), so ``--resume`` and ``nnctl eval`` of the run's own splits compare it
  with the data they read (:func:`data_changes`): a file added to a class folder moves training
  samples into "val". An image folder's ``data.val_root`` (or ``test_root``) has its own fingerprint
  under that key (``samples``, ``per_class``, ``digest``), the top level being ``data.root``'s.
  An image folder's digest is of its files' names and labels (``"by": "files"``) however the run
  held them (streamed, preloaded or from the decoded cache: one fingerprint for one folder); other
  sources' of their bytes. Null in records written before it (nothing is compared)

No torch import at module level: reading a record is cheap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

VERSION = 1

FASHION_MNIST = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DIGITS = [str(i) for i in range(10)]


@dataclass
class Preprocessing:
    task: str = "classification"
    source: str = ""
    input_shape: list[int] = field(default_factory=list)
    color_mode: str | None = None
    resize: list[int] | None = None
    scale: float | None = None
    image_scale: float = 255.0
    mean: list[float] | None = None
    std: list[float] | None = None
    classes: list[str] | None = None
    version: int = VERSION
    data: dict | None = None  # the training data's fingerprint (see data_changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def image_size(self) -> list[int] | None:
        """``[H, W]`` a new image file is decoded to for this model (predict, eval --data): the recorded
        resize, else the height and width of the model's input."""
        shape = list(self.input_shape or [])
        return list(self.resize) if self.resize else (shape[1:3] if len(shape) == 3 else None)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Preprocessing | None":
        """A record read back from a checkpoint or an export; None for a file written before records."""
        if not isinstance(d, dict):
            return None
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError:
            return None

    def describe(self) -> str:
        """What inputs the model takes, in one line (``nnctl summary RUN``): shape, image size and colour
        mode, scale, normalisation, classes."""
        parts = [f"{list(self.input_shape)}"]
        if self.is_image:
            size = self.image_size()
            mode = "L (one channel)" if self.color_mode == "L" else "RGB"
            parts.append(f"images {size[1]}x{size[0]} {mode}" if size else f"images {mode}")
            parts.append(f"image files' pixels / {self.image_scale:g}")
        if self.scale not in (None, 1, 1.0):
            parts.append(f"{self.source} values / {self.scale:g}")
        if self.mean is not None and self.std is not None:
            fmt = lambda v: "[" + ", ".join(f"{x:.4g}" for x in v) + "]"  # noqa: E731
            parts.append(f"then normalised with mean {fmt(self.mean)}, std {fmt(self.std)}")
        if self.classes:
            shown = ", ".join(map(str, self.classes[:10])) + (" ..." if len(self.classes) > 10 else "")
            parts.append(f"{len(self.classes)} classes: {shown}")
        return "; ".join(parts)

    @property
    def is_image(self) -> bool:
        return self.color_mode in ("L", "RGB")

    def class_name(self, index: int) -> str:
        if self.classes and 0 <= index < len(self.classes):
            return str(self.classes[index])
        return str(index)

    def normalize(self, x):
        """Float inputs on the model's scale -> normalised with the recorded mean/std."""

        if self.mean is None or self.std is None:
            return x
        c = len(self.mean)
        shape = (1, c) + (1,) * (x.dim() - 2)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).reshape(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).reshape(shape)
        return (x - mean) / std

    def divisor(self, image: bool = False) -> float:
        """What a uint8 raw value is divided by: ``image_scale`` for an image file given to a model
        of an image source, else the source's own ``scale`` (or 1: used as is)."""
        return float(self.image_scale) if image and self.is_image else float(self.scale or 1.0)

    def from_raw(self, x, image: bool = False):
        """A batch of raw inputs -> the model's input, exactly as training computed it.

        uint8 inputs are divided by ``divisor(image)``: ``image_scale`` for image files when the
        record is an image source, else the source's own ``scale`` (or 1). Float inputs are taken
        as already scaled. Other integer types and bool raise ``RawInputError``. Then mean/std.
        """

        if x.dtype == torch.uint8:
            x = x.to(torch.float32).div_(self.divisor(image))
        elif x.dtype.is_floating_point:
            if x.dtype != torch.float32:
                x = x.to(torch.float32)
        else:
            raise RawInputError(raw_dtype_problem(x.dtype))
        return self.normalize(x)


class RawInputError(TypeError):
    """A raw input of a type whose scale is ambiguous (int64, bool, complex)."""


def raw_dtype_problem(dtype) -> str | None:
    """Why a tensor of this dtype cannot be a raw input (one line), or None for uint8 and real floats."""
    name = str(dtype).replace("torch.", "")
    if dtype.is_complex:
        return f"{name} values: the model takes real ones"
    if dtype.is_floating_point or name == "uint8":
        return None
    return f"{name} values: give uint8 raw values or float32 model-scale values"


def label_map_names(names: list[str] | None, label_map: list[int]) -> list[str]:
    """The names of the classes after a label_map: each new class named by the old ones it merges."""
    n_new = max(label_map) + 1
    old = names or [str(i) for i in range(len(label_map))]
    merged: list[list[str]] = [[] for _ in range(n_new)]
    for i, j in enumerate(label_map):
        merged[j].append(old[i] if i < len(old) else str(i))
    return ["/".join(m) if m else str(j) for j, m in enumerate(merged)]


def missing_note(path: str) -> str:
    return (f"{path} holds no preprocessing record (written by an nnctl before 0.2): inputs are used as given, "
            "with no scaling or normalisation, and classes are shown by index")


def data_changes(then: dict | None, now: dict | None, names: list[str] | None = None) -> str | None:
    """How the data changed since a record's fingerprint was taken (``Preprocessing.data``), in words
    (``names``: the class names, index = class id); None when it is the same or either side has none.
    An image folder's data.val_root / data.test_root is compared apart and named."""
    if not isinstance(then, dict) or not isinstance(now, dict):
        return None
    found = [_change(then, now, names)]
    for key in ("val_root", "test_root"):
        a, b = then.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            change = _change(a, b, names)
            found.append(f"data.{key}: {change}" if change else None)
        elif a is not None or b is not None:
            found.append(f"data.{key}: {'none now' if b is None else 'none then'}")
    return "; ".join(f for f in found if f) or None


def changed_split(then: dict | None, split: str = "val") -> str:
    """What a data change does to a run's ``split`` (val or train), in words, for the messages of eval and
    --resume: a fraction split is derived from the data, so training samples move into it; a separate
    folder (data.val_root) keeps training samples out, but holds other samples than the run's."""
    if isinstance(then, dict) and then.get("val_root") is not None:
        folder = "data.val_root" if split == "val" else "data.root"
        return (f"its {split} split is the folder {folder} as it is now, which holds other samples than the "
                "ones the run used")
    return (f"its {split} split is derived from the data, so training samples would now be in it" if split == "val"
            else f"its {split} split is derived from the data, so it is no longer the samples the run trained on")


def _change(then: dict, now: dict, names: list[str] | None) -> str | None:
    if then.get("digest") == now.get("digest"):
        return None
    if then.get("by") != now.get("by") and (then.get("samples"), then.get("per_class")) == \
            (now.get("samples"), now.get("per_class")):
        # a record from before image folders were always hashed by their files (a preloaded or cached
        # folder's digest was of its pixels): two kinds of digest, so only the counts can be compared
        return None
    a, b = int(then.get("samples", 0)), int(now.get("samples", 0))
    parts = [f"{b:,} samples now, {a:,} then" if a != b else f"the same {a:,} samples in number, but not the same samples"]
    old, new = list(then.get("per_class") or []), list(now.get("per_class") or [])
    if old and new and old != new:
        width = max(len(old), len(new))
        old, new = old + [0] * (width - len(old)), new + [0] * (width - len(new))
        diffs = [f"class {names[i] if names and i < len(names) else i}: {x:,} -> {y:,}"
                 for i, (x, y) in enumerate(zip(old, new)) if x != y]
        parts.append(", ".join(diffs[:5]) + (f" and {len(diffs) - 5} more" if len(diffs) > 5 else ""))
    return "; ".join(parts)
