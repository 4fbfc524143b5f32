"""The preprocessing record: what turns a raw input into the model's input, and an output into an answer.

Every checkpoint written by training carries one (field ``preprocessing``), and every
export carries it too (safetensors and ``.npz`` metadata, ONNX ``metadata_props``), so a
model used outside nnctl gets the same inputs it was trained on. Like torchvision's
``weights.transforms()`` and ``weights.meta["categories"]``.

Fields (all plain JSON values):

- ``task``: ``classification``, ``regression`` or ``reconstruction`` (``data.target: input``)
- ``source``: the data source it was computed on (``digits``, ``image_folder``, ...)
- ``input_shape``: one sample, ``[C, H, W]`` or any shape for tensors
- ``color_mode``: ``L`` (one channel) or ``RGB`` for image data, else null
- ``resize``: ``[H, W]`` every image file is resized to (bilinear), or null
- ``scale``: a uint8 value of the source's own raw data is divided by this (16 for the
  built-in digits, 255 for images); null for float data
- ``image_scale``: an image file's 0..255 pixels are divided by this (always 255: the
  model sees values in [0, 1], as in training)
- ``mean``, ``std``: per-channel normalisation after scaling (computed on the training
  split), or null
- ``classes``: the class names, index = class id (image_folder's folder names, MNIST's
  '0'..'9', Fashion-MNIST's and CIFAR's names, ``label_map``'s merged names), or null

No torch import at module level: reading a record is cheap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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

    @property
    def is_image(self) -> bool:
        return self.color_mode in ("L", "RGB")

    def class_name(self, index: int) -> str:
        if self.classes and 0 <= index < len(self.classes):
            return str(self.classes[index])
        return str(index)

    def normalize(self, x):
        """Float inputs on the model's scale -> normalised with the recorded mean/std."""
        import torch

        if self.mean is None or self.std is None:
            return x
        c = len(self.mean)
        shape = (1, c) + (1,) * (x.dim() - 2)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).reshape(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).reshape(shape)
        return (x - mean) / std

    def from_raw(self, x, image: bool = False):
        """A batch of raw inputs -> the model's input, exactly as training computed it.

        uint8 inputs are divided by ``image_scale`` for image files, else by the source's
        own ``scale``; float inputs are taken as already scaled. Then mean/std.
        """
        import torch

        if x.dtype == torch.uint8:
            divisor = self.image_scale if image else (self.scale or 1.0)
            x = x.to(torch.float32).div_(divisor)
        elif x.dtype != torch.float32:
            x = x.to(torch.float32)
        return self.normalize(x)


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
