"""Scoring a model on data: a checkpoint on its own splits or on other data, or a config with --init weights.

Other data is read with the checkpoint's recorded preprocessing (its mean/std, not
statistics of the new data), so the score is the one the model would get in use.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nnctl import checking as CHK
from nnctl.config import loader as CL
from nnctl.config import schema as C
from nnctl.config import structure as CS
from nnctl.config.structure import FLOAT32_MAX
from nnctl.config.loader import resolve_paths
from nnctl.config.yamlio import Document, load_file
from nnctl.data import loading as D
from nnctl.data.record import changed_split, data_changes
from nnctl.data.sources import has_test_split
from nnctl.data.sources.read import read_paths
from nnctl.errors import ConfigError, UsageError
from nnctl.files import check_output, display_name, save_figure
from nnctl.model import freeze as FREEZE
from nnctl.model import plan as M
from nnctl.model import weights as F
from nnctl.model.tv import pretrained_preprocessing
from nnctl.optim import losses as T
from nnctl.training import distributed as DIST
from nnctl.training import loop as LOOP
from nnctl.training import policy as POLICY
from nnctl.use import source as api

SPLITS = ("val", "train", "test", "all")
# --set keys that name other data than the run's own (scored whole by default, as --data is)
OTHER_DATA_KEYS = ("data", "data.source", "data.root", "data.path", "data.val_root", "data.test_root")


@dataclass
class EvalResult:
    split: str
    samples: int
    metrics: dict[str, float]
    epoch: int | None = None
    classes: list[str] | None = None
    confusion: list[list[int]] | None = None  # rows: true class, columns: predicted
    per_class: list[dict] = field(default_factory=list)
    confusion_png: str | None = None
    notes: list[str] = field(default_factory=list)
    scored: str = ""  # which samples, in words: "all 1,996 samples of image_folder /data/test"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"split": self.split, "samples": self.samples, "epoch": self.epoch, **self.metrics,
                             "scored": self.scored}
        if self.per_class:
            d["per_class"] = self.per_class
        if self.confusion is not None:
            d["confusion"] = self.confusion
        if self.confusion_png:
            d["confusion_png"] = self.confusion_png
        return d


def _data_section(data: Any) -> dict:
    """--data: a YAML file holding a data: section (or the section itself), or a dict."""
    if isinstance(data, dict):
        return dict(data.get("data", data))

    doc = load_file(os.fspath(data))
    if not isinstance(doc.data, dict):
        raise UsageError(f"{data}: expected a mapping with a data: section")
    section = doc.data.get("data", doc.data)
    if not isinstance(section, dict) or "source" not in section:
        raise UsageError(f"{data}: expected a data: section with a source (for example data: {{source: "
                         "image_folder, root: new_images}})")

    holder = Document({"data": dict(section)}, os.fspath(data))
    resolve_paths(holder, os.path.dirname(os.path.abspath(os.fspath(data))))  # relative to that file
    return holder.data["data"]


def _size_as_trained(section: dict, pre) -> None:
    """--data of images with no data.image_size / data.grayscale: resized to the trained model's input and
    converted to its colour mode (its preprocessing record), as ``nnctl predict`` does with the same files,
    so eval and predict score the same pixels."""
    if pre is None or section.get("source") != "image_folder":
        return
    size = pre.image_size()
    if size and section.get("image_size") is None:
        section["image_size"] = size
    if pre.color_mode in ("L", "RGB") and section.get("grayscale") is None:
        section["grayscale"] = pre.color_mode == "L"


def _same_split(pre, bundle, split: str, other: bool, notes: list[str]) -> None:
    """The run's own splits are derived from its data: if the data changed since training (the record's
    fingerprint), "val" may hold training samples. Refused for --split val / train; a note for all."""
    if other or pre is None or bundle.preprocessing is None or split == "test":
        return
    change = data_changes(pre.data, bundle.preprocessing.data, pre.classes)
    if change is None:
        return
    if split == "all":
        notes.append(f"the data changed since training ({change}): scored as it is now")
        return
    raise UsageError(f"the data changed since this model was trained ({change}); {changed_split(pre.data, split)}. "
                     "Score all of it with --split all, or other data with --data")


def evaluate(source: Any, *, which: str = "best", split: str | None = None, data: Any = None,
             overrides: list[str] | None = None, init: str | None = None, partial: bool = False,
             device: str | None = None, confusion: bool = False, confusion_path: str | None = None) -> EvalResult:

    overrides = list(overrides or [])
    keys = {o.split("=", 1)[0].strip() for o in overrides}
    other = data is not None or bool(keys & set(OTHER_DATA_KEYS))
    if split is None:
        split = default_split(data is not None, keys)
    if split not in SPLITS:
        raise UsageError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")
    notes: list[str] = []
    if api.is_checkpoint_source(source):
        if init is not None:
            raise UsageError("--init applies to a config; a checkpoint already holds its weights")
        src = api.open_source(source, which=which)
        resolved = dict(src.state["config"])
        pre = src.preprocessing
        if pre is None:
            notes.append(f"{src.checkpoint}: no preprocessing record (an older checkpoint): the data's own "
                         "statistics are used")
        epoch = src.state.get("epoch")
        base_dir = src.checkpoint.parent
        _other_folders(resolved, overrides)
    else:
        if init is None:
            raise UsageError(f"{source}: a config has no trained weights; give --init WEIGHTS (evaluated "
                             "without training), or a checkpoint or run folder")
        # the check pipeline, as train runs it (the data: section may come from --data instead)
        checked = CHK.check(api.config_document(source, overrides), "eval" if data is None else "check").refuse()
        model, plan = M.build(checked.cfg, checked.doc, checked=checked.plan)
        report, freezing = F.init_from(model, plan, init, partial=partial)
        FREEZE.apply_config(model, checked.cfg.freeze, inherited=freezing)  # as nnctl.train applies it
        src = api.Source(checked.cfg, checked.doc, model, plan, origin=source)
        notes.append(report)
        resolved = C.resolved(src.cfg)
        pre, epoch, base_dir = None, None, Path(".")
    if data is not None:
        resolved["data"] = _data_section(data)
        _size_as_trained(resolved["data"], pre)
    if split == "test":
        section = resolved.get("data") or {}
        test_root = section.get("test_root") or any(o.startswith("data.test_root=") for o in overrides)
        if section.get("source") and not has_test_split(section["source"], test_root):
            folder = ("--set data.test_root=DIR (a folder of the same classes), "
                      if section["source"] == "image_folder" else "")
            raise UsageError(f"--split test: {section['source']} has no test split of its own; score {folder}"
                             "other data with --data, or the run's validation split with --split val")
        if api.is_checkpoint_source(source):  # after the --set values: data.test_root may be one of them
            overrides.append("data.split=test")
        else:
            resolved.setdefault("data", {})["split"] = "test"
    cfg, doc = CL.from_dict(resolved, str(source))
    if overrides and api.is_checkpoint_source(source):
        CL.apply_overrides(doc, overrides)
        cfg = CS.validate(doc)
    CS.require_data(cfg, doc, what="evaluation")
    dev = DIST.select_device(device or cfg.train.device)
    model = src.model.to(dev).eval()
    bundle = D.load_data(cfg, dev, preprocessing=pre, augment=False, whole=split == "all",
                         weights=pretrained_preprocessing(cfg))  # scoring never augments
    problems = CHK.check_data(cfg, doc, src.plan, bundle)  # the targets against the model, as training checks them
    if problems:
        raise ConfigError(problems)
    _same_split(pre, bundle, split, other, notes)
    batches = bundle.train if split in ("train", "all") else bundle.val
    if batches is None:
        raise UsageError("this data has no validation split (val_fraction 0); use --split train or all")
    task = cfg.task
    classification = task.has_classes
    labels = None
    if any(v == "balanced" for v in cfg.train.loss_args.values()):  # the weights of the training split
        labels = bundle.train.store.y[bundle.train.indices]
    outputs = _output_width(model, cfg)
    loss_fn = T.make_loss(cfg.train, labels=labels, classes=outputs or bundle.num_classes).to(dev)
    metrics = LOOP.evaluate(model, loss_fn, batches, task)
    _refuse_non_finite(metrics, batches, split, cfg)
    result = EvalResult(split, batches.num_samples, metrics, epoch, notes=notes,
                        scored=scored(cfg, split, batches.num_samples, len(bundle.train.store)))
    if classification and confusion:
        names = (pre.classes if pre is not None and pre.classes else None)
        n = bundle.num_classes or 0
        matrix = torch.zeros(n, n, dtype=torch.int64)
        with torch.inference_mode():
            for x, y in batches.epoch(0):
                pred = model(x).argmax(dim=1).cpu()
                y = y.cpu()
                k = max(n, int(pred.max()) + 1, int(y.max()) + 1)
                if k > matrix.shape[0]:
                    grown = torch.zeros(k, k, dtype=torch.int64)
                    grown[:matrix.shape[0], :matrix.shape[1]] = matrix
                    matrix = grown
                matrix += torch.bincount(y * matrix.shape[0] + pred, minlength=matrix.numel()).reshape(matrix.shape)
        names = [str(names[i]) if names and i < len(names) else str(i) for i in range(matrix.shape[0])]
        result.classes = names
        result.confusion = matrix.tolist()
        result.per_class = per_class(matrix, names)
        target = Path(confusion_path) if confusion_path else base_dir / "eval" / f"confusion-{split}.png"
        # never over what was read nor inside a data folder: the data scored and the run's own training data
        src_files, src_dirs = src.read_paths()
        data_files, data_dirs = read_paths(cfg)
        inputs = src_files + data_files + [os.fspath(p) for p in (data, init) if isinstance(p, (str, os.PathLike))]
        result.confusion_png = plot_confusion(matrix, names, target, inputs,
                                              f"{cfg.name}: {split}, {batches.num_samples:,} samples, "
                                              f"accuracy {metrics.get('accuracy', 0):.4f}", src_dirs + data_dirs)
    elif confusion:
        notes.append("--confusion applies to classification only")
    return result


def default_split(data_given: bool, keys: set[str]) -> str:
    """The split eval scores without --split: the run's own validation split; data other than the run's is
    scored whole, however it is given (--data, --set data.root=...), except a folder given for one split:
    --set data.test_root=DIR scores that test folder, --set data.val_root=DIR that validation folder."""
    if not data_given and not keys & {"data", "data.source", "data.root", "data.path"}:
        if "data.test_root" in keys:
            return "test"
        if "data.val_root" in keys:
            return "val"
        return "val"
    return "all"


def _other_folders(resolved: dict, overrides: list[str]) -> None:
    """--set data.root (or source, path) names other data: the run's val_root / test_root belong to its own
    root and are dropped unless set too; a val_root set on a run without one takes the place of its
    val_fraction (both at once are refused)."""
    keys = {o.split("=", 1)[0].strip() for o in overrides}
    section = resolved.get("data")
    if not isinstance(section, dict):
        return
    if keys & {"data", "data.source", "data.root", "data.path"}:
        for key in ("val_root", "test_root"):
            if f"data.{key}" not in keys:
                section.pop(key, None)
    if "data.val_root" in keys and "data.val_fraction" not in keys:
        section.pop("val_fraction", None)


def scored(cfg, split: str, samples: int, total: int) -> str:
    """Which samples eval scored, in words: "all 1,996 samples of image_folder /data/test", "the val split
    (400 of 2,000 samples of image_folder /data)", "the val split: all 400 samples of data.val_root /data/val"."""
    d = cfg.data
    if split == "all":
        return f"all {samples:,} samples of {D._where(d)}"
    key = {"val": "val_root", "test": "test_root"}.get(split) if d.source == "image_folder" else None
    if key and getattr(d, key):
        return f"the {split} split: all {samples:,} samples of data.{key} {getattr(d, key)}"
    if split == "train" and d.source == "image_folder" and (d.val_root or d.split == "test" and d.test_root):
        return f"the train split: {samples:,} samples of data.root {d.root}"
    return f"the {split} split ({samples:,} of {total:,} samples of {D._where(d)})"


def _refuse_non_finite(metrics: dict[str, float], batches, split: str, cfg) -> None:
    """A metric that is not a finite float32 number is no score (training's validation stops on it too):
    NonFiniteValidation, naming whether the data holds NaN/inf or only overflows the loss."""
    bad = [f"{k} {v:.4g}" for k, v in metrics.items() if not math.isfinite(v) or abs(v) > FLOAT32_MAX]
    if not bad:
        return
    n_bad = POLICY.non_finite_inputs(batches)
    where = (cfg.data.root or cfg.data.path or cfg.data.source) if cfg.data is not None else "the data"
    cause = (f"the data holds {n_bad:,} non-finite values (NaN or infinite): clean the data" if n_bad else
             "the data is finite, but the loss overflows float32 on it (inputs or targets far beyond those the "
             "model was trained on)")
    raise POLICY.NonFiniteValidation(f"{', '.join(bad)} on the {split} split of {where}: {cause}; no score")


def per_class(matrix: torch.Tensor, names: list[str]) -> list[dict]:
    rows = []
    for i, name in enumerate(names):
        tp = int(matrix[i, i])
        predicted = int(matrix[:, i].sum())
        actual = int(matrix[i, :].sum())
        rows.append({"class": i, "name": name, "precision": tp / predicted if predicted else None,
                     "recall": tp / actual if actual else None, "support": actual})
    return rows


def plot_confusion(matrix: torch.Tensor, names: list[str], path: Path, inputs: list[str], title: str,
                   input_dirs: list[str] = ()) -> str:
    """A confusion-matrix PNG: counts in each cell, rows normalised for the colour, class names on the axes
    (``display_name``: a folder name that is not UTF-8 shows its bytes as \\xNN). Never written over
    ``inputs`` nor anywhere under ``input_dirs`` (the data folders read)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    check_output(path, inputs, what="--confusion-out", input_dirs=input_dirs)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [display_name(s) for s in names]
    m = matrix.numpy()
    n = len(names)
    share = m / m.sum(axis=1, keepdims=True).clip(min=1)
    size = min(3 + 0.45 * n, 16)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    tilt = n > 6 and max(len(s) for s in names) > 3
    ax.set_xticks(range(n), [s[:18] for s in names], rotation=45 if tilt else 0, ha="right" if tilt else "center")
    ax.set_yticks(range(n), [s[:18] for s in names])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_title(display_name(title), fontsize=10)
    fig.tight_layout()
    try:
        save_figure(fig, path, "png", dpi=110, inputs=inputs, input_dirs=input_dirs)
    finally:
        plt.close(fig)
    return str(path)


def _output_width(model, cfg) -> int | None:
    """The model's number of output scores (one sample through it on the meta device), or None."""


    try:
        meta = copy.deepcopy(model).to("meta").eval()
        with torch.no_grad():
            out = meta(torch.empty((1, *cfg.model.input_shape), device="meta"))
        return int(out.shape[1]) if out.dim() == 2 else None
    except Exception:  # noqa: BLE001 - only a default for weight: balanced
        return None
