"""The trainer's parts: the policies as pure functions, and the TrainState <-> checkpoint round trip."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from nnctl.config import loader as C
from nnctl.data import loading as D
from nnctl.errors import UsageError
from nnctl.model import plan as M
from nnctl.runs import checkpoint as K
from nnctl.training import policy as POL
from nnctl.training import trainer as T

from .conftest import make

CPU = torch.device("cpu")


# --- early stopping: Keras's rule (better than the reference by more than min_delta) ----------

def test_early_stopping_counts_epochs_without_an_improvement_over_min_delta():
    ref = {"metric": "val_loss", "mode": "min", "value": None, "epoch": None}
    trace = []
    for epoch, loss in enumerate([1.0, 0.95, 0.94, 0.80, 0.795, 0.80], start=1):
        ref, bad = POL.early_stopping({"val_loss": loss}, ref, trace[-1][1] if trace else 0, False, 0.02, epoch)
        trace.append((ref["value"], bad))
    # 0.95 improves on 1.0 by 0.05; 0.94 only by 0.01 from 0.95 (not > 0.02); 0.80 by 0.15; then none
    assert trace == [(1.0, 0), (0.95, 0), (0.95, 1), (0.80, 0), (0.80, 1), (0.80, 2)]
    assert ref["epoch"] == 4 and ref["metric"] == "val_loss" and ref["mode"] == "min"


def test_early_stopping_without_its_own_reference_follows_best_pt():
    assert POL.early_stopping({"val_loss": 0.5}, None, 3, True, 0.0, 4) == (None, 0)
    assert POL.early_stopping({"val_loss": 0.5}, None, 3, False, 0.0, 4) == (None, 4)


def test_a_non_finite_metric_never_improves():
    ref = {"metric": "val_accuracy", "mode": "max", "value": 0.5, "epoch": 1}
    assert POL.early_stopping({"val_accuracy": math.nan}, ref, 0, False, 0.0, 2) == (ref, 1)
    assert not POL.improves(math.inf, None, "min")


@pytest.mark.parametrize("bad,epoch,epochs,stops", [(2, 3, 10, True), (1, 3, 10, False), (2, 9, 10, False)])
def test_stops_early_when_patience_is_spent_and_epochs_remain(bad, epoch, epochs, stops):
    assert POL.stops_early(SimpleNamespace(patience=2), bad, epoch, epochs) is stops
    assert POL.stops_early(None, bad, epoch, epochs) is False


# --- divergence ----------------------------------------------------------------------------

def test_non_finite_loss_names_the_step_or_the_other_rank():
    assert POL.non_finite_loss(0, 10, 1.5, -1, "kept") is None
    exc = POL.non_finite_loss(1, 10, math.nan, 3, "No checkpoint was written before this.")
    assert isinstance(exc, POL.NonFiniteLoss) and str(exc) == (
        "the training loss became non-finite at epoch 2, step 4 (of 10 steps an epoch); lower the learning rate, "
        "clip gradients (train.grad_clip) or check the data. No checkpoint was written before this.")
    assert "at epoch 1, on another rank (of" in str(POL.non_finite_loss(0, 10, 2.0, -2, ""))
    assert "at epoch 1 (of" in str(POL.non_finite_loss(0, 10, math.inf, -1, ""))


def test_explosion_is_over_a_million_times_the_first_loss_or_one():
    assert POL.explosion(0, 1e6, 0.5, "") is None  # the scale is max(0.5, 1): at the limit, not over it
    exc = POL.explosion(2, 1.0001e6, 0.5, "The last good checkpoint is r/last.pt")
    assert type(exc) is POL.Diverged and str(exc) == (
        "the training loss exploded at epoch 3: 1e+06, over 1e+06 x max(first step's loss 0.5, 1); lower the "
        "learning rate or clip gradients (train.grad_clip). Nothing saved. The last good checkpoint is r/last.pt")
    assert POL.explosion(0, 1.9e6, 2.0, "") is None and POL.explosion(0, 2.1e6, 2.0, "") is not None


def test_validation_divergence_blames_the_data_or_the_model():
    data = POL.validation_divergence({"loss": math.nan, "accuracy": 0.5}, 0, "validation", "digits", 1234, "k")
    assert str(data) == ("val_loss nan at epoch 1 on the validation split of digits: the validation data holds "
                         "non-finite values (NaN or infinite; 1,234 in this process's share); clean the data. "
                         "Nothing saved. k")
    model = POL.validation_divergence({"mse": math.inf}, 1, "test", "x.pt", 0, "k")
    assert "val_mse inf at epoch 2 on the test split of x.pt: the test data is finite, so the model" in str(model)


def test_a_monitored_column_missing_from_the_row_is_refused():
    POL.check_monitored({"epoch": 1, "train_loss": 0.3}, ["train_loss"])
    with pytest.raises(UsageError, match="the run monitors val_loss, but its metrics are epoch, train_loss: set"):
        POL.check_monitored({"epoch": 1, "train_loss": 0.3}, ["train_loss", "val_loss"])


# --- the TrainState and its checkpoint: one payload builder, one restore ------------------------

def _trainer(d: dict, run, resume=None) -> T.Trainer:
    cfg, doc = C.from_dict(d)
    torch.manual_seed(0)
    model, _ = M.build(cfg, doc)
    return T.Trainer(cfg, model, D.load_data(cfg, CPU), CPU, run, T.FitOptions(resume=resume))


def test_a_resumed_train_state_saves_the_checkpoint_it_was_restored_from(tmp_path):
    """Restore then payload is the identity on every training-state field: what a checkpoint holds is what
    a resume continues from (the RNG included: restored, then captured again)."""
    d = make(train={"epochs": 2, "early_stopping": {"patience": 5, "monitor": "val_loss", "min_delta": 0.001},
                    "scheduler": {"StepLR": {"step_size": 1, "gamma": 0.5}}})
    result = _trainer(d, tmp_path).run()
    assert result.epochs_run == 2
    saved = K.load(tmp_path / "last.pt")
    d["train"]["epochs"] = 3
    trainer = _trainer(d, tmp_path / "other", resume=saved)
    state = trainer.state
    assert (state.epoch, state.step_in_epoch, state.global_step) == (2, 0, saved["global_step"]) and state.sums is None
    again = trainer.payload("last")
    for key in ("epoch", "step_in_epoch", "global_step", "best", "bad_epochs", "history", "partial",
                "loss_reference", "stopping", "world_size", "input_shape", "preprocessing", "freeze"):
        assert again[key] == saved[key], key
    assert again["stopping"]["metric"] == "val_loss" and again["best"]["metric"] == "val_accuracy"
    for a, b in ((again["model"], saved["model"]), (again["rng"], saved["rng"])):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again["optimizer"]["param_groups"] == saved["optimizer"]["param_groups"]
    assert again["scheduler"] == saved["scheduler"] and again["scheduler"]["last_epoch"] == 2
    moments = [(s["exp_avg"], saved["optimizer"]["state"][k]["exp_avg"])
               for k, s in again["optimizer"]["state"].items()]
    assert moments and all(torch.equal(a, b) for a, b in moments)
