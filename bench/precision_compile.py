"""Precision and compile on the CPU: 32-true vs bf16-mixed vs bf16-true vs compile (aot_eager, inductor).

    python bench/precision_compile.py --model digits --threads 1      # one model, one thread count
    python bench/precision_compile.py --model cifar --threads 2 --variants 32-true,inductor
    python bench/precision_compile.py --quick                         # tiny sizes: checks that it works

Each variant is a fresh process running ``nnctl.train`` (the real training path) on a config
through ``--set``-style overrides of train.precision / train.compile, which reports through
``on_event``:

- first step: seconds from the fit's start event to its first step event (the first forward,
  backward and optimizer step; with compile, the training graph's compilation);
- epoch: the per-epoch seconds (metrics.csv's ``seconds``: training steps plus validation) of
  epochs 2..N of every run, the steady state (epoch 1 also compiles the evaluation graph): their best
  (the least disturbed by other processes on a shared machine; the ratio column uses it) and median.

Models: ``digits``, configs/digits_cnn.yaml as it is (1,437 training samples of 1x8x8, batch 64);
``cifar``, a 3x32x32 CNN (conv 32, pool, conv 64, pool, linear 128, linear 10) on 2,048 synthetic
samples, batch 64. Inductor's on-disk cache is a fresh folder each run (TORCHINDUCTOR_CACHE_DIR), so
its first step is a cold compilation. Runs alternate the variants' order (A B, B A, ...).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import common
from nnctl.config.yamlio import load_file

VARIANTS = {  # name -> overrides of train
    "32-true": {},
    "bf16-mixed": {"precision": "bf16-mixed"},
    "bf16-true": {"precision": "bf16-true"},
    "aot_eager": {"compile": {"backend": "aot_eager"}},
    "inductor": {"compile": {"backend": "inductor"}},  # the batch dimension marked dynamic (nnctl's default)
    "inductor-static": {"compile": {"backend": "inductor", "dynamic": False}},  # every size static
}

CIFAR_LAYERS = [
    {"Conv2d": {"out_channels": 32, "kernel_size": 3, "padding": 1}}, "ReLU", {"MaxPool2d": 2},
    {"Conv2d": {"out_channels": 64, "kernel_size": 3, "padding": 1}}, "ReLU", {"MaxPool2d": 2},
    "Flatten", {"Linear": {"out_features": 128}}, "ReLU", {"Linear": {"out_features": 10}},
]

CHILD = r'''
import json, sys, time
import nnctl
config, epochs = json.loads(sys.argv[1]), int(sys.argv[2])
marks = {}
def on_event(e):
    now = time.perf_counter()
    if e.kind == "start":
        marks["start"] = now
    elif e.kind == "step" and "first_step" not in marks:
        marks["first_step"] = now - marks["start"]
    elif e.kind == "note":
        marks.setdefault("notes", []).append(e.message)
result = nnctl.train(config, out=sys.argv[3], epochs=epochs, on_event=on_event, on_message=lambda m: None)
marks["epochs"] = [row["seconds"] for row in result.fit.history]
marks["loss"] = result.fit.history[-1]["train_loss"]
print("RESULT " + json.dumps(marks), flush=True)
'''


def config(model: str, quick: bool, threads: int, overrides: dict) -> dict:
    if model == "digits":
        cfg = load_file(str(common.ROOT / "configs" / "digits_cnn.yaml")).data
        if quick:
            cfg["data"]["limit"] = 200
    else:
        cfg = {"name": "bench-cifar-cnn", "seed": 0,
               "model": {"input_shape": [3, 32, 32], "layers": CIFAR_LAYERS},
               "data": {"source": "synthetic", "size": 256 if quick else 2048, "classes": 10, "val_fraction": 0.2},
               "train": {"batch_size": 64, "optimizer": {"Adam": {"lr": 0.001}}}}
    cfg["train"] = {**cfg.get("train", {}), "device": "cpu", "threads": threads, **overrides}
    return cfg


def run_variant(cfg: dict, epochs: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TORCHINDUCTOR_CACHE_DIR": os.path.join(tmp, "ind")}
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), str(epochs), os.path.join(tmp, "run")],
                              capture_output=True, text=True, env=env, cwd=common.ROOT)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"variant failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], runs=1)
    p.add_argument("--model", choices=("digits", "cifar"), default="digits")
    p.add_argument("--epochs", type=int, default=5, help="epochs a run (default 5: the first, then 4 steady)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    args = p.parse_args()
    threads = args.threads or 1
    common.setup_threads(threads)
    common.header(f"precision and compile, {args.model}", args.quick)
    names = args.variants.split(",")
    epochs = 2 if args.quick else args.epochs
    got: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.runs):
        for name in (names if r % 2 == 0 else names[::-1]):
            res = run_variant(config(args.model, args.quick, threads, VARIANTS[name]), epochs, threads)
            got[name].append(res)
            print(f"  run {r + 1}: {name}: first step {res['first_step']:.2f}s, epochs "
                  f"{', '.join(f'{s:.2f}' for s in res['epochs'])}s", file=sys.stderr, flush=True)
    steady = {n: [s for x in got[n] for s in x["epochs"][1:]] for n in names}
    base = min(steady[names[0]])
    rows = []
    for name in names:
        notes = [n for x in got[name] for n in x.get("notes", []) if "compile:" in n][:1]
        rows.append([name, common.median(x["first_step"] for x in got[name]), min(steady[name]),
                     common.median(steady[name]), f"{min(steady[name]) / base:.2f}x",
                     notes[0].split("compile: ")[1].split(" in ")[0] if notes else ""])
    common.table(f"{args.model}: first step and steady epoch, {threads} thread{'s' if threads > 1 else ''}, "
                 f"{args.runs} run{'s' if args.runs > 1 else ''} of {epochs} epochs",
                 ["variant", "first step (s)", "epoch, best (s)", "epoch, median (s)", f"best vs {names[0]}",
                  "compiled"], rows,
                 note="first step: the median over runs; epoch: epochs 2..N of every run (the steady state), their "
                      "best (least disturbed by other load on a shared machine) and median")


if __name__ == "__main__":
    main()
