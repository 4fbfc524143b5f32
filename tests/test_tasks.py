"""nnctl.tasks.Task: the one owner of the task (issue 19).

The task (classification / multilabel / regression / reconstruction) is decided once, by
``task_for(loss, target)``; the losses it allows, the metrics training logs, the default
monitor and how an output becomes an answer all follow from it. The expectations below are
written out by hand (the table the code had before one module owned it), and the runs are real
``nnctl.train`` runs whose metrics.csv, best.pt and ``nnctl.predict`` answers are compared with
them and with plain PyTorch.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

import nnctl
from nnctl.config import loader as CL
from nnctl.errors import ConfigError
from nnctl.runs import checkpoint as K
from nnctl.tasks import (CLASSIFICATION_LOSSES, LOSSES, MONITORS, SHOWN_METRICS, Task, curve_for, loss_name,
                         mode_of, task_for, task_named, task_of_config)

# --- the decision: every loss x target ---------------------------------------------------------

EXPECTED = {  # loss -> the task for data.target: label (target: input is always reconstruction)
    "cross_entropy": "classification", "nll": "classification", "bce_with_logits": "multilabel",
    "mse": "regression", "l1": "regression", "l2": "regression", "huber": "regression", "smooth_l1": "regression",
}


def test_the_table_covers_every_loss():
    assert set(EXPECTED) == set(LOSSES) and len(LOSSES) == 8


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("target", ["label", "input"])
def test_task_of_every_loss_and_target(loss, target):
    want = EXPECTED[loss] if target == "label" else "reconstruction"
    task = task_for(loss, target)
    assert task is Task(want) and task == want and str(task) == want
    # the same decision from a loss with arguments, from plain config data, and from a checked Config
    assert task_for({loss: {}}, target) is task
    assert task_of_config({"train": {"loss": {loss: {}}}, "data": {"target": target}}) is task
    doc = {"name": "t", "model": {"input_shape": [4], "layers": [{"Linear": [4, 4]}]},
           "data": {"source": "synthetic", "classes": 4, "target": target}, "train": {"loss": loss}}
    if target == "input" and want == "reconstruction" and loss in ("cross_entropy", "nll", "bce_with_logits"):
        with pytest.raises(ConfigError, match=f"target: input reconstructs the .normalised. input; use mse, l1, "
                                              f"huber or smooth_l1, not {loss}"):
            CL.from_dict(doc, "t.yaml")
        assert loss not in task.losses
    else:
        cfg, _ = CL.from_dict(doc, "t.yaml")
        assert cfg.task is task and loss in task.losses


def test_defaults_of_plain_config_data():
    # what the schema fills in: cross_entropy on labels; a config without data is a classification
    assert task_of_config({}) is task_of_config(None) is task_of_config({"train": {}}) is Task.CLASSIFICATION
    assert task_of_config({"train": {"loss": "mse"}, "data": None}) is Task.REGRESSION
    assert task_of_config({"train": "junk", "data": ["junk"]}) is Task.CLASSIFICATION
    assert loss_name({"nll": {"weight": [1, 2]}}) == "nll" and loss_name("l1") == "l1"
    cfg, _ = CL.from_dict({"name": "m", "model": {"input_shape": [4], "layers": [{"Linear": [4, 2]}]}}, "m.yaml")
    assert cfg.data is None and cfg.task is Task.CLASSIFICATION


def test_what_each_task_says():
    c, m, r, rec = Task.CLASSIFICATION, Task.MULTILABEL, Task.REGRESSION, Task.RECONSTRUCTION
    assert list(Task) == [c, m, r, rec]
    assert c.losses == CLASSIFICATION_LOSSES == ("cross_entropy", "nll") and m.losses == ("bce_with_logits",)
    assert r.losses == rec.losses == ("mse", "l1", "l2", "huber", "smooth_l1")
    assert sorted(c.losses + m.losses + r.losses) == sorted(LOSSES)
    assert c.metrics(10) == ("val_loss", "val_accuracy", "val_top5_accuracy")
    assert c.metrics(5) == c.metrics(None) == ("val_loss", "val_accuracy")
    assert c.metrics(6, prefix="") == ("loss", "accuracy", "top5_accuracy")
    assert m.metrics(10) == ("val_loss", "val_accuracy")
    assert r.metrics(10) == rec.metrics() == ("val_loss", "val_mse", "val_mae")
    assert (c.monitor, c.mode) == ("val_accuracy", "max")
    assert [(t.monitor, t.mode) for t in (m, r, rec)] == [("val_loss", "min")] * 3
    assert [t.answer for t in Task] == ["classes", "labels", "values", "values"]
    assert [t.has_classes for t in Task] == [True, False, False, False]
    assert [t.curve for t in Task] == ["val_accuracy", "val_accuracy", "val_mae", "val_mae"]
    assert set(MONITORS) == {"train_loss"} | {n for t in Task for n in t.metrics(math.inf)}
    assert set(SHOWN_METRICS) == set(MONITORS) - {"val_top5_accuracy"}
    assert [mode_of(x) for x in MONITORS] == ["min", "max", "max", "min", "min", "min"]
    assert task_named("regression") is r and task_named("no such task") is c and task_named(None, m) is m
    assert curve_for(["epoch", "train_loss", "val_loss", "val_mae"]) == "val_mae"
    assert curve_for(["train_loss", "val_loss", "val_accuracy"]) == "val_accuracy"
    assert curve_for(["train_loss"]) is None


def test_tasks_module_needs_no_torch():
    import subprocess
    import sys

    code = "import sys, nnctl.tasks, nnctl.config.schema; print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("loss, monitor, message", [
    ("bce_with_logits", "val_mse", "val_mse is a regression metric; a bce_with_logits run has val_loss and "
                                   "val_accuracy"),
    ("nll", "val_mae", "val_mae is a regression metric; a nll run has val_loss, val_accuracy and val_top5_accuracy"),
    ("huber", "val_accuracy", "val_accuracy needs class labels and a classification loss (cross_entropy or nll, "
                              "or bce_with_logits); this run trains with huber"),
    ("bce_with_logits", "val_top5_accuracy", "val_top5_accuracy needs class labels and a classification loss "
                                             "(cross_entropy or nll); this run trains with bce_with_logits"),
])
def test_a_monitor_the_task_never_logs_is_refused_at_its_line(loss, monitor, message):
    doc = {"name": "t", "model": {"input_shape": [4], "layers": [{"Linear": [4, 4]}]},
           "data": {"source": "synthetic", "classes": 4}, "train": {"loss": loss, "checkpoint": {"monitor": monitor}}}
    with pytest.raises(ConfigError) as info:
        CL.from_dict(doc, "t.yaml")
    assert str(info.value) == f"t.yaml: train.checkpoint.monitor: {message}"
    assert not task_for(loss).could_log(monitor)


# --- real runs: one per task ------------------------------------------------------------------

MLP_DIGITS = {"input_shape": [1, 8, 8], "layers": ["Flatten", {"Linear": {"out_features": 16}}, "ReLU",
                                                    {"Linear": {"out_features": 10}}]}


def _tensors(tmp, kind: str):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(120, 6, generator=g)
    if kind == "multilabel":
        y = torch.stack([x[:, 0] > 0, x[:, 1] + x[:, 2] > 0, x[:, 3] < 0.5], dim=1).float()
    else:
        y = x[:, :2] @ torch.tensor([[1.0, -0.5], [0.3, 2.0]])
    path = tmp / f"{kind}.pt"
    torch.save({"x": x, "y": y}, path)
    return str(path)


def _config(tmp, kind: str) -> dict:
    train = {"epochs": 3, "batch_size": 16, "device": "cpu", "optimizer": {"SGD": {"lr": 0.05}}}
    if kind == "classification":  # 10 classes: top-5 accuracy too
        return {"name": kind, "model": MLP_DIGITS, "data": {"source": "digits", "val_fraction": 0.2},
                "train": {**train, "batch_size": 64}}
    if kind == "classification3":  # 3 classes: no top-5 accuracy; nll on log-probabilities
        return {"name": kind, "model": {"input_shape": [5], "layers": [{"Linear": [5, 3]}, {"LogSoftmax": {"dim": 1}}]},
                "data": {"source": "synthetic", "classes": 3, "size": 90}, "train": {**train, "loss": "nll"}}
    if kind == "multilabel":
        return {"name": kind, "model": {"input_shape": [6], "layers": [{"Linear": [6, 3]}]},
                "data": {"source": "tensors", "path": _tensors(tmp, kind)},
                "train": {**train, "loss": {"bce_with_logits": {"pos_weight": [1.0, 2.0, 0.5]}}}}
    if kind == "regression":
        return {"name": kind, "model": {"input_shape": [6], "layers": [{"Linear": [6, 2]}]},
                "data": {"source": "tensors", "path": _tensors(tmp, kind)}, "train": {**train, "loss": "huber"}}
    assert kind == "reconstruction"
    return {"name": kind, "model": {"input_shape": [4], "layers": [{"Linear": [4, 4]}]},
            "data": {"source": "synthetic", "target": "input", "size": 80, "shape": [4]},
            "train": {**train, "loss": "l1"}}


# the expectations, by hand: the task, metrics.csv's columns, the default monitor and its mode
RUNS = {
    "classification": ("classification", ["val_loss", "val_accuracy", "val_top5_accuracy"], "val_accuracy", "max"),
    "classification3": ("classification", ["val_loss", "val_accuracy"], "val_accuracy", "max"),
    "multilabel": ("multilabel", ["val_loss", "val_accuracy"], "val_loss", "min"),
    "regression": ("regression", ["val_loss", "val_mse", "val_mae"], "val_loss", "min"),
    "reconstruction": ("reconstruction", ["val_loss", "val_mse", "val_mae"], "val_loss", "min"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 3-epoch run per task, trained once for the module's tests (they only read them)."""
    tmp = tmp_path_factory.mktemp("tasks")
    return {kind: nnctl.train(_config(tmp, kind), out=str(tmp / kind)) for kind in RUNS}


def _read_csv(path):
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return list(rows[0]), rows


@pytest.mark.parametrize("kind", list(RUNS))
def test_a_run_logs_exactly_its_tasks_metrics(runs, kind):
    name, metrics, _, _ = RUNS[kind]
    run = runs[kind]
    task = Task(name)
    header, rows = _read_csv(run.run_dir / "metrics.csv")
    assert header == ["epoch", "step", "train_loss", *metrics, "lr", "seconds"]
    outputs = 10 if kind == "classification" else 3
    assert tuple(metrics) == task.metrics(outputs)
    assert len(rows) == 3 and all(math.isfinite(float(r[k])) for r in rows for k in metrics)
    assert curve_for(header) == task.curve  # the curve curves.png draws beside the losses
    assert (run.run_dir / "curves.png").stat().st_size > 0
    # the record every checkpoint carries names the task (a plain string on disk)
    record = nnctl.load_record(run.run_dir)
    assert record.task == name and type(record.task) is str
    if kind == "classification":  # class names only where the task has classes (synthetic data names none)
        assert record.classes == [str(i) for i in range(10)]
    elif not task.has_classes:
        assert record.classes is None
    # evaluate scores with the same metrics, without the val_ prefix, and the same values on the val split
    result = nnctl.evaluate(run.run_dir, which="last")
    assert list(result.metrics) == [m.removeprefix("val_") for m in metrics]
    for m in metrics:
        assert result.metrics[m.removeprefix("val_")] == pytest.approx(float(rows[-1][m]), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("kind", list(RUNS))
def test_the_tasks_default_monitor_picks_best_pt(runs, kind):
    _, _, monitor, mode = RUNS[kind]
    run = runs[kind]
    assert (run.best["metric"], run.best["mode"]) == (monitor, mode) == (Task(RUNS[kind][0]).monitor,
                                                                        Task(RUNS[kind][0]).mode)
    _, rows = _read_csv(run.run_dir / "metrics.csv")
    values = [float(r[monitor]) for r in rows]
    best = (max if mode == "max" else min)(values)
    epoch = values.index(best) + 1  # the first epoch that reached it (a later tie is no improvement)
    assert run.best["epoch"] == epoch and run.best["value"] == pytest.approx(best, rel=1e-5)
    state = K.load(run.run_dir / "best.pt")
    assert state["epoch"] == epoch and state["best"]["metric"] == monitor
    status = json.loads((run.run_dir / "status.json").read_text())
    assert status["best"]["metric"] == monitor and status["best"]["epoch"] == epoch


def _inputs(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(9)
    shape = {"classification": (1, 8, 8), "classification3": (5,), "multilabel": (6,), "regression": (6,),
             "reconstruction": (4,)}[kind]
    return torch.rand((7, *shape), generator=g)


@pytest.mark.parametrize("kind", list(RUNS))
def test_predict_answers_in_the_tasks_form(runs, kind):
    name = RUNS[kind][0]
    x = _inputs(kind)
    preds = nnctl.predict(runs[kind].run_dir, x, top_k=3)
    assert preds.task is Task(name) and preds.task == name
    out = preds.outputs
    # the raw outputs are the model's, on the recorded preprocessing (plain PyTorch from here on)
    model = nnctl.load(runs[kind].run_dir)
    pre = model.nnctl_meta["preprocessing"]
    with torch.no_grad():
        assert torch.allclose(out, model(pre.normalize(x)), atol=1e-6)
    rows = list(preds.rows)
    assert len(rows) == 7 and not preds.failed
    if name == "classification":  # the top-k classes with softmax probabilities (exp of nll's log-probs)
        probs = out.exp() if kind == "classification3" else torch.softmax(out, dim=1)
        top_p, top_i = probs.topk(3, dim=1)
        assert [r.classes for r in rows] == top_i.tolist()
        assert torch.allclose(torch.tensor([r.probabilities for r in rows]), top_p, atol=1e-6)
        assert all(r.values is None for r in rows)
    elif name == "multilabel":  # one sigmoid probability per label
        assert torch.allclose(torch.tensor([r.values for r in rows]), torch.sigmoid(out), atol=1e-6)
        assert all(r.classes is None for r in rows)
    else:  # the raw values
        assert torch.allclose(torch.tensor([r.values for r in rows]), out, atol=0)
        assert all(r.classes is None for r in rows)


# --- old records -------------------------------------------------------------------------------

def _rewrite(path, **changes):
    """A checkpoint as an older nnctl wrote it: the same state with some fields changed (digests renewed)."""
    state = K.load(path)
    state.update(changes)
    K.save(path, state)


def test_an_old_multilabel_record_saying_regression_still_loads(runs, tmp_path):
    import shutil

    run = tmp_path / "old"
    shutil.copytree(runs["multilabel"].run_dir, run)
    for f in ("best.pt", "last.pt"):
        state = K.load(run / f)
        _rewrite(run / f, preprocessing={**state["preprocessing"], "task": "regression"})
    record = nnctl.load_record(run)
    assert record.task == "regression"  # the string on disk is kept as written
    x = _inputs("multilabel")
    preds = nnctl.predict(run, x)
    assert preds.task is Task.MULTILABEL  # the recorded config decides: bce_with_logits
    assert torch.allclose(torch.tensor([r.values for r in preds.rows]), torch.sigmoid(preds.outputs), atol=1e-6)
    assert list(nnctl.evaluate(run).metrics) == ["loss", "accuracy"]


def test_a_checkpoint_without_a_record_takes_the_task_of_its_config(runs, tmp_path):
    import shutil

    run = tmp_path / "norecord"
    shutil.copytree(runs["classification3"].run_dir, run)
    for f in ("best.pt", "last.pt"):
        state = K.load(run / f)
        config = {**state["config"], "train": {**state["config"]["train"], "loss": {"nll": {"weight": [1, 1, 1]}}}}
        _rewrite(run / f, preprocessing=None, config=config)
    x = _inputs("classification3")
    preds = nnctl.predict(run, x, top_k=2)
    assert any("no preprocessing record" in n for n in preds.notes)
    # nll with arguments is still a classification (the old fallback compared the loss to plain names)
    assert preds.task is Task.CLASSIFICATION
    top_p, top_i = preds.outputs.exp().topk(2, dim=1)
    assert [r.classes for r in preds.rows] == top_i.tolist()
    assert torch.allclose(torch.tensor([r.probabilities for r in preds.rows]), top_p, atol=1e-6)


def test_a_folder_without_status_json_is_judged_by_its_tasks_monitor(runs, tmp_path):
    """An older nnctl's run folder (no status.json): best is the task's default monitor, as training
    picked it; a multilabel run has val_accuracy in metrics.csv but monitored val_loss."""
    import shutil

    for kind in ("multilabel", "classification3"):
        run = tmp_path / kind
        shutil.copytree(runs[kind].run_dir, run)
        (run / "status.json").unlink()
        info, = nnctl.list_runs(run)
        assert not info.recorded
        assert {k: info.best[k] for k in ("metric", "mode", "epoch")} == \
            {k: runs[kind].best[k] for k in ("metric", "mode", "epoch")}
