"""Shared helpers: configs as dicts, the CLI runner, small model configs."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

BASE = {
    "name": "t",
    "seed": 0,
    "model": {"input_shape": [1, 8, 8], "layers": ["Flatten", {"Linear": {"out_features": 10}}]},
    "data": {"source": "digits"},
    "train": {"loss": "cross_entropy", "epochs": 1},
}


def make(**sections) -> dict:
    """BASE with sections replaced or updated: make(model={...}, train={"epochs": 2})."""
    d = copy.deepcopy(BASE)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(d.get(key), dict) and key != "model":
            d[key].update(value)
        else:
            d[key] = value
    return d


def write(tmp_path: Path, d: dict, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None):
    """Run the real `nnctl` entry point in a subprocess: exit code, stdout, stderr."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "nnctl", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


@pytest.fixture
def cli():
    """In-process CLI (fast): returns (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from nnctl.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        result = runner.invoke(app, list(args), catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return invoke
