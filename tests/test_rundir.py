"""RunDir owns the run folder (its names, "is this a run", the lock); nnctl.locks is the one lock helper;
nnctl.seeds the one seed rule."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import nnctl
from nnctl import locks, seeds
from nnctl.config import loader as C
from nnctl.data import cache as K
from nnctl.data import loading as D
from nnctl.errors import UsageError
from nnctl.files import check_output
from nnctl.runs.claim import claim_new
from nnctl.runs.rundir import RUN_FILES, RunDir, RunLock

from .conftest import make, run_cli, write

HAS_TENSORBOARD = True
try:
    import tensorboard  # noqa: F401
except ImportError:
    HAS_TENSORBOARD = False


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunDir:
    """One epoch of the digits config with a tiny model through nnctl.train (every file nnctl writes)."""
    out = tmp_path_factory.mktemp("rundir") / "run"
    train = {"epochs": 1, "checkpoint": {"every": 1}, "log": ["csv", "tensorboard"] if HAS_TENSORBOARD else ["csv"]}
    result = nnctl.train(make(train=train), out=str(out))
    assert result.run_dir == out
    return RunDir(out)


def _message(folder, pid: int) -> str:
    return (f"{folder}: another nnctl process (pid {pid}) is training in this run folder; "
            "wait for it, or stop it first")


# --- the names are the files a real run writes -------------------------------------------------------

def test_rundir_names_are_the_files_a_real_run_writes(run):
    written = {p.name for p in run.path.iterdir()}
    named = [run.config, run.last, run.best, run.epoch(1), run.metrics, run.curves, run.status]
    if HAS_TENSORBOARD:
        named.append(run.tensorboard)
    assert written == {p.name for p in named}
    assert all(p.parent == run.path for p in named)
    assert run.checkpoint("last") == run.last and run.checkpoint("best") == run.best
    with pytest.raises(ValueError, match="'last' or 'best', not 'epoch'"):
        run.checkpoint("epoch")
    assert run.epoch_checkpoints() == [(1, run.epoch(1))]
    assert torch.load(run.epoch(1), weights_only=True)["epoch"] == 1
    assert torch.load(run.last, weights_only=True)["epoch"] == 1
    assert json.loads(run.status.read_text())["state"] == "finished"
    assert run.metrics.read_text().splitlines()[0].startswith("epoch,")
    assert run.curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "digits" in run.config.read_text()
    if HAS_TENSORBOARD:
        assert run.tensorboard.is_dir() and any(run.tensorboard.iterdir())
    assert all(RunDir.is_own_file(name) for name in written)
    assert not run.lock_file.exists() and not run.is_locked()  # released and removed at the end
    # nnctl export without -o writes into RunDir.export_dir, which is not a file nnctl keeps
    exported = nnctl.export(run.path)
    assert Path(exported.path) == run.export_dir / "best.safetensors" and Path(exported.path).is_file()
    assert not RunDir.is_own_file(run.export_dir.name)
    shutil.rmtree(run.export_dir)


def test_the_names_on_disk_stay_byte_identical():
    r = RunDir("x")
    assert [p.name for p in (r.config, r.last, r.best, r.metrics, r.curves, r.status, r.lock_file,
                             r.tensorboard, r.export_dir, r.epoch(12), r.mlruns, r.mlflow)] == \
        ["config.yaml", "last.pt", "best.pt", "metrics.csv", "curves.png", "status.json", ".lock", "tensorboard",
         "export", "epoch-12.pt", "mlruns", "mlflow.json"]
    assert set(RUN_FILES) == {"last.pt", "best.pt", "config.yaml", "metrics.csv", "curves.png", ".lock",
                              "status.json", "tensorboard", "mlruns", "mlflow.json"}
    for name in ("epoch-0.pt", "epoch-12.pt", *RUN_FILES):
        assert RunDir.is_own_file(name), name
    for name in ("epoch-.pt", "epoch-1.pth", "epoch-x.pt", "epoch-\u0663.pt", "export", "notes.txt", "last.pt.bak"):
        assert not RunDir.is_own_file(name), name


# --- one rule for "is this a run" ---------------------------------------------------------------------

def test_is_run_on_a_run_an_empty_folder_and_user_files(run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    user = tmp_path / "user"
    user.mkdir()
    for name in ("metrics.csv", "curves.png", "notes.txt"):  # user files, two of them named like nnctl's
        (user / name).write_text("mine")
    (user / "tensorboard").mkdir()
    (user / ".lock").write_text("")  # a lock alone is not a run: a claimer holds one before it is
    assert run.is_run()
    assert not RunDir(empty).is_run() and not RunDir(user).is_run()
    assert not RunDir(tmp_path / "missing").is_run() and not RunDir(user / "notes.txt").is_run()
    for mark in ("config.yaml", "last.pt", "best.pt", "status.json"):  # each one alone makes a run
        one = tmp_path / f"only-{mark}"
        one.mkdir()
        (one / mark).write_text("")
        assert RunDir(one).is_run(), mark

    # the same rule everywhere: nnctl runs, nnctl compare, -o over a run's file, --out onto a folder
    shutil.copytree(run.path, tmp_path / "r")
    assert sorted(info.name for info in nnctl.list_runs(tmp_path)) == ["only-best.pt", "only-config.yaml",
                                                                       "only-last.pt", "only-status.json", "r"]
    with pytest.raises(UsageError, match=re.escape(f"{user}: is not an nnctl run folder")):
        nnctl.compare([tmp_path / "r", user])
    with pytest.raises(UsageError, match="is a file nnctl keeps in the run folder"):
        check_output(tmp_path / "r" / "curves.png")
    assert check_output(user / "curves.png") == user / "curves.png"  # not a run: the user's own file
    with pytest.raises(UsageError, match=r"is not empty and is not an nnctl run folder \(it holds 'curves.png'\)"):
        claim_new("t", out=user)
    assert (user / "metrics.csv").read_text() == "mine"
    claim = claim_new("t", out=empty)  # an empty folder is claimed, and locked
    assert RunDir(empty).is_locked() and not RunDir(empty).is_run()
    claim.release()
    assert not RunDir(empty).is_locked()


# --- the run lock -------------------------------------------------------------------------------------

_HOLDER = ("import sys, time\nfrom nnctl.runs.rundir import RunDir\n"
           "lock = RunDir(sys.argv[1]).lock(); print('held', flush=True); time.sleep(120)\n")


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_cannot_claim_a_locked_run_folder_and_after_kill_9_it_can_at_once(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    cfg = write(tmp_path, make())
    holder = _holder(folder)
    try:
        assert RunDir(folder).lock_file.read_text() == f"{holder.pid}\n"  # the holder's pid, in the lock
        assert RunDir(folder).is_locked()
        r = run_cli("train", str(cfg), "--out", str(folder))  # a second nnctl train: refused at once
        assert r.returncode == 2, r.stderr
        assert _message(folder, holder.pid) in r.stderr
        assert sorted(os.listdir(folder)) == [".lock"]  # nothing written
        with pytest.raises(UsageError) as refused:
            RunDir(folder).lock()
        assert str(refused.value) == _message(folder, holder.pid)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    assert RunDir(folder).lock_file.exists()  # the dead holder's file stays; the kernel dropped its flock
    assert not RunDir(folder).is_locked()
    t0 = time.perf_counter()
    lock = RunDir(folder).lock()  # at once: no stale lock, whatever pid the file names
    took = time.perf_counter() - t0
    assert lock.held and took < 0.5, took
    assert RunDir(folder).lock_file.read_text() == f"{os.getpid()}\n"
    lock.release()
    assert not RunDir(folder).lock_file.exists()


def test_the_run_lock_refuses_odd_lock_files_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / ".lock")  # opening a FIFO for reading would wait for a writer forever
    with pytest.raises(UsageError, match=r"the run lock is not a regular file; refused \(remove it\)"):
        RunLock(fifo).acquire()
    link = tmp_path / "link"
    link.mkdir()
    (tmp_path / "elsewhere").write_text("1\n")
    os.symlink(tmp_path / "elsewhere", link / ".lock")
    with pytest.raises(UsageError, match=r"the run lock is a symbolic link; refused \(remove it\)"):
        RunDir(link).lock()
    assert (tmp_path / "elsewhere").read_text() == "1\n"


def test_is_locked_is_a_shared_probe(tmp_path):
    """A probe holds the lock shared for an instant: another probe at that instant still says 'not locked'."""
    run = RunDir(tmp_path)
    run.lock_file.write_text("")
    fd = os.open(run.lock_file, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # what a concurrent probe holds
        assert not run.is_locked()
    finally:
        os.close(fd)
    with run.lock():
        assert run.is_locked()
    assert not run.is_locked()


def test_a_waiter_locks_the_file_now_at_the_path_after_a_release_that_removes_it(tmp_path):
    path = tmp_path / "x.lock"
    first = locks.FileLock(path)
    assert first.acquire(blocking=False)
    got: dict = {}

    def wait() -> None:
        second = locks.FileLock(path)
        second.acquire()  # blocks until released
        got["ino"] = os.fstat(second.fd).st_ino
        got["path_ino"] = os.stat(path).st_ino
        second.release()

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive() and not got  # waiting
    other = locks.FileLock(path)
    assert not other.acquire(blocking=False)  # a try fails at once
    first.release(remove=True)
    waiter.join(10)
    assert got and got["ino"] == got["path_ino"]  # it holds the file at the path, not the removed one


# --- the cache build waits on the same helper ----------------------------------------------------------

_CACHE_USER = r"""
import hashlib, json, sys, time
import torch
from nnctl.config import loader as C
from nnctl.data import loading as D
cfg = C.from_dict(json.loads(sys.argv[1]))[0]
print("ready", flush=True)
t0 = time.monotonic()
bundle = D.load_data(cfg, torch.device("cpu"))
print(json.dumps({"seconds": time.monotonic() - t0, "notes": bundle.notes,
                  "sha": hashlib.sha256(bundle.train.store.x.numpy().tobytes()).hexdigest()}))
"""


def test_a_second_cache_builder_waits_for_the_lock_then_reuses_the_entry(tmp_path, monkeypatch):
    from PIL import Image

    cache = tmp_path / "cache"
    monkeypatch.setenv("NNCTL_CACHE_DIR", str(cache))
    root = tmp_path / "images"
    g = torch.Generator().manual_seed(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(6):
            pixels = torch.randint(0, 256, (8, 8, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.png")
    d = make(model={"input_shape": [3, 8, 8], "layers": ["Flatten", {"Linear": {"out_features": 2}}]},
             data={"source": "image_folder", "root": str(root), "image_size": [8, 8], "cache": True,
                   "num_workers": 0})
    D.load_data(C.from_dict(d)[0], torch.device("cpu"))  # build the entry once, keep its bytes, remove it
    (entry,) = K.entries()
    data, header = cache / f"{entry.key}.u8", cache / f"{entry.key}.json"
    saved = data.read_bytes(), header.read_bytes()
    K.clear(all=True)
    assert not data.exists() and not header.exists()

    builder = locks.FileLock(cache / f"{entry.key}.lock")
    assert builder.acquire(blocking=False)  # this process is "building" the entry
    proc = subprocess.Popen([sys.executable, "-c", _CACHE_USER, json.dumps(d)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(2.0)
        assert proc.poll() is None  # waiting for the lock (a hit or a decode of 12 images takes milliseconds)
        assert [e.status for e in K.entries()] == ["building"]  # cache info's probe sees the builder
        data.write_bytes(saved[0])  # the "build" completes: data first, the header last
        header.write_bytes(saved[1])
    finally:
        builder.release()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["seconds"] >= 1.5  # it waited
    assert any(n.startswith("using decoded cache") and n.endswith("by another process)") for n in result["notes"]), \
        result["notes"]  # and then reused the entry the holder made: nothing decoded
    assert not any(n.startswith("decoded ") for n in result["notes"]), result["notes"]
    assert [e.status for e in K.entries(verify=True)] == ["valid"]


# --- one seed rule -------------------------------------------------------------------------------------

def _mix_before(*parts: int) -> int:  # the rule as it was written before nnctl.seeds had public names
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p)) & ((1 << 63) - 1)
    return h


def test_the_seed_rules_give_the_numbers_they_always_gave():
    for parts in [(0, 0), (0, 1), (7, 3, 11, 0, 0xA06), (2**62, 5, 9, 1), (-3, 2), (123456789, 7, 0, 3)]:
        assert seeds.derive(*parts) == _mix_before(*parts)
    assert seeds.derive(0, 1) == 1 and seeds.derive(1, 0) == 1_000_003
    for seed, rank, epoch in [(0, 0, 0), (0, 1, 0), (42, 3, 5), (7, 1, 2)]:
        assert seeds.rank_seed(seed, rank, epoch) == seed + 1_000_003 * rank + epoch
    assert seeds.rank_seed(42, 2) == 42 + 2_000_006
