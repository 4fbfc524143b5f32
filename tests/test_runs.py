"""`nnctl runs`, `nnctl compare`, status.json (failed runs recorded) and TensorBoard logging (issue 13, items 3-6)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nnctl.runs import rundir as RD
from nnctl.training import run as R
from nnctl.runs import metrics as MET
from nnctl.runs import records as RS

from .conftest import make, write

MLP = {"input_shape": [1, 8, 8], "layers": ["Flatten", {"Linear": {"out_features": 16}}, "ReLU",
                                            {"Linear": {"out_features": 10}}]}
LRS = ("0.01", "0.003", "0.001")
LR_KEY = "train.optimizer.Adam.lr"


def mlp_config(tmp: Path, **train) -> Path:
    return write(tmp, make(name="mlp", model=MLP, train={"epochs": 2, **train}), "mlp.yaml")


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """Three --set variants of one config, trained as `nnctl train` names them: runs/mlp, runs/mlp-2, runs/mlp-3."""
    tmp = tmp_path_factory.mktemp("variants")
    cfg = mlp_config(tmp)
    here = os.getcwd()
    os.chdir(tmp)
    try:
        results = [R.train(str(cfg), overrides=[f"{LR_KEY}={lr}"]) for lr in LRS]
    finally:
        os.chdir(here)
    assert [str(r.run_dir) for r in results] == ["runs/mlp", "runs/mlp-2", "runs/mlp-3"]
    for r in results:
        r.run_dir = tmp / r.run_dir
    return tmp, cfg, results


# --- 1: nnctl runs: the --set variants and what differs --------------------------------------

def test_runs_lists_the_set_variants_with_their_differing_keys(variants, cli):
    tmp, _, results = variants
    code, out, err = cli("runs", str(tmp / "runs"), "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["name"] for r in rows] == ["mlp", "mlp-2", "mlp-3"]  # by start time
    assert [r["started_at"] for r in rows] == sorted(r["started_at"] for r in rows)
    for row, lr, result in zip(rows, LRS, results):
        assert row["state"] == "finished" and row["error"] is None
        assert row["differs"] == {LR_KEY: float(lr)}  # only the key that differs, with this run's value
        assert row["overrides"] == [f"{LR_KEY}={lr}"]
        assert row["epochs_done"] == 2 and row["epochs_total"] == 2
        assert row["best"] == {k: result.best[k] for k in ("metric", "mode", "value", "epoch")}
        assert row["parameters"] == {"total": 64 * 16 + 16 + 16 * 10 + 10, "trainable": 1210}
        assert row["last"]["train_loss"] == result.history[-1]["train_loss"]
        assert row["wall_seconds"] > 0 and row["config_name"] == "mlp"
    code, out, err = cli("runs", str(tmp / "runs"))
    assert code == 0, err
    lines = out.splitlines()
    for name, lr in zip(("mlp ", "mlp-2", "mlp-3"), LRS):
        line = next(x for x in lines if x.startswith(f"│ {name}"))
        assert f"{LR_KEY}={lr}" in line and "finished" in line and "2/2" in line, line


def test_runs_of_a_missing_folder_is_a_usage_error(tmp_path, cli):
    code, _, err = cli("runs", str(tmp_path / "nowhere"))
    assert code == 2 and "no such folder" in err


# --- 2: a failed run is recorded, blocks nothing, and --resume says why ---------------------------

def test_a_failed_run_is_recorded_and_its_folder_reused(tmp_path, cli, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    torch.save({"x": torch.zeros(20, 1, 4, 4), "y": torch.zeros(20, dtype=torch.long)}, tmp_path / "bad.pt")
    bad = write(tmp_path, make(model=MLP, data={"source": "tensors", "path": "bad.pt"}), "bad.yaml")
    code, _, err = cli("train", str(bad))
    assert code == 2 and "[1, 4, 4]" in err, err
    run = tmp_path / "runs" / "t"
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "status.json"]
    code, out, _ = cli("runs", "--json")  # the default folder: runs
    (row,) = json.loads(out)
    assert row["state"] == "failed" and row["error"]["type"] == "ConfigError"  # at model.input_shape's line
    assert "[1, 4, 4]" in row["error"]["message"] and row["epochs_done"] == 0
    code, out, _ = cli("runs")
    assert "failed" in out and "t: failed:" in out
    # --resume of the failed folder: the reason and the command that starts it again
    code, _, err = cli("train", "--resume", "runs/t")
    assert code == 2, err
    assert "runs/t: this run failed before its first checkpoint: " in err and "[1, 4, 4]" in err
    assert "start it again with: nnctl train runs/t/config.yaml --out runs/t" in err
    # the next run of the same name takes the same folder (no runs/t-2), starts clean and finishes
    good = write(tmp_path, make(model=MLP), "good.yaml")
    code, out, err = cli("train", str(good))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["t"]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["error"] is None and status["epochs_done"] == 1
    assert RD.RunDir(run).has_checkpoint()


def test_an_interrupt_before_the_first_checkpoint_is_recorded_and_the_folder_reused(tmp_path, monkeypatch):
    from nnctl.training import signals as T
    from nnctl.training import trainer
    from nnctl.errors import CheckpointError

    monkeypatch.chdir(tmp_path)
    cfg = write(tmp_path, make(model=MLP))

    def stopped(*args, **kwargs):  # SIGINT while the first epoch ran: nothing saved
        raise T.Interrupted(signal.SIGINT, None)

    with monkeypatch.context() as m:
        m.setattr(trainer, "fit", stopped)
        with pytest.raises(T.Interrupted):
            R.train(str(cfg))
    (info,) = RS.list_runs()
    assert info.state == "interrupted" and info.error["message"] == "stopped by SIGINT; nothing saved"
    with pytest.raises(CheckpointError, match="this run was interrupted before its first checkpoint: stopped by "
                                              "SIGINT; nothing saved; start it again with: nnctl train"):
        R.train(resume="runs/t")
    assert str(R.train(str(cfg)).run_dir) == "runs/t"
    (info,) = RS.list_runs()
    assert info.state == "finished" and info.error is None


def test_an_early_stopped_run_is_finished_and_says_so(tmp_path, cli):
    cfg = write(tmp_path, make(model=MLP, train={"epochs": 6, "early_stopping": {"patience": 1, "min_delta": 10}}))
    result = R.train(str(cfg), out=str(tmp_path / "r"))
    assert result.fit.stopped_early and len(result.history) == 2
    status = json.loads((tmp_path / "r" / "status.json").read_text())
    assert status["state"] == "finished" and status["stopped_early"] and status["epochs_done"] == 2
    assert "did not improve" in status["stop_reason"]
    code, out, _ = cli("runs", str(tmp_path))
    assert code == 0 and "finished (early stop)" in out and "2/6" in out


# --- 3: running, killed, and folders of an older nnctl ----------------------------------------------

def test_a_running_record_is_running_only_while_its_lock_is_held(variants, tmp_path):
    run = shutil.copytree(variants[2][0].run_dir, tmp_path / "live")
    status = json.loads((run / "status.json").read_text())
    status.update(state="running", ended_at=None, epochs_done=1)
    (run / "status.json").write_text(json.dumps(status))
    rows = (run / "metrics.csv").read_text().splitlines()  # as a run killed in its second epoch leaves it:
    (run / "metrics.csv").write_text("\n".join(rows[:2]) + "\n")  # one epoch saved (header + 1 row)
    with RD.RunLock(run):
        (info,) = RS.list_runs(tmp_path)
        assert info.state == "running" and info.epochs_done == 1
    (info,) = RS.list_runs(tmp_path)  # the lock is gone and nothing recorded an end: killed
    assert info.state == "interrupted" and "without recording why" in info.error["message"]


def test_a_folder_without_status_is_described_from_its_files(variants, tmp_path):
    src = variants[2][1].run_dir
    run = shutil.copytree(src, tmp_path / "old")
    (run / "status.json").unlink()
    (info,) = RS.list_runs(tmp_path)
    assert not info.recorded and info.state == "finished" and info.epochs_done == 2
    recorded = RS.read_run(src)
    assert info.best["metric"] == recorded.best["metric"] and info.best["epoch"] == recorded.best["epoch"]
    assert info.best["value"] == pytest.approx(recorded.best["value"], rel=1e-5)  # metrics.csv: 6 digits
    (run / "last.pt").unlink()
    (run / "best.pt").unlink()
    (info,) = RS.list_runs(tmp_path)
    assert info.state == "failed"


def test_a_fifo_or_a_folder_in_place_of_a_run_file_never_blocks_the_listing(variants, tmp_path):
    """runs reads every file through files.read_input: a FIFO named metrics.csv or status.json is skipped
    (in a child process under a timeout, so that a regression fails instead of hanging the suite)."""
    run = shutil.copytree(variants[2][1].run_dir, tmp_path / "runs" / "odd")
    (run / "metrics.csv").unlink()
    os.mkfifo(run / "metrics.csv")
    (run / "status.json").unlink()
    os.mkfifo(run / "status.json")
    other = shutil.copytree(variants[2][0].run_dir, tmp_path / "runs" / "odd-2")
    (other / "status.json").unlink()
    (other / "status.json").mkdir()
    proc = subprocess.run([sys.executable, "-m", "nnctl", "runs", str(tmp_path / "runs"), "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    names = {r["name"] for r in json.loads(proc.stdout)}
    assert names == {"odd", "odd-2"}


# --- 4: nnctl compare -----------------------------------------------------------------------------

def test_compare_writes_a_png_and_shows_the_differences_side_by_side(variants, tmp_path, cli):
    import matplotlib.image as mpimg

    a, b, c = (r.run_dir for r in variants[2])
    png = tmp_path / "x.png"
    code, out, err = cli("compare", str(a), str(b), str(c), "-o", str(png))
    assert code == 0, err
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert mpimg.imread(png).shape[:2] == (420, 1100)  # 11 x (3.5 + 3 legend rows x 0.2 + 0.1) inches at 100 dpi
    row = next(line for line in out.splitlines() if LR_KEY in line)
    assert [cell.strip() for cell in row.strip("│ ").split("│")] == [LR_KEY, "0.01", "0.003", "0.001"]
    assert "final val accuracy" in out and f"curves: {png}" in out
    code, out, err = cli("compare", str(a), str(b), "-o", str(tmp_path / "y.png"), "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["differences"] == {LR_KEY: [0.01, 0.003]}
    assert d["labels"] == [f"mlp ({LR_KEY}=0.01)", f"mlp-2 ({LR_KEY}=0.003)"]
    assert d["final"][0]["val_accuracy"] == pytest.approx(variants[2][0].history[-1]["val_accuracy"], rel=1e-5)


def test_compare_refuses_to_overwrite_an_input_and_non_runs(variants, tmp_path, cli):
    a, b = variants[2][0].run_dir, variants[2][1].run_dir
    before = (a / "curves.png").read_bytes()
    code, _, err = cli("compare", str(a), str(b), "-o", str(a / "curves.png"))
    assert code == 2 and "refused" in err, err
    assert (a / "curves.png").read_bytes() == before
    (tmp_path / "plain").mkdir()
    code, _, err = cli("compare", str(a), str(tmp_path / "plain"), "-o", str(tmp_path / "z.png"))
    assert code == 2 and "is not an nnctl run folder" in err
    code, _, err = cli("compare", str(a), "-o", str(tmp_path / "z.png"))
    assert code == 2 and "two run folders" in err
    assert not (tmp_path / "z.png").exists()


# --- 5: TensorBoard ------------------------------------------------------------------------------------

def _accumulator(run: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    return ea


def test_tensorboard_holds_every_epochs_scalars_the_graph_and_the_hparams(variants, tmp_path):
    pytest.importorskip("tensorboard")
    import numpy as np
    from tensorboard.plugins.hparams import plugin_data_pb2

    cfg = variants[1]
    result = R.train(str(cfg), overrides=[f"{LR_KEY}=0.01", "train.log=[csv,tensorboard]"], out=str(tmp_path / "tb"))
    ea = _accumulator(result.run_dir)
    assert ea.Tags()["graph"]
    for key in ("train_loss", "val_loss", "val_accuracy", "lr"):
        events = ea.Scalars(key)
        assert [e.step for e in events] == [1, 2], key
        assert [e.value for e in events] == [np.float32(r[key]) for r in result.history], key
    assert [e.value for e in ea.Scalars(f"best/{result.best['metric']}")] == [np.float32(result.best["value"])]
    content = ea.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start.session_start_info.hparams[LR_KEY].number_value == 0.01
    assert start.session_start_info.hparams["train.epochs"].number_value == 2
    end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"])
    assert end.session_end_info.status == 1  # STATUS_SUCCESS
    # logging changes nothing in the training: the same losses as the run without TensorBoard
    plain = variants[2][0]
    assert [r["train_loss"] for r in result.history] == [r["train_loss"] for r in plain.history]


def test_tensorboard_without_the_package_fails_before_anything_is_written(variants, tmp_path):
    script = ("import sys\nsys.modules['tensorboard'] = None\nsys.argv = ['nnctl'] + sys.argv[1:]\n"
              "from nnctl.cli.app import main\nmain()\n")
    r = subprocess.run([sys.executable, "-c", script, "train", str(variants[1]), "--set", "train.log=[tensorboard]"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert ("--set train.log=[tensorboard]: train.log: tensorboard needs the tensorboard package: "
            "pip install 'nnctl[tensorboard]'") in r.stderr
    assert "Traceback" not in r.stderr and list(tmp_path.iterdir()) == []


def test_a_resumed_logger_drops_what_came_after_the_checkpoint(variants, tmp_path):
    """purge_step: events an interrupted process logged after its checkpoint's epoch are dropped."""
    pytest.importorskip("tensorboard")
    from types import SimpleNamespace

    from nnctl.config import loader as C
    from nnctl.runs import tensorboard as TB

    cfg, _ = C.load(str(variants[1]))
    for continuing, resume_epoch, epochs in ((False, 0, (1, 2, 3)), (True, 1, (2, 3, 4))):
        log = TB.TensorBoardLogger(tmp_path, cfg, None, "cpu", continuing=continuing, resume_epoch=resume_epoch)
        for e in epochs:
            log.on_event(SimpleNamespace(kind="epoch_end", epoch=e - 1, row={"epoch": e, "train_loss": 10.0 * continuing + e},
                                         message=""))
        log.end("interrupted" if not continuing else "finished")
    events = _accumulator(tmp_path).Scalars("train_loss")
    assert [(e.step, e.value) for e in events] == [(1, 1.0), (2, 12.0), (3, 13.0), (4, 14.0)]


# --- 6: interrupt, then resume: one record, no duplicated epochs -----------------------------------------

def test_interrupt_then_resume_appends_to_the_record_and_the_events(variants, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    args = [sys.executable, "-m", "nnctl", "train", str(variants[1]), "--epochs", "400", "--set",
            "train.log=[csv,tensorboard]", "--out", str(run)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.time() + 120
    while not (run / "metrics.csv").exists():  # epoch 1 is saved
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted" and status["error"]["type"] == "Interrupted"
    done = status["epochs_done"]
    assert 1 <= done < 400
    (info,) = RS.list_runs(tmp_path)
    assert info.state == "interrupted"
    result = R.train(resume=str(run), epochs=done + 2)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["epochs_done"] == done + 2 and status["error"] is None
    assert [r["epoch"] for r in status["resumes"]] == [done] and status["epochs_total"] == done + 2
    assert status["started_at"] < status["resumes"][0]["at"]
    epochs = [r["epoch"] for r in MET.read_metrics(run)]
    assert epochs == list(range(1, done + 3))
    ea = _accumulator(run)
    for key in ("train_loss", "val_accuracy"):
        assert [e.step for e in ea.Scalars(key)] == epochs, key
    assert ea.Scalars("train_loss")[-1].value == pytest.approx(result.history[-1]["train_loss"], rel=1e-6)


# --- regressions: a damaged status.json / metrics.csv, markup in names, --resume onto odd run files ---

BAD_STATUS = [
    {"epochs_done": "three"},
    {"best": "val"},
    {"best": {"metric": {"a": 1}, "value": "x"}},
    {"wall_seconds": float("inf")},
    {"epochs_done": 10**400, "epochs_total": 10**400},
    {"wall_seconds": 1e308, "parameters": {"total": 1e308, "trainable": 1}},
    {"best": {"metric": "val_accuracy", "mode": "max", "value": 1e308, "epoch": 1}},
    {"state": ["x"], "started_at": 5, "last": {"epoch": 1e300}, "overrides": 7, "error": "boom"},
]


@pytest.mark.parametrize("bad", BAD_STATUS, ids=range(len(BAD_STATUS)))
def test_a_malformed_status_field_is_dropped_and_noted_never_fatal(variants, tmp_path, cli, bad):
    run = shutil.copytree(variants[2][0].run_dir, tmp_path / "runs" / "bad")
    shutil.copytree(variants[2][1].run_dir, tmp_path / "runs" / "good")
    status = json.loads((run / "status.json").read_text())
    status.update(bad)
    (run / "status.json").write_text(json.dumps(status))  # Infinity, 10**400: as json.dumps writes them
    info = RS.read_run(run)
    assert sorted(n.split()[-1] for n in info.notes) == sorted(bad)
    assert all(n.startswith("status.json unreadable field ") for n in info.notes)
    assert info.epochs_done == 2 and info.state == "finished"  # from the rest of the record, or the files
    assert info.best is None or isinstance(info.best["value"], float) and abs(info.best["value"]) <= 1
    code, out, err = cli("runs", str(tmp_path / "runs"))
    assert code == 0, err
    assert f"bad: status.json unreadable field {sorted(bad)[0]}" in out
    code, out, err = cli("runs", str(tmp_path / "runs"), "--json")
    assert code == 0, err
    code, out, err = cli("compare", str(run), str(tmp_path / "runs" / "good"), "-o", str(tmp_path / "c.png"))
    assert code == 0, err
    assert max(len(line) for line in out.splitlines()) < 200


def test_metrics_rows_with_absurd_epochs_are_skipped(variants, tmp_path, cli):
    run = shutil.copytree(variants[2][0].run_dir, tmp_path / "a")
    lines = (run / "metrics.csv").read_text().splitlines()
    cols = lines[0].split(",")
    bad = [",".join("1e300" if c == "epoch" else v for c, v in zip(cols, lines[1].split(","))),
           ",".join("x" if c == "epoch" else v for c, v in zip(cols, lines[1].split(",")))]
    (run / "metrics.csv").write_text("\n".join(lines + bad) + "\n")
    assert [r["epoch"] for r in MET.read_metrics(run)] == [1, 2]
    code, _, err = cli("compare", str(run), str(variants[2][1].run_dir), "-o", str(tmp_path / "c.png"))
    assert code == 0, err


def test_markup_in_run_folder_names_is_shown_as_named(variants, tmp_path, cli):
    shutil.copytree(variants[2][0].run_dir, tmp_path / "runs" / "lr[bold]0.1")
    b = shutil.copytree(variants[2][1].run_dir, tmp_path / "runs" / "x[red]y")
    code, out, err = cli("runs", str(tmp_path / "runs"))
    assert code == 0, err
    assert "lr[bold]0.1" in out and "x[red]y" in out
    code, out, err = cli("compare", str(tmp_path / "runs" / "lr[bold]0.1"), str(b), "-o", str(tmp_path / "c.png"))
    assert code == 0, err
    assert "lr[bold]0.1" in out and "x[red]y" in out


def test_train_out_with_markup_in_its_name_finishes_cleanly(tmp_path):
    cfg = write(tmp_path, make(train={"epochs": 1}))
    proc = subprocess.run([sys.executable, "-m", "nnctl", "train", str(cfg), "--epochs", "1", "--out", "X/new[/]"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, COLUMNS="200"))
    assert proc.returncode == 0, proc.stderr
    assert "X/new[/]" in proc.stdout and (tmp_path / "X" / "new[/]" / "last.pt").exists()


def _odd(path: Path, kind: str, target: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "symlink":
        path.symlink_to(target)
    else:
        path.write_text("x")


@pytest.mark.parametrize("name,kind", [("status.json", "fifo"), ("metrics.csv", "folder"),
                                       ("config.yaml", "symlink"), ("tensorboard", "symlink"),
                                       ("tensorboard", "file")])
def test_resume_onto_run_files_that_are_not_regular_is_refused_up_front(variants, tmp_path, name, kind):
    from nnctl.errors import UsageError

    run = shutil.copytree(variants[2][0].run_dir, tmp_path / "run")
    target = tmp_path / "elsewhere"
    if name == "tensorboard":
        target.mkdir()
    else:
        target.write_text("keep")
    _odd(run / name, kind, target)
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file() and not p.is_symlink()}
    with pytest.raises(UsageError, match=name.replace(".", r"\.")):
        R.train(resume=str(run), epochs=3)
    after = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file() and not p.is_symlink()}
    assert after == before
    assert not RD.RunDir(run).is_locked()
    if name != "tensorboard":
        assert target.read_text() == "keep"


def test_resume_with_more_epochs_rewrites_config_yaml(variants, tmp_path):
    import yaml

    run = shutil.copytree(variants[2][0].run_dir, tmp_path / "run")
    R.train(resume=str(run), epochs=3)
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 3
    info = RS.read_run(run)
    assert info.epochs_done == 3 and info.epochs_total == 3 and info.notes == []
