"""What commands open: a config (path, YAML text or dict), a checkpoint or a run folder -> the model and its record."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from nnctl.config import loader as CL
from nnctl.config import structure as CS
from nnctl.config.yamlio import Document, load_text
from nnctl.data.record import Preprocessing
from nnctl.data.sources.read import read_paths as data_read_paths
from nnctl.errors import NnctlError, UsageError
from nnctl.model import freeze as F
from nnctl.model import plan as M
from nnctl.model import weights as W
from nnctl.runs import checkpoint as K_CHECKPOINT
from nnctl.runs import records as RS
from nnctl.runs.rundir import RunDir
from nnctl.training.distributed import select_device

WEIGHTS_ONLY_SUFFIXES = (".safetensors", ".npz", ".onnx")



CONFIG_SUFFIXES = (".yaml", ".yml")



def untrained_source_problem(source: Any, needs: str) -> str | None:
    """Why ``source`` cannot give a trained model (a config, a weights-only export), or None.

    None also for what the loader itself reports better (a missing path, a checkpoint).
    """
    if isinstance(source, torch.nn.Module):
        return None
    path_like = isinstance(source, (str, os.PathLike)) and (isinstance(source, os.PathLike) or "\n" not in source)
    if path_like and Path(source).suffix.lower() in WEIGHTS_ONLY_SUFFIXES and Path(source).exists():
        p = Path(source)
        held = "an ONNX export" if p.suffix.lower() == ".onnx" else "weights only"
        return f"{p.name} holds {held}, without the config; {needs} needs a run folder or an nnctl checkpoint (.pt)"
    if is_checkpoint_source(source):
        return None
    if path_like:
        p = Path(source)
        if p.suffix.lower() not in CONFIG_SUFFIXES or not p.exists():
            return None  # a missing path or an unknown file: the loader's own message
    return f"{needs} needs a trained model: a run folder or a checkpoint (a config has no trained weights)"



CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")



def config_document(config: Any, overrides: Sequence[str] = ()):
    """A config file path, a YAML string or a dict -> its Document, with the overrides applied (not validated).

    A file's relative paths resolve against its folder; a dict's or a YAML string's, and --set's, against
    the current folder."""
    overrides = list(overrides)
    if isinstance(config, dict):
        doc = Document(copy.deepcopy(config), "<dict>")
    elif isinstance(config, os.PathLike) or (isinstance(config, str) and not _is_yaml_text(config)):
        return CL.load_document(os.fspath(config), overrides)
    elif isinstance(config, str):
        doc = load_text(config, "<string>")
    else:
        raise UsageError(f"a config is a path, a YAML string or a dict, not {type(config).__name__}")
    # no file, so no file's folder: relative paths are relative to the current folder, as --set's are
    CL.resolve_paths(doc, os.getcwd())
    if overrides:
        CL.apply_overrides(doc, overrides)
        CL.resolve_paths(doc, os.getcwd(), only_overridden=True)
    return doc


def load_config(config: Any, overrides: Sequence[str] = ()):
    """A config file path, a YAML string or a dict -> (Config, Document), validated, with overrides."""
    doc = config_document(config, overrides)
    return CS.validate(doc), doc



def _is_yaml_text(text: str) -> bool:
    """A config given as YAML text rather than a path: several lines, a flow mapping, or `key: value`
    that names no existing file."""
    if "\n" in text.strip() or text.lstrip().startswith("{"):
        return True
    return ": " in text and not os.path.exists(text)



@dataclass
class Source:
    """A config, or a checkpoint with its model: what summary, freeze, export, eval and predict open."""

    cfg: Any
    doc: Any
    model: Any
    plan: Any
    state: dict | None = None
    checkpoint: Path | None = None
    origin: Any = None  # the source as given (a path, YAML text, a dict)

    @property
    def preprocessing(self):

        return Preprocessing.from_dict((self.state or {}).get("preprocessing"))

    def read_paths(self) -> tuple[list[str], list[str]]:
        """What a command that opened this source reads, as (files, folders): the config or run folder
        given, the checkpoint, and the data its config names (a run's training data too: a picture or an
        export written into a class folder would be read as data by the next run). Every output of such
        a command goes through ``files.check_output(path, files, input_dirs=folders)``."""
        given = [os.fspath(p) for p in (self.origin, self.checkpoint) if _is_path(p)]
        data_files, data_dirs = data_read_paths(self.cfg)
        return given + data_files, data_dirs


def _is_path(p: Any) -> bool:
    return isinstance(p, os.PathLike) or (isinstance(p, str) and not _is_yaml_text(p))


def record_read_paths(config: Any) -> tuple[list[str], list[str]]:
    """The data a run's recorded config (a dict) reads, as (files, folders), like ``Source.read_paths``;
    a record that no longer validates: its ``data.path`` and ``data.root`` as written (refusing more,
    never less)."""
    if not isinstance(config, dict):
        return [], []
    try:
        cfg, _ = CL.from_dict(config, "<run record>")
    except NnctlError:
        data = config.get("data") if isinstance(config.get("data"), dict) else {}
        path, root = data.get("path"), data.get("root")
        return ([path] if isinstance(path, str) else []), ([root] if isinstance(root, str) else [])
    return data_read_paths(cfg)



def _with_lines(doc, folder: Path):
    """A checkpoint's config located at the lines of its run's config.yaml, when that file holds the same
    config (nnctl summary RUN's line column, problems at their lines); else the document as it is."""
    try:
        on_disk = CL.load_file(str(RunDir(folder).config)) if RunDir(folder).config.is_file() else None
    except NnctlError:
        return doc
    if on_disk is None or on_disk.data != doc.data:
        return doc
    return Document(doc.data, str(RunDir(folder).config), on_disk.marks, doc.overridden)


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

    if which not in ("best", "last"):
        raise UsageError(f"--which must be best or last, not {which!r}")
    if is_checkpoint_source(source):

        path = RS.resolve(source, which)
        state = K_CHECKPOINT.load(path)
        cfg, doc = CL.from_dict(state["config"], str(path))
        doc = _with_lines(doc, Path(path).parent)
        model, plan = M.build(cfg, doc, pretrained=False)  # the checkpoint's weights are loaded next
        W.load_weights(model, plan, state["model"], str(path))
        if state.get("freeze"):
            F.apply(model, state["freeze"])
        return Source(cfg, doc, model, plan, state, Path(path), source)
    cfg, doc = load_config(source, overrides)
    model, plan = M.build(cfg, doc)
    F.apply_config(model, cfg.freeze)
    return Source(cfg, doc, model, plan, origin=source)



def load(run_or_checkpoint: str | os.PathLike, *, which: str = "best", device: str = "cpu"):
    """A trained model, in eval mode on ``device``, with its record at ``model.nnctl_meta``.

    ``model.nnctl_meta``: ``{"preprocessing": Preprocessing or None, "config": dict,
    "checkpoint": path, "epoch": int, "best": dict}``.
    """

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

