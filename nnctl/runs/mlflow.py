"""MLflow logging: ``train.log: [csv, mlflow]`` (the optional extra ``nnctl[mlflow]``: ``mlflow-skinny``).

The run's events become one MLflow run, through ``MlflowClient`` only (no active run, no global state:
several runs may log in one process, e.g. the trials of ``nnctl tune``), written by rank 0:

- start: the params (the resolved config, flattened to dotted keys as ``--set`` names them:
  ``model.layers.0.Conv2d.out_channels``, ``train.optimizer.Adam.lr``; values as text, cut to MLflow's
  6000 characters), the tags ``nnctl.run_dir`` and ``mlflow.parentRunId`` (``train.mlflow.parent_run_id``:
  the run is a child of that run, as nnctl tune makes each trial), and ``config.yaml`` as an artifact;
- every epoch's end: each number of the epoch's metrics row (train_loss, val_loss, val_accuracy, lr,
  seconds, ...) as a metric at step = the epoch (1-based, as in metrics.csv);
- the end: ``curves.png`` and best.pt's weights as ``nnctl export-weights`` writes them
  (``weights/best.safetensors``), each only when the file exists; the metric ``best/<monitor>`` at the best
  epoch; the tags ``nnctl.state`` (finished, interrupted, failed, pruned) and, for a failure, ``nnctl.error``;
  then the run's status: finished -> FINISHED, failed -> FAILED, interrupted -> KILLED (a signal stopped it:
  its resume continues it), pruned -> FINISHED (the search stopped it; ``nnctl.state`` says pruned).

Where: ``train.mlflow.tracking_uri``, or by default MLflow's file store in the run folder (``RUN/mlruns``, as
a ``file:`` URI: no server, nothing outside the run folder); the experiment is ``train.mlflow.experiment``,
or the config's name. MLflow 3 keeps its file store behind ``MLFLOW_ALLOW_FILE_STORE`` (it is in maintenance
mode; its SQLite store needs SQLAlchemy and alembic, and took 10 s to create its tables here, against 0.1 s
for a whole run's records in the file store): for a ``file:`` URI nnctl sets that variable, unless the
environment already says otherwise.

``RUN/mlflow.json`` records the MLflow run (tracking URI, experiment and run id): a resumed run (``--resume
RUN``) continues that MLflow run, RUNNING again, and logs the epochs it inherits that MLflow lacks; a new run
(a reused folder, another tracking URI, a run started from another run's checkpoint) is a new MLflow run,
which first logs the history it inherits. MLflow's params cannot change: a value a resume changed (--epochs,
--set) keeps its first value as the param, and the tag ``nnctl.resumed_changes`` lists the new ones
(config.yaml, logged again, is the whole new config).

MLflow never stops a run: a failure (a server that cannot be reached, a full disk, a deleted experiment)
costs one note line naming the tracking URI, and the run goes on without MLflow records. MLflow writes its
store's files itself (its business); what nnctl writes (mlflow.json, the weights handed to MLflow) goes
through ``nnctl.files``. ``mlflow`` is imported only when a config asks for it; ``missing`` (a step of the
check pipeline) reports a missing package before anything is written.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import posixpath
import re
import ssl
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nnctl import files
from nnctl.config.loader import flatten
from nnctl.config.schema import resolved
from nnctl.errors import NnctlError
from nnctl.runs import checkpoint as K
from nnctl.runs.rundir import RunDir
from nnctl.runs.tensorboard import _reason

INSTALL = "mlflow needs the mlflow-skinny package: pip install 'nnctl[mlflow]'"
RECORD_FORMAT = 1
# the run's end state -> MLflow's RunStatus (see the module docstring)
END_STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED", "pruned": "FINISHED"}
WEIGHTS_ARTIFACT = "weights"  # best.pt's weights go to weights/best.safetensors
# MLflow's limits (mlflow.utils.validation): key length, param and tag value length, entities per log_batch
MAX_KEY, MAX_PARAM, MAX_TAG, BATCH_PARAMS, BATCH_METRICS = 250, 6000, 8000, 100, 1000
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /:]")


def wanted(cfg) -> bool:
    return "mlflow" in (getattr(cfg.train, "log", None) or ())


def missing(cfg, doc) -> list:
    """[the located problem] when the config asks for mlflow and the package does not import, else []
    (the check pipeline's environment step: exit 1 with the pip command)."""
    if not wanted(cfg):
        return []
    try:
        import mlflow  # noqa: F401 - optional: imported only when a config asks for it
    except ImportError:
        return [doc.problem(("train", "log"), INSTALL)]
    return []


def tracking_uri(cfg, run_dir: str | Path) -> str:
    """train.mlflow.tracking_uri, or the file store in the run folder (RUN/mlruns) as an absolute file: URI."""
    section = getattr(cfg.train, "mlflow", None)
    if section is not None and section.tracking_uri:
        return section.tracking_uri
    return RunDir(Path(run_dir).resolve()).mlruns.as_uri()


def local_store(uri: str | None) -> Path | None:
    """The local path a tracking URI writes to (file:/..., sqlite:////...), None for a server or nothing."""
    if not uri:
        return None
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "sqlite" and uri.startswith("sqlite:////"):
        return Path(uri[len("sqlite:///"):])
    return None


def experiment_name(cfg) -> str:
    section = getattr(cfg.train, "mlflow", None)
    return section.experiment if section is not None and section.experiment else cfg.name


def metric_key(name: str) -> str | None:
    """A name as MLflow takes it (``[0]`` -> ``.0``, other characters -> ``_``), or None if it has none."""
    key = _BAD_KEY_CHARS.sub("_", re.sub(r"\[(\d+)\]", r".\1", str(name)))
    norm = posixpath.normpath(key)  # MLflow's rule: a name that resolves to another path is refused
    if not key or len(key) > MAX_KEY or norm != key or norm == "." or norm.startswith(("..", "/")):
        return None
    return key


def params_of(resolved_cfg: dict) -> dict[str, str]:
    """The config's values by dotted key (``--set``'s names), as MLflow params: text, cut to its limit."""
    out: dict[str, str] = {}
    for name, value in flatten(resolved_cfg).items():
        key = metric_key(name)
        if key is None or key in out:
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        out[key] = text[:MAX_PARAM]
    return out


def read_record(run_dir: str | Path) -> dict | None:
    """RUN/mlflow.json (tracking_uri, experiment_id, run_id), or None when it is absent or unreadable."""
    try:
        record = json.loads(files.read_input(RunDir(run_dir).mlflow, "MLflow record", limit=65536))
    except (NnctlError, OSError, ValueError):
        return None
    ok = isinstance(record, dict) and all(isinstance(record.get(k), str) for k in ("tracking_uri", "run_id"))
    return record if ok else None


def _answers(uri: str, timeout: float = 10.0) -> None:
    """Raise ConnectionError when an http(s) tracking server does not answer at all within ``timeout``: MLflow
    retries a request for about 4 minutes (7 retries, backoff factor 2) before it gives up, so a wrong host
    would hold the run's start that long. Any HTTP answer, an error status too, and a TLS failure (MLflow
    has its own TLS settings) leave the decision to MLflow."""
    if not uri.lower().startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLError):
            return
        text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
        raise ConnectionError(0, f"no answer from the server: {text}") from None


def _client(uri: str):
    if uri.startswith("file:"):  # MLflow 3 refuses its file store without this (module docstring)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, name: str) -> str:
    """The experiment's id, created when it does not exist (another process may create it at the same time)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name)
        except MlflowException:
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    return found.experiment_id


def search_run(uri: str, experiment: str, name: str, run_id: str | None, params: dict[str, Any]) -> str:
    """The MLflow run of a hyperparameter search (nnctl tune): its trials' runs are its children (their
    ``train.mlflow.parent_run_id``). Created the first time (``run_id`` None) with the search's space as
    params; an existing one is continued. Raises what MLflow raises (the caller decides what a failure costs)."""
    _answers(uri)
    client = _client(uri)
    if run_id:
        client.get_run(run_id)  # still there (MlflowException if not)
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(_experiment_id(client, experiment), run_name=name, tags={"nnctl.kind": "search"})
    for key, value in params.items():
        k = metric_key(key)
        if k is not None:
            client.log_param(run.info.run_id, k, (value if isinstance(value, str) else json.dumps(value))[:MAX_PARAM])
    return run.info.run_id


def end_search_run(uri: str, run_id: str, metric: str, best: float | None) -> None:
    """The search's run ends FINISHED with ``best/<metric>``, the best trial's value (when one completed)."""
    client = _client(uri)
    key = metric_key(f"best/{metric}")
    if best is not None and key is not None and math.isfinite(best):
        client.log_metric(run_id, key, float(best))
    client.set_terminated(run_id, "FINISHED")


def _metrics(row: dict, timestamp: int) -> list:
    from mlflow.entities import Metric

    step = int(row.get("epoch", 0))
    out = []
    for name, value in row.items():
        if name in ("epoch", "step") or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        key = metric_key(name)
        if key is not None and math.isfinite(value):
            out.append(Metric(key, float(value), timestamp, step))
    return out


class MlflowLogger:
    """Turns the run's events into one MLflow run (see the module docstring)."""

    def __init__(self, run_dir: str | Path, cfg, *, continuing: bool = False, history: list[dict] | None = None,
                 say: Callable[[str], None] | None = None):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.uri = tracking_uri(cfg, run_dir)
        self.say = say or (lambda text: None)
        self.client = None
        self.run_id: str | None = None
        try:
            _answers(self.uri)
            self.client = _client(self.uri)
        except Exception as exc:  # noqa: BLE001 - an unreachable store costs the log, not the run
            self._failed("opening the tracking store", exc)
            return
        self._guard("starting the MLflow run", lambda: self._start(continuing, list(history or [])))

    # --- safety: logging never stops the training ----------------------------------------------
    def _guard(self, what: str, fn: Callable[[], None]) -> None:
        if self.client is None:
            return
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a server, a disk or an MLflow bug costs the log, not the run
            self._failed(what, exc)

    def _failed(self, what: str, exc: BaseException) -> None:
        self.say(f"note: mlflow: {what} at {self.uri} failed ({_reason(exc)}); the run goes on without "
                 "MLflow records")
        self.client = None

    # --- start ----------------------------------------------------------------------------------
    def _start(self, continuing: bool, history: list[dict]) -> None:
        from mlflow.entities import Param, RunTag

        client, params = self.client, params_of(resolved(self.cfg))
        run = self._continued() if continuing else None
        tags: list = []
        if run is None:
            section = getattr(self.cfg.train, "mlflow", None)
            start_tags = {"nnctl.run_dir": str(self.run_dir.resolve())[:MAX_TAG], "nnctl.config": self.cfg.name}
            if section is not None and section.parent_run_id:
                start_tags["mlflow.parentRunId"] = section.parent_run_id
            run = client.create_run(_experiment_id(client, experiment_name(self.cfg)), run_name=self.run_dir.name,
                                    tags=start_tags)
            self.run_id = run.info.run_id
            record = {"format": RECORD_FORMAT, "tracking_uri": self.uri, "experiment_id": run.info.experiment_id,
                      "run_id": self.run_id}
            text = json.dumps(record, indent=1).encode()
            files.atomic_write(RunDir(self.run_dir).mlflow, lambda fh: fh.write(text), run_file=True)
        else:
            self.run_id = run.info.run_id
            client.update_run(self.run_id, status="RUNNING")
            before = run.data.params
            changed = {k: v for k, v in params.items() if k in before and before[k] != v}
            params = {k: v for k, v in params.items() if k not in before}
            if changed:
                text = "; ".join(f"{k}={v}" for k, v in changed.items())
                tags.append(RunTag("nnctl.resumed_changes", text[:MAX_TAG]))
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, max(len(items), len(tags)), BATCH_PARAMS):
            client.log_batch(self.run_id, params=items[i:i + BATCH_PARAMS], tags=tags[i:i + BATCH_PARAMS])
        self._artifact(RunDir(self.run_dir).config)
        self._inherited(history, run if continuing else None)

    def _continued(self):
        """The MLflow run this run folder's record names, if it is in this tracking store and not deleted."""
        from mlflow.exceptions import MlflowException

        record = read_record(self.run_dir)
        if record is None or record["tracking_uri"] != self.uri:
            return None
        try:
            run = self.client.get_run(record["run_id"])
        except MlflowException:
            return None
        return run if run.info.lifecycle_stage == "active" else None

    def _inherited(self, history: list[dict], run) -> None:
        """The epochs this run inherits and the MLflow run lacks (all of them for a new MLflow run)."""
        rows = [r for r in history if isinstance(r.get("epoch"), int)]
        if not rows:
            return
        logged: set[int] = set()
        if run is not None:
            key = next((m.key for m in _metrics(rows[-1], 0)), None)
            logged = {m.step for m in self.client.get_metric_history(self.run_id, key)} if key else set()
        stamp = int(time.time() * 1000)
        metrics = [m for r in rows if r["epoch"] not in logged for m in _metrics(r, stamp)]
        for i in range(0, len(metrics), BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + BATCH_METRICS])

    def _artifact(self, path: Path, folder: str | None = None) -> None:
        if files.is_regular(path):
            self.client.log_artifact(self.run_id, str(path), folder)

    # --- events ---------------------------------------------------------------------------------
    def on_event(self, event) -> None:
        if getattr(event, "kind", "") != "epoch_end" or event.row is None:
            return
        row = dict(event.row)
        metrics = _metrics(row, int(time.time() * 1000))
        self._guard("logging the epoch's metrics",
                    lambda: self.client.log_batch(self.run_id, metrics=metrics) if metrics else None)

    # --- the end ----------------------------------------------------------------------------------
    def end(self, state: str, result: Any = None, error: BaseException | None = None) -> None:
        """Artifacts, the best metric, the end state's tags and MLflow status (see the module docstring)."""
        def finish() -> None:
            from mlflow.entities import RunTag

            run = RunDir(self.run_dir)
            self._artifact(run.curves)
            self._best(run.best)
            tags = [RunTag("nnctl.state", state)]
            if error is not None and state == "failed":
                tags.append(RunTag("nnctl.error", " ".join(str(error).split())[:MAX_TAG] or type(error).__name__))
            self.client.log_batch(self.run_id, tags=tags)
            with contextlib.redirect_stdout(io.StringIO()):  # for a server, MLflow prints the run's URL to stdout
                self.client.set_terminated(self.run_id, END_STATUS.get(state, "FAILED"))

        self._guard("ending the MLflow run", finish)
        self.client = None

    def _best(self, best_pt: Path) -> None:
        """best.pt's weights (as export-weights writes them) and its metric, when best.pt exists."""
        from mlflow.entities import Metric

        if not files.is_regular(best_pt):
            return
        state = K.load(best_pt)
        blob = K.weights_file(state, "best", str(best_pt))
        with tempfile.TemporaryDirectory(prefix="nnctl-mlflow-") as scratch:
            target = Path(scratch) / "best.safetensors"
            files.atomic_write(target, lambda fh: fh.write(blob))
            self.client.log_artifact(self.run_id, str(target), WEIGHTS_ARTIFACT)
        best = state.get("best") or {}
        key = metric_key(f"best/{best.get('metric')}") if best.get("metric") else None
        value = best.get("value")
        if key and isinstance(value, int | float) and math.isfinite(value):
            step = int(best.get("epoch") or state.get("epoch") or 0)
            self.client.log_batch(self.run_id, metrics=[Metric(key, float(value), int(time.time() * 1000), step)])
