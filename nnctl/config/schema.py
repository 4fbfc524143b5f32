"""The config: load the YAML, apply overrides, validate the structure.

This module does not import torch. It checks everything that can be checked
without it (keys, types, ranges, choices) and reports every problem at once,
each located in the file. The model's layers are checked by ``nnctl.model``,
which needs torch for shapes.
"""

from __future__ import annotations

import math
from typing import Any, Literal
from pydantic import Field, field_validator, model_validator
from nnctl.tasks import CLASSIFICATION_LOSSES, LOSSES, MONITORS, Task, mode_of, task_for
from nnctl.config.nn_names import LAYER_NAMES
from nnctl.config.suggest import CORE_LAYERS, suggest  # noqa: F401  (re-exported)
from nnctl.config.base import _CrossProblems, _one_key, _Section  # noqa: F401  (re-exported)
from nnctl.config.tune import TuneSection
from nnctl.config.compute import COMPILE_HELP, PRECISION_HELP, Compile, DistributedSection, Precision


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# the arguments each loss takes (torch.nn's, without `reduction`: nnctl averages over the batch)
LOSS_ARGS = {
    "cross_entropy": ("weight", "ignore_index", "label_smoothing"),
    "nll": ("weight", "ignore_index"),
    "mse": (), "l1": (), "l2": (),
    "bce_with_logits": ("weight", "pos_weight"),
    "huber": ("delta",),
    "smooth_l1": ("beta",),
}
SOURCES = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "image_folder", "tensors", "synthetic")
FLOAT32_TINY = 1.1754943508222875e-38  # float32's smallest normal number

_Int = int


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
    val_root: str | None = Field(None, description="image_folder: a folder of the same classes that validates "
                                                   "(instead of val_fraction), as ImageNet's train/ and val/")
    test_root: str | None = Field(None, description="image_folder: a folder of the same classes for split: test")
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
                if key == "std" and any(x < FLOAT32_TINY for x in vals):
                    # x / std in float32: a std below float32's smallest normal number divides by (almost) zero
                    raise ValueError(f"normalize.std = {min(vals):g} is below float32's smallest normal number "
                                     f"(about 1.2e-38): nnctl normalises in float32, where it divides by zero")
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


class MlflowSection(_Section):
    tracking_uri: str | None = Field(None, description="where MLflow records the run: a URI such as "
                                     "http://host:5000, file:/abs/mlruns or sqlite:////abs/mlflow.db "
                                     "(default: the file store RUN/mlruns)")
    experiment: str | None = Field(None, min_length=1, max_length=500,
                                   description="the MLflow experiment (default: the config's name)")
    parent_run_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,256}$",
                                      description="log as a child of this MLflow run (nnctl tune: the study's run)")

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        """A URI, not a path: a relative path would be MLflow's (the current folder's), not the config's."""
        scheme, colon, rest = (v or "").partition(":")
        if v is None or v == "databricks" or (colon and len(scheme) > 1 and scheme[0].isalpha() and
                                              all(c.isalnum() or c in "+.-" for c in scheme) and
                                              (scheme != "file" or rest.startswith("/")) and
                                              (scheme != "sqlite" or rest.startswith("////"))):
            return v
        raise ValueError("tracking_uri must be a URI with an absolute path or a host, such as file:/abs/mlruns, "
                         f"sqlite:////abs/mlflow.db or http://host:5000, got {_describe(v)}")


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
    precision: Precision = Field("32-true", description=PRECISION_HELP)
    grad_clip: float | None = Field(None, gt=0.0, description="clip the gradients' total norm to this value")
    early_stopping: EarlyStopping | None = None
    channels_last: bool = False
    compile: Compile = Field(False, description=COMPILE_HELP)
    distributed: DistributedSection = Field(default_factory=DistributedSection, description=DistributedSection.__doc__)
    threads: int | None = Field(None, ge=1, le=1024, description="CPU threads (torch.set_num_threads)")
    log: list[Literal["csv", "tensorboard", "mlflow"]] = Field(
        default_factory=lambda: ["csv"],
        description="what the run logs: csv (metrics.csv, always written: nnctl runs and compare read it), "
                    "tensorboard (RUN/tensorboard/: scalars, model graph, hparams; pip install 'nnctl[tensorboard]') "
                    "and mlflow (params, metrics, artifacts; train.mlflow says where; pip install 'nnctl[mlflow]')")
    mlflow: MlflowSection | None = Field(None, description="where train.log: [mlflow] records the run")

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
    tune: TuneSection | None = Field(None, description="what nnctl tune searches (nnctl train ignores it)")

    @property
    def task(self) -> Task:
        """The run's task (nnctl.tasks.task_for of train.loss and data.target)."""
        return task_for(self.train.loss_name, self.data.target if self.data is not None else "label")

    @model_validator(mode="after")
    def _cross(self) -> "Config":
        problems = []
        d, t = self.data, self.train
        if d is None:
            return self
        loss, task = t.loss_name, self.task
        if loss not in task.losses:  # target: input (reconstruction) with a classification or multilabel loss
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
        if d.source == "synthetic" and task is Task.CLASSIFICATION and not d.classes:
            problems.append((("data",), "source: synthetic with a classification loss needs classes: N"))
        for key in ("val_root", "test_root"):  # a train/val(/test) layout of folders: image_folder only
            if getattr(d, key) is not None and d.source != "image_folder":
                problems.append((("data", key), f"{key} applies to source: image_folder, not {d.source}"))
        if d.val_root is not None and "val_fraction" in d.model_fields_set:
            problems.append((("data", "val_fraction"), "val_root is the validation split: remove val_fraction"))
        if d.split == "test" and d.source in ("tensors", "synthetic", "image_folder", "digits") and not d.test_root:
            problems.append((("data", "split"), f"source {d.source} has no test split of its own; use split: fraction"
                                                + (", or give test_root" if d.source == "image_folder" else "")))
        no_val = d.split == "fraction" and d.val_fraction == 0.0
        watched = [(("train", "checkpoint", "monitor"), t.checkpoint.monitor)]
        if t.early_stopping is not None:
            watched.append((("train", "early_stopping", "monitor"), t.early_stopping.monitor))
        for where, metric in watched:
            if metric is None:
                continue
            if no_val and metric.startswith("val_"):
                problems.append((where, f"{metric} needs validation data: val_fraction > 0 (or monitor train_loss)"))
            elif not task.could_log(metric) and mode_of(metric) == "max":  # an accuracy
                losses = ", or ".join(" or ".join(k.losses) for k in Task if k.could_log(metric))
                problems.append((where, f"{metric} needs class labels and a classification loss ({losses}); "
                                        f"this run trains with {loss}"))
            elif not task.could_log(metric):  # an error metric
                *has, last = task.metrics(math.inf)
                problems.append((where, f"{metric} is a regression metric; a {loss} run has {', '.join(has)} "
                                        f"and {last}"))
        if (t.early_stopping is not None and no_val and t.early_stopping.monitor is None
                and t.checkpoint.monitor is None):
            problems.append((("train", "early_stopping"), "early stopping needs validation data: val_fraction > 0 "
                                                          "(or early_stopping.monitor: train_loss)"))
        if problems:
            raise _CrossProblems(problems)
        return self


def resolved(cfg: Config) -> dict:
    """The config with every default filled in, as plain data (a val_root's run has no val_fraction)."""
    out = cfg.model_dump(mode="json")
    if cfg.data is not None and cfg.data.val_root is not None:
        del out["data"]["val_fraction"]
    return out


def json_schema() -> dict:
    """A JSON Schema of the config for YAML editors (yaml-language-server)."""

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
