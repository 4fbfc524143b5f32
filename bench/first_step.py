"""Time to first step: `nnctl train` against a hand-written loop, with nnctl's time split into its parts.

    python bench/first_step.py            # the measurement (about a minute on 2 cores)
    python bench/first_step.py --quick    # one run each: checks that it works

Both sides are fresh processes on the CPU that train the digits CNN (configs/digits_cnn.yaml)
and stop after their first optimizer step (the wall time from fork to that step is printed by
the process itself):

- hand-written: `import torch`, read the same digits (nnctl's own reader, so that the data is
  identical; the reader's time is part of "data"), build the same nn.Sequential by hand, Adam,
  one step. Its time to first step is what PyTorch itself costs: `import torch`, and the
  first `optimizer.step()`, which imports `torch._dynamo` (torch.optim does so on every
  optimizer, compiled or not).
- nnctl: the real CLI (`nnctl.cli.app.main`, `nnctl train CONFIG --epochs 1`) in a process whose
  functions are wrapped with timers: imports, config + planning (`nnctl.checking.load_checked`),
  model build (`nnctl.model.plan.build`), run folder, data (`nnctl.data.loading.load_data`),
  optimizer and the first step.

Goal (issue 14): nnctl's fixed cost before its first step at most `import torch` + 0.5 s; shown
here as nnctl's time to first step minus the hand-written loop's (the cost nnctl adds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import common

NNCTL_CHILD = r'''
import json, sys, time, os
T0 = float(sys.argv[1])
parts = {}
def timed(mod, name, label):
    f = getattr(mod, name)
    def wrapper(*a, **k):
        t = time.time()
        try:
            return f(*a, **k)
        finally:
            parts[label] = parts.get(label, 0.0) + time.time() - t
    setattr(mod, name, wrapper)
t = time.time(); import torch; parts["import torch"] = time.time() - t
t = time.time()
import nnctl.cli.app
import nnctl.checking as CHK, nnctl.model.plan as M, nnctl.data.loading as D
import nnctl.training.run as R, nnctl.training.trainer as T
parts["import nnctl"] = time.time() - t
# each wrapped where the caller looks it up (a name imported into the caller is wrapped there)
timed(CHK, "load_checked", "config + planning")
timed(M, "build", "model build")
timed(R, "claim_new", "run folder")
timed(D, "load_data", "data")
timed(T, "make_optimizer", "optimizer (torch)")
real = T.train_one_epoch
def first_step(ctx, batches, epoch, start, sums, on_step=None):
    def stop(step, s):
        parts["first step"] = time.time() - parts.pop("_step0")
        print(json.dumps({"first_step": time.time() - T0, "parts": parts}), flush=True)
        os._exit(0)
    parts["_step0"] = time.time()
    return real(ctx, batches, epoch, start, sums, stop)
T.train_one_epoch = first_step
sys.argv = ["nnctl", "train", sys.argv[2], "--epochs", "1", "--out", sys.argv[3]]
nnctl.cli.app.main()
'''

HAND_CHILD = r'''
import json, sys, time
T0 = float(sys.argv[1])
import torch
from torch import nn
from nnctl.data import sources as D  # the same digits, read the same way
store = D.builtin._digits()
x = store.x.float().div_(16.0)
y = store.y
net = nn.Sequential(
    nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Dropout2d(0.25), nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10),
    nn.LogSoftmax(dim=1))
opt = torch.optim.Adam(net.parameters(), lr=1e-3)
idx = torch.randperm(len(x))[:64]
loss = nn.functional.nll_loss(net(x[idx]), y[idx])
opt.zero_grad(set_to_none=True)
loss.backward()
opt.step()
print(json.dumps({"first_step": time.time() - T0}), flush=True)
'''


def run_child(code: str, *args: str) -> dict:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code, repr(t0), *args], capture_output=True, text=True,
                          cwd=common.ROOT, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def main() -> None:
    args = common.parser(__doc__.splitlines()[0], runs=7).parse_args()
    common.header("time to first step: nnctl train vs a hand-written loop (digits CNN, CPU)", args.quick)
    runs = 1 if args.quick else args.runs
    config = str(common.ROOT / "configs" / "digits_cnn.yaml")
    results: dict[str, list[dict]] = {"nnctl": [], "hand": [], "torch": []}
    with tempfile.TemporaryDirectory() as tmp:
        count = {"n": 0}

        def nnctl_side():
            count["n"] += 1
            r = run_child(NNCTL_CHILD, config, os.path.join(tmp, f"run-{count['n']}"))
            results["nnctl"].append(r)
            return r["first_step"]

        def hand_side():
            r = run_child(HAND_CHILD)
            results["hand"].append(r)
            return r["first_step"]

        def torch_side():
            return common.wall([sys.executable, "-c", "import torch"], cwd=common.ROOT)

        times = common.interleaved({"nnctl": nnctl_side, "hand": hand_side, "import torch": torch_side}, runs,
                                   warmup=0 if runs == 1 else 1)
    nn_s, hand_s, torch_s = (common.median(times[k]) for k in ("nnctl", "hand", "import torch"))
    rows = [["`python -c \"import torch\"`", torch_s, common.spread(times["import torch"]), ""],
            ["hand-written loop, first step", hand_s, common.spread(times["hand"]), ""],
            ["`nnctl train`, first step", nn_s, common.spread(times["nnctl"]), ""],
            ["nnctl - hand-written", nn_s - hand_s, "", f"{'met' if nn_s - hand_s <= 0.5 else 'NOT met'} (<= 0.5 s)"]]
    common.table(f"time to first step, median of {runs} interleaved runs", ["process", "s", "range s", "goal"],
                 rows, "Seconds from fork to the end of the first optimizer step; lower is better. "
                       "Goal: nnctl adds at most 0.5 s to what PyTorch itself costs.")
    keys = list(results["nnctl"][0]["parts"])
    part_rows = [[k, common.median([r["parts"].get(k, 0.0) for r in results["nnctl"]])] for k in keys]
    common.table("nnctl train: where the time to first step goes (medians, s)", ["part", "s"], part_rows,
                 "The rest is the interpreter, typer's parsing, the run log and writing config.yaml.")


if __name__ == "__main__":
    main()
