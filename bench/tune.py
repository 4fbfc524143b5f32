"""nnctl tune: what a trial costs over a plain training of the same config, and a search's wall time.

    python bench/tune.py               # the measurement (about 10 minutes on 2 cores)
    python bench/tune.py --tiny        # tiny sizes, one run each: checks that it works

1. Overhead of a trial: the same config and values trained in one process, interleaved, as
   `nnctl.train` (a plain run) and as a one-trial `nnctl.tune` (the study, sampling, the per-epoch
   report to Optuna, the heartbeat thread, the trial's bookkeeping). Each side is timed whole, from
   the call to its return; the search's `tune show` (best.yaml, pictures) is not part of a trial.
   Goal (issue 21): under 5%.
2. configs/digits_tune.yaml's 12 trials, `nnctl tune` with 1 and with 2 worker processes (fresh
   processes, wall clock from fork to exit, `tune show` included as the command prints it).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

import common

ROOT = common.ROOT


def _config(folder: Path, epochs: int, quick: bool) -> Path:
    d = yaml.safe_load((ROOT / "configs" / "digits_tune.yaml").read_text())
    d["train"]["epochs"] = epochs
    d["tune"] = {"trials": 1, "pruner": "none", "sampler": "random",
                 "params": {"train.batch_size": {"choice": [64]}}}  # one value: the same run as the plain one
    if quick:
        d["model"]["layers"] = ["Flatten", {"Linear": {"out_features": 10}}, {"LogSoftmax": {"dim": 1}}]
    path = folder / "one.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def overhead(args, folder: Path) -> str:
    import nnctl

    path = _config(folder, 1 if args.quick else 15, args.quick)
    count = iter(range(10_000))

    # CPU seconds of this process (time.process_time): what each side costs, robust to other jobs on a shared
    # machine, where wall times of one side swing by several times (measured: 8 s to 64 s for the same run)
    def plain() -> float:
        t0 = time.process_time()
        nnctl.train(str(path), out=str(folder / f"plain-{next(count)}"))
        return time.process_time() - t0

    def trial() -> float:
        out = folder / f"search-{next(count)}"
        t0 = time.process_time()
        result = nnctl.tune(str(path), out=str(out))
        took = time.process_time() - t0
        assert [o.state for o in result.outcomes] == ["complete"], result.outcomes
        return took

    times = common.interleaved({"nnctl train": plain, "nnctl tune (1 trial)": trial}, runs=args.runs,
                               warmup=0 if args.quick else 1)
    a, b = common.median(times["nnctl train"]), common.median(times["nnctl tune (1 trial)"])
    ratio = b / a
    return common.table(
        "A trial against a plain run of the same config (digits CNN, 15 epochs, in one process; CPU seconds)",
        ["variant", "median CPU s", "runs (min-max)"],
        [["nnctl train", a, common.spread(times["nnctl train"])],
         ["nnctl tune, one trial", b, common.spread(times["nnctl tune (1 trial)"])],
         ["overhead", f"{(ratio - 1) * 100:+.1f}%", common.verdict(ratio, 1.05)]],
        note=f"{common.machine()}; `python bench/tune.py --runs {args.runs}`")


def workers(args, folder: Path) -> str:
    rows = []
    config = ROOT / "configs" / "digits_tune.yaml"
    extra = ["--set", "train.epochs=1", "--set", "tune.trials=2"] if args.quick else []
    for n in (1, 2):
        out = folder / f"w{n}"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "nnctl", "tune", str(config), "--out", str(out),
                               "--workers", str(n), *extra], capture_output=True, text=True, cwd=folder)
        took = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        summary = next(line for line in proc.stdout.splitlines() if line.startswith("search "))
        best = next((line for line in proc.stdout.splitlines() if line.startswith("best: ")), "best: none")
        rows.append([n, took, summary.split("), ", 1)[1], best.split(",")[1].strip() if "," in best else best])
    return common.table("configs/digits_tune.yaml (12 trials, median pruner): wall time by workers",
                        ["workers", "wall s", "trials", "best"], rows,
                        note=f"{common.machine()}; `python bench/tune.py`; fresh `nnctl tune` processes, "
                             "each worker with cores / workers torch threads")


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], runs=3)
    p.add_argument("--overhead-only", action="store_true", help="only the trial's overhead (no 12-trial searches)")
    args = p.parse_args()
    common.setup_threads(args.threads)
    if args.quick:
        args.runs = 1
    folder = Path(tempfile.mkdtemp(prefix="nnctl-bench-tune-"))
    try:
        overhead(args, folder)
        if not args.overhead_only:
            workers(args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
