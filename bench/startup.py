"""Start-up time of nnctl commands against `python -c "import torch"` (subprocess wall times).

    python bench/startup.py            # the measurement (about a minute)
    python bench/startup.py --quick    # one run each: checks that it works

Each command is a fresh process, timed from fork to exit, the commands interleaved
round by round. `python -c pass` is the floor (the interpreter alone).
Goal: `nnctl --help` <= 0.2x `import torch`.
"""

from __future__ import annotations

import sys

import common


def main() -> None:
    args = common.parser(__doc__.splitlines()[0], runs=9).parse_args()
    common.header("start-up: nnctl commands vs import torch (subprocess wall time)", args.quick)
    runs = 1 if args.quick else args.runs
    nnctl = common.nnctl_exe()
    config = str(common.ROOT / "configs" / "digits_cnn.yaml")
    commands = {
        'python -c "pass"': [sys.executable, "-c", "pass"],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "nnctl --help": nnctl + ["--help"],
        "nnctl --version": nnctl + ["--version"],
        "nnctl check configs/digits_cnn.yaml": nnctl + ["check", config],
        "nnctl check (a structural mistake: seed: abc)": nnctl + ["check", config, "--set", "seed=abc"],
    }
    goals = {"nnctl --help": 0.2, "nnctl check (a structural mistake: seed: abc)": 0.2}
    refused = {"nnctl check (a structural mistake: seed: abc)"}  # exits 2, as it must
    variants = {name: (lambda cmd=cmd, name=name: common.wall(cmd, cwd=common.ROOT, check=name not in refused))
                for name, cmd in commands.items()}
    times = common.interleaved(variants, runs, warmup=0 if runs == 1 else 1)
    base = common.median(times['python -c "import torch"'])
    rows = []
    for name in commands:
        m = common.median(times[name])
        goal = goals.get(name)
        rows.append([f"`{name}`", m, common.spread(times[name]), m / base,
                     common.verdict(m / base, goal) if goal else ""])
    common.table(f"start-up, median of {runs} interleaved runs",
                 ["command", "median s", "range s", "/ import torch", "goal"], rows,
                 "Wall time of a fresh process, fork to exit; lower is better.")


if __name__ == "__main__":
    main()
