"""Resuming a run: what --resume names (a checkpoint, the folder to continue in), and whether the checkpoint
accepts the resume (the same config but for what a resume may change, a run not finished). Used by the run
itself (``run.train``) and by the DDP launcher before its workers start (``launch.launch``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnctl import checking as CHK
from nnctl.config import loader as CL
from nnctl.config import schema as C
from nnctl.errors import CheckpointError, UsageError
from nnctl.runs import checkpoint as K
from nnctl.runs import records as RS
from nnctl.runs.rundir import RunDir
from nnctl.training import policy

# config keys a resume may change without --force
# (data.cache and data.preload change no batch: a cache hit equals a fresh decode, and both data paths
# give the same batches; tests/test_cache.py and tests/test_train_safety.py check it)
RESUME_MAY_CHANGE = {"train.epochs", "train.device", "data.num_workers", "data.root", "data.download",
                     "data.val_root", "data.test_root",  # moved folders: the data's fingerprint guards them
                     "train.log", "data.cache", "data.preload",  # train.log, train.mlflow: where it is logged
                     "train.mlflow", *(f"train.mlflow.{k}" for k in C.MlflowSection.model_fields),
                     # how the ranks share the model: the checkpoint is one format under every strategy
                     "train.distributed", *(f"train.distributed.{k}" for k in C.DistributedSection.model_fields)}


# --- resume --------------------------------------------------------------------------------

@dataclass
class ResumeSource:
    """What --resume names: a checkpoint, and the run folder to continue in (None: a new folder)."""

    checkpoint: Path
    continue_in: Path | None


def resume_source(resume: str | os.PathLike, out: str | os.PathLike | None) -> ResumeSource:

    p = Path(resume)
    if p.is_dir():
        folder = p
        ckpt = RunDir(folder).last
        if not ckpt.exists():
            RS.resolve(folder, "last")  # raises the message that leads somewhere (no checkpoint yet, or best only)
    else:
        if not p.exists():
            raise CheckpointError(f"{p}: no such checkpoint or run folder")
        ckpt = p
        folder = p.parent if (p == RunDir(p.parent).last and RunDir(p.parent).is_run()) else None
    if folder is not None and out is not None and os.path.abspath(out) != os.path.abspath(folder):
        folder = None  # --resume RUN --out NEW: a new run from RUN's state; RUN is only read
    return ResumeSource(ckpt, folder)


def config_diff(a: Any, b: Any, prefix: tuple = ()) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            out += config_diff(a.get(k), b.get(k), prefix + (str(k),))
        return out
    return [] if a == b else [".".join(prefix)]


def accepted_resume(source: ResumeSource, cfg, doc, checked, overrides: list[str], force: bool):
    """(state, cfg, doc, checked) of a resume the checkpoint accepts: its config (or the one given, checked)
    differs only where a resume may change it (else --force), and the run is not finished. Refusals are
    UsageError, raised once by whoever asks first: the process, or the DDP launcher before its workers."""
    state = K.load(source.checkpoint)
    saved, saved_doc = CL.from_dict(state["config"], str(source.checkpoint))
    if cfg is None:
        if overrides:
            CL.apply_overrides(saved_doc, overrides)
        checked = CHK.check(saved_doc, purpose="train").refuse()
        cfg, doc = checked.cfg, checked.doc
    diff = [k for k in config_diff(C.resolved(saved), C.resolved(cfg)) if k not in RESUME_MAY_CHANGE]
    if diff and not force:
        raise UsageError(f"the config differs from the checkpoint's in {', '.join(diff[:8])}"
                         f"{' ...' if len(diff) > 8 else ''}; resuming would not continue the same run "
                         "(use --force to resume anyway, or start a new run)")
    _refuse_finished(source.checkpoint, state, cfg)
    return state, cfg, doc, checked


def _refuse_finished(checkpoint: Path, state: dict, cfg) -> None:
    """A finished run is not resumed: it ran all its epochs, or early stopping ended it (the checkpoint's
    ``stopped_early``; an older checkpoint: its ``bad_epochs`` against the patience, the trainer's own rule),
    and would end it again at once. A larger patience or no early stopping (--force) resumes it."""
    epoch, epochs = int(state.get("epoch", 0)), cfg.train.epochs
    if state.get("step_in_epoch"):
        return
    if epoch >= epochs:
        raise UsageError(f"{checkpoint}: the run already finished {epoch} of {epochs} epoch"
                         f"{'' if epochs == 1 else 's'}; pass --epochs N with a larger N to train further")
    if not policy.stops_early(cfg.train.early_stopping, int(state.get("bad_epochs", 0)), epoch - 1, epochs):
        return
    reason = (state.get("stopped_early") or {}).get("reason") or \
        f"early stopping: {state.get('bad_epochs')} epochs without improvement, its patience"
    best = RunDir(checkpoint.parent).best
    planned = ((state.get("config") or {}).get("train") or {}).get("epochs") or epochs  # the run's own total
    raise UsageError(f"{checkpoint}: the run stopped early at epoch {epoch} of {planned} ({reason}); it is "
                     "finished, and resuming it as it is would train one more epoch and stop again. To train "
                     "further, resume with a larger patience or without early stopping (--force --set "
                     "train.early_stopping.patience=N), or start a new run from its weights (nnctl train "
                     f"CONFIG --init {best if best.exists() else checkpoint})")
