"""Which reader for which ``data.source``: the source's samples as one store."""

from __future__ import annotations

import os
from pathlib import Path

from nnctl.config.schema import Config
from nnctl.data.sources.builtin import (
    _CIFAR,
    _MNIST_FOLDERS,
    _cifar,
    _digits,
    _mnist,
    default_root,
)
from nnctl.data.sources.folder import _image_folder
from nnctl.data.sources.tensors import _synthetic, _tensors
from nnctl.data.store import _Store

IMAGE_SOURCES = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "image_folder")


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


def read_paths(cfg: Config) -> tuple[list[str], list[str]]:
    """What ``_read`` reads from the file system, as (files, folders): a tensors file; the root of an image
    folder or of a torchvision set. A command's outputs are never written over or inside them
    (``files.check_output``'s inputs and input_dirs)."""
    d = cfg.data
    if d is None:
        return [], []
    if d.source == "tensors" and d.path:
        return [os.path.expanduser(d.path)], []
    if d.source == "image_folder":  # data.val_root and data.test_root are input folders too
        return [], [os.path.expanduser(p) for p in (d.root, d.val_root, d.test_root) if p]
    if d.source in _MNIST_FOLDERS or d.source in _CIFAR:
        return [], [str(Path(os.path.expanduser(d.root)) if d.root else default_root())]
    return [], []


# --- load_data -------------------------------------------------------------------------

def has_test_split(source: str, test_root: str | None = None) -> bool:
    """Sources that come with a test split of their own (data.split: test); an image_folder with a test_root."""
    return source in ("mnist", "fashion_mnist", "cifar10", "cifar100") or bool(source == "image_folder" and test_root)


IMAGE_MODES = {"digits": "L", "mnist": "L", "fashion_mnist": "L", "cifar10": "RGB", "cifar100": "RGB"}
