"""A run's end states (issue 20, defects 8, 10, 16, 18): an early-stopped run is finished, a signal after the
last checkpoint leaves the run finished, TensorBoard on a full disk and on a signal, all-ignored batches."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nnctl.runs import checkpoint as K
from tests.conftest import make, run_cli, write


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


# --- defect 8: an early-stopped run is finished -------------------------------------------------

# lr 0: the validation accuracy never improves after epoch 1, so patience 1 stops the run after epoch 2 of 20
EARLY = make(train={"epochs": 20, "optimizer": {"SGD": {"lr": 0.0}}, "early_stopping": {"patience": 1}})


@pytest.mark.slow  # real runs and resumes (about 20 s): .ci/run runs the slow group
def test_resume_refuses_an_early_stopped_run_and_touches_nothing(tmp_path):
    cfg = write(tmp_path, EARLY)
    run = tmp_path / "run"
    r = run_cli("train", str(cfg), "-o", str(run), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    state = K.load(run / "last.pt")
    assert state["epoch"] == 2 and state["stopped_early"] == {
        "epoch": 2, "reason": "early stopping: val_accuracy did not improve by more than 0 for 1 epochs"}
    assert _status(run)["state"] == "finished" and _status(run)["stopped_early"] is True
    before = {name: _sha(run / name) for name in ("last.pt", "best.pt", "metrics.csv", "status.json")}
    for _ in range(2):  # the defect: each resume trained one more epoch and rewrote best.pt / last.pt
        r = run_cli("train", "--resume", str(run), cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip() == (
            f"error: {run}/last.pt: the run stopped early at epoch 2 of 20 (early stopping: val_accuracy did not "
            "improve by more than 0 for 1 epochs); it is finished, and resuming it as it is would train one more "
            "epoch and stop again. To train further, resume with a larger patience or without early stopping "
            "(--force --set train.early_stopping.patience=N), or start a new run from its weights (nnctl train "
            f"CONFIG --init {run}/best.pt)")
        assert {name: _sha(run / name) for name in before} == before
    # --epochs does not change early stopping's decision: refused the same way
    r = run_cli("train", "--resume", str(run), "--epochs", "40", cwd=tmp_path)
    assert r.returncode == 2 and "stopped early at epoch 2 of 20" in r.stderr  # the run's own total, not --epochs
    # a larger patience (a changed config: --force) trains on, as the message says
    r = run_cli("train", "--resume", str(run), "--force", "--set", "train.early_stopping.patience=3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert K.load(run / "last.pt")["epoch"] == 4 and _status(run)["epochs_done"] == 4


@pytest.mark.slow  # several real runs and resumes: .ci/run runs the slow group
def test_an_older_checkpoint_without_the_field_is_refused_by_its_counter_and_others_resume(tmp_path):
    cfg = write(tmp_path, EARLY)
    run = tmp_path / "run"
    assert run_cli("train", str(cfg), "-o", str(run), cwd=tmp_path).returncode == 0
    old = {k: v for k, v in K.load(run / "last.pt").items() if k not in ("stopped_early", *K.DIGEST_KEYS)}
    K.save(run / "last.pt", old)  # as an nnctl before the field wrote it (digests recomputed)
    assert "stopped_early" not in K.load(run / "last.pt")
    r = run_cli("train", "--resume", str(run), cwd=tmp_path)
    assert r.returncode == 2 and "stopped early at epoch 2 of 20 (early stopping: 1 epochs without improvement, " \
                                  "its patience)" in r.stderr
    # an older checkpoint of a run that did not stop early resumes as before
    cfg2 = write(tmp_path, make(train={"epochs": 1}), "c2.yaml")
    run2 = tmp_path / "run2"
    assert run_cli("train", str(cfg2), "-o", str(run2), cwd=tmp_path).returncode == 0
    old = {k: v for k, v in K.load(run2 / "last.pt").items() if k not in ("stopped_early", *K.DIGEST_KEYS)}
    K.save(run2 / "last.pt", old)
    r = run_cli("train", "--resume", str(run2), "--epochs", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert K.load(run2 / "last.pt")["epoch"] == 2 and K.load(run2 / "last.pt")["stopped_early"] is None


# --- defect 18: a signal after the last epoch's checkpoint leaves the run finished ------------------

def _signal_at_the_end(tmp_path: Path, sig: int, delay: float, epochs: int = 3):
    """A real `nnctl train` process, signalled once its last epoch's row is in metrics.csv (the last
    checkpoint is written before it) and `delay` seconds later (validation, the plot, the record)."""
    cfg = write(tmp_path, make(train={"epochs": epochs}))
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    p = subprocess.Popen([sys.executable, "-m", "nnctl", "train", str(cfg), "-o", str(run)], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = run / "metrics.csv"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().strip().splitlines()) == epochs + 1):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.001)
    time.sleep(delay)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    return p.returncode, err, run


@pytest.mark.slow  # real processes stopped at their end (about 45 s on 2 cores): .ci/run runs the slow group
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("delay", [0.0, 0.15])
def test_a_signal_after_the_last_checkpoint_leaves_the_run_finished(tmp_path, sig, delay):
    code, err, run = _signal_at_the_end(tmp_path, sig, delay)
    status = _status(run)
    assert (status["state"], status["epochs_done"], status.get("error")) == ("finished", 3, None), err
    assert K.load(run / "last.pt")["epoch"] == 3
    # the decision (README, Training, "Stopping"): every signal exits 128 + signal; the run is recorded finished
    # (unless the process had exited before the signal came: then 0, and finished as well)
    if code != 0:
        assert code == 128 + sig, err
        assert err.strip().splitlines()[-1] == (f"error: stopped by {signal.Signals(sig).name} after the run "
                                                f"finished: {run}/last.pt holds its last epoch; nothing was lost "
                                                "and there is nothing to resume"), err
    assert "Traceback" not in err and "second Ctrl-C" not in err
    r = run_cli("runs", str(tmp_path), cwd=tmp_path)
    assert "interrupted" not in r.stdout and "finished" in r.stdout
    r = run_cli("train", "--resume", str(run), cwd=tmp_path)
    assert r.returncode == 2 and "the run already finished 3 of 3 epochs" in r.stderr


def test_a_signal_during_the_run_still_interrupts_it(tmp_path):
    """The other side of the rule: a signal before the last epoch is an interrupted run that resumes."""
    cfg = write(tmp_path, make(train={"epochs": 200}))
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "nnctl", "train", str(cfg), "-o", str(run)], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.csv"
    while not (metrics.exists() and len(metrics.read_text().strip().splitlines()) >= 2):
        assert p.poll() is None
        time.sleep(0.002)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert _status(run)["state"] == "interrupted" and "resume with --resume" in err
    assert K.load(run / "last.pt")["epoch"] < 200


# --- defect 10: TensorBoard on a full disk, and on a signal -----------------------------------------------

TB = make(train={"epochs": 3, "log": ["csv", "tensorboard"]})


@pytest.fixture
def small_disk(tmp_path):
    """A 200 KiB tmpfs (root only; skipped elsewhere), unmounted afterwards."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(folder)],
                                           capture_output=True, check=False).returncode != 0:
        pytest.skip("mounting a tmpfs needs root with mount permission (CAP_SYS_ADMIN), which this process lacks")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)


def _fill(disk: Path, keep_kib: int) -> None:
    for p in disk.iterdir():
        subprocess.run(["rm", "-rf", str(p)], check=True)
    (disk / "fill").write_bytes(b"\0" * (200 * 1024 - keep_kib * 1024))


@pytest.mark.slow  # a tmpfs filled by real runs: .ci/run runs the slow group
def test_tensorboard_on_a_full_disk_is_one_note_naming_the_folder(small_disk, tmp_path):
    pytest.importorskip("tensorboard")
    cfg = write(tmp_path, TB)
    notes = 0
    # how much room is left decides which write fails first (the writer's, the first checkpoint's): each is
    # one line naming its folder or file, never a thread's traceback or "(writing the output)"
    for keep in (8, 12, 16, 24):
        _fill(small_disk, keep)
        r = run_cli("train", str(cfg), "-o", str(small_disk / "run"), cwd=tmp_path)
        text = r.stdout + r.stderr
        assert r.returncode == 1 and "Traceback" not in text and "Exception in thread" not in text, text
        assert "(writing the output)" not in text
        assert r.stderr.strip().splitlines()[-1].startswith("error: "), text
        assert f"{small_disk}/run" in r.stderr.strip().splitlines()[-1], text
        note = [line for line in text.splitlines() if line.startswith("note: tensorboard")]
        if note:
            notes += 1
            assert note == [(f"note: tensorboard: could not write to {small_disk}/run/tensorboard (No space "
                             "left on device); the run goes on without TensorBoard records")], text
    assert notes, "no amount of room made the TensorBoard writer fail first"


def test_tensorboard_writer_failing_at_the_start_costs_the_log_not_the_run(small_disk, tmp_path):
    """The decision (nnctl/runs/tensorboard.py, module docstring): the run goes on without TensorBoard."""
    pytest.importorskip("tensorboard")
    script = tmp_path / "child.py"
    script.write_text(f"""
import sys
from pathlib import Path
from nnctl.config import loader
from nnctl.model import plan
from nnctl.runs.tensorboard import TensorBoardLogger
cfg, doc = loader.from_dict({make(train={"log": ["csv", "tensorboard"]})!r}, "c.yaml")
model, _ = plan.build(cfg, doc)
board = TensorBoardLogger(Path(sys.argv[1]), cfg, model, "cpu", say=print)
class E: kind, row, epoch = "epoch_end", {{"epoch": 1, "train_loss": 1.0}}, 0
board.on_event(E)
board.end("finished")
print("went on")
""")
    _fill(small_disk, 0)
    (small_disk / "run").mkdir()
    r = subprocess.run([sys.executable, str(script), str(small_disk / "run")], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120, check=False)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.splitlines() == [(f"note: tensorboard: could not write to {small_disk}/run/tensorboard (No "
                                      "space left on device); the run goes on without TensorBoard records"),
                                     "went on"]


@pytest.mark.slow  # a real-process test (README test command kept under ~6 minutes; .ci/run runs it)
def test_an_interrupted_run_records_its_hparams_with_a_status_tensorboard_knows(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    cfg = write(tmp_path, make(train={"epochs": 300, "log": ["csv", "tensorboard"]}))
    run = tmp_path / "run"
    for sig in (signal.SIGINT, signal.SIGTERM):
        args = ["train", str(cfg), "-o", str(run)] if sig == signal.SIGINT else ["train", "--resume", str(run)]
        p = subprocess.Popen([sys.executable, "-m", "nnctl", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        metrics = run / "metrics.csv"
        rows = len(metrics.read_text().splitlines()) if metrics.exists() else 1
        while not (metrics.exists() and len(metrics.read_text().splitlines()) > rows):
            assert p.poll() is None, p.communicate()
            time.sleep(0.002)
        p.send_signal(sig)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 128 + sig, err
        assert "tensorboard" not in out + err and "STATUS_ABORTED" not in out + err, out + err
        assert _status(run)["state"] == "interrupted"
        ea = EventAccumulator(str(run / "tensorboard"))
        ea.Reload()
        content = ea.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        assert start.session_start_info.hparams["train.epochs"].number_value == 300
        end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"])
        assert end.session_end_info.status == api_pb2.Status.Value("STATUS_UNKNOWN")


# --- defect 16: a batch whose targets are all ignore_index ------------------------------------------------

def _ignore_data(tmp_path: Path, y: list[int]) -> Path:
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "d.pt"
    torch.save({"x": torch.randn(len(y), 4, generator=g), "y": torch.tensor(y)}, path)
    return path


def _ignore_cfg(tmp_path: Path, path: Path, lr: float = 0.0) -> Path:
    return write(tmp_path, make(
        model={"input_shape": [4], "layers": [{"Linear": {"out_features": 3}}]},
        data={"source": "tensors", "path": str(path), "val_fraction": 0.0, "normalize": False},
        train={"loss": {"cross_entropy": {"ignore_index": 2}}, "epochs": 1, "batch_size": 2,
               "optimizer": {"SGD": {"lr": lr}}}))


@pytest.mark.slow  # a real-process test (README test command kept under ~6 minutes; .ci/run runs it)
def test_an_all_ignored_batch_counts_for_nothing_and_the_mean_is_plain_pytorchs(tmp_path):
    # 16 samples in batches of 2, 10 of them ignored (class 2): several batches hold only ignored targets
    y = [2, 2, 2, 0, 2, 2, 1, 2, 2, 0, 2, 1, 2, 2, 0, 1]
    path = _ignore_data(tmp_path, y)
    run = tmp_path / "run"
    r = run_cli("train", str(_ignore_cfg(tmp_path, path)), "-o", str(run), cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # before: "the training loss became non-finite ... lower the learning rate"
    # lr 0: the weights never change, so the epoch's mean is plain PyTorch's over the whole split, by hand
    state = K.load(run / "last.pt")
    data = torch.load(path)
    logits = data["x"] @ state["model"]["0.weight"].T + state["model"]["0.bias"]
    by_hand = torch.nn.functional.cross_entropy(logits.double(), data["y"], ignore_index=2)
    assert state["history"][0]["train_loss"] == pytest.approx(float(by_hand), rel=1e-6)
    # with learning: every step finite (a zero loss, zero gradients), the same as PyTorch's mean elsewhere
    r = run_cli("train", str(_ignore_cfg(tmp_path, path, lr=0.1)), "-o", str(tmp_path / "run2"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_the_loss_of_an_all_ignored_batch_is_zero_with_zero_gradients_and_otherwise_pytorchs():
    from nnctl.optim.losses import counted, make_loss

    loss_fn = make_loss({"cross_entropy": {"ignore_index": 2, "weight": [1.0, 2.0, 3.0]}})
    out = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([2, 0, 2, 1])
    ref = torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0]), ignore_index=2)
    assert torch.equal(loss_fn(out, y), ref(out, y)) and counted(loss_fn, y, 4) == 2
    every = torch.tensor([2, 2, 2, 2])
    assert torch.isnan(ref(out, every))  # plain PyTorch: 0/0
    loss = loss_fn(out, every)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(out.grad, torch.zeros(4, 3)) and counted(loss_fn, every, 4) == 0


def test_an_epoch_with_no_counted_target_says_so_plainly(tmp_path):
    path = _ignore_data(tmp_path, [2] * 8)
    r = run_cli("train", str(_ignore_cfg(tmp_path, path, lr=0.1)), "-o", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        "error: every training target of epoch 1 (4 steps) is the loss's ignore_index: there is nothing to learn "
        "from; check the labels and train.loss ignore_index. No checkpoint was written before this.")
    assert "learning rate" not in r.stderr


def test_validation_counts_only_the_kept_targets_and_says_when_there_are_none():
    from nnctl.errors import NnctlError
    from nnctl.optim.losses import make_loss
    from nnctl.training.loop import evaluate

    class Batches:
        def __init__(self, parts):
            self.parts = parts

        def epoch(self, epoch):
            yield from self.parts

    g = torch.Generator().manual_seed(1)
    model = torch.nn.Linear(4, 3)
    x = torch.randn(6, 4, generator=g)
    y = torch.tensor([2, 2, 0, 1, 2, 0])
    loss_fn = make_loss({"cross_entropy": {"ignore_index": 2}})
    got = evaluate(model, loss_fn, Batches([(x[:2], y[:2]), (x[2:], y[2:])]), "classification")
    with torch.no_grad():
        logits = model(x)
    keep = y != 2
    assert got["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits.double(), y, ignore_index=2)))
    assert got["accuracy"] == pytest.approx(float((logits.argmax(1)[keep] == y[keep]).double().mean()))
    with pytest.raises(NnctlError, match=r"^every target of the 2 samples evaluated is the loss's ignore_index \(2\)"):
        evaluate(model, loss_fn, Batches([(x[:2], y[:2])]), "classification")
