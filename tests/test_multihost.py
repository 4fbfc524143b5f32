"""Several machines (issue 23, item 1): every rank trains the same config and data, two real network hosts
(network namespaces joined by a veth pair), a host killed mid-epoch, --rdzv-timeout."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
import contextlib
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from nnctl.errors import UsageError
from nnctl.runs import checkpoint as K
from nnctl.training import launch as LAUNCH
from nnctl.training import ranks as RANKS
from nnctl.training.distributed import Dist

from .conftest import make, run_cli, write
from .test_distributed import MODEL, SLOW, TOL, TRAIN, max_diff

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")

NODES = (("nodea", "10.77.0.1"), ("nodeb", "10.77.0.2"))  # (host name, address) of each namespace
PORT = 29500


# --- the ranks' agreement, without processes --------------------------------------------------------------

class _Peers(Dist):
    """Rank 0 of a world whose other ranks send what ``peers`` says (a gather returns them after ours)."""

    def __init__(self, *peers):
        super().__init__(0, 1 + len(peers), 0)
        self.peers = list(peers)

    def gather(self, obj):
        return [obj, *(peer(obj) for peer in self.peers)]


def _cfg(**train):
    from nnctl.config import loader as CL

    return CL.from_dict(make(train={"epochs": 3, **train}), "c.yaml")[0]


def test_ranks_that_agree_pass_and_per_host_options_may_differ():
    cfg = _cfg()
    other_host = _cfg(device="cpu", threads=3)  # train.device and threads are this machine's
    RANKS.check_same_run(cfg, _Peers(lambda mine: mine, lambda mine: mine))
    assert RANKS.shared_config(cfg) == RANKS.shared_config(other_host)
    assert "train.epochs" in RANKS.shared_config(cfg) and "train.device" not in RANKS.shared_config(cfg)


def test_another_config_on_one_rank_is_refused_naming_the_rank_and_the_key():
    cfg, five = _cfg(), _cfg(epochs=5)

    def rank2(mine):  # rank 2's config: the digest first, then (a second gather) the config itself
        if "host" in mine:
            return dict(RANKS.identity(five)[0], host="B")
        return RANKS.shared_config(five)

    with pytest.raises(UsageError) as err:
        RANKS.check_same_run(cfg, _Peers(lambda mine: mine, rank2))
    assert "rank 2 (host B) trains another config: train.epochs 5 vs 3 on rank 0" in str(err.value)
    assert "rank 1" not in str(err.value) and err.value.exit_code == 2


def test_other_data_on_one_rank_is_refused_naming_the_rank():
    cfg = _cfg()
    mine = RANKS.identity(cfg)[0]
    fewer = dict(mine, host="B", data=dict(mine["data"], samples=mine["data"]["samples"] - 3, digest="x"))
    with pytest.raises(UsageError) as err:
        RANKS.check_same_run(cfg, _Peers(lambda m: fewer))
    n = mine["data"]["samples"]
    assert f"rank 1's data (host B) differs: {n - 3:,} samples vs {n:,} on rank 0" in str(err.value)


def test_torchrun_arguments_of_several_machines():
    t = LAUNCH.Torchrun(1, "2", 0, "10.0.0.1:29500", "job", 0, 20)
    args = t.args(["c.yaml"])
    conf = args[args.index("--rdzv-conf") + 1]
    assert conf == "join_timeout=20,read_timeout=20,close_timeout=20,is_host=1"
    assert "--node-rank" not in args  # c10d numbers the machines: torchrun would ignore it (with a warning)
    other = LAUNCH.Torchrun(1, "2", 1, "10.0.0.1:29500").args([])
    assert other[other.index("--rdzv-conf") + 1] == "is_host=0"
    assert "--rdzv-conf" not in LAUNCH.Torchrun(2).args([])  # one machine, torchrun's defaults


# --- processes on this machine: two launchers, as two machines would run them --------------------------------

def _pair(tmp_path, first: list[str], second: list[str], port: int, timeout: float = 120):
    """Two `nnctl train --nnodes 2 --nproc-per-node 1` launchers meeting at 127.0.0.1:port."""
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-timeout", "30"]
    procs = [subprocess.Popen([sys.executable, "-m", "nnctl", "train", *args, *common], cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
             for args in (first, second)]
    return [(p, *p.communicate(timeout=timeout)) for p in procs]


@pytest.mark.slow  # two torchrun launchers and their workers (about 15 s on 2 cores): .ci/run runs the slow group
def test_mismatched_config_on_one_machine_is_refused_on_every_rank(tmp_path):
    p = write(tmp_path, make(model=MODEL, train=TRAIN))
    ends = _pair(tmp_path, [str(p), "--out", "run"], [str(p), "--out", "run", "--set", "train.epochs=5"], 29531)
    for proc, out, err in ends:
        assert proc.returncode == 2, err
        # which launcher's worker becomes rank 0 is the rendezvous' choice: either value may be rank 1's
        assert re.search(r"error: the processes of this run do not train the same thing: rank 1 \(host \S+\) "
                         r"trains another config: train\.epochs (5 vs 3|3 vs 5) on rank 0", err), err
        assert "distributed training refused: every worker of this machine exited with 2" in err
        assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before rank 0 claimed a folder: nothing written


@pytest.mark.slow  # two torchrun launchers and their workers (about 15 s on 2 cores): .ci/run runs the slow group
def test_other_data_on_one_machine_is_refused_naming_the_rank(tmp_path):
    g = torch.Generator().manual_seed(0)
    for name, n in (("a.pt", 200), ("b.pt", 180)):  # data.path is where each machine keeps it: not compared
        torch.save({"x": torch.randn(n, 1, 8, 8, generator=g), "y": torch.arange(n) % 10}, tmp_path / name)
    p = write(tmp_path, make(model=MODEL, train=TRAIN, data={"source": "tensors", "path": "a.pt"}))
    ends = _pair(tmp_path, [str(p), "--out", "run"], [str(p), "--out", "run", "--set", "data.path=b.pt"], 29532)
    for proc, out, err in ends:
        assert proc.returncode == 2, err
        assert re.search(r"rank 1's data \(host \S+\) differs: (180 samples vs 200|200 samples vs 180); "
                         r"class \d: \d+ vs \d+.* on rank 0", err), err
    assert not (tmp_path / "run").exists()


# --- two network hosts: namespaces joined by a veth pair ---------------------------------------------------

def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=30)


@contextmanager
def _two_hosts():
    """Two network namespaces joined by a veth pair, 10.77.0.1 and 10.77.0.2, each with the other's name in
    its /etc/hosts (``ip netns exec`` mounts /etc/netns/NS/hosts); yields the namespaces' names. Skips,
    saying why, where namespaces cannot be made (not root, no iproute2 or unshare)."""
    why = ("not root" if os.geteuid() != 0 else "no `ip` (iproute2)" if not shutil.which("ip")
           else "no `unshare` (util-linux)" if not shutil.which("unshare") else None)
    tag = f"{os.getpid() % 100000}"
    names = [f"nnctl{tag}{c}" for c in "ab"]
    if why is None:
        try:
            _sh("ip", "netns", "add", names[0])
        except (subprocess.CalledProcessError, OSError) as exc:
            why = f"`ip netns add` failed: {getattr(exc, 'stderr', '') or exc}".strip()
    if why is not None:  # said in pytest's warnings summary too, which is printed without -rs
        warnings.warn(f"two-host test skipped: network namespaces cannot be made here ({why})", stacklevel=3)
        pytest.skip(f"network namespaces cannot be made here ({why})")
    links = [f"nv{tag}{c}" for c in "ab"]
    etc_netns = Path("/etc/netns")
    made = not etc_netns.exists()
    try:
        _sh("ip", "netns", "add", names[1])
        _sh("ip", "link", "add", links[0], "type", "veth", "peer", "name", links[1])
        hosts = "127.0.0.1 localhost\n" + "".join(f"{addr} {host}\n" for host, addr in NODES)
        for ns, link, (host, addr) in zip(names, links, NODES):
            _sh("ip", "link", "set", link, "netns", ns)
            _sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", link)
            _sh("ip", "-n", ns, "link", "set", link, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            (etc_netns / ns).mkdir(parents=True, exist_ok=True)
            (etc_netns / ns / "hosts").write_text(hosts)
        yield names
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # its veth end goes with it
            shutil.rmtree(etc_netns / ns, ignore_errors=True)
        if made:
            with contextlib.suppress(OSError):
                etc_netns.rmdir()  # only if empty: another test's namespaces may use it


def _node(ns: str, host: str, rank: int, args: list[str], cwd: Path) -> subprocess.Popen:
    """`nnctl train ARGS --nnodes 2 --node-rank RANK --nproc-per-node 1` on the host ``ns`` (its own network and
    host name), meeting the other at nodea's address."""
    command = [sys.executable, "-m", "nnctl", "train", *args, "--nnodes", "2", "--node-rank", str(rank),
               "--rdzv-endpoint", f"{NODES[0][1]}:{PORT}", "--nproc-per-node", "1"]
    return subprocess.Popen(["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c",
                             f'hostname {host} && exec "$@"', "sh", *command], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _both_nodes(names, args: list[str], cwd) -> list[tuple]:
    """One node in each namespace, run to their end (killed if the test fails first); each exited 0."""
    nodes = [_node(ns, host, r, args, cwd) for r, (ns, (host, _)) in enumerate(zip(names, NODES))]
    try:
        ends = [(n, *n.communicate(timeout=180)) for n in nodes]
    finally:
        for node in nodes:
            _kill(node)
    for node, out, err in ends:
        assert node.returncode == 0, err
    return ends


@pytest.mark.slow  # a run across two network hosts and a single-process one (about 25 s): .ci/run runs the slow group
def test_two_hosts_train_one_run_equal_to_one_process(tmp_path):
    p = write(tmp_path, make(model=MODEL, train=TRAIN))
    with _two_hosts() as names:
        one = run_cli("train", str(p), "--out", str(tmp_path / "one"), cwd=tmp_path)
        assert one.returncode == 0, one.stderr
        ends = _both_nodes(names, [str(p), "--out", "run", "--rdzv-timeout", "30"], tmp_path)
    assert "epoch 3/3" in ends[0][1] + ends[1][1]
    assert sorted(os.listdir(tmp_path)) == ["c.yaml", "one", "run"]  # one run folder, written by global rank 0
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "finished" and status["epochs_done"] == 3
    a, b = K.load(tmp_path / "one" / "last.pt"), K.load(tmp_path / "run" / "last.pt")
    assert b["world_size"] == 2 and len(b["rng_ranks"]) == 2
    assert max_diff(a["model"], b["model"]) < TOL
    assert abs(a["history"][-1]["val_loss"] - b["history"][-1]["val_loss"]) < 1e-4


@pytest.mark.slow  # a one-epoch run across two network hosts, resumed in one process (about 40 s): slow group
def test_two_hosts_then_one_process_resume_equals_one_process_throughout(tmp_path):
    p = write(tmp_path, make(model=MODEL, train=TRAIN))
    with _two_hosts() as names:
        straight = run_cli("train", str(p), "--out", str(tmp_path / "straight"), cwd=tmp_path)
        assert straight.returncode == 0, straight.stderr
        ends = _both_nodes(names, [str(p), "--out", "run", "--epochs", "1"], tmp_path)
    r = run_cli("train", "--resume", str(tmp_path / "run"), "--epochs", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    state = K.load(tmp_path / "run" / "last.pt")
    assert state["epoch"] == 3 and state["world_size"] == 1
    assert max_diff(K.load(tmp_path / "straight" / "last.pt")["model"], state["model"]) < TOL


def _tree(pid: int) -> list[int]:
    """pid and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo += children.get(out[-1], [])
    return out


def _kill(node: subprocess.Popen, how: int = signal.SIGKILL) -> None:
    """SIGKILL (or another signal) a host: its launcher and its workers (nothing when it has ended)."""
    for pid in _tree(node.pid) if node.poll() is None else []:
        try:
            os.kill(pid, how)
        except ProcessLookupError:
            pass


@pytest.mark.slow  # a two-host run, one host killed, then resumed (about 35 s): .ci/run runs the slow group
@pytest.mark.parametrize("killed, how", [(1, signal.SIGKILL), (0, signal.SIGKILL), (1, signal.SIGSTOP)],
                         ids=["rank1-host-killed", "rank0-and-rendezvous-host-killed", "rank1-host-frozen"])
def test_killed_host_fails_the_other_within_the_timeout_and_the_run_resumes(tmp_path, killed, how):
    """SIGKILL: the host's sockets are closed by its kernel, the other learns it at once; SIGSTOP: a host that
    says nothing more (a machine gone, a network cut): the other waits --rdzv-timeout, then fails."""
    p = write(tmp_path, SLOW)
    with _two_hosts() as names:
        nodes = [_node(ns, host, r, [str(p), "--out", "run", "--rdzv-timeout", "20"], tmp_path)
                 for r, (ns, (host, _)) in enumerate(zip(names, NODES))]
        began = time.time()
        while not (tmp_path / "run" / "last.pt").exists():
            assert all(n.poll() is None for n in nodes), [n.communicate() for n in nodes]
            assert time.time() - began < 120
            time.sleep(0.05)
        time.sleep(1.0)  # into the second epoch
        victim, survivor = nodes[killed], nodes[1 - killed]
        _kill(victim, how)  # the whole machine: its launcher and its worker
        killed = time.time()
        try:
            out, err = survivor.communicate(timeout=120)
        finally:
            took = time.time() - killed
            for node in nodes:
                _kill(node)
                node.communicate()
    assert survivor.returncode == 1, err
    print(f"the surviving host failed {took:.1f} s after the other was killed")
    assert took < 60, f"the surviving host took {took:.0f} s to fail"
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors and "lost contact with another process of the run" in errors[0], err
    assert errors[-1].startswith("error: distributed training failed") and "the last checkpoint is in run" in errors[-1]
    assert "Traceback" not in err
    state = K.load(tmp_path / "run" / "last.pt")
    assert state["epoch"] >= 1
    r = run_cli("train", "--resume", str(tmp_path / "run"), cwd=tmp_path)  # one host, one process
    assert r.returncode == 0, r.stderr
    assert f"resuming from epoch {state['epoch']}" in r.stdout
    end = K.load(tmp_path / "run" / "last.pt")
    assert end["epoch"] == 3 and [h["epoch"] for h in end["history"]] == [1, 2, 3]
