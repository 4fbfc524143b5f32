"""Shared helpers for the benchmarks: arguments, interleaved timing, medians, tables, configs.

Every benchmark compares variants (A: nnctl, B: the reference) by running them
interleaved, A B A B ..., so that load from other processes on a shared machine
falls on both sides alike, and reports the median of each and the ratio of the
medians. Nothing here imports nnctl; the scripts import it from the repository
root (bench/ is run as ``python bench/x.py`` from anywhere).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/ on sys.path, not the repository
    sys.path.insert(0, str(ROOT))


# --- arguments ------------------------------------------------------------------------

def parser(description: str, runs: int = 5) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", "--tiny", dest="quick", action="store_true",
                   help="tiny sizes and one run each: checks that the benchmark works, measures nothing")
    p.add_argument("--runs", type=int, default=runs, help=f"interleaved runs of each variant (default {runs})")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for both sides (default: torch's default, one a core)")
    return p


def setup_threads(threads: int | None) -> int:
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# --- timing ---------------------------------------------------------------------------

def interleaved(variants: dict[str, Callable[[], float | None]], runs: int, warmup: int = 1,
                log: bool = True, before_round: Callable[[], None] | None = None,
                after_round: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Run each variant `runs` times in rounds after `warmup` untimed rounds.

    The order alternates, A B, B A, A B, ..., so neither side always runs first (a cache
    warmed or a clock boosted by the one before). before_round / after_round run
    outside the timing (e.g. to build one fresh model for both sides, then compare them).
    A variant returns the seconds it measured itself (to time only the epoch and leave
    set-up out), or None to be timed whole by the wall clock here.
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(warmup + runs):
        if before_round is not None:
            before_round()
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            got = variants[name]()
            took = time.perf_counter() - t0 if got is None else float(got)
            if r >= warmup:
                times[name].append(took)
        if after_round is not None:
            after_round()
        if log and r >= warmup:
            done = r - warmup + 1
            print(f"  run {done}/{runs}: " + "  ".join(f"{n} {times[n][-1]:.3f}s" for n in names),
                  file=sys.stderr, flush=True)
    return times


def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float]) -> str:
    """min-max of the runs, for the table."""
    return f"{min(xs):.3f}-{max(xs):.3f}" if xs else ""


def wall(cmd: list[str], env: dict | None = None, cwd: str | os.PathLike | None = None,
         check: bool = True) -> float:
    """Wall-clock seconds of a subprocess, from fork to exit."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)
    took = time.perf_counter() - t0
    if check and proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
                         f"{proc.stdout.decode(errors='replace')[-2000:]}\n{proc.stderr.decode(errors='replace')[-4000:]}")
    return took


# --- tables ---------------------------------------------------------------------------

def table(title: str, header: list[str], rows: list[list], note: str | None = None) -> str:
    """A Markdown table (pastes into docs/benchmarks.md as it is), printed and returned."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    right = [all(isinstance(row[i], int | float) or _NUMBER.match(str(row[i])) for row in rows) and bool(rows)
             for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.rjust(w) if right[i] else c.ljust(w)
                                       for i, (c, w) in enumerate(zip(r, widths))) + " |"
    out = [f"### {title}", "", line(cells[0]),
           "|" + "|".join(("-" * (w + 1) + ":") if right[i] else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"]
    out += [line(r) for r in cells[1:]]
    if note:
        out += ["", note]
    text = "\n".join(out) + "\n"
    print(text, flush=True)
    return text


_NUMBER = re.compile(r"^[-+]?[\d,.]+(e[-+]?\d+)?x?$|^$")


def _fmt(c) -> str:
    if isinstance(c, float):
        if c != c:
            return "n/a"
        return f"{c:.3f}" if abs(c) < 1000 else f"{c:,.0f}"
    return str(c)


def verdict(ratio: float, goal: float, lower_is_better: bool = True) -> str:
    ok = ratio <= goal if lower_is_better else ratio >= goal
    sign = "<=" if lower_is_better else ">="
    return f"{'met' if ok else 'NOT met'} ({sign} {goal:g}x)"


def machine() -> str:
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.strip().lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


def header(name: str, quick: bool) -> None:
    print(f"# {name}{' (--quick: tiny sizes, not a measurement)' if quick else ''}")
    print(f"machine: {machine()}\n", flush=True)


# --- configs and tools ----------------------------------------------------------------

MLP_LAYERS = ["Flatten", {"Linear": [784, 128]}, "ReLU", {"Linear": [128, 10]}]

# pytorch/examples mnist/main.py, layer for layer
CNN_LAYERS = [
    {"Conv2d": [1, 32, 3, 1]}, "ReLU", {"Conv2d": [32, 64, 3, 1]}, "ReLU", {"MaxPool2d": 2},
    {"Dropout": 0.25}, "Flatten", {"Linear": [9216, 128]}, "ReLU", {"Dropout": 0.5},
    {"Linear": [128, 10]}, {"LogSoftmax": {"dim": 1}},
]

MODELS = {
    # name: (layers, loss, optimizer)
    "mlp": (MLP_LAYERS, "cross_entropy", {"Adam": {"lr": 0.001}}),
    "cnn": (CNN_LAYERS, "nll", {"Adadelta": {"lr": 1.0}}),
}


def config_dict(model: str, data: dict, batch_size: int = 64, epochs: int = 1, seed: int = 1, **train) -> dict:
    layers, loss, optimizer = MODELS[model]
    return {
        "name": f"bench-{model}",
        "seed": seed,
        "model": {"input_shape": [1, 28, 28], "layers": layers},
        "data": data,
        "train": {"epochs": epochs, "batch_size": batch_size, "loss": loss, "optimizer": optimizer, **train},
    }


def synthetic(size: int) -> dict:
    return {"source": "synthetic", "size": size, "classes": 10, "val_fraction": 0.0}


def nnctl_exe() -> list[str]:
    """The nnctl console script beside this Python, else `python -m nnctl`."""
    exe = Path(sys.executable).parent / "nnctl"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "nnctl"]


def mnist_like(n: int, seed: int = 0):
    """MNIST-shaped data: (n, 28, 28) random uint8 pixels (empty border rows, as MNIST) and int64 labels."""
    import torch

    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = (torch.rand((n, 28, 28), generator=g) * 255).to(torch.uint8)
    x[:, :4] = 0  # MNIST's empty border rows
    x[:, -4:] = 0
    return x, y


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def write_tensors_file(path: Path, x_uint8, y) -> Path:
    """A `tensors` source file with float x already scaled and normalised as ToTensor + Normalize do."""
    import torch

    x = x_uint8.to(torch.float32).div_(255).sub_(MNIST_MEAN).div_(MNIST_STD).unsqueeze(1).contiguous()
    torch.save({"x": x, "y": y}, path)
    return path
