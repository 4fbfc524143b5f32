"""The config: load the YAML, apply overrides, validate the structure.

This module does not import torch. It checks everything that can be checked
without it (keys, types, ranges, choices) and reports every problem at once,
each located in the file. The model's layers are checked by ``nnctl.model``,
which needs torch for shapes.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, Problem
from .yamlio import Document, format_path, load_file, load_text, scalar_value

LOSSES = ("cross_entropy", "nll", "mse", "l1", "l2", "bce_with_logits", "huber", "smooth_l1")
CLASSIFICATION_LOSSES = ("cross_entropy", "nll")
# the arguments each loss takes (torch.nn's, without `reduction`: nnctl averages over the batch)
LOSS_ARGS = {
    "cross_entropy": ("weight", "ignore_index", "label_smoothing"),
    "nll": ("weight", "ignore_index"),
    "mse": (), "l1": (), "l2": (),
    "bce_with_logits": ("weight", "pos_weight"),
    "huber": ("delta",),
    "smooth_l1": ("beta",),
}
# what a run can monitor (best checkpoint, early stopping): the columns of metrics.csv
MONITORS = ("val_loss", "val_accuracy", "val_top5_accuracy", "val_mse", "val_mae", "train_loss")
SOURCES = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "image_folder", "tensors", "synthetic")
PRECISIONS = ("fp32", "bf16", "fp16")

_Int = int


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


_EXAMPLES = {"loss": ("cross_entropy", "{label_smoothing: 0.1}"),
             "scheduler": ("StepLR", "{step_size: 10}"),
             "augmentation": ("RandomCrop", "{size: 32, padding: 4}")}


def _one_key(value: Any, what: str) -> tuple[str, dict]:
    """`Adam`, `{Adam: {lr: 0.1}}` or `{Adam: null}` -> ("Adam", {...})."""
    example, args_example = _EXAMPLES.get(what, ("Adam", "{lr: 0.001}"))
    kind = "name" if what == "loss" else "class name"
    if isinstance(value, str):
        return value, {}
    if isinstance(value, dict) and len(value) == 1:
        (name, args), = value.items()
        if not isinstance(name, str):
            raise ValueError(f"{what} name must be a {kind} such as {example}")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise ValueError(f"the arguments of {what} {name} must be a mapping such as {args_example}")
        return name, args
    raise ValueError(f"expected one {what} {kind}, alone or with a mapping of its arguments, "
                     f"such as {{{example}: {args_example}}}")


class ModelSection(_Section):
    input_shape: list[_Int] = Field(min_length=1, max_length=4,
                                    description="one sample's shape, without the batch dimension, e.g. [1, 28, 28]")
    blocks: dict[str, Any] = Field(default_factory=dict,
                                   description="named layer entries (usually a Sequential or Residual) used as type names")
    layers: list[Any] = Field(default_factory=list, description="the children of the top-level nn.Sequential "
                                                                "(or torchvision: a torchvision model instead)")
    torchvision: str | None = Field(None, description="a torchvision classification model by its builder name "
                                                      "(torchvision.models.list_models()), e.g. resnet18, "
                                                      "instead of layers")
    weights: str | None = Field(None, description="torchvision: pretrained weights by name (IMAGENET1K_V1, "
                                                  "DEFAULT, ResNet18_Weights.IMAGENET1K_V1), read from the local "
                                                  "torch hub cache; null: random init")
    args: dict[str, Any] = Field(default_factory=dict, description="torchvision: the builder's keyword arguments")
    replace: dict[str, Any] = Field(default_factory=dict,
                                    description="torchvision: child (dotted name) -> a layer entry that replaces "
                                                "it, its input size inferred, e.g. {fc: {Linear: {out_features: 5}}}")

    @field_validator("input_shape")
    @classmethod
    def _dims(cls, v: list[int]) -> list[int]:
        for d in v:
            if d < 1 or d > (1 << 20):
                raise ValueError(f"each dimension must be between 1 and {1 << 20}, got {d}")
        if math.prod(v) > (1 << 28):
            raise ValueError(f"one sample of shape {v} has {math.prod(v):,} values, more than {1 << 28:,}; refused")
        return v

    @model_validator(mode="after")
    def _source(self) -> "ModelSection":
        problems = []
        if self.torchvision is None:
            if not self.layers:
                problems.append((("model", "layers"), "the model needs layers: a non-empty list of layers "
                                                      "(or torchvision: a model name such as resnet18)"))
            for key in ("weights", "args", "replace"):
                if getattr(self, key):
                    problems.append((("model", key), f"{key} applies to a torchvision model "
                                                     "(model.torchvision: NAME); this model is written with layers"))
        else:
            if self.layers:
                problems.append((("model", "layers"), "a model is written with layers or taken from torchvision, "
                                                      "not both: remove layers or torchvision"))
            if self.blocks:
                problems.append((("model", "blocks"), "blocks apply to models written with layers, not to a "
                                                      "torchvision model (use replace to change its children)"))
        if problems:
            raise _CrossProblems(problems)
        return self


class DataSection(_Section):
    source: Literal[SOURCES] = Field(description="digits (built in), mnist, fashion_mnist, cifar10, cifar100, "
                                                 "image_folder, tensors or synthetic")
    root: str | None = Field(None, description="folder of torchvision datasets or of an image_folder")
    path: str | None = Field(None, description="a .pt, .npz or .safetensors file with x and y (source: tensors)")
    download: bool = Field(False, description="let torchvision download the dataset into root")
    split: Literal["fraction", "test"] = Field("fraction", description="validate on a seeded fraction of the "
                                                                        "training data, or on the dataset's own test split")
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    normalize: Any = Field(None, description="true (per-channel mean/std of the training split), false, "
                                             "or {mean: [...], std: [...]}; default true for images")
    target: Literal["label", "input"] = Field("label", description="label: class labels or y; input: reconstruct the input")
    noise: float = Field(0.0, ge=0.0, le=1000.0, description="std of Gaussian noise added to inputs when target is input")
    augment: list[Any] = Field(default_factory=list,
                               description="image augmentation of training batches, per sample: torchvision "
                                           "transforms.v2 classes by name with their arguments, applied in order, "
                                           "e.g. [{RandomCrop: {size: 32, padding: 4}}, RandomHorizontalFlip]; "
                                           "see nnctl.augment.SUPPORTED")
    shape: list[_Int] | None = Field(None, description="synthetic: one sample's shape (default: model.input_shape)")
    classes: int | None = Field(None, ge=1, le=1_000_000, description="synthetic: number of classes")
    size: int | None = Field(None, ge=1, le=100_000_000, description="synthetic: number of samples")
    image_size: list[_Int] | None = Field(None, min_length=2, max_length=2, description="image_folder: resize to [H, W]")
    grayscale: bool = Field(False, description="image_folder: convert to one channel")
    limit: int | None = Field(None, ge=1, description="use only the first N training samples")
    label_map: list[_Int] | None = Field(None, min_length=1, max_length=100_000,
                                         description="class i becomes label_map[i]: a changed task for fine-tuning, "
                                                     "e.g. [0, 1, 0, 1, 0, 1, 0, 1, 0, 1] for even / odd")
    preload: bool | None = Field(None, description="hold the dataset as tensors on the device; default: when it fits")
    num_workers: int = Field(2, ge=0, le=64, description="DataLoader workers when not preloaded")
    cache: bool = Field(False, description="image_folder: keep the decoded, resized images in one memory-mapped "
                                           "file under $NNCTL_CACHE_DIR (default ~/.cache/nnctl/decoded), "
                                           "shared by later runs; `nnctl cache info|clear` shows and frees it")

    @field_validator("normalize")
    @classmethod
    def _normalize(cls, v: Any) -> Any:
        if v is None or isinstance(v, bool):
            return v
        if isinstance(v, dict) and set(v) == {"mean", "std"}:
            for key in ("mean", "std"):
                vals = v[key]
                if isinstance(vals, int | float) and not isinstance(vals, bool):
                    vals = [vals]
                if not isinstance(vals, list) or not vals or not all(
                    isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in vals
                ):
                    raise ValueError(f"normalize.{key} must be a number or a list of finite numbers")
                if key == "std" and any(x <= 0 for x in vals):
                    raise ValueError("normalize.std must be positive")
                v[key] = [float(x) for x in vals]
            return v
        raise ValueError("expected true, false or {mean: [...], std: [...]}")

    @field_validator("augment")
    @classmethod
    def _augment(cls, v: list[Any]) -> list[Any]:
        problems = []
        for i, entry in enumerate(v):
            try:
                name, _ = _one_key(entry, "augmentation")
            except ValueError:
                name = None
            if name is None or not name:
                problems.append((("data", "augment", i), "expected an augmentation name, alone or with a mapping of "
                                                         "its arguments, such as {RandomCrop: {size: 32, padding: 4}}"))
        if problems:
            raise _CrossProblems(problems)
        return v

    @field_validator("label_map")
    @classmethod
    def _label_map(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(c < 0 or c > 1_000_000 for c in v):
            raise ValueError("label_map entries are class indices from 0")
        return v

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not 1 <= len(v) <= 4 or any(d < 1 for d in v) or math.prod(v) > (1 << 28)):
            raise ValueError("expected 1 to 4 positive dimensions, at most 2^28 values a sample")
        return v


def mode_of(metric: str) -> str:
    """min for losses and errors, max for accuracies."""
    return "max" if metric.endswith("accuracy") else "min"


class EarlyStopping(_Section):
    patience: int = Field(ge=1, le=1_000_000, description="epochs without improvement before stopping")
    min_delta: float = Field(0.0, ge=0.0, description="smallest change that counts as an improvement")
    monitor: Literal[MONITORS] | None = Field(None, description="the metric to watch (default: the best "
                                                                "checkpoint's, train.checkpoint.monitor)")
    mode: Literal["min", "max"] | None = Field(None, description="min or max (default: max for accuracies, "
                                                                 "min for losses and errors)")


class CheckpointSection(_Section):
    monitor: Literal[MONITORS] | None = Field(None, description="the metric best.pt tracks (default: "
                                                                "val_accuracy for classification, else val_loss; "
                                                                "train_loss without validation data)")
    mode: Literal["min", "max"] | None = Field(None, description="min or max (default: from the metric)")
    every: int | None = Field(None, ge=1, le=1_000_000, description="also keep epoch-N.pt every N epochs")
    keep: int | None = Field(None, ge=1, le=1_000_000, description="keep only the K newest epoch-N.pt "
                                                                   "(default: all)")


def _check_loss(value: Any) -> list[tuple[tuple, str]]:
    """Problems of a loss spec (name alone or {name: {args}}), located under train.loss."""
    name, args = _one_key(value, "loss")
    if name not in LOSSES:
        return [(("train", "loss") + ((name,) if isinstance(value, dict) else ()),
                 f"unknown loss {name!r}{suggest(name, LOSSES)} (one of: {', '.join(LOSSES)})")]
    problems = []
    allowed = LOSS_ARGS[name]

    def numbers(v: Any) -> list | None:
        vals = v if isinstance(v, list) else [v]
        ok = vals and all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in vals)
        return vals if ok else None

    for key, v in args.items():
        where = ("train", "loss", name, key)
        if key not in allowed:
            problems.append((where, f"unknown argument {key!r} for loss {name}"
                                    + (suggest(str(key), allowed) or f" (takes: {', '.join(allowed) or 'none'})")))
        elif key == "weight":
            if v == "balanced" and name in CLASSIFICATION_LOSSES:
                continue
            vals = numbers(v) if isinstance(v, list) else None
            if vals is None or any(x < 0 or x > 3.4e38 for x in vals):
                problems.append((where, "weight must be a list of non-negative numbers (within float32's "
                                        "range), one per class"
                                        + (", or balanced (from the training split's class counts)"
                                           if name in CLASSIFICATION_LOSSES else "")))
            elif not any(x > 0 for x in vals):
                problems.append((where, "weight is all zeros: no sample would count (the loss is 0/0)"))
        elif key == "pos_weight":
            vals = numbers(v)
            if vals is None or any(x < 0 or x > 3.4e38 for x in vals):
                problems.append((where, "pos_weight must be a non-negative number (within float32's range) or a "
                                        "list of them, one per output"))
        elif key == "label_smoothing":
            if numbers(v) is None or isinstance(v, list) or not 0.0 <= v <= 1.0:
                problems.append((where, f"label_smoothing must be a number from 0 to 1, got {_describe(v)}"))
        elif key == "ignore_index":
            if not isinstance(v, int) or isinstance(v, bool) or not -(2**63) <= v < 2**63:
                problems.append((where, f"ignore_index must be an integer (a class label, a 64-bit integer), "
                                        f"got {_describe(v)}"))
        elif key in ("delta", "beta"):
            if numbers(v) is None or isinstance(v, list) or v < 0 or v > 3.4e38 or (key == "delta" and v == 0):
                problems.append((where, f"{key} must be a {'positive' if key == 'delta' else 'non-negative'} "
                                        f"number, got {_describe(v)}"))
    return problems


class TrainSection(_Section):
    epochs: int = Field(10, ge=1, le=1_000_000)
    batch_size: int = Field(64, ge=1, le=1 << 20)
    eval_batch_size: int | None = Field(None, ge=1, le=1 << 20, description="default: 4 x batch_size")
    loss: Any = Field("cross_entropy",
                      description="cross_entropy (the default) | nll | mse | l1 | l2 (= mse: PyTorch has no L2Loss) "
                                  "| bce_with_logits (multi-label) | huber | smooth_l1; with arguments: "
                                  "{cross_entropy: {label_smoothing: 0.1, weight: balanced}}")
    accumulate: int = Field(1, ge=1, le=65536, description="gradient accumulation: one optimizer step every N "
                                                           "batches, equal to an N times larger batch")
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection,
                                          description="best.pt's monitor, and epoch-N.pt every N epochs")
    optimizer: Any = Field(default_factory=lambda: {"Adam": {"lr": 0.001}},
                           description="a torch.optim class with its arguments, e.g. {SGD: {lr: 0.1, momentum: 0.9}}")
    scheduler: Any = Field(None, description="a torch.optim.lr_scheduler class with its arguments")
    scheduler_interval: Literal["epoch", "step"] = "epoch"
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:[0-9]+)?)$",
                        description="auto (CUDA, else MPS, else CPU) | cpu | cuda | cuda:N | mps")
    precision: Literal[PRECISIONS] = Field("fp32", description="fp32, or bf16 / fp16 autocast (fp16 with a grad scaler)")
    grad_clip: float | None = Field(None, gt=0.0, description="clip the gradients' total norm to this value")
    early_stopping: EarlyStopping | None = None
    channels_last: bool = False
    compile: bool = Field(False, description="torch.compile the model")
    threads: int | None = Field(None, ge=1, le=1024, description="CPU threads (torch.set_num_threads)")
    log: list[Literal["csv", "tensorboard"]] = Field(
        default_factory=lambda: ["csv"],
        description="what the run logs: csv (metrics.csv, always written: nnctl runs and compare read it) and "
                    "tensorboard (RUN/tensorboard/: scalars, model graph, hparams; pip install 'nnctl[tensorboard]')")

    @field_validator("loss")
    @classmethod
    def _loss(cls, v: Any) -> Any:
        problems = _check_loss(v)
        if problems:
            raise _CrossProblems(problems)
        name, args = _one_key(v, "loss")
        return {name: args} if args else name

    @property
    def loss_name(self) -> str:
        """The loss's name (cross_entropy, mse, ...), with or without arguments."""
        return self.loss if isinstance(self.loss, str) else next(iter(self.loss))

    @property
    def loss_args(self) -> dict:
        return {} if isinstance(self.loss, str) else dict(next(iter(self.loss.values())))

    @field_validator("optimizer")
    @classmethod
    def _optimizer(cls, v: Any) -> dict:
        name, args = _one_key(v, "optimizer")
        return {name: args}

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: Any) -> dict | None:
        if v is None:
            return None
        name, args = _one_key(v, "scheduler")
        return {name: args}


class FreezeSection(_Section):
    first: int | None = Field(None, ge=0, description="freeze the first N children of the model")
    children: list[_Int] | None = Field(None, description="freeze these children by index")
    names: list[str] | None = Field(None, description="freeze these children or parameters by dotted name; globs allowed")
    unfreeze: list[str] | None = Field(None, description="then make these dotted names / globs trainable again")
    train_frozen_norm: bool = Field(False, description="let frozen normalisation layers update running statistics")


class Config(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
                      description="the run's name; runs go to runs/<name>/ (default: the config file's name)")
    seed: int = Field(0, ge=0, le=2**63 - 1)
    model: ModelSection
    data: DataSection | None = Field(None, description="what to train on; only train and eval need it "
                                                       "(check, summary, layers, freeze need only model)")
    train: TrainSection = Field(default_factory=TrainSection,
                                description="how to train; every key has a default (Adam lr 1e-3, 10 epochs, "
                                            "batch 64, cross_entropy)")
    freeze: FreezeSection | None = None

    @model_validator(mode="after")
    def _cross(self) -> "Config":
        problems = []
        d, t = self.data, self.train
        if d is None:
            return self
        loss = t.loss_name
        if d.target == "input" and loss in CLASSIFICATION_LOSSES + ("bce_with_logits",):
            problems.append((("train", "loss"), f"target: input reconstructs the (normalised) input; use mse, l1, "
                                                f"huber or smooth_l1, not {loss}"))
        if d.source == "tensors" and not d.path:
            problems.append((("data",), "source: tensors needs path: a .pt, .npz or .safetensors file with x and y"))
        if d.source == "image_folder" and not d.root:
            problems.append((("data",), "source: image_folder needs root: a folder with one sub-folder per class"))
        if d.cache and d.source != "image_folder":
            problems.append((("data", "cache"), f"cache: true applies to source: image_folder only (it keeps "
                                                f"decoded image files); {d.source} is read as whole tensors "
                                                "already: remove cache"))
        if d.augment and len(self.model.input_shape) != 3:
            problems.append((("data", "augment"), f"augmentation applies to images, samples of shape [channels, "
                                                  f"height, width]; model.input_shape is {self.model.input_shape}"))
        if d.source == "synthetic" and d.target == "label" and loss in CLASSIFICATION_LOSSES and not d.classes:
            problems.append((("data",), "source: synthetic with a classification loss needs classes: N"))
        if d.split == "test" and d.source in ("tensors", "synthetic", "image_folder", "digits"):
            problems.append((("data", "split"), f"source {d.source} has no test split of its own; use split: fraction"))
        no_val = d.split == "fraction" and d.val_fraction == 0.0
        watched = [(("train", "checkpoint", "monitor"), t.checkpoint.monitor)]
        if t.early_stopping is not None:
            watched.append((("train", "early_stopping", "monitor"), t.early_stopping.monitor))
        for where, metric in watched:
            if metric is None:
                continue
            if no_val and metric.startswith("val_"):
                problems.append((where, f"{metric} needs validation data: val_fraction > 0 (or monitor train_loss)"))
            elif metric in ("val_accuracy", "val_top5_accuracy") and not (
                    (loss in CLASSIFICATION_LOSSES and d.target == "label")
                    or (metric == "val_accuracy" and loss == "bce_with_logits")):
                problems.append((where, f"{metric} needs class labels and a classification loss (cross_entropy "
                                        f"or nll{', or bce_with_logits' if metric == 'val_accuracy' else ''}); "
                                        f"this run trains with {loss}"))
            elif metric in ("val_mse", "val_mae") and (
                    (loss in CLASSIFICATION_LOSSES and d.target == "label") or loss == "bce_with_logits"):
                has = ("val_loss and val_accuracy" if loss == "bce_with_logits"
                       else "val_loss, val_accuracy and val_top5_accuracy")
                problems.append((where, f"{metric} is a regression metric; a {loss} run has {has}"))
        if (t.early_stopping is not None and no_val and t.early_stopping.monitor is None
                and t.checkpoint.monitor is None):
            problems.append((("train", "early_stopping"), "early stopping needs validation data: val_fraction > 0 "
                                                          "(or early_stopping.monitor: train_loss)"))
        if problems:
            raise _CrossProblems(problems)
        return self


class _CrossProblems(ValueError):
    def __init__(self, problems: list[tuple[tuple, str]]):
        super().__init__("; ".join(m for _, m in problems))
        self.problems = problems


# --- turning pydantic's errors into located, actionable problems -------------------

def _model_at(path: tuple) -> type[BaseModel] | None:
    import typing

    cls: Any = Config
    for part in path:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return None
        ann = cls.model_fields[part].annotation
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        cls = args[0] if args and not (isinstance(ann, type) and issubclass(ann, BaseModel)) else ann
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


CORE_LAYERS = ("Conv2d", "Linear", "Dropout2d", "Dropout", "MaxPool2d", "ReLU", "Softmax", "LogSoftmax",
               "ReflectionPad2d", "InstanceNorm2d", "Flatten", "Sequential", "Residual", "BatchNorm2d")


def suggest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """'; did you mean X?' or '' (case-insensitive close match; the documented core wins ties)."""
    lowered = {c.lower(): c for c in choices}
    target = str(word).lower()
    hits = difflib.get_close_matches(target, list(lowered), n=5, cutoff=0.6)
    if not hits:
        return ""
    score = lambda h: (round(difflib.SequenceMatcher(None, target, h).ratio(), 6), lowered[h] in CORE_LAYERS)
    best = max(hits, key=score)
    return f"; did you mean {lowered[best]!r}?"


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _problem_from(err: dict, data: Any, doc: Document) -> Problem:
    loc = tuple(err["loc"])
    kind = err["type"]
    path: list = []
    cur = data
    missing_key = None
    for i, part in enumerate(loc):
        if isinstance(cur, dict) and part in cur:
            path.append(part)
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            path.append(part)
            cur = cur[part]
        elif kind == "missing" and i == len(loc) - 1:
            missing_key = part
        # else: a union member tag or similar; not a place in the file
    msg = err["msg"]
    value = err.get("input")
    if kind == "missing":
        msg = f"missing required key {missing_key!r}"
    elif kind == "extra_forbidden":
        model = _model_at(tuple(path[:-1]))
        fields = list(model.model_fields) if model else []
        key = path[-1] if path else "?"
        msg = f"unknown key {key!r}" + (suggest(key, fields) or (f" (expected one of: {', '.join(fields)})" if fields else ""))
    elif kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        msg = f"{_describe(value)} is not one of {expected}" + suggest(str(value), [e.strip(" '") for e in expected.replace(" or ", ",").split(",")])
    elif kind == "bool_type":
        msg = f"expected true or false, got {_describe(value)}"
        if isinstance(value, str) and value.lower() in ("yes", "no", "on", "off", "y", "n"):
            msg += f" (nnctl reads YAML 1.2: {value!r} is a string here; write {'true' if value.lower() in ('yes', 'on', 'y') else 'false'})"
    elif kind in ("int_type", "int_from_float"):
        msg = f"expected an integer, got {_describe(value)}"
    elif kind in ("float_type", "float_parsing"):
        msg = f"expected a number, got {_describe(value)}"
    elif kind == "string_type":
        msg = f"expected a string, got {_describe(value)}"
    elif kind in ("list_type",):
        msg = f"expected a list, got {_describe(value)}"
    elif kind in ("dict_type", "model_type", "model_attributes_type"):
        msg = f"expected a mapping, got {_describe(value)}"
    elif kind == "string_pattern_mismatch":
        msg = f"{_describe(value)} is not valid here (must match {err.get('ctx', {}).get('pattern')})"
    elif kind == "value_error":
        msg = str(err.get("ctx", {}).get("error", msg))
    elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than",
                  "too_short", "too_long", "finite_number"):
        msg = f"{msg}, got {_describe(value)}"
    return doc.problem(tuple(path), msg)


def default_name(file: str) -> str:
    """The run name of a config without ``name:``: its file name, made a valid name."""
    import os

    stem = os.path.splitext(os.path.basename(str(file)))[0]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("._-")[:100]
    return name or "model"


def validate(doc: Document) -> Config:
    """Validate the structure of a loaded document; raise ConfigError with every problem."""
    data = doc.data
    if data is None:
        raise ConfigError([doc.problem((), "the document is empty: expected a mapping with at least 'model' "
                                            "(and 'data' and 'train' to train)")])
    if not isinstance(data, dict):
        raise ConfigError([doc.problem((), f"a config must be a mapping with at least 'model' (and 'data' and "
                                             f"'train' to train), not {type(data).__name__}")])
    data = copy.deepcopy(data)
    if "name" not in data:
        data["name"] = default_name(doc.file)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems: list[Problem] = []
        for err in exc.errors(include_url=False):
            cross = err.get("ctx", {}).get("error")
            if isinstance(cross, _CrossProblems):
                problems.extend(doc.problem(p, m) for p, m in cross.problems)
            else:
                problems.append(_problem_from(err, data, doc))
        # one problem per place and message, in file order
        unique = {(p.line, p.column, p.path, p.message): p for p in problems}
        ordered = sorted(unique.values(), key=lambda p: (p.line or 0, p.column or 0))
        raise ConfigError(ordered) from None


def require_data(cfg: Config, doc: Document, what: str = "training") -> DataSection:
    """The data section, or a located ConfigError saying that `what` needs one.

    Only ``train`` and ``eval`` need data; ``check``, ``summary``, ``layers``, ``freeze``
    and ``export-weights`` work on a config that has only ``model:``.
    """
    if cfg.data is None:
        raise ConfigError([Problem(f"no data: section: {what} needs one; add for example "
                                   "`data: {source: digits}`", "data", doc.file)])
    return cfg.data


@dataclass
class Checked:
    """Every structural problem of a document, and the sections that are valid on their own.

    ``cfg`` is the whole validated config (None when anything is wrong); ``model`` and
    ``train`` are those sections when they validate alone, so that the model can still be
    planned (and its layer and shape problems reported) while another section is broken.
    """

    cfg: Config | None
    model: ModelSection | None
    train: TrainSection | Any | None  # with only optimizer and scheduler when the rest is broken
    problems: list[Problem]


def validate_all(doc: Document) -> Checked:
    """Like :func:`validate`, but never raises: every problem, plus the sections that are valid."""
    try:
        cfg = validate(doc)
        return Checked(cfg, cfg.model, cfg.train, [])
    except ConfigError as exc:
        problems = list(exc.problems)
    data = doc.data
    sections: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, cls in (("model", ModelSection), ("train", TrainSection)):
            value = data.get(key, {} if key == "train" else None)
            if value is None:
                continue
            try:
                sections[key] = cls.model_validate(copy.deepcopy(value))
            except ValidationError:
                if key == "train" and isinstance(value, dict):
                    sections[key] = _classes_only(value)
    return Checked(None, sections.get("model"), sections.get("train"), problems)


def _classes_only(train: dict) -> Any:
    """A broken train section's optimizer and scheduler, when those two are well formed.

    Lets ``nnctl check`` check the optimizer's class and arguments while, say, ``epochs``
    is wrong (each problem is then reported once, in the same pass).
    """
    from types import SimpleNamespace

    try:
        optimizer = TrainSection._optimizer(train.get("optimizer", {"Adam": {"lr": 0.001}}))
        scheduler = TrainSection._scheduler(train.get("scheduler"))
    except ValueError:
        return None
    return SimpleNamespace(optimizer=optimizer, scheduler=scheduler)


# --- paths: relative to the config file's folder --------------------------------------

# every path-valued key of the config
PATH_KEYS: tuple[tuple[str, ...], ...] = (("data", "root"), ("data", "path"))


def _resolve_path(value: Any, base: str) -> Any:
    import os

    if not isinstance(value, str) or not value.strip():
        return value  # not a path: validation reports it
    value = os.path.expanduser(value)
    return os.path.normpath(os.path.join(base, value)) if not os.path.isabs(value) else value


def resolve_paths(doc: Document, base: str, only_overridden: bool = False) -> None:
    """Make the path-valued keys absolute: relative ones against ``base``, ``~`` expanded.

    A config file's paths resolve against the file's folder; ``--set`` values against the
    current directory (``only_overridden=True`` with base = the current directory).
    """
    data = doc.data
    for keys in PATH_KEYS:
        if only_overridden != any(keys[:i] in doc.overridden for i in range(1, len(keys) + 1)):
            continue
        cur = data
        for k in keys[:-1]:
            cur = cur.get(k) if isinstance(cur, dict) else None
        if isinstance(cur, dict) and keys[-1] in cur:
            cur[keys[-1]] = _resolve_path(cur[keys[-1]], base)


# --- overrides: --set train.optimizer.Adam.lr=0.01 ---------------------------------

def _split_key(key: str) -> list[str | int]:
    import re

    parts: list[str | int] = []
    for token in re.findall(r"[^.\[\]]+|\[\d+\]", key):
        if token.startswith("["):
            parts.append(int(token[1:-1]))
        elif token.isdigit():
            parts.append(int(token))
        else:
            parts.append(token)
    return parts


def apply_overrides(doc: Document, overrides: list[str]) -> None:
    """Apply `key.path=value` overrides in place; values are parsed as YAML."""
    problems = []
    for item in overrides:
        # an option may hold newlines or control characters; the location stays one line
        where = "--set " + re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], item)
        if "=" not in item:
            problems.append(Problem("expected key.path=value, e.g. train.optimizer.Adam.lr=0.01", "", where))
            continue
        key, raw = item.split("=", 1)
        parts = _split_key(key.strip())
        if not parts:
            problems.append(Problem("empty key", "", where))
            continue
        try:
            value = load_text(raw, where).data if raw.strip() else None
        except ConfigError:
            value = scalar_value(raw)
        if doc.data is None:
            doc.data = {}
        cur = doc.data
        ok = True
        for i, part in enumerate(parts[:-1]):
            nxt = parts[i + 1]
            if isinstance(cur, dict):
                if part not in cur or cur[part] is None:
                    cur[part] = [] if isinstance(nxt, int) else {}
                cur = cur[part]
            elif isinstance(cur, list) and isinstance(part, int) and part < len(cur):
                cur = cur[part]
            else:
                problems.append(Problem(f"cannot set {format_path(tuple(parts[:i + 1]))}: "
                                        f"the config has no such place", "", where))
                ok = False
                break
        if not ok:
            continue
        last = parts[-1]
        if isinstance(cur, dict):
            cur[last] = value
        elif isinstance(cur, list) and isinstance(last, int) and last < len(cur):
            cur[last] = value
        else:
            problems.append(Problem(f"cannot set {key}: the config has no such place", "", where))
            continue
        # locate anything under the override at the override itself
        doc.marks = {p: m for p, m in doc.marks.items() if p[: len(parts)] != tuple(parts)}
        doc.overridden[tuple(parts)] = where
    if problems:
        raise ConfigError(problems)


def load(source: str, overrides: list[str] | None = None) -> tuple[Config, Document]:
    """Load, override and validate a config file. Raises ConfigError."""
    doc = load_document(source, overrides)
    return validate(doc), doc


def load_document(source: str, overrides: list[str] | None = None) -> Document:
    """Read a config file and apply overrides, with its paths resolved; not yet validated.

    Paths in the file resolve against the file's folder; paths given with ``--set``
    against the current directory.
    """
    import os

    doc = load_file(source)
    resolve_paths(doc, os.path.dirname(os.path.abspath(source)))
    if overrides:
        apply_overrides(doc, overrides)
        resolve_paths(doc, os.getcwd(), only_overridden=True)
    return doc


def from_dict(data: dict, file: str = "<checkpoint>") -> tuple[Config, Document]:
    """Validate a config carried inside a checkpoint."""
    doc = Document(copy.deepcopy(data), file)
    return validate(doc), doc


def resolved(cfg: Config) -> dict:
    """The config with every default filled in, as plain data."""
    return cfg.model_dump(mode="json")


def json_schema() -> dict:
    """A JSON Schema of the config for YAML editors (yaml-language-server)."""
    from ._nn_names import LAYER_NAMES

    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "nnctl config"
    names = sorted(set(LAYER_NAMES) | {"Sequential", "Residual", "Concat"})
    layer_args = {"anyOf": [{"type": "null"}, {"type": "number"}, {"type": "string"}, {"type": "boolean"},
                            {"type": "array"}, {"type": "object"}]}
    entry = {
        "description": "a layer: a torch.nn class name, or {Type: args} with optional name and repeat",
        "anyOf": [
            {"type": "string", "anyOf": [{"enum": names}, {"pattern": "^[A-Z][A-Za-z0-9_]*$"}]},
            {
                "type": "object",
                "properties": {
                    "name": {"anyOf": [{"type": "string", "pattern": "^[^.]+$"}, {"type": "integer", "minimum": 0}]},
                    "repeat": {"type": "integer", "minimum": 1},
                    **{n: layer_args for n in names},
                },
                "patternProperties": {"^[A-Z][A-Za-z0-9_]*$": layer_args},
                "additionalProperties": False,
                "minProperties": 1,
                "description": "Residual: a list, or {layers, shortcut, after}; Concat: {dim, branches}",
            },
        ],
    }
    schema.setdefault("$defs", {})["LayerEntry"] = entry
    train = schema["$defs"].get("TrainSection", {}).get("properties", {})
    if "loss" in train:
        train["loss"] = {
            "description": train["loss"].get("description", ""),
            "default": "cross_entropy",
            "anyOf": [{"enum": list(LOSSES)},
                      {"type": "object", "minProperties": 1, "maxProperties": 1,
                       "properties": {name: {"anyOf": [{"type": "null"}, {
                           "type": "object", "additionalProperties": False,
                           "properties": {arg: {} for arg in LOSS_ARGS[name]}}]} for name in LOSSES},
                       "additionalProperties": False}],
        }
    model = schema["$defs"]["ModelSection"]["properties"]
    model["layers"]["items"] = {"$ref": "#/$defs/LayerEntry"}
    model["blocks"]["additionalProperties"] = {"$ref": "#/$defs/LayerEntry"}
    return schema
