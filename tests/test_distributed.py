"""DistributedDataParallel through torch.distributed.run: 2 CPU processes with gloo."""

from __future__ import annotations

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

from .conftest import make, run_cli, write

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")

# no dropout: a 2-process run and a 1-process run with the same global batch compute the same mean gradients
MODEL = {"input_shape": [1, 8, 8], "layers": ["Flatten", {"Linear": {"out_features": 32}}, "ReLU",
                                               {"Linear": {"out_features": 10}}]}
TRAIN = {"epochs": 3, "batch_size": 64, "optimizer": {"SGD": {"lr": 0.1, "momentum": 0.9}}}
TOL = 1e-5  # float sums in another order (gradient all-reduce): rounding only


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.slow  # torchrun with two ranks (about 20 s each on 2 cores): .ci/run runs the slow group
def test_two_processes_match_one_and_only_rank0_writes(tmp_path):
    p = write(tmp_path, make(model=MODEL, train=TRAIN))
    one = run_cli("train", str(p), "--out", str(tmp_path / "one"), cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = run_cli("train", str(p), "--nproc-per-node", "2", cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    assert "2 processes (DistributedDataParallel, gloo)" in two.stdout
    assert two.stdout.count("epoch 3/3") == 1  # one rank logs
    runs = sorted(os.listdir(tmp_path / "runs"))
    assert runs == ["t"]  # one run folder
    files = sorted(f for f in os.listdir(tmp_path / "runs" / "t") if not f.startswith("."))
    assert files == ["best.pt", "config.yaml", "curves.png", "last.pt", "metrics.csv", "status.json"]
    status = json.loads((tmp_path / "runs" / "t" / "status.json").read_text())  # rank 0's record
    assert status["state"] == "finished" and status["epochs_done"] == 3
    a = K.load(tmp_path / "one" / "last.pt")
    b = K.load(tmp_path / "runs" / "t" / "last.pt")
    assert b["world_size"] == 2 and len(b["rng_ranks"]) == 2
    assert max_diff(a["model"], b["model"]) < TOL
    # validation metrics are reduced over both ranks' shards: the same 360 samples
    assert abs(a["history"][-1]["val_loss"] - b["history"][-1]["val_loss"]) < 1e-4
    assert a["history"][-1]["val_accuracy"] == pytest.approx(b["history"][-1]["val_accuracy"], abs=1 / 360)


@pytest.mark.slow  # five real runs, two of them 2-process: .ci/run runs the slow group
def test_resume_across_process_counts(tmp_path):
    p = write(tmp_path, make(model=MODEL, train=TRAIN))
    straight = run_cli("train", str(p), "--out", str(tmp_path / "straight"), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    ref = K.load(tmp_path / "straight" / "last.pt")["model"]
    # 2 processes, then 1
    r = run_cli("train", str(p), "--nproc-per-node", "2", "--epochs", "1", "--out", str(tmp_path / "a"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("train", "--resume", str(tmp_path / "a"), "--epochs", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert max_diff(ref, K.load(tmp_path / "a" / "last.pt")["model"]) < TOL
    # 1 process, then 2
    r = run_cli("train", str(p), "--epochs", "1", "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("train", "--resume", str(tmp_path / "b"), "--epochs", "3", "--nproc-per-node", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    state = K.load(tmp_path / "b" / "last.pt")
    assert state["epoch"] == 3 and max_diff(ref, state["model"]) < TOL


@pytest.mark.slow  # torchrun with two ranks (about 20 s each on 2 cores): .ci/run runs the slow group
def test_frozen_children_under_ddp(tmp_path):
    d = make(model=MODEL, train=TRAIN)
    d["freeze"] = {"first": 2}
    p = write(tmp_path, d)
    r = run_cli("freeze", str(p), "-o", str(tmp_path / "init.pt"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("train", str(p), "--nproc-per-node", "2", "--init", str(tmp_path / "init.pt"),
                "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    start = K.load(tmp_path / "init.pt")["model"]
    end = K.load(tmp_path / "run" / "last.pt")["model"]
    assert torch.equal(start["1.weight"], end["1.weight"]) and torch.equal(start["1.bias"], end["1.bias"])
    assert not torch.equal(start["3.weight"], end["3.weight"])


SLOW = make(model={"input_shape": [1, 16, 16], "layers": [
    {"Conv2d": {"out_channels": 16, "kernel_size": 3, "padding": 1}}, "ReLU", "Flatten",
    {"Linear": {"out_features": 10}}]},
    data={"source": "synthetic", "size": 6000, "classes": 10, "val_fraction": 0.1},
    train={"epochs": 3, "batch_size": 16})


def _workers(pid: int) -> list[int]:
    """Descendant processes of pid that run `nnctl train` (the torchrun workers)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and ("nnctl" in cmd or "multiprocessing" in cmd or "python" in cmd):
            out.append(int(entry))
            out += _workers(int(entry))
    return out


def _start(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "nnctl", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _kill_one_worker_after_first_epoch(proc, run: Path):
    began = time.time()
    while not (run / "last.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - began < 120
        time.sleep(0.05)
    time.sleep(0.5)
    victims = [w for w in _workers(proc.pid) if "-m nnctl train" in Path(f"/proc/{w}/cmdline").read_bytes()
               .replace(b"\0", b" ").decode()]
    assert victims, "no worker found"
    os.kill(victims[-1], signal.SIGKILL)


@pytest.mark.slow  # a worker killed in a real 2-process run: .ci/run runs the slow group
def test_killed_rank_ends_the_run_with_clear_error(tmp_path):
    p = write(tmp_path, SLOW)
    proc = _start(["train", str(p), "--nproc-per-node", "2", "--out", str(tmp_path / "run")], tmp_path)
    _kill_one_worker_after_first_epoch(proc, tmp_path / "run")
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err
    assert "distributed training failed" in err and "Traceback" not in err.split("distributed training failed")[1]
    state = K.load(tmp_path / "run" / "last.pt")  # the last checkpoint stays loadable
    assert state["epoch"] >= 1


@pytest.mark.slow  # a worker killed, the 2-process run restarted and resumed: .ci/run runs the slow group
def test_max_restarts_resumes_from_last_checkpoint(tmp_path):
    p = write(tmp_path, SLOW)
    proc = _start(["train", str(p), "--nproc-per-node", "2", "--max-restarts", "1", "--out", str(tmp_path / "run")],
                  tmp_path)
    _kill_one_worker_after_first_epoch(proc, tmp_path / "run")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "resuming from epoch" in out
    state = K.load(tmp_path / "run" / "last.pt")
    assert state["epoch"] == 3 and [r["epoch"] for r in state["history"]] == [1, 2, 3]
