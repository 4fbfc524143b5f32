"""Shared helpers: configs as dicts, the CLI runner, small model configs."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections import Counter
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

    from nnctl.cli.app import app

    runner = CliRunner()

    def invoke(*args: str):
        result = runner.invoke(app, list(args), catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return invoke


# --- shared by the reliability tests (tests/test_reliability_*.py) ---------------------

HELPERS = Path(__file__).resolve().parent / "helpers"
SENTINEL = "SENTINEL"  # the file a hostile payload would create, were it ever run


def helper_command(name: str, *args: str) -> list[str]:
    """The command line running tests/helpers/NAME.py by its absolute path: works from any working folder."""
    return [sys.executable, str(HELPERS / f"{name}.py"), *args]


def config_outcome(doc) -> tuple[str, list[str]]:
    """Validate a loaded document as `nnctl check` does, through the one check pipeline (nnctl.checking:
    structure, plan, freeze, data facts, optimizer, augment, loss): ("ok", []) or ("refused", the problems
    as the CLI prints them). Any other exception escapes. The caller asserts on the problems."""
    from nnctl import checking as CHK
    from nnctl.errors import UsageError

    try:
        result = CHK.check(doc)
    except UsageError as exc:
        return "refused", [" ".join(str(exc).split())]  # as the CLI's handle_errors prints it
    if result.problems:
        return "refused", [p.format() for p in result.problems]
    return "ok", []


def text_outcome(text: str, file: str = "c.yaml") -> tuple[str, list[str]]:
    """config_outcome for YAML text: refused by the loader itself, or the loaded document's outcome."""
    from nnctl.config import yamlio
    from nnctl.errors import ConfigError

    try:
        doc = yamlio.load_text(text, file)
    except ConfigError as exc:
        return "refused", [p.format() for p in exc.problems]
    return config_outcome(doc)


def not_one_line(texts: list[str]) -> list[str]:
    """The texts that are not exactly one non-empty line (the ones a test should complain about)."""
    return [t for t in texts if "\n" in t or not t.strip()]


def add_to_reliability_report(stats: Counter) -> None:
    """Add a module's counts to the JSON file named by NNCTL_RELIABILITY_REPORT, if set: the figures
    that docs/reliability.md quotes (configs tried, corruptions tried and caught, kills resumed)."""
    target = os.environ.get("NNCTL_RELIABILITY_REPORT")
    if not target:
        return
    old = {}
    if os.path.exists(target):
        try:
            old = json.loads(Path(target).read_text())
        except ValueError:
            old = {}
    for k, v in stats.items():
        old[k] = old.get(k, 0) + v
    Path(target).write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
