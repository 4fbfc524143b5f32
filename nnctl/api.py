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

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import yaml

from nnctl.errors import ConfigError, UsageError
from nnctl import checking as CHK
from nnctl import files
from nnctl.data import loading as D
from nnctl.model import freeze as F
from nnctl.model import plan as M
from nnctl.model import weights as W
from nnctl.training import distributed as DIST
from nnctl.training import launch as LAUNCH
from nnctl.training import sharding as SHARD
from nnctl.optim.optimizers import state_slots
from nnctl.training.launch import is_main_process, is_worker, set_timeout  # noqa: F401  (the CLI's train)
from nnctl.use import freeze as FREEZE
from nnctl.model import graph as G
from nnctl.model import registry as REG
from nnctl.model import summary as S
from nnctl.config.schema import suggest
from nnctl.use.source import (CHECKPOINT_SUFFIXES, Source, _is_yaml_text, config_document,  # noqa: F401
                              is_checkpoint_source, load, load_config, open_source, record_read_paths)
from nnctl.model.tv import pretrained_preprocessing
from nnctl.data.augment.spec import describe as describe_augment
from nnctl.config import schema as C
from nnctl.config import yamlio
from nnctl.runs import records as RS
from nnctl.runs import checkpoint as K_CHECKPOINT
from nnctl.data.record import Preprocessing
from nnctl.training import trainer as T
from nnctl.use import predict as P
from nnctl.use import evaluate as E_EVALUATE
from nnctl.use import export as E_EXPORT
from nnctl.data import cache as K_CACHE
from nnctl.runs import plots as PLOTS
from nnctl.runs.tensorboard import MissingPackage
from nnctl.config import tune as TUNE_CONFIG

__all__ = ["build", "load", "load_config", "load_record", "check", "prepare", "fit", "train", "launch", "predict",
           "evaluate", "summarize", "layer_types", "freeze", "export", "cache_info", "cache_clear", "list_runs",
           "compare", "tune", "tune_show", "serve", "serve_openapi"]



# --- configs -------------------------------------------------------------------------------





def check(config: Any, overrides: Sequence[str] = ()) -> list:
    """Every problem of a config, in one pass (nnctl.checking: structure, layers, shapes, freeze selection,
    data facts, optimizer, augmentation, loss; a package it asks for and lacks): [] when it is valid."""
    try:
        doc = config_document(config, overrides)
    except ConfigError as exc:
        return list(exc.problems)
    checked = CHK.check(doc)
    return list(checked.problems) + list(checked.missing)


# --- models ----------------------------------------------------------------------------------

def build(config: Any, *, overrides: Sequence[str] = (), init: str | None = None, partial: bool = False):
    """The model a config declares (an ``nn.Module`` in train mode, seeded as training seeds it).

    ``init``: weights to load (an nnctl checkpoint, ``.safetensors`` or a ``.pt`` state_dict),
    with the config's freeze selection applied.
    """
    cfg, doc = load_config(config, overrides)
    model, plan = M.build(cfg, doc)
    freezing = None
    if init is not None:
        _, freezing = W.init_from(model, plan, init, partial=partial)
    F.apply_config(model, cfg.freeze, inherited=freezing)  # as nnctl.train applies it
    model.nnctl_meta = {"config": _resolved(cfg), "preprocessing": None, "checkpoint": None}
    return model


def _resolved(cfg) -> dict:

    return C.resolved(cfg)










def load_record(run_or_checkpoint: str | os.PathLike, *, which: str = "best"):
    """The preprocessing record of a checkpoint (None for one written before records)."""

    state = K_CHECKPOINT.load(RS.resolve(run_or_checkpoint, which))
    return Preprocessing.from_dict(state.get("preprocessing"))


# --- training, evaluation, prediction ---------------------------------------------------------

def train(config: Any = None, *, overrides: Sequence[str] = (), out: str | None = None,
          resume: str | None = None, init: str | None = None, partial: bool = False, force: bool = False,
          epochs: int | None = None, seed: int | None = None, device: str | None = None,
          on_event=None, on_message=None):
    """Train a config (a path) or resume a run: returns a RunResult (run_dir, history, best, plot).

    A config given as a dict or YAML text is written to a temporary file first, so that
    the run's ``config.yaml`` and its relative paths behave as for a file. SIGTERM while the
    run starts raises ``Interrupted`` (exit 143); the process's own handler is restored afterwards.
    Under torchrun, ``on_event`` and ``on_message`` are called on rank 0 only.
    """
    with _config_file(config) as path:
        return LAUNCH.train(path, overrides=list(overrides), out=out, resume=resume, init=init, partial=partial,
                            force=force, epochs=epochs, seed=seed, device=device, on_event=on_event,
                            on_message=on_message)


def tune(config: Any, *, overrides: Sequence[str] = (), out: str | os.PathLike | None = None, workers: int = 1,
         nproc_per_node: int = 1, on_trial=None):
    """Search the config's ``tune:`` section with Optuna until ``tune.trials`` trials count (or continue the
    search in its folder): each trial a run folder ``<out>/trial-NNN`` (default out: runs/<name>-tune).
    ``workers``: that many worker processes on this machine; ``nproc_per_node``: each trial a DDP run of that
    many processes (rank 0 reports, every rank stops together when pruned). ``on_trial(TrialOutcome)`` as each trial starts
    and ends. Returns a ``TuneResult``; ``tune_show(result.folder)`` says what it found. Needs the tune extra."""
    _require_optuna()
    from nnctl.search import loop  # the tune extra (Optuna): imported only for a search

    with _config_file(config) as path:
        return loop.tune(path, overrides=list(overrides), out=out, workers=workers, on_trial=on_trial,
                         nproc_per_node=nproc_per_node)


def tune_show(folder: str | os.PathLike, *, write: bool = True, storage: str | None = None):
    """A search's trials and its best one (its metric at its best epoch), as a ``TuneSummary``; with ``write``
    also ``best.yaml`` and the pictures (history, importances, parallel coordinates) in the folder."""
    _require_optuna()
    from nnctl.search import results  # the tune extra (Optuna): imported only for a search

    return results.summarize(folder, write=write, storage=storage)


def serve(source: Any, *, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu", which: str = "best",
          max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 1024, max_body: int = 16 << 20,
          timeout: float = 30.0, drain_timeout: float = 30.0, top_k: int = 1, token: str | None = None,
          on_listening=None):
    """Serve a trained run (a run folder, a checkpoint or an ``nn.Module``) over HTTP until SIGTERM or SIGINT:
    /predict answers what ``predict`` answers, in dynamic batches (``max_batch`` samples within
    ``max_wait_ms``); /health, /ready, /info, /metrics, a page at /. ``on_listening(url, predictor)`` once
    the port is bound and the model loaded. Returns how it ended (``nnctl.serving.lifecycle.Served``: a drained
    stop is a success). Needs the serve extra."""
    _require_serve()
    from nnctl.serving import app as SERVE_APP  # the serve extra (FastAPI, uvicorn): imported only to serve
    from nnctl.serving import lifecycle

    options = SERVE_APP.ServeOptions(host=host, port=port, device=device, which=which, max_batch=max_batch,
                                     max_wait_ms=max_wait_ms, max_queue=max_queue, max_body=max_body,
                                     timeout=timeout, drain_timeout=drain_timeout, top_k=top_k, token=token,
                                     name=_served_name(source))
    problems = options.problems()
    if problems:
        raise UsageError("; ".join(problems))
    return lifecycle.serve(source, options, on_listening)


def serve_openapi() -> dict:
    """The OpenAPI schema of ``nnctl serve``'s endpoints (FastAPI's), without a model. Needs the serve extra."""
    _require_serve()
    from nnctl.serving import app as SERVE_APP  # the serve extra (FastAPI): imported only to serve

    return SERVE_APP.openapi()


def _served_name(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        return p.name if p.is_dir() else f"{p.parent.name}/{p.name}"
    return type(source).__name__


def _require_serve() -> None:
    from nnctl.serving import REQUIRED  # no third-party import: the list of what the extra installs

    lacking = [m for m in REQUIRED if not TUNE_CONFIG.installed(m)]
    if lacking:
        raise MissingPackage(f"nnctl serve needs {', '.join(lacking)}, not installed: pip install 'nnctl[serve]'")


def _require_optuna() -> None:
    if not TUNE_CONFIG.installed("optuna"):
        raise MissingPackage("nnctl tune needs Optuna, which is not installed: pip install 'nnctl[tune]'")


def launch(config: Any = None, *, nproc_per_node: int, nnodes: str = "1", node_rank: int | None = None,
           rdzv_endpoint: str | None = None, rdzv_id: str = "nnctl", max_restarts: int = 0,
           rdzv_timeout: int | None = None, overrides: Sequence[str] = (), out: str | None = None,
           resume: str | None = None, init: str | None = None, partial: bool = False, force: bool = False,
           epochs: int | None = None, seed: int | None = None, device: str | None = None) -> Path | None:
    """``train`` in ``nproc_per_node`` processes a machine (DistributedDataParallel), started through
    torch.distributed.run as torchrun starts them; ``nnodes``, ``node_rank``, ``rdzv_endpoint``,
    ``rdzv_id`` and ``max_restarts`` are torchrun's; ``rdzv_timeout`` (seconds) bounds the rendezvous
    and every collective. On one machine the run folder is claimed here and held for the workers; on
    several, global rank 0 claims it on its machine. Returns it (None: several machines, no ``out``).
    The workers report as ``nnctl train`` does (rank 0 prints)."""
    with _config_file(config) as path:
        torchrun = LAUNCH.Torchrun(nproc_per_node, str(nnodes), node_rank, rdzv_endpoint, rdzv_id, max_restarts,
                                   rdzv_timeout)
        return LAUNCH.launch(path, torchrun, overrides=list(overrides), out=out, resume=resume, init=init,
                             partial=partial, force=force, epochs=epochs, seed=seed, device=device)


@contextlib.contextmanager
def _config_file(config: Any) -> Iterator[str | None]:
    """A config as a file path (None stays None): a dict or YAML text is written to a temporary file."""
    if config is None or isinstance(config, os.PathLike) or (isinstance(config, str) and not _is_yaml_text(config)):
        yield None if config is None else os.fspath(config)
        return
    # its relative paths are relative to the current folder (config_document), never to the temporary one
    doc = config_document(config)
    raw = config if isinstance(config, dict) else yamlio.load_text(config, "<string>").data
    text = config if isinstance(config, str) and doc.data == raw else yaml.safe_dump(doc.data, sort_keys=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        files.atomic_write(path, lambda fh: fh.write(text.encode()))  # the one writer (issue 20)
        yield str(path)


@dataclass
class Prepared:
    """A config made ready to train in memory: its model, its data on the device (what bench and tests time)."""

    cfg: Any
    doc: Any
    model: Any
    plan: Any
    data: Any
    device: Any
    freezing: dict | None = None  # the config's freeze: selection, applied to model (nnctl.model.freeze)


def prepare(config: Any, *, overrides: Sequence[str] = (), device: str | None = None) -> Prepared:
    """Config -> model + data on the device, as ``nnctl.train`` would make them, without a run folder:
    the same checks (nnctl.checking, for training), the same seeded model with the config's freeze applied."""
    checked = CHK.check(config_document(config, overrides), purpose="train").refuse()
    cfg, doc = checked.cfg, checked.doc
    model, plan = M.build(cfg, doc, checked=checked.plan)
    freezing = F.apply_config(model, cfg.freeze)
    dev = DIST.select_device(device or cfg.train.device)
    return Prepared(cfg, doc, model, plan, D.load_data(cfg, dev, weights=pretrained_preprocessing(cfg)), dev,
                    freezing)


def fit(prepared: Prepared, *, run_dir: str | os.PathLike | None = None, on_event=None):
    """The training loop on prepared model and data. Without run_dir nothing is written (a FitResult)."""


    shape = prepared.plan.output_shape
    outputs = int(shape[-1]) if shape else None
    if run_dir is not None:
        return T.fit(prepared.cfg, prepared.model, prepared.data, prepared.device, run_dir,
                     T.FitOptions(on_event=on_event, outputs=outputs, freezing=prepared.freezing))
    with tempfile.TemporaryDirectory() as tmp:
        return T.fit(prepared.cfg, prepared.model, prepared.data, prepared.device, tmp,
                     T.FitOptions(on_event=on_event, write_checkpoints=False, outputs=outputs,
                                  freezing=prepared.freezing))


def predict(model_or_run: Any, inputs: Iterable[Any], *, which: str = "best", device: str = "cpu",
            batch_size: int = 256, top_k: int = 5, glob: str | None = None, on_progress=None):
    """Predictions for image files, folders of them, tensors files, or tensors: a Predictions object.

    ``inputs``: one input (a str or os.PathLike path, a tensor) or an iterable of them; a str is
    never iterated. ``.rows`` (made on demand), ``.failed``, ``.files`` (every file read).
    """

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

    return E_EVALUATE.evaluate(source, which=which, split=split, data=data, overrides=list(overrides), init=init,
                      partial=partial, device=device, confusion=confusion, confusion_path=confusion_path)


def summarize(source: Any, *, depth: int = 1, which: str = "best", overrides: Sequence[str] = (),
              graph: str | os.PathLike | None = None, processes: int = 1):
    """torchinfo-style statistics of a model: rows, totals, MACs (a Summary object, named after the config).

    ``graph``: also draw the model (branches, shortcuts, output shapes) to this .png, .svg or .pdf file.
    """
    if graph is not None and not os.fspath(graph).lower().endswith((".png", ".svg", ".pdf")):
        raise UsageError(f"--graph {graph}: the picture's file name must end in .png, .svg or .pdf")
    src = open_source(source, overrides, which)
    cfg = src.cfg
    spec = cfg.data.augment if cfg.data is not None else None
    augment = describe_augment(spec) if spec else None  # the training batches' augmentation, one line
    result = S.summarize(src.model, src.plan, cfg.model.input_shape, depth=depth, augment=augment)
    result.name = cfg.name
    pre = src.preprocessing
    result.inputs = pre.describe() if pre is not None else None
    if cfg.train is not None:  # what training holds a rank: parameters, gradients, the optimizer's state
        strategy = cfg.train.distributed.strategy if processes > 1 else "one process"
        slots = state_slots(cfg.train.optimizer)
        result.per_rank = {"strategy": strategy, "processes": processes, "optimizer_slots": slots,
                           **SHARD.per_rank_bytes(src.model, processes, strategy, slots)}
    located = getattr(src.plan, "doc", None)
    result.lines_of = located.file if located is not None and any(r.line for r in result.rows) else None
    if graph is not None:
        # never over what was read (the config, a link named g.png to it too, the checkpoint, a run's
        # files) nor inside the data folders its config names
        inputs, input_dirs = src.read_paths()
        G.draw_graph(src.model, cfg.model.input_shape, os.fspath(graph),
                     title=f"{cfg.name}: input {list(cfg.model.input_shape)}", plan=src.plan, inputs=inputs,
                     input_dirs=input_dirs)
    return result


def layer_types(name: str | None = None) -> list[dict]:
    """The layer types a config may name (torch.nn, from PyTorch's signatures) and their arguments, by name;
    with ``name``, that one type (an unknown name: UsageError with the nearest names)."""
    reg = REG.registry()
    if name:
        if name not in reg:
            raise UsageError(REG.refusal(name) or f"unknown layer type {name!r}{suggest(name, list(reg))}")
        return [REG.describe(reg[name])]
    return [REG.describe(reg[n]) for n in sorted(reg)]


def freeze(source: Any, *, first: int | None = None, children: Sequence[int] | None = None,
           names: Sequence[str] | None = None, unfreeze: Sequence[str] | None = None,
           train_frozen_norm: bool = False, output: str | os.PathLike | None = None, which: str = "best"):
    """Freeze a model's children for fine-tuning (a config, a checkpoint or a run folder): the first N,
    children by index, modules or parameters by dotted name (globs), then ``unfreeze``. Without a
    selector: the checkpoint's own selection. ``output``: a checkpoint with the weights and the
    selection, for ``train(init=...)``. Returns a ``nnctl.use.freeze.Frozen`` (children, counts, plan)."""
    return FREEZE.freeze(source, first=first, children=children, names=names, unfreeze=unfreeze,
                         train_frozen_norm=train_frozen_norm, output=output, which=which)


def export(source: Any, fmt: str = "safetensors", out: str | None = None, *, which: str = "best",
           with_preprocess: bool = False):
    """Write a checkpoint's weights (safetensors, pt, npz or onnx); returns an ExportResult."""

    if fmt not in E_EXPORT.FORMATS:
        raise UsageError(f"unknown --format {fmt!r}: choose one of {', '.join(E_EXPORT.FORMATS)}")
    src = open_source(source, which=which)
    inputs, input_dirs = src.read_paths()  # never over what was read, nor inside a data folder
    if src.state is None:  # a config: its freshly initialised (seeded) weights, as nnctl train would start
        if out is None:
            raise UsageError(f"{source}: exporting a config's initial weights needs -o OUT")
        state = K_CHECKPOINT.make_payload("init", C.resolved(src.cfg), src.model.state_dict(),
                               input_shape=list(src.cfg.model.input_shape), source=os.path.basename(str(source)))
        return E_EXPORT.export(state, src.model, fmt, out, "init", str(source), inputs=inputs,
                               with_preprocess=with_preprocess, input_dirs=input_dirs)
    ckpt_path = RS.resolve(source, which)
    target = out or str(E_EXPORT.default_path(ckpt_path, fmt))
    return E_EXPORT.export(src.state, src.model, fmt, target, which, str(ckpt_path), inputs=inputs,
                           with_preprocess=with_preprocess, input_dirs=input_dirs)


# --- the decoded-image cache (data.cache: true) ---------------------------------------------

def cache_info(*, verify: bool = False):
    """The decoded-image cache's folder and entries (``nnctl.cache.Entry``), newest use first.
    ``verify``: hash every data file in full (reads them all)."""

    return K_CACHE.cache_dir(), K_CACHE.entries(verify=verify)


def cache_clear(*, root: str | os.PathLike | None = None, all: bool = False):
    """Remove every entry of the decoded-image cache (``all``) or one image folder's (``root``);
    entries being built by a live process are left alone (``.busy``). A ``nnctl.cache.Cleared``."""

    return K_CACHE.clear(root=root, all=all)


# --- runs ------------------------------------------------------------------------------------
# (list_runs, not runs: nnctl.runs is the module, and no public function shares a submodule's name)

def list_runs(folder: str | os.PathLike = "runs") -> list:
    """The runs in a folder (or one run folder), by start time: a list of nnctl.runs.RunInfo
    (state, epochs, best, parameters, wall time, and ``differs``: the config keys in which a run
    differs from the other runs of its config). ``RunInfo.to_dict()`` is the ``--json`` form."""

    return RS.list_runs(folder)


def compare(runs: Sequence[str | os.PathLike], *, out: str | os.PathLike | None = None):
    """Run folders side by side: a nnctl.runs.Comparison (config differences, final and best metrics,
    the curves); with ``out``, also the picture of their curves overlaid (.png, .svg or .pdf)."""

    comparison = RS.compare(runs)
    if out is not None:
        reads = [record_read_paths(info.config) for info in comparison.runs]  # their data: never written into
        PLOTS.plot_comparison(comparison, out, ([f for r in reads for f in r[0]], [d for r in reads for d in r[1]]))
    return comparison
