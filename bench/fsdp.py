"""Per-rank memory and step time: FSDP2 against DDP, 2 CPU processes with gloo (nnctl's own code paths).

    python bench/fsdp.py            # a ~50M-parameter model of Linear layers, Adam (a few minutes on 2 cores)
    python bench/fsdp.py --quick    # a small model: checks that it works

Each side runs in 2 spawned processes: the model as nnctl's trainer holds it (DDP: a DistributedDataParallel
copy a rank; FSDP2: ``nnctl.training.sharding.shard``), Adam, batches of 64. Memory is what one rank holds,
measured from its tensors after a step: parameters, gradients and Adam's state (the local shard of a DTensor),
and the process's peak RSS (``getrusage``) beside it. The step time is the median of the steps after the
first two (1 torch thread a process).
"""

from __future__ import annotations

import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def _worker(rank: int, world: int, port: int, strategy: str, width: int, depth: int, steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from nnctl.training import sharding as SH
    from nnctl.training.distributed import Dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        layers = [nn.Flatten()] + [m for _ in range(depth) for m in (nn.Linear(width, width), nn.ReLU())]
        model = nn.Sequential(*layers, nn.Linear(width, 10))
        if strategy == "fsdp":
            runner = SH.shard(model, Dist(rank, world), torch.device("cpu"))
        else:
            runner = DistributedDataParallel(model)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        x, y = torch.randn(64 // world, width), torch.randint(0, 10, (64 // world,))
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            loss = nn.functional.cross_entropy(runner(x), y)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
        params = list(model.parameters())
        row = {"rank": rank, "parameters": _local_bytes(params), "gradients": _local_bytes(p.grad for p in params),
               "optimizer": _local_bytes(v for s in opt.state.values() for v in s.values()
                                         if isinstance(v, torch.Tensor) and v.dim() > 0),
               "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               "step_s": statistics.median(times[2:]) if len(times) > 2 else times[-1],
               "numel": sum(p.numel() for p in model.parameters()) if strategy == "ddp" else None}
        Path(f"{out}.{rank}").write_text(json.dumps(row))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    args = common.parser(__doc__.splitlines()[0], runs=1).parse_args()
    common.header("FSDP2 vs DDP: what one rank holds, 2 CPU processes (gloo)", args.quick)
    import torch.multiprocessing as mp

    width, depth, steps = (256, 2, 4) if args.quick else (4096, 3, 8)
    rows, found = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in ("ddp", "fsdp"):
            out = os.path.join(tmp, strategy)
            mp.spawn(_worker, args=(2, _free_port(), strategy, width, depth, steps, out), nprocs=2)
            ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
            found[strategy] = ranks
    params = next(r["numel"] for r in found["ddp"] if r["numel"])
    mib = 2 ** 20
    for strategy, ranks in found.items():
        r0 = ranks[0]
        state = r0["parameters"] + r0["gradients"] + r0["optimizer"]
        rows.append([{"ddp": "DDP", "fsdp": "FSDP2"}[strategy], r0["parameters"] / mib, r0["gradients"] / mib,
                     r0["optimizer"] / mib, state / mib, max(r["peak_rss"] for r in ranks) / mib,
                     max(r["step_s"] for r in ranks)])
    common.table(f"one rank of 2, a model of {params / 1e6:.1f}M parameters ({depth} x Linear({width}, {width}) + "
                 f"head), Adam, global batch 64, {steps} steps",
                 ["strategy", "parameters MiB", "gradients MiB", "Adam state MiB", "total MiB", "peak RSS MiB",
                  "step s"], rows,
                 "MiB of rank 0's own tensors after a step (a DTensor's local shard); peak RSS: the larger of the "
                 "two processes (torch itself and the full model built before sharding included).")


if __name__ == "__main__":
    sys.exit(main())
