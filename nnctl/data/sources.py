"""Data sources: the built-in digits, torchvision sets, image folders, tensors files, synthetic data."""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import stat
from importlib import resources
from pathlib import Path
from typing import Any
import numpy as np
import torch
from torch import Tensor
from nnctl.data import record as P
from nnctl.config.schema import Config
from nnctl.tasks import Task
from nnctl.errors import NnctlError, UsageError
from nnctl.files import _kind as _file_kind
from nnctl.files import open_input, read_input
from nnctl.data.store import _Store, _StoreDataset, _iterate, _loader
from nnctl.data import cache
from nnctl.data.decode import image_size
from safetensors.torch import load

IMAGE_SOURCES = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "image_folder")


def default_root() -> Path:
    """Where torchvision datasets live when data.root is not given."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "nnctl" / "datasets"


def _digits() -> _Store:
    """The built-in 1,797 8x8 digits: pixels 0..16 kept as uint8, scaled by 1/16 per batch."""
    ref = resources.files("nnctl") / "data" / "digits.csv.gz"
    try:
        with ref.open("rb") as raw, gzip.open(raw, "rt") as text:
            table = np.loadtxt(text, delimiter=",", dtype=np.int64)
    except (OSError, ValueError) as exc:
        raise NnctlError(f"cannot read the built-in digits data ({ref}): {exc}; reinstall nnctl") from exc
    x = torch.from_numpy(table[:, :64].astype(np.uint8)).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(table[:, 64].copy())
    return _Store(y=y, sample_shape=(1, 8, 8), x=x, scale=16.0, num_classes=10, class_names=list(P.DIGITS))


_MNIST_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def _mnist(cfg: Config, root: Path) -> _Store:
    """MNIST / FashionMNIST through torchvision, read as whole uint8 tensors (no PIL)."""
    from torchvision import datasets

    source = cfg.data.source
    cls = datasets.MNIST if source == "mnist" else datasets.FashionMNIST
    raw = root / _MNIST_FOLDERS[source] / "raw"
    parts = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=cfg.data.download)
        except RuntimeError as exc:
            if "not found" in str(exc) and not cfg.data.download:
                raise UsageError(
                    f"{source} is not in {raw}: torchvision expects the unpacked files train-images-idx3-ubyte, "
                    f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte there "
                    f"(data.download: true also unpacks .gz archives found there); set data.download: true (or --set data.download=true) to fetch "
                    f"them, or data.root to the folder that holds {_MNIST_FOLDERS[source]}/raw") from None
            raise NnctlError(f"cannot download {source} into {raw}: {exc}") from exc
        except NnctlError:  # a stop signal while reading: not the files' fault
            raise
        except Exception as exc:  # a damaged IDX file
            raise UsageError(f"cannot read {source} from {raw}: {exc}; delete the folder and download again "
                             f"(data.download: true)") from exc
        parts.append((ds.data.to(torch.uint8), ds.targets.to(torch.int64)))
    (xtr, ytr), (xte, yte) = parts
    x = torch.cat([xtr, xte]).unsqueeze(1)
    y = torch.cat([ytr, yte])
    names = list(P.FASHION_MNIST) if source == "fashion_mnist" else list(P.DIGITS)
    return _Store(y=y, sample_shape=tuple(x.shape[1:]), x=x, scale=255.0, num_classes=10, test_start=len(xtr),
                  class_names=names)


# CIFAR: our own reader with a restricted unpickler. Torchvision's checks md5 sums
# first and then runs an unrestricted pickle.load.

_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}

_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    # protocol 2 written by Python 3 stores bytes as _codecs.encode(text, "latin1")
    ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Loads only numpy arrays, lists, dicts, numbers and strings; refuses every other global."""

    def __init__(self, file, name: str):
        super().__init__(file, encoding="bytes")
        self.name = name

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise UsageError(f"refusing to unpickle {module}.{name} from {self.name}: CIFAR batch files hold only "
                         f"numpy arrays and lists; this file is not a genuine CIFAR batch")


def read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch file -> (N x 3072 uint8 data, N int64 labels)."""
    try:
        with open_input(path, "CIFAR batch file") as f:
            batch = _CifarUnpickler(f, str(path)).load()
    except NnctlError:  # a refused file, or a stop signal while reading (not the file's fault)
        raise
    except OSError as exc:
        raise NnctlError(f"cannot read {path}: {exc}") from exc
    except Exception as exc:
        raise UsageError(f"{path} is not a readable CIFAR batch file ({type(exc).__name__}: {exc})") from exc

    def get(key: bytes) -> Any:
        if isinstance(batch, dict):
            for k in (key, key.decode()):
                if k in batch:
                    return batch[k]
        raise UsageError(f"{path} is not a CIFAR batch: it has no {key.decode()!r} entry")

    data, labels = get(b"data"), get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UsageError(f"{path}: 'data' must be an N x 3072 uint8 array")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{path}: {label_key.decode()!r} must be a list of integers") from exc
    if len(labels) != len(data):
        raise UsageError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def _cifar(cfg: Config, root: Path) -> _Store:
    source = cfg.data.source
    folder, train_files, test_files, label_key, classes = _CIFAR[source]
    base = root / folder
    missing = [n for n in train_files + test_files if not (base / n).is_file()]
    if missing:
        if not cfg.data.download:
            raise UsageError(f"{source} is not in {base} (no {missing[0]}); set data.download: true "
                             f"(or --set data.download=true) to fetch it, or data.root to the folder that holds "
                             f"{folder}/")
        from torchvision import datasets

        cls = datasets.CIFAR10 if source == "cifar10" else datasets.CIFAR100
        try:
            cls(str(root), train=True, download=True)  # fetch and verify only; we read the files ourselves
        except Exception as exc:
            raise NnctlError(f"cannot download {source} into {root}: {exc}") from exc
    xs, ys, n_train = [], [], 0
    for name in train_files + test_files:
        data, labels = read_cifar_batch(base / name, label_key)
        xs.append(data)
        ys.append(labels)
        if name in train_files:
            n_train += len(data)
    x = torch.from_numpy(np.concatenate(xs)).reshape(-1, 3, 32, 32)
    y = torch.from_numpy(np.concatenate(ys))
    if len(y) and (y.min() < 0 or y.max() >= classes):
        raise UsageError(f"{base}: labels must be in [0, {classes}), found {int(y.min())}..{int(y.max())}")
    return _Store(y=y, sample_shape=(3, 32, 32), x=x, scale=255.0, num_classes=classes, test_start=n_train,
                  class_names=list(P.CIFAR10) if source == "cifar10" else _cifar100_names(base))


def _cifar100_names(base: Path) -> list[str] | None:
    """CIFAR-100's fine label names from its meta file (read with the same restricted unpickler)."""
    try:
        with open_input(base / "meta", "CIFAR meta file") as fh:
            meta = _CifarUnpickler(fh, str(base / "meta")).load()
        names = meta.get("fine_label_names") if isinstance(meta, dict) else None
        return [str(n) for n in names] if isinstance(names, list) and len(names) == 100 else None
    except UsageError:  # not a regular file, or a refused pickle: names by index
        return None
    except NnctlError:  # a stop signal while reading: not the file's fault
        raise
    except Exception:  # no meta file, or a damaged one: names by index
        return None


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's


_NOTES_SHOWN = 8


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _class_folders(root: Path, seen: dict[tuple[int, int], str], note) -> list[tuple[str, str]]:
    """ImageFolder's classes: (name, path) of each sub-folder of ``root``, by name, each real folder
    once (a link to a folder already read is skipped and noted). ``seen`` gathers the folders read."""
    try:
        seen[_ident(os.stat(root))] = str(root)
        top = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise UsageError(f"data.root {root}: cannot read: {exc.strerror or exc}") from None
    classes: list[tuple[str, str]] = []
    for entry in top:
        try:
            st = os.stat(entry.path)
        except OSError:
            if entry.is_symlink():
                note(f"{entry.path}: skipped: a broken symbolic link")
            continue
        if not stat.S_ISDIR(st.st_mode):
            continue
        if _ident(st) in seen:
            note(f"{entry.path}: skipped as a class: a link to {seen[_ident(st)]}, a folder already read")
            continue
        seen[_ident(st)] = entry.path
        classes.append((entry.name, entry.path))
    return classes


# the class count of each built-in source (the labels are 0 .. count - 1)
CLASS_COUNTS = {"digits": 10, "mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}


def class_count(cfg: Config) -> int | None:
    """The number of classes ``cfg.data``'s source gives, known without reading a sample: the built-in
    sources' own, an image_folder's class sub-folders (counted, no image opened); None when it is
    not known before reading (tensors, synthetic) or the folder cannot be read (loading says why).
    ``data.label_map`` is not applied here."""
    d = cfg.data
    if d is None:
        return None
    if d.source in CLASS_COUNTS:
        return CLASS_COUNTS[d.source]
    if d.source != "image_folder" or not d.root:
        return None
    root = Path(os.path.expanduser(d.root))
    if not root.is_dir():
        return None
    try:
        return len(_class_folders(root, {}, lambda text: None)) or None
    except UsageError:
        return None


def _scan_image_folder(root: Path) -> tuple[list[str], list[tuple[str, int]], list[str]]:
    """ImageFolder's classes and (file, class) samples, in ImageFolder's order, read safely.

    Every real folder is read once: folders are identified by (st_dev, st_ino), so a symbolic link
    to a folder already read (its own ancestor, the root, another class, a second link to one
    folder) is skipped, never followed into a loop or a second copy of the same images. Real
    folders are walked before links, so a link never shadows the folder it points to. Files are
    read once too (a link or hard link to a file already listed is skipped). Only regular files
    are images: a FIFO, device or socket with an image name is skipped (opening a FIFO would wait
    forever). Each skip is reported in the returned notes.
    """
    notes: list[str] = []
    seen: dict[tuple[int, int], str] = {}
    ident = _ident

    def note(text: str) -> None:
        notes.append(text)

    classes = _class_folders(root, seen, note)
    if not classes:
        raise UsageError(f"data.root {root} has no sub-folders: image_folder needs one sub-folder of images "
                         "per class")

    found: list[list[tuple[str, list[str]]]] = [[] for _ in classes]  # per class: (folder, its image files)
    links: list[tuple[int, str]] = []  # folder links, followed after every real folder has been read

    def walk(index: int, start: str) -> None:
        stack = [start]
        while stack:
            folder = stack.pop()
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as exc:
                note(f"{folder}: skipped: cannot read the folder ({exc.strerror or exc})")
                continue
            files = []
            for e in entries:
                is_link = e.is_symlink()
                try:
                    st = os.stat(e.path)
                except OSError:
                    if is_link:
                        note(f"{e.path}: skipped: a broken symbolic link")
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if is_link:
                        links.append((index, e.path))
                    elif ident(st) in seen:  # a bind mount can repeat a real folder
                        note(f"{e.path}: skipped: the same folder as {seen[ident(st)]}, already read")
                    else:
                        seen[ident(st)] = e.path
                        stack.append(e.path)
                    continue
                if not e.name.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                if not stat.S_ISREG(st.st_mode):
                    note(f"{e.path}: skipped: {_file_kind(st.st_mode)}, not a regular file")
                    continue
                files.append(e.path)
            found[index].append((folder, files))

    for index, (_, class_dir) in enumerate(classes):
        walk(index, class_dir)
    while links:
        index, link = links.pop(0)
        try:
            st = os.stat(link)
        except OSError:
            continue
        if ident(st) in seen:
            note(f"{link}: skipped: a link to {seen[ident(st)]}, a folder already read (following it would "
                 "repeat those images, or loop forever)")
            continue
        seen[ident(st)] = link
        walk(index, link)

    ordered = [[p for _, files in sorted(found[i]) for p in sorted(files)] for i in range(len(classes))]
    owner: dict[tuple[int, int], str] = {}  # each file once: the real file wins over links to it
    for paths in ordered:
        for path in paths:
            if not os.path.islink(path):
                owner.setdefault(ident(os.stat(path)), path)
    samples: list[tuple[str, int]] = []
    for index, (_, class_dir) in enumerate(classes):
        count = 0
        for path in ordered[index]:
            key = ident(os.stat(path))
            if owner.setdefault(key, path) != path:
                note(f"{path}: skipped: the same file as {owner[key]}, listed once")
                continue
            samples.append((path, index))
            count += 1
        if count == 0:
            raise UsageError(f"class folder {class_dir} holds no images (regular files ending in "
                             f"{', '.join(IMAGE_EXTENSIONS)}); remove it or add images")
    if len(notes) > _NOTES_SHOWN:
        notes = notes[:_NOTES_SHOWN] + [f"... and {len(notes) - _NOTES_SHOWN} more skipped entries under {root}"]
    return [n for n, _ in classes], samples, [f"image_folder: {n}" for n in notes]


def _image_folder(cfg: Config, weights: dict | None = None) -> _Store:
    """ImageFolder's files and classes; sizes checked from the headers, decoding left for later.

    ``data.cache: true``: ``x`` is the memory-mapped decoded cache instead (nnctl/cache.py),
    built first when missing; the size check is then needed only to build it."""
    root = Path(os.path.expanduser(cfg.data.root))
    if not root.is_dir():
        raise UsageError(f"data.root {root} is not a folder; image_folder needs one sub-folder of images per class")
    class_names, samples, notes = _scan_image_folder(root)
    files = [p for p, _ in samples]
    y = torch.tensor([c for _, c in samples], dtype=torch.int64)
    mode = "L" if cfg.data.grayscale else "RGB"
    size = None
    if cfg.data.image_size is not None:
        size = (int(cfg.data.image_size[0]), int(cfg.data.image_size[1]))
    elif weights and len(cfg.model.input_shape) == 3:  # pretrained weights: every image at the model's input size
        size = (int(cfg.model.input_shape[1]), int(cfg.model.input_shape[2]))
    channels = 1 if mode == "L" else 3
    store = _Store(y=y, sample_shape=(channels, *(size or ())), scale=255.0, num_classes=len(class_names),
                   files=files, image_mode=mode, image_size=size, class_names=class_names, notes=notes)
    if cfg.data.cache:
        if cache.attach(store, root, measure_size=lambda: _common_size(root, files)):
            return store
    if store.image_size is None:
        store.image_size = _common_size(root, files)
        store.sample_shape = (channels, *store.image_size)
    return store


def _common_size(root: Path, files: list[str]) -> tuple[int, int]:
    """The one (H, W) of every image, read from the headers; different sizes are an error."""
    sizes: dict[tuple[int, int], str] = {}
    for p in files:
        sizes.setdefault(image_size(p), p)
        if len(sizes) > 1:
            (s1, f1), (s2, f2) = list(sizes.items())[:2]
            raise UsageError(f"images in {root} have different sizes ({f1} is {s1[0]}x{s1[1]}, {f2} is "
                             f"{s2[0]}x{s2[1]}); set data.image_size: [H, W] to resize them all")
    return next(iter(sizes))


def _decode_all(store: _Store, workers: int) -> None:
    """Decode every image of a streamed store once into one uint8 tensor."""
    loader = _loader(_StoreDataset(store), batch_size=256, num_workers=workers)
    store.x = torch.cat([x for x, _ in _iterate(loader)]) if len(store) else \
        torch.empty((0, *store.sample_shape), dtype=torch.uint8)
    store.files = None


def _read_tensors(path: Path) -> dict[str, Any]:
    """The file's tensors; read through files.read_input (a regular file only, never a FIFO)."""
    ext = path.suffix.lower()
    if ext in (".pt", ".pth", ".npz", ".safetensors"):
        data = read_input(path, "data file")
    if ext in (".pt", ".pth"):
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if not isinstance(obj, dict):
            raise UsageError(f"{path} holds a {type(obj).__name__}, not a dict with 'x' and 'y' tensors")
        return obj
    if ext == ".npz":
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: torch.from_numpy(np.array(npz[k])) for k in npz.files}
    if ext == ".safetensors":

        return load(data)
    raise UsageError(f"data.path {path}: unsupported file type {ext or '(none)'!r}; "
                     f"use .pt, .pth, .npz or .safetensors with x and y")


def _tensors(cfg: Config) -> _Store:
    """A file with x and y: integer y is class labels, float y regression targets (N -> N x 1)."""
    path = Path(os.path.expanduser(cfg.data.path))
    if not path.exists():
        raise UsageError(f"data.path {path} does not exist (expected a .pt, .npz or .safetensors file with x and y)")
    try:
        obj = _read_tensors(path)
    except NnctlError:  # a refused file, or a stop signal while reading (not corrupt data)
        raise
    except Exception as exc:
        raise UsageError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    missing = [k for k in ("x", "y") if k not in obj]
    if missing:
        raise UsageError(f"{path} has no {' or '.join(repr(m) for m in missing)} (keys: {sorted(map(str, obj))})")
    x, y = obj["x"], obj["y"]
    for k, v in (("x", x), ("y", y)):
        if not isinstance(v, Tensor):
            raise UsageError(f"{path}: {k!r} is a {type(v).__name__}, not a tensor")
    if x.ndim < 2:
        raise UsageError(f"{path}: x must have a sample dimension first, shape (N, ...), got {list(x.shape)}")
    if y.ndim < 1 or len(y) != len(x):
        raise UsageError(f"{path}: x has {len(x)} samples but y has shape {list(y.shape)}")
    if x.dtype == torch.bool or x.is_complex() or y.dtype == torch.bool or y.is_complex():
        raise UsageError(f"{path}: x and y must be real numbers (x: {x.dtype}, y: {y.dtype})")
    x = x.to(torch.float32).contiguous()
    _refuse_non_finite(path, "x", x)
    num_classes = None
    if y.is_floating_point():
        y = y.to(torch.float32)
        _refuse_non_finite(path, "y", y)
        if y.ndim == 1:
            y = y.unsqueeze(1)
    else:
        if y.ndim != 1:
            raise UsageError(f"{path}: integer y (class labels) must have shape (N,), got {list(y.shape)}")
        y = y.to(torch.int64)
        if len(y) and int(y.min()) < 0:
            raise UsageError(f"{path}: class labels in y must be >= 0, found {int(y.min())}")
        num_classes = int(y.max()) + 1 if len(y) else 0
    return _Store(y=y.contiguous(), sample_shape=tuple(x.shape[1:]), x=x, num_classes=num_classes)


def _refuse_non_finite(path: Path, key: str, t: Tensor) -> None:
    """NaN or infinite values (after the conversion to float32) would train on garbage: refused at load."""
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        first = int((~torch.isfinite(t.reshape(len(t), -1))).any(1).nonzero()[0])
        raise UsageError(f"{path}: {key} holds {bad:,} non-finite values (NaN or infinite, or beyond float32's "
                         f"range) of {t.numel():,}, the first in sample {first}; clean the data")


def _synthetic(cfg: Config) -> _Store:
    """Seeded random data: x ~ N(0, 1); labels uniform in [0, classes), or for a regression
    loss y = x.flatten() @ w + 0.01 * N(0, 1) with a fixed random w of shape (features, 1)."""
    d = cfg.data
    shape = tuple(d.shape or cfg.model.input_shape)
    n = d.size or 1024
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn((n, *shape), generator=g)
    if cfg.task is Task.CLASSIFICATION:
        classes = d.classes or 1
        return _Store(y=torch.randint(0, classes, (n,), generator=g), sample_shape=shape, x=x, num_classes=classes)
    features = math.prod(shape)
    w = torch.randn((features, 1), generator=g) / math.sqrt(features)
    y = x.reshape(n, -1) @ w + 0.01 * torch.randn((n, 1), generator=g)
    return _Store(y=y, sample_shape=shape, x=x)


def _read(cfg: Config, weights: dict | None = None) -> _Store:
    """The source's samples; ``weights``: a torchvision model's pretrained preprocessing (images at its input size)."""
    source = cfg.data.source
    root = Path(os.path.expanduser(cfg.data.root)) if cfg.data.root else default_root()
    if source == "digits":
        return _digits()
    if source in _MNIST_FOLDERS:
        return _mnist(cfg, root)
    if source in _CIFAR:
        return _cifar(cfg, root)
    if source == "image_folder":
        return _image_folder(cfg, weights)
    if source == "tensors":
        return _tensors(cfg)
    return _synthetic(cfg)


# --- load_data -------------------------------------------------------------------------

def has_test_split(source: str) -> bool:
    """Sources that come with a test split of their own (data.split: test)."""
    return source in ("mnist", "fashion_mnist", "cifar10", "cifar100")


IMAGE_MODES = {"digits": "L", "mnist": "L", "fashion_mnist": "L", "cifar10": "RGB", "cifar100": "RGB"}
