"""Datasets as batches of tensors on the training device.

``load_data(cfg, device)`` reads the source named by ``cfg.data``, splits it into
training and validation samples, and returns a ``DataBundle`` whose ``Batches``
yield ``(x, y)`` already on the device.

How the data is held:

* Every source is first read into one in-memory *store*: raw samples ``x`` of
  shape ``(N, *sample_shape)`` (uint8 for images, float32 otherwise) and targets
  ``y`` (int64 class labels, or float32). The dataset's own test split, when
  used, is appended after the training samples. ``image_folder`` streams its
  files instead when it is not preloaded.
* Preloaded (``data.preload: true``, or auto when the store is under 2 GiB and,
  on CUDA, under half the free GPU memory): ``x`` and ``y`` are moved to the
  device once (images stay uint8 there, a quarter of the memory of float32) and a
  batch is one index operation with the epoch's shuffled index tensor.
* Otherwise a ``DataLoader`` with ``data.num_workers`` workers reads the same
  samples in the same order, through a batch sampler.
* Either way, each batch is finished on the device by the same code: uint8 is
  scaled to [0, 1] (digits: /16, other images: /255), normalised per channel,
  and for ``target: input`` copied to ``y`` with optional noise added to ``x``.
  So both paths give identical batches.
* ``data.augment`` (training batches only; see ``nnctl.augment``): each batch is
  augmented per sample after the scaling and before the normalisation, with a generator
  seeded by (seed, epoch, step, rank): on the device when preloaded, in the DataLoader's
  workers when streamed (which then hand over float32 batches).

Default dataset folder (mnist, fashion_mnist, cifar10, cifar100):
``$XDG_CACHE_HOME/nnctl/datasets``, i.e. ``~/.cache/nnctl/datasets``.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import signal
import stat
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from . import preprocess as P
from .config import CLASSIFICATION_LOSSES, Config
from .errors import NnctlError, UsageError
from .files import _kind as _file_kind
from .files import open_input, read_input

IMAGE_SOURCES = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "image_folder")
PRELOAD_LIMIT_BYTES = 2 << 30
_MASK = (1 << 63) - 1


def default_root() -> Path:
    """Where torchvision datasets live when data.root is not given."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "nnctl" / "datasets"


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers: seed * 1_000_003 + epoch, and so on."""
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p)) & _MASK
    return h


# --- the store: every source read into tensors ----------------------------------------

@dataclass
class _Store:
    """All samples of a source: raw x (or image files), targets y, and the split."""

    y: Tensor                       # (N,) int64 labels or (N, k) float32 targets
    sample_shape: tuple[int, ...]
    x: Tensor | None = None         # (N, *sample_shape) uint8 or float32; None: stream `files`
    scale: float | None = None      # uint8 x is divided by this (255, or 16 for digits)
    num_classes: int | None = None
    test_start: int | None = None   # samples from here on are the dataset's own test split
    files: list[str] | None = None  # image_folder, streamed
    image_mode: str = "RGB"
    image_size: tuple[int, int] | None = None  # (H, W) to resize to
    class_names: list[str] | None = None  # index = class id (the preprocessing record's `classes`)
    notes: list[str] = field(default_factory=list)  # what reading skipped, for the run to print
    mapped: bool = False  # x is memory-mapped from the decoded cache (data.cache): indexing it reads pages

    def __len__(self) -> int:
        return len(self.y)

    def nbytes(self) -> int:
        per = math.prod(self.sample_shape) * (self.x.element_size() if self.x is not None else 1)
        return len(self) * per + self.y.numel() * self.y.element_size()

    def sample(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.x[i] if self.x is not None else _decode_image(self.files[i], self.image_mode, self.image_size)
        return x, self.y[i]


class _StoreDataset(torch.utils.data.Dataset):
    def __init__(self, store: _Store):
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> "tuple[Tensor, Tensor] | _Failed":
        try:
            return self.store.sample(i)
        except UsageError as exc:  # a bad file: a value, so that no worker traceback crosses processes
            return _Failed(" ".join(str(exc).split()))


class _Failed:
    """A sample that could not be read; the DataLoader hands it back in place of a batch."""

    def __init__(self, message: str):
        self.message = message


def _collate(items: list) -> Any:
    for item in items:
        if isinstance(item, _Failed):
            return item
    batch = torch.utils.data.default_collate(items)
    if isinstance(items, _ToAugment):  # a training batch of augmented streamed data: scaled and augmented here
        x, y = batch
        return items.finish(x), y
    return batch


class _StepIndices(list):
    """One training batch's sample indices, tagged with its (epoch, step) for the worker's augmentation."""

    def __init__(self, indices: list[int], epoch: int, step: int):
        super().__init__(indices)
        self.epoch, self.step = epoch, step


class _ToAugment(list):
    """A training batch's samples, with what the worker needs to scale and augment them after collation."""

    def __init__(self, items: list, augment, scale: float | None, seed: int, epoch: int, step: int, rank: int):
        super().__init__(items)
        self.augment, self.scale, self.key = augment, scale, (seed, epoch, step, rank)

    def finish(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            x = x.to(torch.float32).div_(self.scale)
        elif x.dtype != torch.float32:
            x = x.to(torch.float32)
        return self.augment(x, self.augment.generator(*self.key))


class _AugmentedDataset(_StoreDataset):
    """A streamed training split with data.augment: batches tagged by the sampler are augmented in the
    DataLoader's workers (see _collate), with the generator of their (seed, epoch, step, rank)."""

    def __init__(self, store: _Store, augment, seed: int, rank: int):
        super().__init__(store)
        self.augment, self.seed, self.rank = augment, seed, rank

    def __getitems__(self, indices: list[int]) -> list:
        items = [self[i] for i in indices]
        if isinstance(indices, _StepIndices):
            return _ToAugment(items, self.augment, self.store.scale, self.seed, indices.epoch, indices.step,
                              self.rank)
        return items


WORKER_TERM_GRACE_S = 60


def _worker_term(signum, frame) -> None:
    """SIGTERM in a worker: die WORKER_TERM_GRACE_S seconds later, unless the main process shuts the
    worker down first (a group SIGTERM reaches the main process too, which stops at the next step
    boundary, saves and closes its workers)."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(WORKER_TERM_GRACE_S)


def _worker_init(worker_id: int) -> None:
    """DataLoader workers leave stops to the main process: Ctrl-C (sent to the whole process group) is
    ignored, and SIGTERM ends a worker only after a grace period (see _worker_term). A worker that
    died at once would fail the main process's next batch, or its SIGCHLD handler in the middle of
    a step, where no consistent state can be saved."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_term)


def _loader(dataset, **kwargs) -> torch.utils.data.DataLoader:
    """A DataLoader that draws no global random numbers (its own generator) and returns bad samples
    as values (see _Failed)."""
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    workers = kwargs.get("num_workers", 0)
    return torch.utils.data.DataLoader(dataset, collate_fn=_collate,
                                       worker_init_fn=_worker_init if workers else None, **kwargs)


class LoaderStopped(NnctlError):
    """A DataLoader worker process died (a signal, the out-of-memory killer): exit 1, not the data's fault."""


def _iterate(loader) -> Iterator[Any]:
    """A DataLoader's batches; a sample that could not be read is a one-line UsageError naming the file,
    and a worker process that died (a signal, out of memory) a one-line NnctlError, never a traceback."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except NnctlError:  # a stop signal (Interrupted) while waiting for a batch
            raise
        except RuntimeError as exc:
            text = " ".join(str(exc).split())
            if "DataLoader worker" in text:
                raise LoaderStopped(f"a DataLoader worker process stopped ({text[:200]}); this is not a fault "
                                 "of the data: a signal or the out-of-memory killer ended it") from None
            raise
        if isinstance(batch, _Failed):
            raise UsageError(batch.message)
        yield batch


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


@contextmanager
def _open_image(path: str):
    """PIL's image of a regular file (never a FIFO or device), or a one-line UsageError naming the file.

    A decompression bomb (more pixels than PIL's MAX_IMAGE_PIXELS, whether PIL warns or raises) is
    refused. A stop signal raised while reading (an NnctlError that is not a UsageError) passes
    through: it is not the file's fault.
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with open_input(path, "image file") as fh, Image.open(fh) as img:
                yield img
        except NnctlError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise UsageError(f"image {path}: refused as a possible decompression bomb: "
                             f"{' '.join(str(exc).split())[:200]}") from None
        except Exception as exc:  # OSError, SyntaxError (broken PNG), ValueError, zlib.error, struct.error, ...
            text = " ".join(str(exc).split())[:200]
            raise UsageError(f"cannot read image {path}: {type(exc).__name__}: {text} "
                             "(a corrupt or truncated image file)") from None


def _decode_image(path: str, mode: str, size: tuple[int, int] | None) -> Tensor:
    """One image file -> uint8 (C, H, W)."""
    from PIL import Image

    with _open_image(path) as img:
        img = img.convert(mode)
        if size is not None and (img.height, img.width) != tuple(size):
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


_NOTES_SHOWN = 8


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

    def ident(st: os.stat_result) -> tuple[int, int]:
        return st.st_dev, st.st_ino

    def note(text: str) -> None:
        notes.append(text)

    try:
        seen[ident(os.stat(root))] = str(root)
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
        if ident(st) in seen:
            note(f"{entry.path}: skipped as a class: a link to {seen[ident(st)]}, a folder already read")
            continue
        seen[ident(st)] = entry.path
        classes.append((entry.name, entry.path))
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


def _image_folder(cfg: Config) -> _Store:
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
    weights = weights_preprocessing(cfg)
    size = None
    if cfg.data.image_size is not None:
        size = (int(cfg.data.image_size[0]), int(cfg.data.image_size[1]))
    elif weights and len(cfg.model.input_shape) == 3:  # pretrained weights: every image at the model's input size
        size = (int(cfg.model.input_shape[1]), int(cfg.model.input_shape[2]))
    channels = 1 if mode == "L" else 3
    store = _Store(y=y, sample_shape=(channels, *(size or ())), scale=255.0, num_classes=len(class_names),
                   files=files, image_mode=mode, image_size=size, class_names=class_names, notes=notes)
    if cfg.data.cache:
        from . import cache

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
        with _open_image(p) as img:
            sizes.setdefault((img.height, img.width), p)
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
        from safetensors.torch import load

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
    if cfg.train.loss_name in CLASSIFICATION_LOSSES:
        classes = d.classes or 1
        return _Store(y=torch.randint(0, classes, (n,), generator=g), sample_shape=shape, x=x, num_classes=classes)
    features = math.prod(shape)
    w = torch.randn((features, 1), generator=g) / math.sqrt(features)
    y = x.reshape(n, -1) @ w + 0.01 * torch.randn((n, 1), generator=g)
    return _Store(y=y, sample_shape=shape, x=x)


def _read(cfg: Config) -> _Store:
    source = cfg.data.source
    root = Path(os.path.expanduser(cfg.data.root)) if cfg.data.root else default_root()
    if source == "digits":
        return _digits()
    if source in _MNIST_FOLDERS:
        return _mnist(cfg, root)
    if source in _CIFAR:
        return _cifar(cfg, root)
    if source == "image_folder":
        return _image_folder(cfg)
    if source == "tensors":
        return _tensors(cfg)
    return _synthetic(cfg)


# --- batches ---------------------------------------------------------------------------

@dataclass
class _Order:
    """Which samples each batch of an epoch holds, for one rank (see ``Batches``)."""

    indices: Tensor
    batch_size: int
    shuffle: bool
    seed: int
    rank: int = 0
    world_size: int = 1

    def __len__(self) -> int:
        n, b = len(self.indices), self.batch_size
        count = -(-n // b)
        if self.world_size > 1 and n % b and n % b < self.world_size:
            count -= 1  # too few samples left to give every rank one
        return count

    def order(self, epoch: int) -> Tensor:
        if not self.shuffle:
            return self.indices
        g = torch.Generator().manual_seed(_mix(self.seed, epoch))
        return self.indices[torch.randperm(len(self.indices), generator=g)]

    def batches(self, epoch: int, start_step: int, device: torch.device | None = None) -> Iterator[Tensor]:
        order = self.order(epoch)
        if device is not None:
            order = order.to(device)  # one copy an epoch, then every batch is a slice
        b, ws = self.batch_size, self.world_size
        for step in range(start_step, len(self)):
            chunk = order[step * b:(step + 1) * b]
            yield torch.tensor_split(chunk, ws)[self.rank] if ws > 1 else chunk


class _EpochBatchSampler:
    """Hands a DataLoader the index lists of one epoch, from a start step on."""

    def __init__(self, order: _Order):
        self.order = order
        self.epoch = 0
        self.start_step = 0
        self.tag = False  # data.augment: tag each index list with its (epoch, step)

    def __iter__(self) -> Iterator[list[int]]:
        for step, idx in enumerate(self.order.batches(self.epoch, self.start_step), self.start_step):
            yield _StepIndices(idx.tolist(), self.epoch, step) if self.tag else idx.tolist()

    def __len__(self) -> int:
        return max(0, len(self.order) - self.start_step)


class Batches:
    """The batches of one split, for one process.

    Training batches are shuffled by a permutation that depends only on
    ``(seed, epoch)``, so ``epoch(e, start_step=k)`` yields exactly batches
    k, k+1, ... of ``epoch(e)``. Validation batches come in order. The last
    partial batch is kept.

    Several processes (``world_size > 1``): every rank draws the same permutation;
    each global batch of ``batch_size`` samples is cut into ``world_size``
    consecutive slices and rank r takes slice r, so a rank's batches hold
    ``batch_size // world_size`` samples and the ranks together see each global
    batch exactly once. The last partial global batch is split as evenly as
    possible (``torch.tensor_split``), and dropped if it has fewer samples than
    ranks so that every rank runs the same number of steps. Validation is split
    differently: each rank evaluates one contiguous block of the validation
    samples (sum the metrics over ranks).

    Iterate one epoch at a time: a streamed split shares one DataLoader (and its
    persistent workers) between epochs; starting a new epoch abandons the last.

    ``target: input`` with noise: ``x`` gets ``noise * N(0, 1)`` from a generator
    seeded by (seed, epoch, step, rank) for training, by (seed, step, rank) for
    validation; ``y`` is the clean ``x``.

    ``augment`` (data.augment, training splits only; see nnctl.augment): each batch is
    augmented per sample on [0, 1] images, before normalisation, with the generator of
    (seed, epoch, step, rank): on the device for preloaded data, in the DataLoader's
    workers for streamed data. ``epoch(..., augment=False)`` gives the plain batches.
    """

    def __init__(self, store: _Store, indices: Tensor, batch_size: int, device: torch.device, *,
                 shuffle: bool, seed: int, mean: list[float] | None, std: list[float] | None,
                 target_input: bool, noise: float, preloaded: bool, num_workers: int = 0,
                 rank: int = 0, world_size: int = 1, device_x: Tensor | None = None,
                 device_y: Tensor | None = None, augment=None):
        self.store = store
        self.augment = augment if augment else None
        self.indices = indices
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.seed = seed
        # validation is sharded through `indices` already
        self._order = _Order(indices, batch_size, shuffle, seed, rank, world_size if shuffle else 1)
        self.target_input = target_input
        self.noise = float(noise)
        self.preloaded = preloaded
        self.rank = rank
        self.world_size = self._order.world_size
        view = (1, -1) + (1,) * (len(store.sample_shape) - 1)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=device).view(view) if mean else None
        self._std = torch.tensor(std, dtype=torch.float32, device=device).view(view) if std else None
        self._x, self._y = device_x, device_y
        self._loader = None
        if not preloaded:
            # the sampler must not refer back to this object: a reference cycle would leave the
            # persistent workers to be shut down by the garbage collector, slowly
            self._sampler = _EpochBatchSampler(self._order)
            # A DataLoader iterator draws its workers' base seed when it is made: from this generator,
            # never from the global RNG, whose stream belongs to dropout (exact resume). The workers
            # draw no random numbers (decoding is deterministic; noise is added in _finish).
            self._generator = torch.Generator()
            dataset = _StoreDataset(store) if self.augment is None else \
                _AugmentedDataset(store, self.augment, seed, rank)
            self._loader = _loader(
                dataset, batch_sampler=self._sampler, num_workers=num_workers,
                pin_memory=device.type == "cuda", persistent_workers=num_workers > 0, generator=self._generator)
        self._len = len(self._order)
        self.num_samples = sum(map(len, self._order.batches(0, 0))) if self.world_size > 1 else len(indices)

    def __len__(self) -> int:
        return self._len

    def global_size(self, step: int) -> int:
        """Samples in batch ``step`` summed over every rank (the global batch; smaller for the last)."""
        return max(0, min(self.batch_size, len(self.indices) - step * self.batch_size))

    def order(self, epoch: int) -> Tensor:
        """This split's sample indices in the order of ``epoch`` (all ranks)."""
        return self._order.order(epoch)

    def epoch(self, epoch: int, start_step: int = 0, *, augment: bool = True) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(x, y)`` on the device for batches ``start_step``, ... of ``epoch``
        (augmented when this split has a data.augment pipeline, unless ``augment=False``)."""
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        augment = augment and self.augment is not None
        if self.preloaded:
            for step, idx in enumerate(self._order.batches(epoch, start_step, self.device), start_step):
                yield self._finish(self._x[idx], self._y[idx], epoch, step, augment)
        else:
            self._sampler.epoch, self._sampler.start_step = epoch, start_step
            self._sampler.tag = augment  # the workers augment (see _collate)
            if start_step >= self._len:
                return
            nb = self.device.type == "cuda"
            self._generator.manual_seed(_mix(self.seed, epoch, 0x10AD))
            for step, (x, y) in enumerate(_iterate(self._loader), start_step):
                yield self._finish(x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb),
                                   epoch, step)

    def _finish(self, x: Tensor, y: Tensor, epoch: int, step: int,
                augment: bool = False) -> tuple[Tensor, Tensor]:
        """Scale, (preloaded, augment) augment, normalise and (target: input) copy and noise one batch,
        on the device."""
        if x.dtype == torch.uint8:
            x = x.to(torch.float32).div_(self.store.scale)
        elif x.dtype != torch.float32:
            x = x.to(torch.float32)
        if augment:  # streamed batches come augmented from the workers, as float32
            x = self.augment(x, self.augment.generator(self.seed, epoch, step, self.rank))
        if self._mean is not None:
            x = (x - self._mean) / self._std
        if not self.target_input:
            return x, y
        y = x
        if self.noise > 0:
            seed = _mix(self.seed, epoch, step, self.rank) if self.shuffle else _mix(self.seed, 7, step, self.rank)
            g = torch.Generator(device=x.device).manual_seed(seed)
            x = x + self.noise * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        return x, y


@dataclass
class DataBundle:
    """What the trainer needs to know about its data."""

    train: Batches
    val: Batches | None
    input_shape: tuple[int, ...]
    num_classes: int | None
    task: str                       # "classification" or "regression"
    mean: list[float] | None
    std: list[float] | None
    description: str
    preloaded: bool
    preprocessing: P.Preprocessing | None = None  # the record every checkpoint of this data carries
    # what reading skipped or decided, one line each, for the run to print (as "note: ...")
    notes: list[str] = field(default_factory=list)
    target_shape: tuple[int, ...] | None = None  # one sample's regression target; None for class labels
    label_range: tuple[int, int] | None = None  # (min, max) class label over both splits
    where: str = ""  # the data, for messages: "tensors file d.pt", "image_folder data/pets", "digits"


# --- load_data -------------------------------------------------------------------------

def has_test_split(source: str) -> bool:
    """Sources that come with a test split of their own (data.split: test)."""
    return source in ("mnist", "fashion_mnist", "cifar10", "cifar100")


def _align_classes(store: _Store, record: P.Preprocessing, source: str) -> None:
    """Other data scored by a trained model: its classes mapped onto the model's by name, never by position.

    An image folder of new images may hold a subset of the classes, in folders sorted
    differently; a class the model does not know, or unnamed classes that do not match,
    are an error instead of a silently wrong score.
    """
    if store.y.dtype != torch.int64 or not record.classes:
        return
    model_names = [str(c) for c in record.classes]
    names = store.class_names or [str(i) for i in range(store.num_classes or int(store.y.max()) + 1)]
    if list(names) == model_names:
        return
    unknown = [n for n in names if n not in model_names]
    if unknown:
        raise UsageError(f"the data's classes {names[:12]}{' ...' if len(names) > 12 else ''} are not the "
                         f"model's {model_names[:12]}{' ...' if len(model_names) > 12 else ''} ({source}: "
                         f"{unknown[0]!r} is unknown to the model); score it on data with the model's classes")
    index = torch.tensor([model_names.index(n) for n in names], dtype=torch.int64)
    store.y = index[store.y]
    store.num_classes = len(model_names)
    store.class_names = model_names


def weights_preprocessing(cfg: Config) -> dict | None:
    """A torchvision source's pretrained weights' own preprocessing (mean, std, crop size, categories), or None."""
    model = cfg.model
    if getattr(model, "torchvision", None) is None or getattr(model, "weights", None) is None:
        return None
    from .model import resolve_weights
    from .model import weights_preprocessing as of_weights

    member, _ = resolve_weights(model.torchvision, model.weights)
    return of_weights(member) if member is not None else None


def _split(cfg: Config, store: _Store) -> tuple[Tensor, Tensor]:
    """Training and validation indices into the store.

    ``split: fraction``: a permutation seeded by cfg.seed; the last
    ceil(val_fraction * N) samples validate (as scikit-learn rounds: 1,797 digits
    at 0.2 -> 1,437 / 360). ``split: test``: the dataset's own test split.
    ``limit`` then keeps the first N training samples.
    """
    d = cfg.data
    n = len(store)
    if d.split == "test":
        if store.test_start is None:
            raise UsageError(f"source {d.source} has no test split of its own; use split: fraction")
        train, val = torch.arange(store.test_start), torch.arange(store.test_start, n)
    else:
        n_val = math.ceil(d.val_fraction * n - 1e-9) if d.val_fraction > 0 else 0
        if n - n_val < 1:
            raise UsageError(f"{d.source} has {n} samples: too few for val_fraction {d.val_fraction}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
        train, val = perm[:n - n_val], perm[n - n_val:]
    if d.limit is not None:
        train = train[:d.limit]
    return train, val


def _stats(store: _Store, indices: Tensor, workers: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the scaled training samples (float64 sums)."""
    c = store.sample_shape[0]
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    count = 0
    if store.x is not None:
        chunks = (store.x[indices[i:i + 8192]] for i in range(0, len(indices), 8192))
    else:
        subset = torch.utils.data.Subset(_StoreDataset(store), indices.tolist())
        chunks = (x for x, _ in _iterate(_loader(subset, batch_size=256, num_workers=workers)))
    for x in chunks:
        x = x.to(torch.float64)
        if store.scale:  # set for uint8 images only
            x = x / store.scale
        per = x.transpose(0, 1).reshape(c, -1)
        total += per.sum(1)
        squares += (per * per).sum(1)
        count += per.shape[1]
    if count == 0:
        raise UsageError("no training samples to compute normalisation statistics from")
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant channel is only shifted
    return mean.tolist(), std.tolist()


def _normalization(cfg: Config, store: _Store, train: Tensor) -> tuple[list[float] | None, list[float] | None]:
    norm = cfg.data.normalize
    if norm is None:
        norm = cfg.data.source in IMAGE_SOURCES
    if norm is False:
        return None, None
    if norm is True:
        return _stats(store, train, cfg.data.num_workers)
    c = store.sample_shape[0]
    mean, std = list(norm["mean"]), list(norm["std"])
    for key, vals in (("mean", mean), ("std", std)):
        if len(vals) not in (1, c):
            raise UsageError(f"data.normalize.{key} has {len(vals)} values; the data has {c} channels "
                             f"(samples of shape {list(store.sample_shape)}): give 1 or {c}")
    return mean * c if len(mean) == 1 else mean, std * c if len(std) == 1 else std


def _should_preload(cfg: Config, store: _Store, device: torch.device) -> bool:
    if cfg.data.preload is not None:
        return cfg.data.preload
    if store.mapped and device.type == "cpu":
        # the decoded cache on the CPU: batches index the map directly (no copy, no workers), also
        # for a folder larger than memory; the page cache keeps what fits
        return True
    size = store.nbytes()
    if size > PRELOAD_LIMIT_BYTES:
        return False
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
        except Exception:
            return False
        return size < free // 2
    return True


def _map_labels(store: _Store, label_map: list[int], source: str) -> None:
    """data.label_map: class i becomes label_map[i] (a changed task for fine-tuning, e.g. even / odd)."""
    if store.y.dtype != torch.int64 or store.y.dim() != 1:
        raise UsageError(f"data.label_map needs class labels, but {source} gives {store.y.dtype} targets")
    classes = store.num_classes if store.num_classes is not None else int(store.y.max()) + 1
    if len(label_map) != classes:
        raise UsageError(f"data.label_map has {len(label_map)} entries but {source} has {classes} classes: "
                         "give one new class for each original class")
    store.y = torch.tensor(label_map, dtype=torch.int64)[store.y]
    store.num_classes = max(label_map) + 1
    store.class_names = P.label_map_names(store.class_names, label_map)


IMAGE_MODES = {"digits": "L", "mnist": "L", "fashion_mnist": "L", "cifar10": "RGB", "cifar100": "RGB"}


def preprocessing_record(cfg: Config, store: _Store, task: str, mean, std) -> P.Preprocessing:
    """What turns a raw input into this data's model input, and an output into an answer."""
    source = cfg.data.source
    shape = [int(v) for v in store.sample_shape]
    mode = store.image_mode if source == "image_folder" else IMAGE_MODES.get(source)
    resize = list(store.image_size) if store.image_size else (shape[1:3] if mode and len(shape) == 3 else None)
    if cfg.data.target == "input":
        task = "reconstruction"
    return P.Preprocessing(task=task, source=source, input_shape=shape, color_mode=mode,
                           resize=[int(v) for v in resize] if resize else None,
                           scale=float(store.scale) if store.scale else None,
                           mean=[float(v) for v in mean] if mean is not None else None,
                           std=[float(v) for v in std] if std is not None else None,
                           classes=list(store.class_names) if store.class_names and task == "classification"
                           else None)


def load_data(cfg: Config, device: torch.device, *, rank: int = 0, world_size: int = 1,
              preprocessing: P.Preprocessing | None = None, augment: bool = True) -> DataBundle:
    """Read cfg.data and return the training (and validation) batches on ``device``.

    With ``world_size > 1`` each rank gets its own shard of every batch (see ``Batches``);
    train.batch_size is the global batch and must divide by world_size.
    ``augment=False`` leaves data.augment out (scoring a model, as nnctl eval does).
    """
    device = torch.device(device)
    d, t = cfg.data, cfg.train
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    if t.batch_size % world_size:
        raise UsageError(f"train.batch_size {t.batch_size} must be a multiple of the number of processes "
                         f"({world_size}): it is the global batch, split evenly between them")
    store = _read(cfg)
    if d.label_map is not None:
        _map_labels(store, d.label_map, d.source)
    shape = list(store.sample_shape)
    if shape != list(cfg.model.input_shape):
        raise UsageError(f"data gives samples of shape {shape} but model.input_shape is "
                         f"{list(cfg.model.input_shape)} (source: {d.source}); set model.input_shape: {shape}")
    if len(store) == 0:
        raise UsageError(f"{d.source} has no samples")

    if d.target == "input":
        task, num_classes = "regression", None
    elif store.y.dtype == torch.int64:
        task, num_classes = "classification", store.num_classes
        if t.loss_name not in CLASSIFICATION_LOSSES:
            raise UsageError(f"{d.source} gives class labels but train.loss is {t.loss_name}; use cross_entropy or nll, "
                             f"or data.target: input to reconstruct the input")
    else:
        task, num_classes = "regression", None
        if t.loss_name in CLASSIFICATION_LOSSES:
            raise UsageError(f"{d.source} gives float targets (y is {store.y.dtype}), not class labels, but "
                             f"train.loss is {t.loss_name}; use mse or l1, or integer labels in y")

    train_idx, val_idx = _split(cfg, store)
    weights = weights_preprocessing(cfg) if preprocessing is None else None
    if preprocessing is not None:  # scoring other data as the model was trained: the recorded statistics
        _align_classes(store, preprocessing, d.source)
        mean, std = preprocessing.mean, preprocessing.std
    elif weights and d.normalize is None and weights.get("mean") and len(weights["mean"]) == shape[0]:
        mean, std = list(weights["mean"]), list(weights["std"])  # pretrained weights: their own statistics
    else:
        mean, std = _normalization(cfg, store, train_idx)
    preload = _should_preload(cfg, store, device)
    if preload and store.x is None:
        _decode_all(store, d.num_workers)
    dx = dy = None
    if preload:
        try:
            dx, dy = store.x.to(device), store.y.to(device)
        except torch.OutOfMemoryError as exc:
            raise NnctlError(f"{d.source} ({store.nbytes() / 2**30:.1f} GiB) does not fit on {device}; "
                             f"set data.preload: false to stream it") from exc

    common = dict(seed=cfg.seed, mean=mean, std=std, target_input=d.target == "input", noise=d.noise,
                  preloaded=preload, num_workers=d.num_workers, device_x=dx, device_y=dy)
    pipeline = None
    if d.augment and augment:  # training batches only (augment=False: scoring, as nnctl eval does)
        from .augment import build as build_augment

        pipeline = build_augment(d.augment, shape)
    train = Batches(store, train_idx, t.batch_size, device, shuffle=True, rank=rank, world_size=world_size,
                    augment=pipeline, **common)
    val = None
    if len(val_idx):
        if world_size > 1:
            val_idx = torch.tensor_split(val_idx, world_size)[rank]
        val = Batches(store, val_idx, t.eval_batch_size or 4 * t.batch_size, device, shuffle=False, **common)

    how = f"preloaded on {device}" if preload else f"streamed by a DataLoader with {d.num_workers} workers"
    if preload and store.mapped and device.type == "cpu":
        how = "indexed in the memory-mapped decoded cache"
    desc = f"{d.source}: {len(train_idx):,} train / {len(val_idx):,} {'test' if d.split == 'test' else 'val'} " \
           f"samples, {how}"
    if world_size > 1:
        desc += f" (rank {rank} of {world_size})"
    if pipeline is not None:
        desc += f"; augment: {pipeline.describe()}"
    record = preprocessing_record(cfg, store, task, mean, std)
    if task == "classification":
        target_shape, label_range = None, (int(store.y.min()), int(store.y.max()))
    else:
        target_shape = tuple(shape) if d.target == "input" else tuple(store.y.shape[1:])
        label_range = None
    where = d.source
    if d.source == "tensors":
        where = f"tensors file {d.path}"
    elif d.source == "image_folder":
        where = f"image_folder {d.root}"
    return DataBundle(train=train, val=val, input_shape=tuple(shape), num_classes=num_classes, task=task,
                      mean=mean, std=std, description=desc, preloaded=preload, preprocessing=record,
                      notes=list(store.notes), target_shape=target_shape, label_range=label_range, where=where)


# --- targets against the model -----------------------------------------------------------

def _output_layer(plan) -> Any:
    """The layer that sets the model's output shape: the last one that changes its input's shape
    (the Linear before a LogSoftmax, say), else the last layer."""
    leaves = [node for _, node in plan.root.walk() if not node.children]
    for node in reversed(leaves):
        if node.in_shape is not None and node.out_shape is not None and tuple(node.in_shape) != tuple(node.out_shape):
            return node
    return leaves[-1] if leaves else None


def check_targets(cfg: Config, doc, plan, data: DataBundle) -> list:
    """Problems (nnctl.errors.Problem, located at the model's output layer) where the data's targets
    do not fit the model's output: class labels at or above the output width, an output that is not
    one score per class, or a regression target whose shape differs from the output's (which the
    loss would broadcast with only a warning). An empty list when they fit.

    Call it after load_data and before anything is written; raise ConfigError(problems) (exit 2).
    """
    from .yamlio import format_path

    out = plan.output_shape
    if out is None:
        return []
    out = tuple(int(v) for v in out)
    node = _output_layer(plan)
    path = tuple(node.path) if node is not None else ("model", "layers")
    line, _ = doc.locate(path)
    layer = (f"the model's output layer {format_path(path)} ({node.label()}{f', line {line}' if line else ''})"
             if node is not None else "the model")
    what = data.where or cfg.data.source
    problems = []
    if data.task == "classification":
        classes = data.num_classes or 0
        lo, hi = data.label_range if data.label_range else (0, classes - 1)
        needed = max(classes, hi + 1)
        if len(out) != 1:
            problems.append(doc.problem(path, (
                f"{layer} gives outputs of shape {list(out)} per sample, but the data ({what}) has class labels "
                f"({needed} classes) and train.loss {cfg.train.loss_name} needs one score per class, shape [{needed}]; "
                "end the model with a Flatten and a Linear of that width")))
        elif out[0] < needed:
            hint = f"; set out_features: {needed}" if node is not None and node.type_name == "Linear" else ""
            problems.append(doc.problem(path, (
                f"{layer} gives {out[0]} class scores per sample, but the data ({what}) has class labels "
                f"{lo}..{hi} ({needed} classes): a label at or above {out[0]} has no score{hint}")))
    else:
        target = tuple(data.target_shape) if data.target_shape is not None else None
        if target is not None and target != out:
            source = "the input (data.target: input)" if cfg.data.target == "input" else f"y in {what}"
            problems.append(doc.problem(path, (
                f"{layer} gives outputs of shape {list(out)} per sample, but the targets ({source}) have shape "
                f"{list(target)} per sample; the {cfg.train.loss_name} loss would broadcast them and train on the "
                f"wrong differences: make the output {list(target)}")))
    return problems
