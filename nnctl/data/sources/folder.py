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


def _class_folders(root: Path, seen: dict[tuple[int, int], str], note, key: str = "root") -> list[tuple[str, str]]:
    """ImageFolder's classes: (name, path) of each sub-folder of ``root``, by name, each real folder
    once (a link to a folder already read is skipped and noted). ``seen`` gathers the folders read."""
    try:
        seen[_ident(os.stat(root))] = str(root)
        top = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise UsageError(f"data.{key} {root}: cannot read: {exc.strerror or exc}") from None
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


def _scan_image_folder(root: Path, key: str = "root") -> tuple[list[str], list[tuple[str, int]], list[str]]:
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

    classes = _class_folders(root, seen, note, key)
    if not classes:
        raise UsageError(f"data.{key} {root} has no sub-folders: image_folder needs one sub-folder of images "
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


def other_folder(d) -> tuple[str, str] | None:
    """The folder an image_folder reads besides data.root, as (its key, its path): data.val_root (the
    validation split, split: fraction) or data.test_root (split: test); None when there is none."""
    if d is None or d.source != "image_folder":
        return None
    key = "test_root" if d.split == "test" else "val_root"
    return (key, getattr(d, key)) if getattr(d, key) else None


def folder_classes(folder: Path, key: str, root: Path, classes: list[str]) -> tuple[list[int], list[str]]:
    """The class index in ``root``'s classes of each class folder of ``folder`` (data.val_root or
    data.test_root), matched by name, and the notes: a class folder that root does not have is an
    error naming it; a class of root with no folder there is allowed (that split has none of it) and noted."""
    names = [n for n, _ in _class_folders(folder, {}, lambda text: None, key)]
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise UsageError(f"data.{key} {folder}: class folder {unknown[0]!r} is not a class of data.root {root} "
                         f"(its classes: {', '.join(classes[:12])}{' ...' if len(classes) > 12 else ''}); "
                         "classes are matched by folder name: rename or remove it")
    missing = [n for n in classes if n not in names]
    many = len(missing) > 1
    note = (f"image_folder: data.{key} {folder} has no folder for class{'es' if many else ''} "
            f"{', '.join(repr(n) for n in missing[:5])}{' ...' if len(missing) > 5 else ''}: the "
            f"{key.removesuffix('_root')} split holds none of {'them' if many else 'it'}")
    notes = [note] if missing else []
    return [classes.index(n) for n in names], notes


def _folder(path: str, key: str, root: Path | None = None) -> Path:
    """data.root's (or, beside ``root``, data.val_root's or test_root's) folder, refused when it is not one."""
    folder = Path(os.path.expanduser(path))
    if not folder.is_dir():
        raise UsageError(f"data.{key} {folder} is not a folder; image_folder needs one sub-folder of images per class")
    if root is not None and os.path.samefile(folder, root):
        raise UsageError(f"data.{key} {folder} is data.root: its images would be training images too; "
                         f"give a folder of other images")
    return folder


def root_problem(d) -> str | None:
    """What reading refuses first about an image folder's data.root (not a folder), or None. Training's
    check (before a run folder is made); ``nnctl check`` leaves it out: shipped configs are templates whose
    root is given with --set data.root=..."""
    if d is None or d.source != "image_folder" or not d.root:
        return None
    root = Path(os.path.expanduser(d.root))
    return None if root.is_dir() else f"{root} is not a folder; image_folder needs one sub-folder of images per class"


def folder_problems(d) -> list[tuple[str, str]]:
    """(key, message) for each data.val_root / data.test_root that is not a folder, is data.root, or holds a
    class folder that data.root does not have: what reading them refuses, found without opening an image."""
    if d is None or d.source != "image_folder":
        return []
    root = Path(os.path.expanduser(d.root)) if d.root else None
    root = root if root is not None and root.is_dir() else None
    problems = []
    for key in ("val_root", "test_root"):
        if getattr(d, key):
            try:
                folder = _folder(getattr(d, key), key, root)
                if root is not None:
                    folder_classes(folder, key, root, [n for n, _ in _class_folders(root, {}, lambda t: None)])
            except UsageError as exc:
                problems.append((key, str(exc).removeprefix(f"data.{key} ")))
    return problems


def folder_notes(d) -> list[tuple[str, str]]:
    """(key, note) for each data.val_root / data.test_root that lacks a class folder of data.root: what
    training notes in its run log (that split holds none of the class), for ``nnctl check`` to say too."""
    if d is None or d.source != "image_folder" or not d.root or not os.path.isdir(os.path.expanduser(d.root)):
        return []
    root = Path(os.path.expanduser(d.root))
    notes = []
    for key in ("val_root", "test_root"):
        if getattr(d, key) and os.path.isdir(os.path.expanduser(getattr(d, key))):
            try:
                classes = [n for n, _ in _class_folders(root, {}, lambda t: None)]
                _, found = folder_classes(Path(os.path.expanduser(getattr(d, key))), key, root, classes)
            except UsageError:  # refused by folder_problems, at its line
                continue
            notes += [(key, n.removeprefix("image_folder: ").removeprefix(f"data.{key} ")) for n in found]
    return notes


def _image_folder(cfg: Config, weights: dict | None = None) -> _Store:
    """ImageFolder's files and classes; sizes checked from the headers, decoding left for later.

    data.val_root (split: fraction) or data.test_root (split: test): that folder's samples follow
    data.root's (``val_start`` / ``test_start``), classes matched by name (``folder_classes``).
    ``data.cache: true``: ``x`` is the memory-mapped decoded cache instead (nnctl/cache.py), one
    entry per folder, built first when missing; the size check is then needed only to build it."""
    root = _folder(cfg.data.root, "root")
    class_names, samples, notes = _scan_image_folder(root)
    parts = [(root, samples)]
    other = other_folder(cfg.data)
    if other is not None:
        key, folder = other[0], _folder(other[1], other[0], root)
        index, more_notes = folder_classes(folder, key, root, class_names)
        _, more, scan_notes = _scan_image_folder(folder, key)
        parts.append((folder, [(p, index[c]) for p, c in more]))
        notes += more_notes + scan_notes
    mode = "L" if cfg.data.grayscale else "RGB"
    size = None
    if cfg.data.image_size is not None:
        size = (int(cfg.data.image_size[0]), int(cfg.data.image_size[1]))
    elif weights and len(cfg.model.input_shape) == 3:  # pretrained weights: every image at the model's input size
        size = (int(cfg.model.input_shape[1]), int(cfg.model.input_shape[2]))
    elif len(parts) > 1:  # one size for both folders
        size = _common_size(f"{root} and {parts[1][0]}", [p for _, part in parts for p, _ in part])
    stores = [_folder_store(cfg, folder, part, class_names, mode, size) for folder, part in parts]
    if len(stores) == 1:
        stores[0].notes[:0] = notes
        return stores[0]
    return _joined(stores, [[p for p, _ in part] for _, part in parts], other[0], str(parts[1][0]), notes)


def _folder_store(cfg: Config, folder: Path, samples: list[tuple[str, int]], class_names: list[str], mode: str,
                  size: tuple[int, int] | None) -> _Store:
    """One folder's samples as a store: streamed files, or its decoded cache entry (data.cache)."""
    files = [p for p, _ in samples]
    y = torch.tensor([c for _, c in samples], dtype=torch.int64)
    channels = 1 if mode == "L" else 3
    store = _Store(y=y, sample_shape=(channels, *(size or ())), scale=255.0, num_classes=len(class_names),
                   files=files, image_mode=mode, image_size=size, class_names=class_names, names=files)
    if cfg.data.cache and cache.attach(store, folder, measure_size=lambda: _common_size(folder, files)):
        return store
    if store.image_size is None:
        store.image_size = _common_size(folder, files)
        store.sample_shape = (channels, *store.image_size)
    return store


def _joined(stores: list[_Store], files: list[list[str]], key: str, folder: str, notes: list[str]) -> _Store:
    """data.root's store and the other folder's as one: the other's samples from ``val_start`` (val_root)
    or ``test_start`` (test_root) on. Two decoded cache entries are joined in memory (a copy)."""
    first, second = stores
    mapped = all(s.x is not None for s in stores)
    joined = _Store(y=torch.cat([first.y, second.y]), sample_shape=first.sample_shape, scale=first.scale,
                    num_classes=first.num_classes, image_mode=first.image_mode, image_size=first.image_size,
                    class_names=first.class_names, notes=notes + first.notes + second.notes,
                    x=torch.cat([first.x, second.x]) if mapped else None,
                    files=None if mapped else files[0] + files[1], names=files[0] + files[1])
    if not mapped and any(s.x is not None for s in stores):
        joined.notes.append("the decoded cache serves one of the two folders only: both are decoded without it")
    joined.parts = [(key, folder, len(first))]
    if key == "test_root":
        joined.test_start = len(first)
    else:
        joined.val_start = len(first)
    return joined


def _common_size(root: Path | str, files: list[str]) -> tuple[int, int]:
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
