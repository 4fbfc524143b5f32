"""The benchmark scripts run (not timed tests): each with --tiny exits 0 and prints a table.

The measurements themselves are in docs/benchmarks.md; these tests only keep the
scripts working. The Lightning benchmark is skipped where lightning is not installed
(it is not an nnctl dependency), and bench/gpu.py skips itself without CUDA (it then
prints the reference figures and a "skipped" line).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def run_bench(name: str, *extra: str) -> str:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(BENCH / name), "--tiny", *extra], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def assert_table(out: str) -> None:
    lines = out.splitlines()
    assert any(line.startswith("### ") for line in lines), out
    assert any(line.startswith("|--") or line.startswith("|-") for line in lines), out


pytestmark = pytest.mark.slow  # every benchmark script once (about 70 s in all on 2 cores): .ci/run runs the slow group


@pytest.mark.parametrize("name", ["parity.py", "tutorial.py", "startup.py", "checkpoints.py", "first_step.py", "tune.py", "fsdp.py",
                                  "serve.py"])
def test_cpu_benchmark_runs(name):
    out = run_bench(name)
    assert_table(out)
    if name == "parity.py":  # the same losses on both sides, step by step
        assert "DIFFERENT" not in out, out


@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="lightning is not installed")
def test_lightning_benchmark_runs():
    out = run_bench("lightning_vs_nnctl.py")
    assert_table(out)
    assert "Lightning s" in out


def test_gpu_benchmark_runs_or_skips():
    import torch

    out = run_bench("gpu.py")
    assert_table(out)  # the reference figures, at least
    if not torch.cuda.is_available():
        assert "skipped: no CUDA device" in out
    else:
        assert "parity on" in out


def test_image_folder_benchmark_runs():
    """bench/image_folder.py --tiny: a generated folder, torchvision's DataLoader and nnctl with and without
    the decoded cache (its own cache folder, removed afterwards)."""
    out = run_bench("image_folder.py")
    assert_table(out)
    for variant in ("torchvision, 0 workers", "| nnctl ", "nnctl, cold cache", "nnctl, warm cache"):
        assert variant in out, out


def test_augment_benchmark_runs():
    """bench/augment.py --tiny: nnctl's batch augmentation (preloaded and streamed) against torchvision's
    per-sample transforms in a DataLoader, and the floor without augmentation, for both pipelines."""
    out = run_bench("augment.py")
    assert_table(out)
    for variant in ("floor (no augmentation)", "nnctl preloaded (batch)", "nnctl streamed, 2 workers (batch)",
                    "torchvision per sample, 0 workers", "torchvision per sample, 2 workers", "crop+flip+jitter"):
        assert variant in out, out


def test_overhead_breakdown_accounts_for_the_whole_run(tmp_path):
    """bench/overhead.py (issue 25): every part of nnctl's run, fork to exit, is clocked: the parts add up to
    the wall time but for the interpreter's start (a later change that adds a second shows in a named row,
    or in "the rest"). The breakdown is printed (pytest -s) and kept in the JSON; this is not a timed test."""
    import json

    out = run_bench("overhead.py", "--json", str(tmp_path / "overhead.json"))
    assert_table(out)
    print(out)
    (case,) = json.loads((tmp_path / "overhead.json").read_text())
    for side in ("nnctl", "hand"):
        parts = sum(v[side] for k, v in case["parts"].items() if k != "wall")
        wall = case["parts"]["wall"][side]
        assert 0 <= wall - parts < 0.5, (side, wall, parts)  # what is left: Python's own start-up
    assert case["parts"]["curves.png (matplotlib)"]["nnctl"] > 0 and case["parts"]["training epochs"]["hand"] > 0
