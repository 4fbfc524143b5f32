"""Loss arguments, monitors, early stopping, top-5, gradient accumulation, epoch checkpoints (issue 13, item 2).

Each test compares nnctl with plain PyTorch computed here by hand, or replays the documented
rule on the run's own history.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import nnctl
from nnctl import api
from nnctl.training import signals as SIG
from nnctl.optim import losses as T
from nnctl.errors import ConfigError

MLP = {
    "name": "opt",
    "seed": 0,
    "model": {"input_shape": [1, 8, 8],
              "layers": ["Flatten", {"Linear": {"out_features": 32}}, "ReLU", {"Linear": {"out_features": 10}}]},
    "data": {"source": "digits", "val_fraction": 0.2},
    "train": {"epochs": 1, "batch_size": 64, "optimizer": {"SGD": {"lr": 0.1}}, "device": "cpu"},
}


def config(**train) -> dict:
    import copy

    cfg = copy.deepcopy(MLP)
    cfg["train"].update(train)
    return cfg


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1).double() for v in model.state_dict().values()])


# --- losses with arguments -------------------------------------------------------------------

def test_make_loss_equals_torch_with_the_same_arguments():
    torch.manual_seed(0)
    logits, y = torch.randn(50, 10), torch.randint(0, 10, (50,))
    y[3] = 7
    w = [0.5 + i / 10 for i in range(10)]
    ours = T.make_loss({"cross_entropy": {"label_smoothing": 0.1, "weight": w, "ignore_index": 7}})
    ref = nn.CrossEntropyLoss(weight=torch.tensor(w), label_smoothing=0.1, ignore_index=7)
    assert torch.equal(ours(logits, y), ref(logits, y))
    targets = (torch.rand(50, 4) > 0.5).float()
    ours = T.make_loss({"bce_with_logits": {"pos_weight": [1.0, 2.0, 3.0, 4.0]}})
    ref = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.equal(ours(logits[:, :4], targets), ref(logits[:, :4], targets))
    a, b = torch.randn(20, 3) * 3, torch.randn(20, 3)
    assert torch.equal(T.make_loss({"huber": {"delta": 0.5}})(a, b), nn.HuberLoss(delta=0.5)(a, b))
    assert torch.equal(T.make_loss({"smooth_l1": {"beta": 2.0}})(a, b), nn.SmoothL1Loss(beta=2.0)(a, b))


def test_balanced_weights_are_scikit_learns_definition():
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    # n / (classes * count): 6 / (4 * [3, 1, 2]); class 3 is absent from training: 1.0
    assert T.balanced_weights(labels, 4) == pytest.approx([0.5, 1.5, 0.75, 1.0])


def test_label_smoothing_and_balanced_weights_in_a_run_equal_torch_cross_entropy():
    """The run's validation loss equals nn.CrossEntropyLoss(weight=balanced, label_smoothing=0.1), by hand."""
    cfg = config(loss={"cross_entropy": {"label_smoothing": 0.1, "weight": "balanced"}})
    prepared = api.prepare(cfg)
    result = api.fit(prepared)
    data = prepared.data
    labels = data.train.store.y[data.train.indices].numpy()
    counts = np.bincount(labels, minlength=10)
    weight = torch.tensor(len(labels) / (10 * counts), dtype=torch.float32)
    assert not torch.allclose(weight, torch.ones(10))  # the digits' classes are not exactly balanced
    ref = nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)
    model = prepared.model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in data.val.epoch(0):
            total += float(ref(model(x), y)) * len(y)
            n += len(y)
    assert result.history[-1]["val_loss"] == pytest.approx(total / n, rel=1e-6)
    # and it is not the unweighted, unsmoothed loss
    with torch.no_grad():
        plain = sum(float(nn.CrossEntropyLoss()(model(x), y)) * len(y) for x, y in data.val.epoch(0)) / n
    assert abs(plain - total / n) > 1e-3


def test_bce_with_logits_for_multi_label_targets(tmp_path):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 6, generator=g)
    y = torch.stack([(x[:, 0] > 0), (x[:, 1] + x[:, 2] > 0), (x[:, 3] < 0.5)], dim=1).float()
    torch.save({"x": x, "y": y}, tmp_path / "ml.pt")
    cfg = {"name": "ml", "model": {"input_shape": [6], "layers": [{"Linear": {"out_features": 16}}, "ReLU",
                                                                   {"Linear": {"out_features": 3}}]},
           "data": {"source": "tensors", "path": str(tmp_path / "ml.pt")},
           "train": {"epochs": 15, "batch_size": 32, "device": "cpu", "optimizer": {"Adam": {"lr": 0.01}},
                     "loss": {"bce_with_logits": {"pos_weight": [1.0, 2.0, 0.5]}}}}
    prepared = api.prepare(cfg)
    result = api.fit(prepared)
    row = result.history[-1]
    assert set(row) >= {"val_loss", "val_accuracy"} and "val_mse" not in row
    model = prepared.model.eval()
    ref = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 2.0, 0.5]))
    xs, ys = zip(*prepared.data.val.epoch(0))
    xv, yv = torch.cat(xs), torch.cat(ys)
    with torch.no_grad():
        out = model(xv)
    assert row["val_loss"] == pytest.approx(float(ref(out, yv)), rel=1e-5)
    assert row["val_accuracy"] == pytest.approx(float(((out > 0) == (yv > 0.5)).float().mean()), rel=1e-6)
    assert row["val_accuracy"] > 0.8


def test_top5_accuracy_for_more_than_five_classes():
    result = api.fit(api.prepare(config()))
    row = result.history[-1]
    assert 0 < row["val_accuracy"] <= row["val_top5_accuracy"] <= 1


# --- configuration errors, located ------------------------------------------------------------

@pytest.mark.parametrize("loss, message", [
    ("{cross_entropy: {label_smoothin: 0.1}}", "did you mean 'label_smoothing'"),
    ("{cross_entropy: {label_smoothing: 2}}", "label_smoothing must be a number from 0 to 1"),
    ("{mse: {weight: balanced}}", "unknown argument 'weight' for loss mse"),
    ("{nll: {weight: [1, -2]}}", "weight must be a list of non-negative numbers"),
    ("{huber: {delta: 0}}", "delta must be a positive number"),
    ("cross_entropi", "unknown loss 'cross_entropi'; did you mean 'cross_entropy'"),
])
def test_loss_argument_errors_are_located(tmp_path, loss, message):
    text = ("model:\n  input_shape: [1, 8, 8]\n  layers: [Flatten, {Linear: {out_features: 10}}]\n"
            "data: {source: digits}\ntrain:\n  epochs: 1\n  loss: " + loss + "\n")
    (tmp_path / "c.yaml").write_text(text)
    problems = nnctl.check(str(tmp_path / "c.yaml"))
    assert any(message in p.message and p.line == 7 for p in problems), [p.format() for p in problems]


@pytest.mark.parametrize("train, message", [
    ({"loss": "mse", "checkpoint": {"monitor": "val_accuracy"}}, "val_accuracy needs class labels"),
    ({"loss": "bce_with_logits", "early_stopping": {"patience": 2, "monitor": "val_mae"}},
     "val_mae is a regression metric"),
    ({"loss": {"cross_entropy": {"weight": [0] * 10}}}, "weight is all zeros"),
    ({"loss": {"cross_entropy": {"weight": [1e39] * 10}}}, "within float32's range"),
    ({"loss": {"cross_entropy": {"ignore_index": 10**30}}}, "a 64-bit integer"),
    ({"loss": {"cross_entropy": {"weight": [1, 2, 3]}}}, "weight has 3 values but the model gives 10 outputs"),
    ({"early_stopping": {"patience": 2, "monitor": "val_mae"}}, "val_mae is a regression metric"),
    ({"checkpoint": {"monitor": "val_los"}}, "did you mean 'val_loss'"),
])
def test_monitor_errors_are_located(train, message):
    problems = nnctl.check(config(**train))
    assert any(message in p.message for p in problems), [p.format() for p in problems]


def test_a_weight_list_of_the_wrong_length_is_refused_before_training(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="weight has 3 values but the model gives 10 outputs"):
        nnctl.train(config(loss={"cross_entropy": {"weight": [1, 2, 3]}}), out=str(out))
    assert not (out / "last.pt").exists()


# --- gradient accumulation --------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", [{"SGD": {"lr": 0.1, "momentum": 0.9}}, {"Adam": {"lr": 0.001}}])
def test_accumulation_equals_the_larger_batch(optimizer):
    """batch 16 x accumulate 4 == batch 64 (no BatchNorm, no dropout): the same samples per update,
    including the epoch's last, partial group (1,437 samples: 16+13 against 29)."""
    a = api.prepare(config(epochs=2, batch_size=16, accumulate=4, optimizer=optimizer))
    b = api.prepare(config(epochs=2, batch_size=64, optimizer=optimizer))
    assert torch.equal(flat(a.model), flat(b.model))
    ra, rb = api.fit(a), api.fit(b)
    assert len(a.data.train) == 90 and len(b.data.train) == 23
    diff = float((flat(a.model) - flat(b.model)).abs().max())
    assert diff < 1e-6, diff
    assert ra.history[-1]["val_loss"] == pytest.approx(rb.history[-1]["val_loss"], abs=1e-6)
    # and accumulation is not a no-op: batch 16 without it trains differently
    c = api.prepare(config(epochs=2, batch_size=16, optimizer=optimizer))
    api.fit(c)
    assert float((flat(c.model) - flat(b.model)).abs().max()) > 1e-3


def test_a_stop_inside_an_accumulation_group_waits_for_its_end_and_resumes_exactly(tmp_path):
    """SIGINT at batch 5 of a group of 4: the run stops after batch 8 (gradients in flight are never
    dropped); the resumed run ends bit-identical with an uninterrupted one."""
    cfg = config(epochs=2, batch_size=16, accumulate=4, optimizer={"Adam": {"lr": 0.001}})
    whole = nnctl.train(cfg, out=str(tmp_path / "whole"))

    def on_event(e):
        if e.kind == "step" and e.epoch == 0 and e.step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(SIG.Interrupted):
        nnctl.train(cfg, out=str(tmp_path / "cut"), on_event=on_event)
    state = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (0, 8)
    nnctl.train(resume=str(tmp_path / "cut"))
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- early stopping and the best checkpoint's monitor -----------------------------------------

def replay(history: list[dict], metric: str, mode: str, patience: int, min_delta: float) -> int:
    """The documented rule (Keras's): the epoch count at which the run stops."""
    ref, bad = None, 0
    for row in history:
        v = row[metric]
        if ref is None or (v < ref - min_delta if mode == "min" else v > ref + min_delta):
            ref, bad = v, 0
        else:
            bad += 1
        if bad >= patience:
            return row["epoch"]
    return history[-1]["epoch"]


def test_early_stopping_on_val_loss_stops_where_the_rule_says(tmp_path):
    cfg = config(epochs=40, optimizer={"Adam": {"lr": 0.003}},
                 early_stopping={"monitor": "val_loss", "patience": 2, "min_delta": 0.01})
    run = nnctl.train(cfg, out=str(tmp_path / "run"))
    history = run.history
    assert run.fit.stopped_early and len(history) < 40
    assert len(history) == replay(history, "val_loss", "min", 2, 0.01)
    # best.pt still tracks val_accuracy (the classification default), independently
    assert run.best["metric"] == "val_accuracy"
    best = max(history, key=lambda r: r["val_accuracy"])
    assert run.best["epoch"] == min(r["epoch"] for r in history if r["val_accuracy"] == best["val_accuracy"])


def test_best_checkpoint_monitor_and_epoch_checkpoints(tmp_path):
    cfg = config(epochs=5, checkpoint={"monitor": "val_loss", "every": 2, "keep": 1})
    run = nnctl.train(cfg, out=str(tmp_path / "run"))
    losses = [r["val_loss"] for r in run.history]
    assert run.best["metric"] == "val_loss" and run.best["mode"] == "min"
    assert run.best["epoch"] == 1 + losses.index(min(losses))
    files = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("epoch-"))
    assert files == ["epoch-4.pt"]  # epoch-2.pt pruned: keep 1
    state = torch.load(tmp_path / "run" / "epoch-4.pt", weights_only=True)
    assert state["kind"] == "epoch" and state["epoch"] == 4
    model = nnctl.load(tmp_path / "run" / "epoch-4.pt")
    assert isinstance(model, nn.Module)
    # an epoch checkpoint is a run file: export -o onto it is refused
    proc = subprocess.run([sys.executable, "-m", "nnctl", "export-weights", str(tmp_path / "run"), "-o",
                           str(tmp_path / "run" / "epoch-4.pt")], capture_output=True, text=True)
    assert proc.returncode == 2 and "is a file nnctl keeps in the run folder" in proc.stderr


def test_bce_with_logits_refuses_targets_outside_0_1_before_training(tmp_path):
    x = torch.randn(100, 6)
    torch.save({"x": x, "y": x[:, :3] * 4}, tmp_path / "reg.pt")
    cfg = {"name": "bad", "model": {"input_shape": [6], "layers": [{"Linear": {"out_features": 3}}]},
           "data": {"source": "tensors", "path": str(tmp_path / "reg.pt")},
           "train": {"epochs": 1, "device": "cpu", "loss": "bce_with_logits"}}
    with pytest.raises(ConfigError, match="bce_with_logits needs targets from 0 to 1"):
        nnctl.train(cfg, out=str(tmp_path / "run"))
    assert not (tmp_path / "run" / "last.pt").exists()


def test_pruning_touches_only_its_own_checkpoints(tmp_path):
    """keep: K never removes a file that is not a checkpoint, a folder or a link, and an epoch-N.pt that is
    a folder costs a note, never the epoch."""
    run = tmp_path / "run"
    cfg = config(epochs=3, checkpoint={"every": 1, "keep": 1})
    nnctl.train(cfg, out=str(run))
    assert sorted(p.name for p in run.glob("epoch-*")) == ["epoch-3.pt"]
    (run / "epoch-1.pt").write_text("USERDATA")
    (run / "epoch-2.pt").mkdir()
    os.symlink(run / "epoch-3.pt", run / "epoch-0.pt")
    (run / "epoch-5.pt").mkdir()
    notes = []
    nnctl.train(resume=str(run), epochs=6, on_event=lambda e: notes.append(e.message) if e.kind == "note" else None)
    assert (run / "epoch-1.pt").read_text() == "USERDATA"
    assert (run / "epoch-2.pt").is_dir() and (run / "epoch-5.pt").is_dir() and (run / "epoch-0.pt").is_symlink()
    assert sorted(p.name for p in run.glob("epoch-*.pt") if p.is_file() and not p.is_symlink()) == \
        ["epoch-1.pt", "epoch-6.pt"]
    assert any("epoch-5.pt exists and is not a regular file" in n for n in notes), notes
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 6
