"""TensorBoard logging: ``train.log: [csv, tensorboard]`` (the optional extra ``nnctl[tensorboard]``).

The run's events drive a ``torch.utils.tensorboard.SummaryWriter`` writing into
``RUN/tensorboard/`` (rank 0 only):

- start: the model graph (``add_graph`` on zeros of ``model.input_shape``, in eval mode,
  under ``no_grad``, with the random state saved and restored, so logging never changes
  the training); a model that cannot be traced costs a note, not the run;
- every epoch's end: each scalar of the epoch's metrics row (train_loss, val_loss,
  val_accuracy, lr, seconds, ...) at step = the epoch (1-based, as in metrics.csv);
- the end (finished, interrupted or failed): the hyperparameters (the resolved config's
  scalar values, by dotted key) with the final metrics and ``best/<metric>``, for the
  HPARAMS table, which then compares the runs under ``tensorboard --logdir runs``.

A resumed run appends to the same folder with ``purge_step`` = the checkpoint's epoch + 1,
so TensorBoard drops whatever an interrupted process logged after its checkpoint. A new
run started from another run's checkpoint first logs the history it inherits.

End states (TensorBoard's hparams ``Status`` has success, failure, running and unknown, no "aborted"):
finished -> STATUS_SUCCESS, failed -> STATUS_FAILURE, interrupted -> STATUS_UNKNOWN (neither a success nor
a failure: the run can be resumed, and its resume records the final status).

TensorBoard never stops a run: a write that fails (a full disk, a folder that cannot be made), when
the writer is made or later, costs one note naming the folder and the run goes on without TensorBoard
records (its checkpoints, metrics.csv and status.json are what the run needs; a disk that stays full
stops it at the next checkpoint, with the file named). TensorBoard writes from a thread of its own
that prints a traceback when a write fails, then hands the same error to the writer's next call;
``_quiet_writer_threads`` silences that thread's print (only TensorBoard's writer threads), so the
note is the one line the user sees.

Event files are append-only streams of CRC-checked records (TensorBoard's own format); they
are the one kind of file in a run folder not written through ``files.atomic_write``.
``torch.utils.tensorboard`` is imported only when a config asks for it; ``missing`` (a step of the
check pipeline) reports a missing ``tensorboard`` package before anything is written.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable
from nnctl.errors import NnctlError
from nnctl.runs.rundir import RunDir
import os
import json
from nnctl.config.loader import flatten
from nnctl.config.schema import resolved
import contextlib
import io
import threading
import warnings
import torch

INSTALL = "tensorboard needs the tensorboard package: pip install 'nnctl[tensorboard]'"
EVENT_PREFIX = "events.out.tfevents."
MAX_HPARAMS = 256
# the run's end state -> TensorBoard's hparams Status (it has no "aborted"; see the module docstring)
END_STATUS = {"finished": "STATUS_SUCCESS", "failed": "STATUS_FAILURE", "interrupted": "STATUS_UNKNOWN",
              "pruned": "STATUS_SUCCESS"}


def _quiet_writer_threads() -> None:
    """threading.excepthook without the print of TensorBoard's event-writer thread (installed once,
    chained to the previous hook): that thread keeps its exception and the writer raises it in the
    thread that logs, where ``TensorBoardLogger`` turns it into a note; every other thread is untouched."""
    if getattr(threading.excepthook, "_nnctl_quiet", False):
        return
    previous = threading.excepthook

    def hook(args) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and \
                type(args.thread).__module__.startswith("tensorboard."):
            return
        previous(args)

    hook._nnctl_quiet = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


class MissingPackage(NnctlError):
    """An optional extra is not installed (exit 1): the environment, not the config, must change."""


def wanted(cfg) -> bool:
    return "tensorboard" in (getattr(cfg.train, "log", None) or ())


def missing(cfg, doc) -> list:
    """[the located problem] when the config asks for tensorboard and the package does not import, else []
    (the check pipeline's environment step; raise MissingPackage with it: exit 1)."""
    if not wanted(cfg):
        return []
    try:
        import tensorboard  # noqa: F401 - optional: imported only when a config asks for it
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return [doc.problem(("train", "log"), INSTALL)]
    return []


def event_files(run_dir: str | Path) -> list[Path]:
    folder = RunDir(run_dir).tensorboard
    try:
        return sorted(p for p in folder.iterdir() if p.name.startswith(EVENT_PREFIX) and p.is_file())
    except OSError:
        return []


def only_event_files(folder: Path) -> str | None:
    """None if RUN/tensorboard holds only TensorBoard event files (nnctl's own), else a foreign name."""
    try:
        for p in folder.iterdir():
            if not (p.name.startswith(EVENT_PREFIX) and p.is_file() and not p.is_symlink()):
                return f"{folder.name}/{p.name}"
    except OSError as exc:
        return f"{folder.name} ({exc.strerror or exc})"
    return None


def clear(folder: Path) -> None:
    """Remove RUN/tensorboard of a run that stopped before its first checkpoint (event files only)."""

    target = RunDir(folder).tensorboard
    if target.is_symlink() or not target.is_dir():
        return
    for p in event_files(folder):
        try:
            p.unlink()
        except OSError:
            pass
    try:
        os.rmdir(target)  # only if empty: never a file nnctl did not write
    except OSError:
        pass


def hparams_of(resolved_cfg: dict) -> dict[str, Any]:
    """The config's scalar values by dotted key (lists of numbers as text), for the HPARAMS table."""


    out: dict[str, Any] = {}
    for key, value in flatten(resolved_cfg).items():
        if value is None:
            continue
        if isinstance(value, bool | int | float | str):
            out[key] = value
        elif isinstance(value, list | dict) and value:  # a list of numbers (input_shape) as text
            out[key] = json.dumps(value)
        if len(out) >= MAX_HPARAMS:
            break
    return out


class TensorBoardLogger:
    """Turns the run's events into TensorBoard records (see the module docstring)."""

    def __init__(self, run_dir: str | Path, cfg, model, device, *, continuing: bool = False,
                 resume_epoch: int = 0, history: list[dict] | None = None,
                 say: Callable[[str], None] | None = None):
        from torch.utils.tensorboard import SummaryWriter


        self.folder = RunDir(run_dir).tensorboard
        self.cfg = cfg
        self.model = model
        self.device = device
        self.say = say or (lambda text: None)
        self.fresh = not event_files(run_dir)
        purge = resume_epoch + 1 if (continuing and not self.fresh) else None
        self.hparams = hparams_of(resolved(cfg))
        self.last: dict = {}
        self.best: dict | None = None
        self.epochs_done = resume_epoch
        self.metrics: list[str] = []
        self.writer = None
        _quiet_writer_threads()
        try:
            self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=purge, flush_secs=30)
        except Exception as exc:  # noqa: BLE001 - a full disk costs the log, not the run (module docstring)
            self.say(f"note: tensorboard: could not write to {self.folder} ({_reason(exc)}); the run goes on "
                     "without TensorBoard records")
        if history:
            self.last = dict(history[-1])
            if self.fresh:  # a new folder (or TensorBoard turned on at resume): the inherited epochs first
                def inherited():
                    for row in history:
                        self._scalars(row)
                    self.writer.flush()

                self._guard("writing the inherited epochs", inherited)

    # --- safety: logging never stops the training ------------------------------------------
    def _guard(self, what: str, fn: Callable[[], None]) -> None:
        if self.writer is None:
            return
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a full disk or a TensorBoard bug costs the log, not the run
            self.say(f"note: tensorboard: {what} in {self.folder} failed ({_reason(exc)}); "
                     "no more TensorBoard records for this run")
            writer, self.writer = self.writer, None
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass

    def on_event(self, event) -> None:
        kind = getattr(event, "kind", "")
        if kind == "start" and self.fresh and self.writer is not None:
            self._graph()
        elif kind == "epoch_end" and event.row is not None:
            row = dict(event.row)
            self.last = row
            self.epochs_done = int(row.get("epoch", event.epoch + 1))

            def log():
                self._scalars(row)
                self.writer.flush()

            self._guard("writing the epoch's scalars", log)

    def _scalars(self, row: dict) -> None:
        step = int(row.get("epoch", 0))
        for key, value in row.items():
            if key in ("epoch", "step") or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue
            self.writer.add_scalar(key, float(value), global_step=step)

    def _graph(self) -> None:


        model = self.model
        try:
            param = next(model.parameters())
            dtype, device = param.dtype, param.device
        except StopIteration:
            dtype, device = torch.float32, torch.device(self.device)
        example = torch.zeros((1, *self.cfg.model.input_shape), dtype=dtype if dtype.is_floating_point
                              else torch.float32, device=device)
        was_training = model.training
        devices = [device.index or 0] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad(), warnings.catch_warnings(), \
                    contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                model.eval()
                self.writer.add_graph(model, example)
        except Exception as exc:  # noqa: BLE001 - tracing fails for some models: a note, not an error
            self.say(f"note: tensorboard: the model graph was not recorded (tracing failed: "
                     f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]})")
        finally:
            model.train(was_training)

    def set_best(self, best: dict | None) -> None:
        self.best = dict(best) if best else None

    def end(self, state: str, result: Any = None, error: BaseException | None = None) -> None:
        """The hyperparameters and the final / best metrics (HPARAMS table), then close (``error``: unused,
        the loggers' shared signature; TensorBoard records no error text)."""
        if result is not None:
            if result.history:
                self.last = dict(result.history[-1])
                self.epochs_done = int(self.last.get("epoch", self.epochs_done))
            if result.best:
                self.best = dict(result.best)

        def write():
            self._hparams(state)
            self.writer.flush()

        self._guard("writing the hyperparameters", write)
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:  # noqa: BLE001
                pass
            self.writer = None

    def _hparams(self, state: str) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.plugins.hparams.api_pb2 import Status
        from tensorboard.plugins.hparams.metadata import PLUGIN_DATA_VERSION, PLUGIN_NAME, SESSION_END_INFO_TAG
        from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo
        from torch.utils.tensorboard.summary import hparams

        step = self.epochs_done
        metrics: dict[str, float] = {}
        for key, value in self.last.items():  # the final values: the last point of each scalar
            if key not in ("epoch", "step", "seconds", "lr") and isinstance(value, float) and math.isfinite(value):
                metrics[key] = value
        best = self.best or {}
        if best.get("metric") and isinstance(best.get("value"), float) and math.isfinite(best["value"]):
            tag = f"best/{best['metric']}"
            metrics[tag] = best["value"]
            self.writer.add_scalar(tag, best["value"], global_step=step)
        exp, ssi, _ = hparams(self.hparams, metrics)
        content = HParamsPluginData(session_end_info=SessionEndInfo(status=Status.Value(END_STATUS.get(state, "STATUS_UNKNOWN"))),
                                    version=PLUGIN_DATA_VERSION)
        sei = Summary(value=[Summary.Value(tag=SESSION_END_INFO_TAG, metadata=SummaryMetadata(
            plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME, content=content.SerializeToString())))])
        for summary in (exp, ssi, sei):
            self.writer.file_writer.add_summary(summary, step)
