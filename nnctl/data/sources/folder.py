"""Image folders: one folder a class, scanned once (links, FIFOs, unreadable files noted), decoded by the
one decoder (nnctl.data.decode), through the decoded cache when data.cache is on."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import torch

from nnctl.config.schema import Config
from nnctl.data import cache
from nnctl.data.decode import IMAGE_SUFFIXES, image_size
from nnctl.data.store import _iterate, _loader, _Store, _StoreDataset
from nnctl.errors import UsageError
from nnctl.files import _kind as _file_kind

IMAGE_EXTENSIONS = IMAGE_SUFFIXES  # the one decoder's list (nnctl.data.decode)


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
