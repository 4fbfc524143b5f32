"""The whole run, fork to exit: `nnctl train` against a hand-written script, split into its parts.

    python bench/overhead.py                  # medians of 5 interleaved runs, 1 thread (a few minutes)
    python bench/overhead.py --quick          # one small run each: checks that it works
    python bench/overhead.py --json OUT.json  # the rows as JSON too (tests/test_bench.py reads it)

The two models of bench/lightning_vs_nnctl.py (an MLP on 20,000 MNIST-shaped samples for 3
epochs, and the pytorch/examples CNN on 2,000 for 1 epoch), read from the same `tensors`
file by both sides, with no validation split, on the CPU, 1 thread.

- hand-written: bench/lightning_vs_nnctl.py's floor script with a clock at each phase
  (`import torch`, reading the data, model + optimizer, the epochs, one `torch.save`) and the
  interpreter's exit measured from outside (fork to exit minus the last clock).
- nnctl: the real CLI (`nnctl.cli.app.run`, `nnctl train CONFIG --out DIR`) in a process
  whose functions are wrapped with clocks where their callers look them up. Each part is
  exclusive: a part that calls another (a checkpoint save calling the atomic writer) does
  not count the inner one's time twice. "the rest" is what no clock covers: typer's
  parsing, the run log, the config record, `check`-style bookkeeping between the parts.

The table is the difference that matters (issue 25): what nnctl costs over the floor, and where.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

NNCTL_CHILD = r'''
import json, sys, time
T0 = float(sys.argv[1])
parts, stack = {}, []


def clock(label, t0):
    parts[label] = parts.get(label, 0.0) + time.time() - t0


def timed(owner, name, label):
    f = getattr(owner, name)

    def wrapper(*a, **k):
        t = time.time()
        stack.append(0.0)
        try:
            return f(*a, **k)
        finally:
            inner = stack.pop()
            took = time.time() - t
            parts[label] = parts.get(label, 0.0) + took - inner
            if stack:
                stack[-1] += took
    setattr(owner, name, wrapper)


t = time.time(); import torch; clock("import torch", t)
t = time.time()
import nnctl.cli.app, nnctl.cli.cmd_train, nnctl.api  # what `nnctl train` imports, torch aside
import nnctl.checking as CHK, nnctl.model.plan as M, nnctl.data.loading as D, nnctl.files as F
import nnctl.training.run as R, nnctl.training.trainer as T, nnctl.runs.plots as P
import nnctl.runs.checkpoint as K, nnctl.runs.status as S
clock("import nnctl (typer, rich, pydantic, yaml, ...)", t)
timed(CHK, "load_checked", "config: read, check, plan")
timed(D, "load_data", "data: read and check")
timed(M, "build", "model build")
timed(R, "claim_new", "run folder")
timed(T, "make_optimizer", "optimizer (imports torch._dynamo)")
timed(T.Trainer, "train_epoch", "training epochs")
timed(T.Trainer, "evaluate", "validation")
timed(K, "save", "checkpoints: build payload, digest")
timed(F, "atomic_write", "writes: temp file, fsync, rename")
timed(T, "write_metrics", "metrics.csv")
timed(S, "write_status", "status record")
timed(P, "plot_curves", "curves.png (matplotlib)")
sys.argv = ["nnctl", "train", sys.argv[2], "--out", sys.argv[3]]


def report():  # registered first, so the last of the atexit handlers: what is left after it is the exit itself
    clock("_main", T_MAIN)
    parts["the rest (CLI, run log, records)"] = parts.pop("_main") - sum(
        v for k, v in parts.items() if k not in ("_main", "import torch") and not k.startswith("import nnctl"))
    print(json.dumps({"end": time.time() - T0, "parts": parts}), flush=True)


import atexit
atexit.register(report)
T_MAIN = time.time()
getattr(nnctl.cli.app, "run", nnctl.cli.app.main)()  # the console script's entry (main() before it had run)
'''

HAND_CHILD = r'''
import json, sys, time
T0 = float(sys.argv[1])
parts = {}
t = time.time()
import torch
from torch import nn
parts["import torch"] = time.time() - t
args = json.loads(sys.argv[2])
torch.manual_seed(args["seed"])
t = time.time()
d = torch.load(args["data"], weights_only=True)
x, y = d["x"], d["y"]
parts["data: read and check"] = time.time() - t
t = time.time()
if args["model"] == "mlp":
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    loss_fn, opt = nn.CrossEntropyLoss(), torch.optim.Adam(net.parameters(), lr=1e-3)
else:
    net = nn.Sequential(
        nn.Conv2d(1, 32, 3, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25),
        nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10), nn.LogSoftmax(dim=1))
    loss_fn, opt = nn.NLLLoss(), torch.optim.Adadelta(net.parameters(), lr=1.0)
parts["optimizer (imports torch._dynamo)"] = time.time() - t
t = time.time()
for epoch in range(args["epochs"]):
    for idx in torch.randperm(len(x)).split(args["batch"]):
        loss = loss_fn(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
parts["training epochs"] = time.time() - t
t = time.time()
torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, args["out"] + ".pt")
parts["writes: temp file, fsync, rename"] = time.time() - t
print(json.dumps({"end": time.time() - T0, "parts": parts}), flush=True)
'''

ORDER = ["import torch", "import nnctl (typer, rich, pydantic, yaml, ...)", "config: read, check, plan",
         "data: read and check", "model build", "run folder", "optimizer (imports torch._dynamo)",
         "training epochs", "validation", "checkpoints: build payload, digest", "writes: temp file, fsync, rename",
         "metrics.csv", "status record", "curves.png (matplotlib)", "the rest (CLI, run log, records)",
         "interpreter exit"]


def run_child(code: str, env: dict, cwd: str, *args: str) -> dict:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code, repr(t0), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env=env)
    wall = time.time() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    result = json.loads(lines[-1])
    result["parts"]["interpreter exit"] = wall - result["end"]
    result["wall"] = wall
    return result


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--json", help="also write the rows as JSON to this file")
    args = p.parse_args()
    threads = args.threads or 1
    common.header(f"the whole run, fork to exit: nnctl train vs a hand-written script (CPU, {threads} thread)",
                  args.quick)
    import yaml

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    runs = 1 if args.quick else args.runs
    cases = [("mlp", 512, 1)] if args.quick else [("mlp", 20_000, 3), ("cnn", 2_000, 1)]
    report = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, size, epochs in cases:
            x_u8, y = common.mnist_like(size)
            data_path = common.write_tensors_file(tmp / f"{name}.pt", x_u8, y)
            cfg = common.config_dict(name, {"source": "tensors", "path": str(data_path), "normalize": False,
                                            "val_fraction": 0.0}, 64, epochs)
            cfg_path = tmp / f"{name}.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            results: dict[str, list[dict]] = {"nnctl": [], "hand": []}
            count = {"n": 0}

            def side(kind):
                def go():
                    count["n"] += 1
                    out = str(tmp / f"{name}-{kind}-{count['n']}")
                    if kind == "nnctl":
                        r = run_child(NNCTL_CHILD, env, str(tmp), str(cfg_path), out)
                    else:
                        spec = json.dumps({"model": name, "data": str(data_path), "epochs": epochs, "batch": 64,
                                           "out": out, "seed": 1})
                        r = run_child(HAND_CHILD, env, str(tmp), spec)
                    results[kind].append(r)
                    return r["wall"]
                return go

            print(f"{name}: {size:,} samples, {epochs} epoch(s), batch 64", flush=True)
            times = common.interleaved({"nnctl": side("nnctl"), "hand": side("hand")}, runs,
                                       warmup=0 if runs == 1 else 1)
            for kind in results:  # the warm-up run is not counted in the parts either
                results[kind] = results[kind][-runs:]
            rows, data = [], {}
            for part in ORDER:
                a = common.median([r["parts"].get(part, 0.0) for r in results["nnctl"]])
                h = common.median([r["parts"].get(part, 0.0) for r in results["hand"]])
                data[part] = {"nnctl": a, "hand": h}
                rows.append([part, a, h, a - h])
            a, h = common.median(times["nnctl"]), common.median(times["hand"])
            rows.append(["**fork to exit (wall)**", a, h, a - h])
            data["wall"] = {"nnctl": a, "hand": h}
            report.append({"model": name, "samples": size, "epochs": epochs, "runs": runs, "parts": data})
            common.table(f"{name}, {size:,} samples, {epochs} epoch(s): medians of {runs} interleaved runs (s)",
                         ["part", "nnctl", "hand-written", "nnctl - hand"], rows,
                         "Each part's median separately, so the parts need not add up to the wall's median. "
                         "Goal (issue 25): nnctl - hand <= 1.0 s.")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
