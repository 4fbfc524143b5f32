"""The built-in digits and torchvision's sets (MNIST, Fashion-MNIST, CIFAR-10/100) read from their own files."""

from __future__ import annotations

import gzip
import os
import pickle
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nnctl.config.schema import Config
from nnctl.data import record as P
from nnctl.data.store import _Store
from nnctl.errors import NnctlError, UsageError
from nnctl.files import open_input


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
