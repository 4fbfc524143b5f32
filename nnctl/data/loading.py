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

import math
from typing import Any

import torch
from torch import Tensor

from nnctl.config.schema import Config
from nnctl.config.yamlio import format_path
from nnctl.data import record as P
from nnctl.data.augment.pipeline import build as build_augment
from nnctl.data.sources.folder import _decode_all, class_count, folder_notes, folder_problems, other_folder
from nnctl.data.sources.read import IMAGE_MODES, IMAGE_SOURCES, _read
from nnctl.data.sources.tensors import SYNTHETIC_SIZE
from nnctl.data.store import (
    Batches,
    DataBundle,
    _iterate,
    _loader,
    _Store,
    _StoreDataset,
)
from nnctl.errors import NnctlError, UsageError
from nnctl.tasks import Task

PRELOAD_LIMIT_BYTES = 2 << 30


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




def _split(cfg: Config, store: _Store, whole: bool = False) -> tuple[Tensor, Tensor]:
    """Training and validation indices into the store.

    ``split: fraction``: a permutation seeded by cfg.seed; the last
    ceil(val_fraction * N) samples validate (as scikit-learn rounds: 1,797 digits
    at 0.2 -> 1,437 / 360); an image_folder's data.val_root instead: that folder's samples.
    ``split: test``: the dataset's own test split (an image_folder's data.test_root).
    ``whole``: every sample read trains, none validates (nnctl eval --split all).
    ``limit`` then keeps the first N training samples.
    """
    d = cfg.data
    n = len(store)
    held_out = store.parts[0][2] if store.parts else store.test_start if d.split == "test" else None
    if d.split == "test" and held_out is None:
        raise UsageError(f"source {d.source} has no test split of its own; use split: fraction")
    if held_out is not None:
        train, val = (torch.arange(n), torch.arange(0)) if whole else (torch.arange(held_out), torch.arange(held_out, n))
    else:
        n_val = 0 if whole else val_count(n, d.val_fraction)
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


def _label_map_message(label_map: list[int], source: str, classes: int) -> str:
    return (f"data.label_map has {len(label_map)} entries but {source} has {classes} classes: "
            "give one new class for each original class")


def _labels_loss_message(source: str, loss: str) -> str:
    return (f"{source} gives class labels but train.loss is {loss}; use cross_entropy or nll, "
            f"or data.target: input to reconstruct the input")


def _map_labels(store: _Store, label_map: list[int], source: str) -> None:
    """data.label_map: class i becomes label_map[i] (a changed task for fine-tuning, e.g. even / odd)."""
    if store.y.dtype != torch.int64 or store.y.dim() != 1:
        raise UsageError(f"data.label_map needs class labels, but {source} gives {store.y.dtype} targets")
    classes = store.num_classes if store.num_classes is not None else int(store.y.max()) + 1
    if len(label_map) != classes:
        raise UsageError(_label_map_message(label_map, source, classes))
    store.y = torch.tensor(label_map, dtype=torch.int64)[store.y]
    store.num_classes = max(label_map) + 1
    store.class_names = P.label_map_names(store.class_names, label_map)


def preprocessing_record(cfg: Config, store: _Store, task: Task, mean, std) -> P.Preprocessing:
    """What turns a raw input into this data's model input, and an output into an answer (the task's name)."""
    source = cfg.data.source
    shape = [int(v) for v in store.sample_shape]
    mode = store.image_mode if source == "image_folder" else IMAGE_MODES.get(source)
    resize = list(store.image_size) if store.image_size else (shape[1:3] if mode and len(shape) == 3 else None)
    return P.Preprocessing(task=str(task), source=source, input_shape=shape, color_mode=mode,
                           resize=[int(v) for v in resize] if resize else None,
                           scale=float(store.scale) if store.scale else None,
                           mean=[float(v) for v in mean] if mean is not None else None,
                           std=[float(v) for v in std] if std is not None else None,
                           classes=list(store.class_names) if store.class_names and task.has_classes else None,
                           data=store.fingerprint(cfg.data.root))


class ShapeMismatch(UsageError):
    """The data's samples are not the shape the model takes; ``key``: the config key the fix is at
    (model.input_shape for a config, data.image_size for a trained image model), so that a caller holding
    the YAML document reports it at that line (nnctl train: the check pipeline's ``located``)."""

    def __init__(self, message: str, key: tuple[str, ...]):
        super().__init__(message)
        self.key = key


def data_fingerprint(cfg: Config) -> dict:
    """The data's fingerprint as a run records it (``Preprocessing.data``: samples, per class, a digest), from
    the source's listing or bytes as ``load_data`` reads them, without decoding an image or filling the
    decoded cache: what a continued search compares its trials' data against (nnctl tune)."""
    d = cfg.data.model_copy(update={"cache": False})
    store = _read(cfg.model_copy(update={"data": d}), None)
    if d.label_map is not None:
        _map_labels(store, d.label_map, d.source)
    return store.fingerprint(d.root)


def _shape_message(cfg: Config, shape: list[int], trained: bool) -> str:
    """Samples of another shape than the model's input: the fix for a config (its input_shape) or, for a
    trained model (a preprocessing record), the data's (image folders resize with data.image_size)."""
    want, source = list(cfg.model.input_shape), cfg.data.source
    if not trained:
        return (f"data gives samples of shape {shape} but model.input_shape is {want} (source: {source}); "
                f"set model.input_shape: {shape}")
    fix = (f"set data.image_size: {want[-2:]} to resize the images to the model's input"
           if source == "image_folder" and len(want) == 3 and len(shape) == 3 and want[0] == shape[0]
           else "give data of the shape it was trained on")
    return f"data gives samples of shape {shape}, but the trained model takes {want} (source: {source}); {fix}"


def load_data(cfg: Config, device: torch.device, *, rank: int = 0, world_size: int = 1,
              preprocessing: P.Preprocessing | None = None, augment: bool = True,
              weights: dict | None = None, whole: bool = False) -> DataBundle:
    """Read cfg.data and return the training (and validation) batches on ``device``.

    With ``world_size > 1`` each rank gets its own shard of every batch (see ``Batches``);
    train.batch_size is the global batch and must divide by world_size.
    ``augment=False`` leaves data.augment out (scoring a model, as nnctl eval does); ``whole``: every
    sample read is in the training batches and none validates (nnctl eval --split all).
    """
    device = torch.device(device)
    d, t = cfg.data, cfg.train
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    if t.batch_size % world_size:
        raise UsageError(f"train.batch_size {t.batch_size} must be a multiple of the number of processes "
                         f"({world_size}): it is the global batch, split evenly between them")
    store = _read(cfg, weights)
    if d.label_map is not None:
        _map_labels(store, d.label_map, d.source)
    shape = list(store.sample_shape)
    if shape != list(cfg.model.input_shape):
        raise ShapeMismatch(_shape_message(cfg, shape, trained=preprocessing is not None), ("model", "input_shape"))
    if len(store) == 0:
        raise UsageError(f"{d.source} has no samples")

    task = cfg.task  # the data must fit it: class labels for a classification loss, float targets else
    num_classes = store.num_classes if task.has_classes else None
    labels = store.y.dtype == torch.int64
    if labels and not task.has_classes and task is not Task.RECONSTRUCTION:  # reconstruction: y is x
        raise UsageError(_labels_loss_message(d.source, t.loss_name))
    if task.has_classes and not labels:
        raise UsageError(f"{d.source} gives float targets (y is {store.y.dtype}), not class labels, but "
                         f"train.loss is {t.loss_name}; use mse or l1, or integer labels in y")

    train_idx, val_idx = _split(cfg, store, whole)
    weights = weights if preprocessing is None else None
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

        pipeline = build_augment(d.augment, shape)
    train = Batches(store, train_idx, t.batch_size, device, shuffle=True, rank=rank, world_size=world_size,
                    augment=pipeline, **common)
    val = None
    val_total = len(val_idx)  # the whole split (the description counts both splits whole, under DDP too)
    if len(val_idx):
        if world_size > 1:
            val_idx = torch.tensor_split(val_idx, world_size)[rank]
        val = Batches(store, val_idx, t.eval_batch_size or 4 * t.batch_size, device, shuffle=False, **common)

    how = f"preloaded on {device}" if preload else f"streamed by a DataLoader with {d.num_workers} workers"
    if preload and store.mapped and device.type == "cpu":
        how = "indexed in the memory-mapped decoded cache"
    desc = f"{d.source}: {len(train_idx):,} train / {val_total:,} {'test' if d.split == 'test' else 'val'} " \
           f"samples, {how}"
    if world_size > 1:
        desc += (f" (rank {rank} of {world_size}: a 1/{world_size} share of every training batch and "
                 f"{len(val_idx):,} of the {'test' if d.split == 'test' else 'val'} samples)")
    if pipeline is not None:
        desc += f"; augment: {pipeline.describe()}"
    record = preprocessing_record(cfg, store, task, mean, std)
    if task.has_classes:
        target_shape, label_range = None, (int(store.y.min()), int(store.y.max()))
    else:
        target_shape = tuple(shape) if task is Task.RECONSTRUCTION else tuple(store.y.shape[1:])
        label_range = None
    where = _where(d)
    return DataBundle(train=train, val=val, input_shape=tuple(shape), num_classes=num_classes, task=task,
                      mean=mean, std=std, description=desc, preloaded=preload, preprocessing=record,
                      notes=list(store.notes), target_shape=target_shape, label_range=label_range, where=where)


# --- targets against the model -----------------------------------------------------------

def _where(d) -> str:
    """The data as messages name it: digits, image_folder ROOT, tensors file PATH."""
    if d.source == "tensors":
        return f"tensors file {d.path}"
    if d.source == "image_folder":
        other = other_folder(d)  # the folder read besides root: data.val_root, or test_root for split: test
        return f"image_folder {d.root}" + (f" and data.{other[0]} {other[1]}" if other else "")
    return d.source


def _output_layer(plan) -> Any:
    """The layer that sets the model's output shape: the last one that changes its input's shape
    (the Linear before a LogSoftmax, say), else the last layer."""
    leaves = [node for _, node in plan.root.walk() if not node.children]
    for node in reversed(leaves):
        if node.in_shape is not None and node.out_shape is not None and tuple(node.in_shape) != tuple(node.out_shape):
            return node
    return leaves[-1] if leaves else None


def _output_place(doc, plan) -> tuple[tuple, str]:
    """The YAML path of the model's output layer, and how messages name it."""
    node = _output_layer(plan)
    path = tuple(node.path) if node is not None else ("model", "layers")
    line, _ = doc.locate(path)
    layer = (f"the model's output layer {format_path(path)} ({node.label()}{f', line {line}' if line else ''})"
             if node is not None else "the model")
    return path, layer


def _score_problems(cfg: Config, doc, plan, what: str, classes: int, lo: int, hi: int) -> list:
    """Class labels lo..hi (``classes`` of them) against the model's output: one score per class."""
    out = tuple(int(v) for v in plan.output_shape)
    path, layer = _output_place(doc, plan)
    node = _output_layer(plan)
    needed = max(classes, hi + 1)
    if len(out) != 1:
        return [doc.problem(path, (
            f"{layer} gives outputs of shape {list(out)} per sample, but the data ({what}) has class labels "
            f"({needed} classes) and train.loss {cfg.train.loss_name} needs one score per class, shape [{needed}]; "
            "end the model with a Flatten and a Linear of that width"))]
    if out[0] < needed:
        hint = f"; set out_features: {needed}" if node is not None and node.type_name == "Linear" else ""
        return [doc.problem(path, (
            f"{layer} gives {out[0]} class scores per sample, but the data ({what}) has class labels "
            f"{lo}..{hi} ({needed} classes): a label at or above {out[0]} has no score{hint}"))]
    return []


def val_count(n: int, val_fraction: float) -> int:
    """The validation samples of ``split: fraction`` out of n: ceil(val_fraction * n), as scikit-learn rounds."""
    return math.ceil(val_fraction * n - 1e-9) if val_fraction > 0 else 0


KNOWN_SIZES = {"digits": 1797}  # sources whose sample count is known without reading them


def split_problems(cfg: Config, doc) -> list:
    """A val_fraction that leaves no training sample, where the count is known before reading (the built-in
    digits, synthetic data), and an image folder's data.val_root / test_root that reading would refuse
    (not a folder, data.root itself, a class folder root lacks): at their lines, as training refuses them."""
    d = cfg.data
    problems = [doc.problem(("data", key), message) for key, message in folder_problems(d)]
    if d is None or d.split != "fraction":
        return problems
    n = KNOWN_SIZES.get(d.source) or ((d.size or SYNTHETIC_SIZE) if d.source == "synthetic" else None)
    if n is None or n - val_count(n, d.val_fraction) >= 1:
        return problems
    return problems + [doc.problem(("data", "val_fraction"), f"{d.source} has {n} samples: val_fraction "
                                                             f"{d.val_fraction} leaves none to train on")]


def check_facts(cfg: Config, doc, plan) -> list:
    """The data's facts known without reading a sample, against the loss and the model's output
    (the check pipeline's data step): a source of class labels (the built-in ones, an image_folder,
    whose classes are its sub-folders) with a loss that is not for classes, a data.label_map of the
    wrong length, and fewer class scores than classes. Located problems; [] when the source's
    classes are not known before reading (tensors, synthetic) or the target is the input."""
    d = cfg.data
    if d is None or d.target == "input" or plan is None or plan.output_shape is None:
        return []
    classes = class_count(cfg)
    if classes is None:
        return []
    if not cfg.task.has_classes:
        return [doc.problem(("train", "loss"), _labels_loss_message(d.source, cfg.train.loss_name))]
    lo, hi = 0, classes - 1
    if d.label_map is not None:
        if len(d.label_map) != classes:
            return [doc.problem(("data", "label_map"), _label_map_message(d.label_map, d.source, classes))]
        lo, hi = min(d.label_map), max(d.label_map)
        classes = hi + 1
    return _score_problems(cfg, doc, plan, _where(d), classes, lo, hi)


def score_warnings(cfg: Config, doc, plan) -> list:
    """More class scores than the data has classes, where the classes are known without reading a sample
    (an image folder's sub-folders, a built-in set): the scores beyond them are never a target, so training
    only pushes them down; legal (room for classes to come), so a warning at the output layer, not an error."""
    d = cfg.data
    if d is None or d.target == "input" or plan is None or not plan.output_shape or not cfg.task.has_classes:
        return []
    classes = class_count(cfg)
    out = tuple(int(v) for v in plan.output_shape)
    if classes is None or len(out) != 1:
        return []
    needed = max(d.label_map) + 1 if d.label_map else classes
    if out[0] <= needed:
        return []
    path, layer = _output_place(doc, plan)
    node = _output_layer(plan)
    hint = f"; set out_features: {needed}" if node is not None and node.type_name == "Linear" else ""
    extra = f"score {needed} is" if out[0] == needed + 1 else f"scores {needed}..{out[0] - 1} are"
    return [doc.problem(path, f"{layer} gives {out[0]} class scores per sample, but the data ({_where(d)}) has "
                              f"{classes} classes: {extra} never a target{hint}")]


def folder_warnings(cfg: Config, doc) -> list:
    """An image folder's val_root / test_root without a folder for one of data.root's classes: allowed
    (that split has none of it), noted by training in its run log; ``nnctl check`` says it at the key."""
    return [doc.problem(("data", key), note) for key, note in folder_notes(cfg.data)]


def check_targets(cfg: Config, doc, plan, data: DataBundle) -> list:
    """Problems (nnctl.errors.Problem, located at the model's output layer) where the data's targets
    do not fit the model's output: class labels at or above the output width, an output that is not
    one score per class, or a regression target whose shape differs from the output's (which the
    loss would broadcast with only a warning). An empty list when they fit.

    Call it after load_data and before anything is written; raise ConfigError(problems) (exit 2).
    """
    out = plan.output_shape
    if out is None:
        return []
    out = tuple(int(v) for v in out)
    path, layer = _output_place(doc, plan)
    what = data.where or cfg.data.source
    problems = []
    if data.task.has_classes:
        classes = data.num_classes or 0
        lo, hi = data.label_range if data.label_range else (0, classes - 1)
        problems += _score_problems(cfg, doc, plan, what, classes, lo, hi)
    else:
        target = tuple(data.target_shape) if data.target_shape is not None else None
        if target is not None and target != out:
            source = "the input (data.target: input)" if cfg.data.target == "input" else f"y in {what}"
            problems.append(doc.problem(path, (
                f"{layer} gives outputs of shape {list(out)} per sample, but the targets ({source}) have shape "
                f"{list(target)} per sample; the {cfg.train.loss_name} loss would broadcast them and train on the "
                f"wrong differences: make the output {list(target)}")))
    return problems
