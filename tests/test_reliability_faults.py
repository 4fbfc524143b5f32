"""Reliability, faults and races: disk full, read-only folders, non-finite loss, two processes
on one run folder, SIGKILL (also inside a checkpoint write), SIGTERM and SIGINT, each followed
by a bit-identical resume.

The long loops are marked `slow` (python -m pytest -m slow -q tests/test_reliability_faults.py).
Set NNCTL_RELIABILITY_REPORT=path.json to add this module's counts to that file.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from nnctl.runs import checkpoint as K
from nnctl.config import loader as C
from nnctl.data import loading as D
from nnctl.model import plan as M
from nnctl.training import trainer as T
from nnctl.training import policy as POL
from nnctl.errors import CheckpointError, NnctlError

from .conftest import add_to_reliability_report, helper_command, make, run_cli, write

CPU = torch.device("cpu")

# figures for docs/reliability.md: counted as the tests run, written at the module's end
STATS: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    add_to_reliability_report(STATS)


def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path):
    target = tmp_path / "last.pt"
    r = subprocess.run(helper_command("save_when_disk_full", str(target)), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("ERROR WriteError True True could not write checkpoint"), lines
    assert "File too large" in lines[0] and "previous checkpoint is intact" in lines[0]
    assert lines[1].startswith("EXPORT-ERROR could not write") and "File too large" in lines[1], lines
    state = K.load(target)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left behind
    STATS["faults_disk_full"] += 2


def test_disk_full_during_training_is_a_clear_error(tmp_path):
    """The whole CLI under a 64 KiB file-size limit: exit 1, one line, no traceback, nothing half-written."""
    d = make(model={"input_shape": [1, 8, 8], "layers": ["Flatten", {"Linear": {"out_features": 512}},
                                                         "ReLU", {"Linear": {"out_features": 10}}]})
    p = write(tmp_path, d)
    r = subprocess.run(helper_command("nnctl_with_file_size_limit", "65536", "train", str(p), "--out",
                                      str(tmp_path / "run")),
                       capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    assert "could not write checkpoint" in r.stderr and "File too large" in r.stderr, r.stderr
    # a run that failed before its first checkpoint keeps only its record (config.yaml, status.json: failed,
    # reused by the next run); nothing half-written stays
    assert sorted(os.listdir(tmp_path / "run")) == ["config.yaml", "status.json"]
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and "File too large" in status["error"]["message"], status
    STATS["faults_disk_full"] += 1


def _can_make_read_only(path: Path) -> str | None:
    """Make a folder read-only for this process: chmod (not root) or chattr +i (root). None if impossible."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return "chmod"
    if shutil.which("chattr"):
        r = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
        if r.returncode == 0:
            try:
                (path / ".probe").write_bytes(b"")
            except OSError:
                return "chattr"
            (path / ".probe").unlink()
            subprocess.run(["chattr", "-i", str(path)])
    return None


def _undo_read_only(path: Path, how: str | None) -> None:
    if how == "chmod":
        path.chmod(0o755)
    elif how == "chattr":
        subprocess.run(["chattr", "-i", str(path)])


@pytest.fixture
def read_only_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    torch.save({}, ro / "placeholder")  # a folder with something in it
    K.save(ro / "last.pt", {"config": {}, "model": {"w": torch.ones(3)}, "epoch": 1})
    how = _can_make_read_only(ro)
    if how is None:
        pytest.skip("running as root without a working chattr: chmod cannot make a folder read-only here "
                    "(the path-under-a-file case below still runs)")
    try:
        yield ro
    finally:
        _undo_read_only(ro, how)


def test_save_into_read_only_folder_keeps_previous(read_only_dir):
    with pytest.raises(NnctlError, match="could not write checkpoint .*the previous checkpoint is intact"):
        K.save(read_only_dir / "last.pt", {"config": {}, "model": {"w": torch.zeros(3)}, "epoch": 2})
    state = K.load(read_only_dir / "last.pt")
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert not [f for f in os.listdir(read_only_dir) if ".tmp-" in f]
    STATS["faults_read_only"] += 1


def test_train_into_read_only_folder_refused_before_training(read_only_dir, tmp_path, cli):
    p = write(tmp_path, make())
    code, out, err = cli("train", str(p), "--out", str(read_only_dir / "run"))
    assert code == 2 and "cannot write to the run folder" in err, err
    assert "epoch" not in out and "data:" not in out  # refused before any data or training
    STATS["faults_read_only"] += 1


def test_train_out_under_a_file_refused_before_training(tmp_path, cli):
    """Works as root too: a run folder below a regular file cannot exist."""
    p = write(tmp_path, make())
    (tmp_path / "afile").write_text("x")
    for out_dir in (tmp_path / "afile", tmp_path / "afile" / "run"):
        code, out, err = cli("train", str(p), "--out", str(out_dir))
        assert code == 2, err
        assert "not a folder" in err or "cannot write to the run folder" in err, err
        assert "epoch" not in out and "data:" not in out
    STATS["faults_read_only"] += 2


def test_non_finite_loss_from_the_start_writes_no_checkpoint(tmp_path):
    import numpy as np

    x = np.ones((32, 4), dtype="float32")
    x[5, 1] = 1e30  # finite data (NaN or inf is refused at load now) whose loss overflows in training
    np.savez(tmp_path / "t.npz", x=x, y=np.zeros((32, 1), dtype="float32"))
    d = make(model={"input_shape": [4], "layers": [{"Linear": {"out_features": 1}}]},
             data={"source": "tensors", "path": str(tmp_path / "t.npz"), "val_fraction": 0.0},
             train={"loss": "mse", "epochs": 2, "batch_size": 8})
    cfg, doc = C.from_dict(d)
    model, _ = M.build(cfg, doc)
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(POL.NonFiniteLoss, match="non-finite at epoch 1, step .*No checkpoint was written"):
        T.fit(cfg, model, D.load_data(cfg, CPU), CPU, run)
    assert not (run / "last.pt").exists() and not (run / "best.pt").exists()
    STATS["faults_non_finite"] += 1


# --- real processes: locks and kills --------------------------------------------------

KILL_DATA = {"source": "synthetic", "size": 3000, "classes": 10, "val_fraction": 0.1}
KILL_MODEL = {"input_shape": [1, 16, 16], "layers": [
    {"Conv2d": {"out_channels": 16, "kernel_size": 3, "padding": 1}}, "ReLU", {"Dropout2d": 0.1}, "Flatten",
    {"Linear": {"out_features": 10}}]}


def _popen(command: list[str], cwd, env_extra=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.update(env_extra or {})
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)


def _nnctl(*args: str) -> list[str]:
    return [sys.executable, "-m", "nnctl", *args]


def _wait(cond, proc, timeout=120):
    began = time.time()
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the process ended early ({proc.returncode}): {err[-2000:]}")
        assert time.time() - began < timeout, "timed out"
        time.sleep(0.02)


def test_second_process_on_a_running_folder_refused(tmp_path, cli):
    d = make(train={"epochs": 100_000})  # digits: an epoch is a fraction of a second, the run goes on
    p = write(tmp_path, d)
    run = tmp_path / "run"
    proc = _popen(_nnctl("train", str(p), "--out", str(run)), tmp_path)
    try:
        _wait(lambda: (run / "last.pt").exists(), proc)
        before = (run / "config.yaml").read_bytes()
        code, out, err = cli("train", "--resume", str(run))
        assert code == 2 and "another nnctl process" in err, (code, out, err)
        code, out, err = cli("train", str(p), "--resume", str(run))
        assert code == 2 and "another nnctl process" in err, (code, out, err)
        code, out, err = cli("train", str(p), "--out", str(run))  # a new run into it: refused as well
        assert code == 2 and "another nnctl process" in err, err  # the lock is taken first
        assert (run / "config.yaml").read_bytes() == before
        assert proc.poll() is None  # the first run was not disturbed
        STATS["faults_two_processes_refused"] += 3
    finally:
        proc.kill()
        proc.communicate()


def _straight(tmp_path: Path, d: dict) -> dict:
    """The weights after an uninterrupted run of d: what every interrupted run must end with."""
    p = write(tmp_path, d, "straight.yaml")
    r = run_cli("train", str(p), "--out", str(tmp_path / "straight"))
    assert r.returncode == 0, r.stderr  # a precondition: the reference run itself trains
    return K.load(tmp_path / "straight" / "last.pt")["model"]


def _differing_weights(a: dict, b: dict) -> list[str]:
    """The keys whose tensors differ (or exist in one state only)."""
    return sorted(set(a) ^ set(b)) + [k for k in a if k in b and not torch.equal(a[k], b[k])]


def _finished(run: Path, epochs: int) -> bool:
    if not (run / "last.pt").exists():
        return False
    state = K.load(run / "last.pt")
    return state["epoch"] >= epochs and not state.get("step_in_epoch")


def _kill_config(epochs: int, size: int) -> dict:
    return make(model=KILL_MODEL, data=dict(KILL_DATA, size=size),
                train={"epochs": epochs, "batch_size": 16, "scheduler": {"StepLR": {"step_size": 1, "gamma": 0.8}}})


@dataclass
class Kills:
    done: int = 0  # kills done
    in_writes: int = 0  # of which inside a checkpoint write
    unreadable: str | None = None  # the CheckpointError of a last.pt that did not load after a kill


def kill_loop(tmp_path: Path, d: dict, run: Path, kills: int, seed: int, in_write_every: int = 2) -> Kills:
    """Train d into run with SIGKILLs at random moments, every in_write_every-th one inside a checkpoint
    write (the k-th .pt write, k random), resuming after each; load last.pt after each kill. Stops after
    `kills` kills, when the run has finished, or at the first last.pt that does not load."""
    epochs = d["train"]["epochs"]
    rng = random.Random(seed)
    p = write(tmp_path, d)
    result = Kills()
    attempt = 0
    while result.done < kills and not _finished(run, epochs):
        fresh = not (run / "last.pt").exists()
        if fresh and run.exists():
            shutil.rmtree(run)  # killed before its first checkpoint: nothing to resume, start again
        args = [str(p), "--out", str(run)] if fresh else ["--resume", str(run)]
        in_write = attempt % in_write_every == in_write_every - 1
        attempt += 1
        mark = tmp_path / f"mark{attempt}"
        if in_write:
            # a fresh run's first .pt write is best.pt before any last.pt exists: kill at the 2nd or later
            env = {"NNCTL_TEST_KILL_AT_WRITE": str(rng.randint(2 if fresh else 1, 3)), "NNCTL_TEST_MARK": str(mark)}
            proc = _popen(helper_command("nnctl_halt_in_write", "train", *args), tmp_path, env)
        else:
            proc = _popen(_nnctl("train", *args), tmp_path)
        try:
            if in_write:
                _wait(mark.exists, proc, timeout=300)
            else:
                if fresh:
                    _wait(lambda: (run / "last.pt").exists(), proc, timeout=300)
                time.sleep(rng.uniform(0.2, 4.0))  # anywhere: start-up, a step, validation, a write
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.communicate(timeout=60)
                result.done += 1
                result.in_writes += in_write
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        if (run / "last.pt").exists():
            try:
                K.load(run / "last.pt")
            except CheckpointError as exc:
                result.unreadable = str(exc)
                return result
    return result


@pytest.mark.slow  # a kill/resume loop: .ci/run runs the slow group
def test_sigkill_inside_a_checkpoint_write_then_resume_is_bit_identical(tmp_path):
    """A kill inside a real training's checkpoint write (the CLI, not just save()); resume is exact."""
    d = _kill_config(epochs=3, size=1500)
    want = _straight(tmp_path, d)
    run = tmp_path / "cut"
    kills = kill_loop(tmp_path, d, run, 1, seed=0, in_write_every=1)
    assert kills.unreadable is None, kills.unreadable  # whatever the moment of the kill, last.pt is whole
    if not _finished(run, 3):
        r = run_cli("train", "--resume", str(run))
        assert r.returncode == 0, r.stderr
    assert _differing_weights(want, K.load(run / "last.pt")["model"]) == []
    assert kills.done == 1 and kills.in_writes == 1, kills
    STATS["faults_sigkill_resumed_identical"] += kills.done
    STATS["faults_sigkill_in_write"] += kills.in_writes


@pytest.mark.slow
def test_random_sigkills_then_resume_is_bit_identical(tmp_path):
    n = int(os.environ.get("NNCTL_KILLS", "10"))
    d = _kill_config(epochs=5, size=6000)
    want = _straight(tmp_path, d)
    run = tmp_path / "cut"
    kills = kill_loop(tmp_path, d, run, n, seed=int(os.environ.get("NNCTL_KILL_SEED", "1")), in_write_every=2)
    assert kills.unreadable is None, kills.unreadable  # whatever the moment of a kill, last.pt is whole
    if not _finished(run, 5):
        r = run_cli("train", "--resume", str(run))
        assert r.returncode == 0, r.stderr
    assert _differing_weights(want, K.load(run / "last.pt")["model"]) == []
    assert kills.done >= n - 2, (kills, n)
    STATS["faults_sigkill_resumed_identical"] += kills.done
    STATS["faults_sigkill_in_write"] += kills.in_writes


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_repeated_sigterm_sigint_then_resume_is_bit_identical(sig, code, tmp_path):
    d = make(model=KILL_MODEL, data=dict(KILL_DATA, size=6000), train={"epochs": 4, "batch_size": 4})
    want = _straight(tmp_path, d)
    p = write(tmp_path, d)
    run = tmp_path / "cut"
    rng = random.Random(int(sig))
    stopped = 0
    for i in range(3):
        if _finished(run, 4):
            break
        args = [str(p), "--out", str(run)] if i == 0 else ["--resume", str(run)]
        proc = _popen(_nnctl("train", *args), tmp_path)
        try:
            if i == 0:
                _wait(lambda: (run / "last.pt").exists(), proc, timeout=180)
            else:
                _wait(lambda: (run / ".lock").exists(), proc, timeout=180)  # the resumed run holds its lock
            time.sleep(rng.uniform(0.1, 0.5) if i == 0 else rng.uniform(0.5, 1.0))
            if proc.poll() is not None:
                break
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        # -sig: the signal came during start-up, before the training loop installs its handler
        # (nothing to save then; the resume below still has to be exact). See docs/reliability.md.
        assert proc.returncode in (code, -int(sig), 0), err
        assert "Traceback" not in err
        if proc.returncode == code and "saved" in err:
            stopped += 1  # stopped at a step boundary with a mid-epoch checkpoint
        # else: the signal came in start-up or after the last epoch (plotting): nothing to save
        STATS[f"faults_signal_exit_{proc.returncode}"] += 1
    assert stopped >= 1, stopped
    STATS["faults_signal_resumed_identical"] += stopped
    if not _finished(run, 4):
        r = run_cli("train", "--resume", str(run))
        assert r.returncode == 0, r.stderr
    assert _differing_weights(want, K.load(run / "last.pt")["model"]) == []
