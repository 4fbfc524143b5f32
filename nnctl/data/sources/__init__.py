"""Data sources: the built-in digits, torchvision sets, image folders, tensors files, synthetic data.

``read._read(cfg)`` picks the reader of ``data.source``: ``builtin`` (digits, MNIST, CIFAR), ``folder``
(image folders) or ``tensors`` (tensors files, synthetic); each returns one ``nnctl.data.store._Store``."""

from __future__ import annotations

from nnctl.data.sources.builtin import default_root, read_cifar_batch
from nnctl.data.sources.folder import IMAGE_EXTENSIONS, class_count
from nnctl.data.sources.read import IMAGE_MODES, IMAGE_SOURCES, has_test_split

__all__ = ["IMAGE_EXTENSIONS", "IMAGE_MODES", "IMAGE_SOURCES", "class_count", "default_root", "has_test_split", "read_cifar_batch"]
