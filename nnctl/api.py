"""nnctl's public Python API: the one entry point for the CLI, the tests and the benchmarks.

    import nnctl
    model = nnctl.build("configs/digits_cnn.yaml")            # an nn.Module, seeded as in training
    result = nnctl.train("configs/digits_cnn.yaml", overrides=["train.epochs=2"])
    model = nnctl.load(result.run_dir)                         # eval mode; model.nnctl_meta: the record
    preds = nnctl.predict(model, ["a.png", "b.png"])           # classes, names, probabilities

Every function raises nnctl's own exception types (``nnctl.errors``): ConfigError and
UsageError (the CLI's exit code 2), CheckpointError (2), NnctlError (1). Nothing here prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import ConfigError, UsageError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


# --- configs -------------------------------------------------------------------------------

def load_config(config: Any, overrides: Sequence[str] = ()):
    """A config file path, a YAML string or a dict -> (Config, Document), validated, with overrides."""
    from . import config as C
    from .yamlio import Document, load_text

    overrides = list(overrides)
    if isinstance(config, dict):
        import copy

        doc = Document(copy.deepcopy(config), "<dict>")
    elif isinstance(config, os.PathLike) or (isinstance(config, str) and not _is_yaml_text(config)):
        return C.load(os.fspath(config), overrides)
    elif isinstance(config, str):
        doc = load_text(config, "<string>")
    else:
        raise UsageError(f"a config is a path, a YAML string or a dict, not {type(config).__name__}")
    if overrides:
        C.apply_overrides(doc, overrides)
    return C.validate(doc), doc


def _is_yaml_text(text: str) -> bool:
    """A config given as YAML text rather than a path: several lines, a flow mapping, or `key: value`
    that names no existing file."""
    if "\n" in text.strip() or text.lstrip().startswith("{"):
        return True
    return ": " in text and not os.path.exists(text)


def check(config: Any, overrides: Sequence[str] = ()) -> list:
    """Every problem of a config, in one pass (structure, layers, shapes, optimizer): [] when it is valid."""
    from . import config as C
    from . import model as M
    from .yamlio import Document, load_text

    try:
        if isinstance(config, dict):
            import copy

            doc = Document(copy.deepcopy(config), "<dict>")
            if overrides:
                C.apply_overrides(doc, list(overrides))
        elif isinstance(config, str) and _is_yaml_text(config):
            doc = load_text(config, "<string>")
            if overrides:
                C.apply_overrides(doc, list(overrides))
        else:
            doc = C.load_document(os.fspath(config), list(overrides))
    except ConfigError as exc:
        return list(exc.problems)
    return list(M.check(doc).problems)


# --- models ----------------------------------------------------------------------------------

def build(config: Any, *, overrides: Sequence[str] = (), init: str | None = None, partial: bool = False):
    """The model a config declares (an ``nn.Module`` in train mode, seeded as training seeds it).

    ``init``: weights to load (an nnctl checkpoint, ``.safetensors`` or a ``.pt`` state_dict),
    with the config's freeze selection applied.
    """
    from . import freeze as F
    from . import model as M

    cfg, doc = load_config(config, overrides)
    model, plan = M.build(cfg, doc)
    if init is not None:
        _, freezing = F.init_from(model, plan, init, partial=partial)
        if freezing and cfg.freeze is None:
            F.apply(model, freezing)
    if cfg.freeze is not None:
        F.apply(model, F.freeze_from_config(model, cfg.freeze))
    model.nnctl_meta = {"config": _resolved(cfg), "preprocessing": None, "checkpoint": None}
    return model


def _resolved(cfg) -> dict:
    from . import config as C

    return C.resolved(cfg)


@dataclass
class Source:
    """A config, or a checkpoint with its model: what summary, freeze, export, eval and predict open."""

    cfg: Any
    doc: Any
    model: Any
    plan: Any
    state: dict | None = None
    checkpoint: Path | None = None

    @property
    def preprocessing(self):
        from .preprocess import Preprocessing

        return Preprocessing.from_dict((self.state or {}).get("preprocessing"))


def is_checkpoint_source(source: Any) -> bool:
    if not isinstance(source, (str, os.PathLike)):
        return False
    p = Path(source)
    if p.suffix in (".safetensors", ".npz", ".onnx"):
        raise UsageError(f"{p} holds exported weights only, without the config: use a run folder or an nnctl "
                         f"checkpoint (.pt), or give a config with --init {p}")
    return p.is_dir() or p.suffix in CHECKPOINT_SUFFIXES


def open_source(source: Any, overrides: Sequence[str] = (), which: str = "best") -> Source:
    """A config (path, YAML text or dict) or a checkpoint / run folder -> its model and record."""
    from . import freeze as F
    from . import model as M

    if which not in ("best", "last"):
        raise UsageError(f"--which must be best or last, not {which!r}")
    if is_checkpoint_source(source):
        from . import checkpoint as K
        from . import config as C

        path = K.resolve(source, which)
        state = K.load(path)
        cfg, doc = C.from_dict(state["config"], str(path))
        model, plan = M.build(cfg, doc, pretrained=False)  # the checkpoint's weights are loaded next
        F.load_weights(model, plan, state["model"], str(path))
        if state.get("freeze"):
            F.apply(model, state["freeze"])
        return Source(cfg, doc, model, plan, state, Path(path))
    cfg, doc = load_config(source, overrides)
    model, plan = M.build(cfg, doc)
    if cfg.freeze is not None:
        F.apply(model, F.freeze_from_config(model, cfg.freeze))
    return Source(cfg, doc, model, plan)


def load(run_or_checkpoint: str | os.PathLike, *, which: str = "best", device: str = "cpu"):
    """A trained model, in eval mode on ``device``, with its record at ``model.nnctl_meta``.

    ``model.nnctl_meta``: ``{"preprocessing": Preprocessing or None, "config": dict,
    "checkpoint": path, "epoch": int, "best": dict}``.
    """
    from .inference import untrained_source_problem
    from .loop import select_device

    problem = untrained_source_problem(run_or_checkpoint, "nnctl.load")
    if problem is not None:
        raise UsageError(problem + ("; for an untrained model of a config use nnctl.build"
                                    if "a config" in problem else ""))
    src = open_source(run_or_checkpoint, which=which)
    if src.state is None:
        raise UsageError(f"{run_or_checkpoint}: nnctl.load needs a trained model: a run folder or a checkpoint "
                         "(a config has no trained weights; for an untrained model use nnctl.build)")
    dev = select_device(device)
    model = src.model.to(dev).eval()
    model.nnctl_meta = {"preprocessing": src.preprocessing, "config": src.state["config"],
                        "checkpoint": str(src.checkpoint), "epoch": src.state.get("epoch"),
                        "best": src.state.get("best")}
    return model


def load_record(run_or_checkpoint: str | os.PathLike, *, which: str = "best"):
    """The preprocessing record of a checkpoint (None for one written before records)."""
    from . import checkpoint as K
    from .preprocess import Preprocessing

    state = K.load(K.resolve(run_or_checkpoint, which))
    return Preprocessing.from_dict(state.get("preprocessing"))


# --- training, evaluation, prediction ---------------------------------------------------------

def train(config: Any = None, *, overrides: Sequence[str] = (), out: str | None = None,
          resume: str | None = None, init: str | None = None, partial: bool = False, force: bool = False,
          epochs: int | None = None, seed: int | None = None, device: str | None = None,
          on_event=None, on_message=None):
    """Train a config (a path) or resume a run: returns a RunResult (run_dir, history, best, plot).

    A config given as a dict or YAML text is written to a temporary file first, so that
    the run's ``config.yaml`` and its relative paths behave as for a file.
    """
    from . import run as R

    if config is not None and not isinstance(config, (str, os.PathLike)) or \
            (isinstance(config, str) and _is_yaml_text(config)):
        import tempfile

        import yaml

        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(text)
            return R.train(str(path), overrides=list(overrides), out=out, resume=resume, init=init,
                           partial=partial, force=force, epochs=epochs, seed=seed, device=device,
                           on_event=on_event, on_message=on_message)
    return R.train(None if config is None else os.fspath(config), overrides=list(overrides), out=out,
                   resume=resume, init=init, partial=partial, force=force, epochs=epochs, seed=seed,
                   device=device, on_event=on_event, on_message=on_message)


@dataclass
class Prepared:
    """A config made ready to train in memory: its model, its data on the device (what bench and tests time)."""

    cfg: Any
    doc: Any
    model: Any
    plan: Any
    data: Any
    device: Any


def prepare(config: Any, *, overrides: Sequence[str] = (), device: str | None = None) -> Prepared:
    """Config -> model + data on the device, as ``nnctl.train`` would make them, without a run folder."""
    from . import data as D
    from . import model as M
    from . import loop as T

    cfg, doc = load_config(config, overrides)
    from . import config as C

    C.require_data(cfg, doc, what="training")
    problems = T.validate(cfg, doc)
    if problems:
        raise ConfigError(problems)
    model, plan = M.build(cfg, doc)
    dev = T.select_device(device or cfg.train.device)
    return Prepared(cfg, doc, model, plan, D.load_data(cfg, dev), dev)


def fit(prepared: Prepared, *, run_dir: str | os.PathLike | None = None, on_event=None):
    """The training loop on prepared model and data. Without run_dir nothing is written (a FitResult)."""
    import tempfile

    from . import loop as T

    shape = prepared.plan.output_shape
    outputs = int(shape[-1]) if shape else None
    if run_dir is not None:
        return T.fit(prepared.cfg, prepared.doc, prepared.model, prepared.data, prepared.device, run_dir,
                     on_event=on_event, outputs=outputs)
    with tempfile.TemporaryDirectory() as tmp:
        return T.fit(prepared.cfg, prepared.doc, prepared.model, prepared.data, prepared.device, tmp,
                     on_event=on_event, write_checkpoints=False, outputs=outputs)


def predict(model_or_run: Any, inputs: Iterable[Any], *, which: str = "best", device: str = "cpu",
            batch_size: int = 256, top_k: int = 5, glob: str | None = None, on_progress=None):
    """Predictions for image files, folders of them, tensors files, or tensors: a Predictions object.

    ``inputs``: one input (a str or os.PathLike path, a tensor) or an iterable of them; a str is
    never iterated. ``.rows`` (made on demand), ``.failed``, ``.files`` (every file read).
    """
    from . import inference as P

    return P.predict(model_or_run, inputs, which=which, device=device, batch_size=batch_size, top_k=top_k,
                     glob=glob, on_progress=on_progress)


def evaluate(source: Any, *, which: str = "best", split: str | None = None, data: Any = None,
             overrides: Sequence[str] = (), init: str | None = None, partial: bool = False,
             device: str | None = None, confusion: bool = False, confusion_path: str | None = None):
    """Metrics of a checkpoint (or of a config with ``init`` weights) on a split of its data or other data.

    ``split``: val, train, test (the dataset's own test split) or all (the default with ``data``).
    ``data``: a YAML file with a ``data:`` section, or a dict; the recorded preprocessing applies.
    ``confusion``: also the confusion matrix, per-class precision/recall and a PNG. Returns an EvalResult.
    """
    from . import evaluation as E

    return E.evaluate(source, which=which, split=split, data=data, overrides=list(overrides), init=init,
                      partial=partial, device=device, confusion=confusion, confusion_path=confusion_path)


def summarize(source: Any, *, depth: int = 1, which: str = "best", overrides: Sequence[str] = ()):
    """torchinfo-style statistics of a model: rows, totals, MACs (a Summary object)."""
    from . import summary as S

    src = open_source(source, overrides, which)
    augment = src.cfg.data.augment if src.cfg.data is not None else None
    return S.summarize(src.model, src.plan, src.cfg.model.input_shape, depth=depth, augment=augment)


def export(source: Any, fmt: str = "safetensors", out: str | None = None, *, which: str = "best",
           with_preprocess: bool = False):
    """Write a checkpoint's weights (safetensors, pt, npz or onnx); returns an ExportResult."""
    from . import checkpoint as K
    from . import exporting as E

    if fmt not in E.FORMATS:
        raise UsageError(f"unknown --format {fmt!r}: choose one of {', '.join(E.FORMATS)}")
    src = open_source(source, which=which)
    if src.state is None:  # a config: its freshly initialised (seeded) weights, as nnctl train would start
        from . import config as C

        if out is None:
            raise UsageError(f"{source}: exporting a config's initial weights needs -o OUT")
        state = K.make_payload("init", C.resolved(src.cfg), src.model.state_dict(),
                               input_shape=list(src.cfg.model.input_shape), source=os.path.basename(str(source)))
        return E.export(state, src.model, fmt, out, "init", str(source), inputs=[str(source)],
                        with_preprocess=with_preprocess)
    ckpt_path = K.resolve(source, which)
    target = out or str(E.default_path(ckpt_path, fmt))
    return E.export(src.state, src.model, fmt, target, which, str(ckpt_path), inputs=[str(ckpt_path), str(source)],
                    with_preprocess=with_preprocess)


# --- the decoded-image cache (data.cache: true) ---------------------------------------------

def cache_info(*, verify: bool = False):
    """The decoded-image cache's folder and entries (``nnctl.cache.Entry``), newest use first.
    ``verify``: hash every data file in full (reads them all)."""
    from . import cache as K

    return K.cache_dir(), K.entries(verify=verify)


def cache_clear(*, root: str | os.PathLike | None = None, all: bool = False):
    """Remove every entry of the decoded-image cache (``all``) or one image folder's (``root``);
    entries being built by a live process are left alone (``.busy``). A ``nnctl.cache.Cleared``."""
    from . import cache as K

    return K.clear(root=root, all=all)


# --- runs ------------------------------------------------------------------------------------
# (list_runs, not runs: nnctl.runs is the module, and no public function shares a submodule's name)

def list_runs(folder: str | os.PathLike = "runs") -> list:
    """The runs in a folder (or one run folder), by start time: a list of nnctl.runs.RunInfo
    (state, epochs, best, parameters, wall time, and ``differs``: the config keys in which a run
    differs from the other runs of its config). ``RunInfo.to_dict()`` is the ``--json`` form."""
    from . import runs as RS

    return RS.list_runs(folder)


def compare(runs: Sequence[str | os.PathLike], *, out: str | os.PathLike | None = None):
    """Run folders side by side: a nnctl.runs.Comparison (config differences, final and best metrics,
    the curves); with ``out``, also the picture of their curves overlaid (.png, .svg or .pdf)."""
    from . import runs as RS

    comparison = RS.compare(runs)
    if out is not None:
        RS.plot_comparison(comparison, out)
    return comparison
