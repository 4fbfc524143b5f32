"""FSDP2 (`train.distributed.strategy: fsdp`, issue 23): 2 CPU processes with gloo against one process.

The sharding functions (nnctl/training/sharding.py) in spawned processes, and whole runs through
`nnctl train --nproc-per-node 2` (slow group): the same weights as one process within DDP's tolerance,
a checkpoint in the one nnctl format (it loads into a plain nn.Sequential), resumed under DDP and under
one process, and a one-process checkpoint resumed under FSDP.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
from torch import nn

from nnctl.runs import checkpoint as K

from .conftest import make, run_cli, write


pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")

TOL = 1e-5  # what DDP meets against one process (tests/test_distributed.py): float sums in another order


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 33), nn.ReLU(), nn.Linear(33, 10))  # 33 rows: uneven shards


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)


def _one_process(steps: int = 3):
    m = _model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x, y = _data()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.state_dict(), opt.state_dict()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from nnctl.training import sharding as SH
    from nnctl.training.distributed import Dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        d = Dist(rank, world)
        m = SH.shard(_model(), d, torch.device("cpu"))
        assert SH.is_sharded(m)
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        x, y = _data()
        for _ in range(3):  # each rank half the batch: the reduce-scatter averages, as DDP's all-reduce
            loss = nn.functional.cross_entropy(m(x.chunk(world)[rank]), y.chunk(world)[rank])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model_state, optim_state = SH.full_model_state(m), SH.full_optimizer_state(m, opt)
        # a sharded model from a plain one-process state (weights, then the optimizer's index-keyed state)
        ref_model, ref_optim = _one_process()
        m2 = _model()
        m2.load_state_dict(ref_model)
        SH.shard(m2, d, torch.device("cpu"))
        opt2 = torch.optim.Adam(m2.parameters(), lr=1e-2)
        SH.load_optimizer_state(m2, opt2, ref_optim)
        back = SH.full_optimizer_state(m2, opt2)
        if rank == 0:
            torch.save({"model": model_state, "optim": optim_state, "back": back}, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two spawned processes (about 10 s on 2 cores): .ci/run runs the slow group
def test_fsdp2_on_two_cpu_processes_equals_one_process_and_its_state_is_plain(tmp_path):
    out = tmp_path / "fsdp.pt"
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2)
    got = torch.load(out, weights_only=True)
    ref_model, ref_optim = _one_process()
    assert got["model"].keys() == ref_model.keys()
    assert max(float((got["model"][k] - ref_model[k]).abs().max()) for k in ref_model) < TOL
    # the optimizer's state in PyTorch's own format: index-keyed, as a one-process Adam gives it
    assert [g["params"] for g in got["optim"]["param_groups"]] == [g["params"] for g in ref_optim["param_groups"]]
    for i, s in ref_optim["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            assert float((got["optim"]["state"][i][k] - s[k]).abs().max()) < TOL
    plain = _model()
    plain.load_state_dict(got["model"])  # strict: no FSDP prefixes, no DTensors
    for i, s in ref_optim["state"].items():  # loaded into shards and gathered back: bit for bit
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(got["back"]["state"][i][k], s[k])
MODEL = {"input_shape": [1, 8, 8], "layers": ["Flatten", {"Linear": {"out_features": 33}}, "ReLU",
                                               {"Linear": {"out_features": 10}}]}
TRAIN = {"epochs": 3, "batch_size": 64, "optimizer": {"Adam": {"lr": 0.01}}}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.slow  # torchrun with two ranks, five runs: .ci/run runs the slow group
def test_an_fsdp_run_equals_one_process_and_resumes_under_any_strategy(tmp_path):
    p = write(tmp_path, make(model=MODEL, train=TRAIN))
    fsdp = ["--set", "train.distributed.strategy=fsdp"]
    one = run_cli("train", str(p), "--out", str(tmp_path / "one"), cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = run_cli("train", str(p), "--nproc-per-node", "2", "--out", str(tmp_path / "two"), *fsdp, cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    assert "2 processes (FSDP2, gloo)" in two.stdout
    ref = K.load(tmp_path / "one" / "last.pt")
    got = K.load(tmp_path / "two" / "last.pt")
    assert got["world_size"] == 2 and _max_diff(ref["model"], got["model"]) < TOL
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 33), nn.ReLU(), nn.Linear(33, 10))
    plain.load_state_dict(got["model"])  # the one checkpoint format: strict, plain tensors
    # FSDP for 1 epoch, then DDP (2 processes) and 1 process to the end: the straight run's weights
    r = run_cli("train", str(p), "--nproc-per-node", "2", "--epochs", "1", "--out", str(tmp_path / "a"), *fsdp,
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("train", "--resume", str(tmp_path / "a"), "--epochs", "2", "--nproc-per-node", "2",
                "--set", "train.distributed.strategy=ddp", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("train", "--resume", str(tmp_path / "a"), "--epochs", "3", "--set", "train.distributed.strategy=ddp",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert _max_diff(ref["model"], K.load(tmp_path / "a" / "last.pt")["model"]) < TOL
    # one process for 1 epoch, then FSDP to the end
    r = run_cli("train", str(p), "--epochs", "1", "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("train", "--resume", str(tmp_path / "b"), "--epochs", "3", "--nproc-per-node", "2", *fsdp,
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    state = K.load(tmp_path / "b" / "last.pt")
    assert state["epoch"] == 3 and _max_diff(ref["model"], state["model"]) < TOL


def test_summary_shows_what_one_rank_holds_under_each_strategy(tmp_path, cli):
    """`nnctl summary --processes N`: parameters, gradients and the optimizer's state one rank holds (ddp: all
    of it; fsdp: 1/N of each tensor's rows, rounded up as fully_shard's dim-0 shards are), counted by hand."""
    import nnctl

    doc = make(model=MODEL, train={"optimizer": {"Adam": {"lr": 0.01}}})
    sizes = [33 * 64, 33, 10 * 33, 10]  # the Linear weights and biases
    rows = [33, 33, 10, 10]
    full = 4 * sum(sizes)
    half = 4 * sum(-(-r // 2) * (n // r) for n, r in zip(sizes, rows))
    one = nnctl.summarize(doc).per_rank
    assert one == {"strategy": "one process", "processes": 1, "optimizer_slots": 2, "parameters": full,
                   "gradients": full, "optimizer": 2 * full}
    ddp = nnctl.summarize(doc, processes=2).per_rank
    assert (ddp["strategy"], ddp["parameters"], ddp["optimizer"]) == ("ddp", full, 2 * full)
    fsdp = nnctl.summarize(doc, processes=2, overrides=["train.distributed.strategy=fsdp"]).per_rank
    assert (fsdp["strategy"], fsdp["parameters"], fsdp["gradients"], fsdp["optimizer"]) == ("fsdp", half, half, 2 * half)
    sgd = nnctl.summarize(doc, overrides=["train.optimizer={SGD: {lr: 0.1}}"]).per_rank
    assert (sgd["optimizer_slots"], sgd["optimizer"]) == (0, 0)
    code, out, _ = cli("summary", str(write(tmp_path, doc)), "-n", "2", "--set", "train.distributed.strategy=fsdp")
    assert code == 0 and "training state a rank (fsdp, 2 processes): parameters" in out, out
