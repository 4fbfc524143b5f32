"""The training loop against a hand-written PyTorch loop; runs; checkpoints; exact resume; clean stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from nnctl.runs import checkpoint as K
from nnctl.config import loader as C
from nnctl.data import loading as D
from nnctl.model import plan as M
from nnctl.training import trainer as T
from nnctl.training import distributed as DIST
from nnctl.errors import UsageError

from .conftest import make, run_cli, write

CPU = torch.device("cpu")


def fit_in_process(d: dict, tmp_path: Path):
    cfg, doc = C.from_dict(d)
    model, plan = M.build(cfg, doc)
    data = D.load_data(cfg, CPU)
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    result = T.fit(cfg, model, data, CPU, run)
    return model, result, run


def hand_loop(d: dict):
    """The loop a careful engineer writes, over the same batches: the oracle for fit()."""
    cfg, doc = C.from_dict(d)
    model, _ = M.build(cfg, doc)
    data = D.load_data(cfg, CPU)
    loss_fn = {"cross_entropy": nn.CrossEntropyLoss(), "nll": nn.NLLLoss(), "mse": nn.MSELoss(),
               "l2": nn.MSELoss(), "l1": nn.L1Loss()}[cfg.train.loss]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.optimizer["Adam"]["lr"])
    losses = []
    for epoch in range(cfg.train.epochs):
        model.train()
        for x, y in data.train.epoch(epoch):
            out = model(x)
            loss = loss_fn(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if data.val is not None:
            model.eval()
            with torch.no_grad():
                for x, y in data.val.epoch(0):
                    model(x)
    return model, losses


LOSS_CASES = {
    "cross_entropy": dict(model={"input_shape": [1, 8, 8], "layers": ["Flatten", {"Linear": {"out_features": 32}},
                                                                       "ReLU", {"Dropout": 0.2},
                                                                       {"Linear": {"out_features": 10}}]}),
    "nll": dict(model={"input_shape": [1, 8, 8], "layers": ["Flatten", {"Linear": {"out_features": 10}},
                                                             {"LogSoftmax": {"dim": 1}}]}),
    "mse": dict(model={"input_shape": [1, 8, 8], "layers": ["Flatten", {"Linear": {"out_features": 64}},
                                                             {"Unflatten": [1, [1, 8, 8]]}]},
                data={"source": "digits", "target": "input", "noise": 0.1}),
    "l1": dict(model={"input_shape": [1, 8, 8], "layers": [{"Conv2d": {"out_channels": 1, "kernel_size": 3,
                                                                        "padding": 1}}]},
               data={"source": "digits", "target": "input"}),
    "l2": dict(model={"input_shape": [5], "layers": [{"Linear": {"out_features": 1}}]},
               data={"source": "synthetic", "size": 256}),
}


@pytest.mark.parametrize("loss", list(LOSS_CASES))
def test_fit_equals_hand_written_loop(loss, tmp_path):
    d = make(**LOSS_CASES[loss], train={"loss": loss, "epochs": 2, "batch_size": 32})
    model, result, run = fit_in_process(d, tmp_path)
    ref, losses = hand_loop(d)
    for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k
    # the epoch's mean loss is the batch-size weighted mean of the step losses
    assert abs(result.history[-1]["train_loss"] - sum(losses[len(losses) // 2:]) / (len(losses) // 2)) < 0.05
    metric = "val_accuracy" if loss in ("cross_entropy", "nll") else "val_mae"
    assert metric in result.history[-1]
    assert (run / "last.pt").exists() and (run / "best.pt").exists() and (run / "metrics.csv").exists()


def test_dropout_active_in_training_only(tmp_path):
    d = make(**LOSS_CASES["cross_entropy"], train={"epochs": 1})
    cfg, doc = C.from_dict(d)
    model, _ = M.build(cfg, doc)
    seen = {"train": set(), "eval": set()}
    dropout = model[3]
    assert isinstance(dropout, nn.Dropout)
    dropout.register_forward_hook(lambda m, i, o: seen["train" if torch.is_grad_enabled() else "eval"].add(m.training))
    data = D.load_data(cfg, CPU)
    T.fit(cfg, model, data, CPU, tmp_path)
    assert seen["train"] == {True}  # Dropout active during steps
    assert seen["eval"] == {False}  # and off during validation (inference mode)


def test_best_is_a_copy_at_the_best_epoch(tmp_path):
    d = make(**LOSS_CASES["nll"], train={"loss": "nll", "epochs": 4, "optimizer": {"SGD": {"lr": 0.5}}})
    model, result, run = fit_in_process(d, tmp_path)
    best = K.load(run / "best.pt")
    assert best["epoch"] == result.best["epoch"]
    for k, v in result.best_state.items():
        assert torch.equal(best["model"][k], v)
    accs = [r["val_accuracy"] for r in result.history]
    assert result.best["value"] == max(accs)
    if result.best["epoch"] != len(accs):  # a later epoch changed the live weights, not the copy
        assert any(not torch.equal(v, model.state_dict()[k]) for k, v in result.best_state.items())


def test_checkpoint_is_weights_only_and_complete(tmp_path):
    d = make(train={"epochs": 2, "scheduler": {"StepLR": {"step_size": 1, "gamma": 0.5}}})
    model, result, run = fit_in_process(d, tmp_path)
    state = torch.load(run / "last.pt", weights_only=True)  # no pickled classes
    for key in ("model", "optimizer", "scheduler", "epoch", "global_step", "rng", "config", "best",
                "format_version", "freeze", "history"):
        assert key in state, key
    assert state["epoch"] == 2 and state["scheduler"]["last_epoch"] == 2
    assert state["config"]["train"]["epochs"] == 2
    assert result.history[1]["lr"] == pytest.approx(0.0005)


def test_device_selection():
    assert DIST.select_device("cpu") == CPU
    if not torch.cuda.is_available():
        assert DIST.select_device("auto").type in ("cpu", "mps")
        with pytest.raises(UsageError, match="CUDA is not available"):
            DIST.select_device("cuda")
        with pytest.raises(UsageError, match="CUDA is not available"):
            DIST.select_device("cuda:1")
    else:  # pragma: no cover - only on a GPU machine
        assert DIST.select_device("auto").type == "cuda"
        n = torch.cuda.device_count()
        with pytest.raises(UsageError, match="CUDA device"):
            DIST.select_device(f"cuda:{n}")


def test_cli_train_unavailable_device_is_an_error(tmp_path, cli):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    p = write(tmp_path, make())
    code, out, err = cli("train", str(p), "--device", "cuda", "--out", str(tmp_path / "r"))
    assert code == 2 and "CUDA is not available" in err


def test_non_finite_loss_stops_with_exit_1(tmp_path):
    import numpy as np

    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    x[37, 2] = 1e30  # finite, but its squared error overflows: sample 37 poisons one batch's loss
    y = np.zeros((64, 1), dtype="float32")
    np.savez(tmp_path / "t.npz", x=x, y=y)
    d = make(model={"input_shape": [4], "layers": [{"Linear": {"out_features": 1}}]},
             data={"source": "tensors", "path": str(tmp_path / "t.npz"), "val_fraction": 0.0},
             train={"loss": "mse", "epochs": 2, "batch_size": 8})
    p = write(tmp_path, d)
    r = run_cli("train", str(p), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert "non-finite at epoch 1, step" in r.stderr and "Traceback" not in r.stderr
    # NaN in the file itself is refused at load, before training (exit 2), naming the file and the count
    x[37, 2] = np.nan
    np.savez(tmp_path / "t.npz", x=x, y=y)
    r = run_cli("train", str(p), "--out", str(tmp_path / "run2"), cwd=tmp_path)
    assert r.returncode == 2 and "t.npz: x holds 1 non-finite values" in r.stderr, r.stderr


def test_same_seed_same_weights_and_run_folders_not_reused(tmp_path):
    p = write(tmp_path, make(train={"epochs": 2}))
    r1 = run_cli("train", str(p), cwd=tmp_path)
    r2 = run_cli("train", str(p), cwd=tmp_path)
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    a = K.load(tmp_path / "runs" / "t" / "last.pt")["model"]
    b = K.load(tmp_path / "runs" / "t-2" / "last.pt")["model"]  # a new folder, never overwritten
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "device: cpu" in r1.stdout
    run = tmp_path / "runs" / "t"
    for f in ("config.yaml", "last.pt", "best.pt", "metrics.csv", "curves.png"):
        assert (run / f).exists(), f
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,step,train_loss,val_loss,val_accuracy,val_top5_accuracy,lr,seconds") and len(rows) == 3
    r3 = run_cli("train", str(p), "--out", str(run), cwd=tmp_path)
    assert r3.returncode == 2 and "already holds a run" in r3.stderr


def weights(path: Path) -> dict:
    return K.load(path)["model"]


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


SLOW_DATA = {"source": "synthetic", "size": 6000, "classes": 10, "val_fraction": 0.1}
SLOW_MODEL = {"input_shape": [1, 16, 16], "layers": [
    {"Conv2d": {"out_channels": 16, "kernel_size": 3, "padding": 1}}, "ReLU", {"Dropout2d": 0.1}, "Flatten",
    {"Linear": {"out_features": 10}}]}


@pytest.mark.slow  # three real runs compared bit for bit (about 25 s; in-process resumes stay bit-identical in the default run: test_train_safety): .ci/run runs the slow group
def test_resume_after_k_epochs_is_bit_identical(tmp_path):
    d = make(model=SLOW_MODEL, data=dict(SLOW_DATA, size=800),
             train={"epochs": 3, "batch_size": 32, "scheduler": {"StepLR": {"step_size": 1, "gamma": 0.9}}})
    p = write(tmp_path, d)
    r = run_cli("train", str(p), "--out", str(tmp_path / "straight"))
    assert r.returncode == 0, r.stderr
    r = run_cli("train", str(p), "--out", str(tmp_path / "split"), "--epochs", "1")
    assert r.returncode == 0, r.stderr
    r = run_cli("train", str(p), "--resume", str(tmp_path / "split"), "--epochs", "3")
    assert r.returncode == 0, r.stderr
    assert_same(weights(tmp_path / "straight" / "last.pt"), weights(tmp_path / "split" / "last.pt"))
    # a resume whose config differs is refused unless forced
    r = run_cli("train", str(p), "--resume", str(tmp_path / "split"), "--epochs", "4", "--set", "train.batch_size=16")
    assert r.returncode == 2 and "differs from the checkpoint" in r.stderr
    r = run_cli("train", "--resume", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "no such checkpoint" in r.stderr


def _start(args, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "nnctl", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)


def _wait_for(path: Path, proc, timeout=120):
    began = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - began < timeout
        time.sleep(0.02)


# 3 epochs: the signal lands in epoch 2 (or 3) however fast the machine, never after the run ends
STOPPED = make(model=SLOW_MODEL, data=dict(SLOW_DATA, size=4000), train={"epochs": 3, "batch_size": 16})


@pytest.fixture(scope="module")
def straight_stopped(tmp_path_factory) -> dict:
    """The weights of STOPPED run straight through by the CLI: what every stopped-and-resumed run must end
    with (trained once for the three signals)."""
    tmp = tmp_path_factory.mktemp("straight")
    r = run_cli("train", str(write(tmp, STOPPED)), "--out", str(tmp / "straight"))
    assert r.returncode == 0, r.stderr
    return weights(tmp / "straight" / "last.pt")


@pytest.mark.slow  # a real process stopped by each signal, then resumed: .ci/run runs the slow group
@pytest.mark.parametrize("sig,code", [(signal.SIGKILL, -9), (signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stop_mid_epoch_then_resume_is_bit_identical(sig, code, straight_stopped, tmp_path):
    p = write(tmp_path, STOPPED)
    proc = _start(["train", str(p), "--out", str(tmp_path / "cut")], tmp_path)
    _wait_for(tmp_path / "cut" / "last.pt", proc)  # epoch 1 is done; now in the middle of epoch 2
    time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    state = K.load(tmp_path / "cut" / "last.pt")
    if sig != signal.SIGKILL:
        # stopped at a step boundary mid-epoch, or (a signal during validation) at the epoch boundary
        assert "saved" in err and (state["step_in_epoch"] > 0 or state["epoch"] >= 2)
        assert state["epoch"] < 3
    r = run_cli("train", "--resume", str(tmp_path / "cut"))
    assert r.returncode == 0, r.stderr
    assert_same(straight_stopped, weights(tmp_path / "cut" / "last.pt"))


def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    """A process killed in the middle of writing leaves the earlier checkpoint loadable."""
    target = tmp_path / "last.pt"
    script = f"""
import os, torch
from nnctl.runs import checkpoint as K
K.save({str(target)!r}, {{"config": {{}}, "model": {{"w": torch.ones(3)}}, "epoch": 1}})
real = torch.save
def dying(obj, fh, *a, **k):
    fh.write(b"PK\\x03\\x04 partial bytes of a new checkpoint")
    fh.flush()
    os._exit(9)  # as SIGKILL: no cleanup, no rename
torch.save = dying
K.save({str(target)!r}, {{"config": {{}}, "model": {{"w": torch.zeros(3)}}, "epoch": 2}})
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 9
    state = K.load(target)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))


def test_two_runs_on_one_folder_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    other = ("from nnctl.runs import rundir as R\ntry:\n    R.RunLock(%r).acquire()\n    print('TOOK IT')\n"
             "except Exception as e:\n    print(e)\n" % str(run))
    from nnctl.runs import rundir as R

    with R.RunLock(run):
        proc = subprocess.run([sys.executable, "-c", other], capture_output=True, text=True)
        assert "another nnctl process" in proc.stdout, proc.stdout + proc.stderr
    assert not (run / ".lock").exists()
    (run / ".lock").write_text("999999999")  # a stale lock of a dead process is taken over
    with R.RunLock(run):
        pass


def test_eval_command(digits_run, cli):
    code, out, err = cli("eval", str(digits_run), "--json")
    assert code == 0, err
    import json

    res = json.loads(out)
    best = K.load(digits_run / "best.pt")
    assert res["accuracy"] == pytest.approx(best["best"]["value"])
    assert res["samples"] == 360


def test_summary_accepts_checkpoint(digits_run, cli):
    code, out, err = cli("summary", str(digits_run / "last.pt"), "--json")
    assert code == 0, err
    import json

    assert json.loads(out)["total_params"] == 650
