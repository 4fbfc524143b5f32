"""MLflow as a logger (issue 21, item 6): ``train.log: [csv, mlflow]``, read back with ``MlflowClient`` from the
file store (no server): params, per-epoch metrics equal to metrics.csv's, artifacts, end states, a child run
of a parent run, a resumed run continuing its MLflow run, and a missing package refused by ``nnctl check``."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import nnctl
from nnctl.runs import mlflow as MLF
from nnctl.training import signals as SIG
from tests.conftest import ROOT, make

DIGITS = str(ROOT / "configs" / "digits_cnn.yaml")
LOGGED = ["train.log=[csv,mlflow]"]


@pytest.fixture
def client_for(monkeypatch):
    """An MlflowClient for a tracking URI (MLflow 3's file store needs MLFLOW_ALLOW_FILE_STORE, as nnctl sets it)."""
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return lambda uri: MlflowClient(tracking_uri=uri)


def _record(run: Path) -> dict:
    return json.loads((run / "mlflow.json").read_text())


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _weights(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()  # noqa: SIM118 - safe_open is not iterable


def _csv(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_a_run_logs_its_params_metrics_artifacts_and_status(tmp_path, client_for):
    """The built-in digits CNN, 2 epochs: everything read back from RUN/mlruns with MlflowClient."""
    run = tmp_path / "run"
    result = nnctl.train(DIGITS, overrides=["train.epochs=2", *LOGGED], out=str(run))
    record = _record(run)
    assert record["tracking_uri"] == (run / "mlruns").resolve().as_uri()  # the default: the run folder's store
    client = client_for(record["tracking_uri"])
    got = client.get_run(record["run_id"])
    assert got.info.status == "FINISHED" and got.info.run_name == "run"
    assert client.get_experiment(got.info.experiment_id).name == "digits-cnn"  # the config's name
    assert got.data.tags["nnctl.state"] == "finished" and got.data.tags["nnctl.run_dir"] == str(run.resolve())
    assert "mlflow.parentRunId" not in got.data.tags
    params = got.data.params
    assert params["train.optimizer.Adam.lr"] == "0.001" and params["train.batch_size"] == "64"
    assert params["model.layers.0.Conv2d.out_channels"] == "32" and params["train.epochs"] == "2"
    assert params["model.input_shape"] == "[1, 8, 8]" and params["train.log"] == '["csv", "mlflow"]'
    rows = _csv(run)
    for key in ("val_loss", "val_accuracy", "train_loss", "lr"):
        logged = _history(client, record["run_id"], key)
        assert [step for step, _ in logged] == [1, 2], key
        assert [v for _, v in logged] == [row[key] for row in result.history]  # the very numbers
        assert [v for _, v in logged] == pytest.approx([float(r[key]) for r in rows], rel=1e-5)  # csv's 6 digits
    best = max(result.history, key=lambda r: r["val_accuracy"])
    assert _history(client, record["run_id"], "best/val_accuracy") == [(best["epoch"], best["val_accuracy"])]
    artifacts = {a.path for a in client.list_artifacts(record["run_id"])}
    assert artifacts == {"config.yaml", "curves.png", "weights"}
    assert [a.path for a in client.list_artifacts(record["run_id"], "weights")] == ["weights/best.safetensors"]
    store = Path(client.download_artifacts(record["run_id"], "", str(tmp_path / "down")))
    assert (store / "config.yaml").read_bytes() == (run / "config.yaml").read_bytes()
    assert (store / "curves.png").read_bytes() == (run / "curves.png").read_bytes()
    # the weights are what `nnctl export-weights RUN` writes: the same tensors and metadata (safetensors keeps
    # its metadata in a hash map: two exports of one checkpoint differ in the order of its keys)
    exported = nnctl.export(str(run), "safetensors", out=str(tmp_path / "best.safetensors"))
    logged, written = _weights(store / "weights" / "best.safetensors"), _weights(Path(exported.path))
    assert logged[1] == written[1] and logged[1]["source"] == "best.pt" and logged[1]["which"] == "best"
    assert logged[0].keys() == written[0].keys() and all(torch.equal(logged[0][k], written[0][k]) for k in logged[0])
    best_pt = torch.load(run / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(logged[0][k], best_pt[k]) for k in best_pt) and logged[0].keys() == best_pt.keys()


def test_a_child_run_of_a_parent_in_a_shared_store(tmp_path, client_for):
    """train.mlflow: another store, an experiment name and a parent run: the run is that run's child."""
    uri = (tmp_path / "store").as_uri()
    client = client_for(uri)
    parent = client.create_run(client.create_experiment("study"), run_name="study").info.run_id
    cfg = make(train={"epochs": 1, "log": ["csv", "mlflow"],
                      "mlflow": {"tracking_uri": uri, "experiment": "study", "parent_run_id": parent}})
    nnctl.train(cfg, out=str(tmp_path / "trial-000"))
    record = _record(tmp_path / "trial-000")
    child = client.get_run(record["run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent and child.info.status == "FINISHED"
    assert child.info.experiment_id == client.get_run(parent).info.experiment_id
    found = client.search_runs([child.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert [r.info.run_id for r in found] == [record["run_id"]]
    assert not (tmp_path / "trial-000" / "mlruns").exists()  # nothing in the run folder's default store


def test_an_interrupted_run_is_killed_and_its_resume_continues_the_same_mlflow_run(tmp_path, client_for):
    run = tmp_path / "run"
    cfg = make(train={"epochs": 4, "log": ["csv", "mlflow"]})

    def stop_after_epoch_2(event):  # a real SIGINT, delivered as epoch 2 ends: last.pt holds epoch 2
        if event.kind == "epoch_end" and event.epoch == 1:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(SIG.Interrupted):
        nnctl.train(cfg, out=str(run), on_event=stop_after_epoch_2)
    record = _record(run)
    client = client_for(record["tracking_uri"])
    stopped = client.get_run(record["run_id"])
    assert stopped.info.status == "KILLED" and stopped.data.tags["nnctl.state"] == "interrupted"
    assert [s for s, _ in _history(client, record["run_id"], "val_loss")] == [1, 2]

    nnctl.train(resume=str(run))
    assert _record(run) == record  # the same MLflow run
    resumed = client.get_run(record["run_id"])
    assert resumed.info.status == "FINISHED" and resumed.data.tags["nnctl.state"] == "finished"
    logged = _history(client, record["run_id"], "val_loss")
    assert [s for s, _ in logged] == [1, 2, 3, 4]  # epochs 3..4 appended, none twice
    assert [v for _, v in logged] == pytest.approx([float(r["val_loss"]) for r in _csv(run)], rel=1e-5)
    assert len(client.search_runs([record["experiment_id"]])) == 1

    # a resume that changes a param (--epochs): MLflow keeps the first value, the tag says the new one
    nnctl.train(resume=str(run), epochs=5)
    again = client.get_run(record["run_id"])
    assert again.data.params["train.epochs"] == "4" and again.data.tags["nnctl.resumed_changes"] == "train.epochs=5"
    assert [s for s, _ in _history(client, record["run_id"], "val_loss")] == [1, 2, 3, 4, 5]
    down = Path(client.download_artifacts(record["run_id"], "config.yaml", str(tmp_path / "down")))
    assert yaml.safe_load(down.read_text())["train"]["epochs"] == 5  # config.yaml: the config it now trains with


def test_a_failed_run_is_recorded_failed_with_its_error(tmp_path, client_for):
    def boom(event):
        if event.kind == "epoch_end":
            raise RuntimeError("boom after the first epoch")

    with pytest.raises(RuntimeError, match="boom"):
        nnctl.train(make(train={"epochs": 2, "log": ["csv", "mlflow"]}), out=str(tmp_path / "run"), on_event=boom)
    record = _record(tmp_path / "run")
    client = client_for(record["tracking_uri"])
    got = client.get_run(record["run_id"])
    assert got.info.status == "FAILED" and got.data.tags["nnctl.state"] == "failed"
    assert got.data.tags["nnctl.error"] == "boom after the first epoch"
    assert [s for s, _ in _history(client, record["run_id"], "val_loss")] == [1]


def _closed_port() -> int:
    with socket.socket() as sock:  # a port nothing listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("store", ["file in the way", "server not listening"])
def test_mlflow_failing_costs_one_note_not_the_run(tmp_path, store):
    """A store that cannot be made (its folder is a file), a server that does not answer (refused at once, not
    after MLflow's 4 minutes of retries): one note line, the run finishes as without MLflow."""
    pytest.importorskip("mlflow")
    (tmp_path / "afile").write_text("not a folder")
    uri, reason = ((f"file:{tmp_path}/afile/mlruns", "Not a directory") if store == "file in the way" else
                   (f"http://127.0.0.1:{_closed_port()}", "no answer from the server: Connection refused"))
    said: list[str] = []
    began = time.monotonic()
    result = nnctl.train(make(train={"epochs": 1, "log": ["csv", "mlflow"], "mlflow": {"tracking_uri": uri}}),
                         out=str(tmp_path / "run"), on_message=said.append)
    assert time.monotonic() - began < 60
    notes = [line for line in said if line.startswith("note:")]
    assert notes == [(f"note: mlflow: opening the tracking store at {uri} failed ({reason}); the run goes on "
                     "without MLflow records")]
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "finished"
    assert len(result.history) == 1 and not (tmp_path / "run" / "mlflow.json").exists()


MLFLOW_CONFIG = """\
name: logged
model:
  input_shape: [1, 8, 8]
  layers: [Flatten, {Linear: {out_features: 10}}]
data: {source: digits}
train:
  epochs: 1
  log: [csv, mlflow]
"""


def test_check_and_train_without_mlflow_say_the_pip_command(tmp_path, cli, monkeypatch):
    """mlflow not importable (None in sys.modules: `import mlflow` raises ImportError): the environment's problem
    (exit 1) at train.log's line, with the pip command; nothing written."""
    monkeypatch.setitem(sys.modules, "mlflow", None)
    config = tmp_path / "c.yaml"
    config.write_text(MLFLOW_CONFIG)
    for args in (("check", str(config)), ("train", str(config), "--out", str(tmp_path / "run"))):
        code, _out, err = cli(*args)
        assert code == 1, err
        assert err.splitlines() == [(f"error: {config}:8:8: train.log: mlflow needs the mlflow-skinny package: "
                                    "pip install 'nnctl[mlflow]'")], err
    assert not (tmp_path / "run").exists()


def test_params_follow_mlflows_rules():
    """Dotted keys as --set names them ([i] -> .i), other characters MLflow refuses -> _, values cut to 6000."""
    params = MLF.params_of({"model": {"layers": [{"Conv2d": {"out_channels": 8}}, "ReLU"]}, "long": "x" * 7000,
                            "data": {"label_map": {"a b!": 1}}, "ok": None, "flag": True})
    assert params == {"model.layers.0.Conv2d.out_channels": "8", "model.layers.1": "ReLU", "long": "x" * 6000,
                      "data.label_map.a b_": "1", "ok": "null", "flag": "true"}
    assert MLF.metric_key("best/val_accuracy") == "best/val_accuracy"
    assert MLF.metric_key("../up") is None and MLF.metric_key("k" * 251) is None
