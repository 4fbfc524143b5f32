"""Shared helpers: configs as dicts, the CLI runner, small model configs."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

import nnctl
from nnctl.locks import FileLock

# One torch thread in each pytest-xdist worker and in every nnctl process a test starts: the workers already
# use every core, and two 2-thread pools on 2 cores spend their time waiting on each other (about 10%
# of the suite's time, measured). Set before torch is imported (nnctl imports it lazily).
os.environ.setdefault("OMP_NUM_THREADS", "1")

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

    def invoke(*args: str, env: dict | None = None):
        # a wide console: pytest-xdist workers get COLUMNS=80, which would wrap the tables the tests read
        result = runner.invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "200", **(env or {})})
        return result.exit_code, result.stdout, result.stderr

    return invoke


# --- one trained run for the whole session ----------------------------------------------------

# the BASE digits model (Flatten + Linear(64, 10): 650 parameters), 1 epoch, with a StepLR scheduler so
# that its checkpoints carry a scheduler state too (the corruption tests flip bytes of all of it)
SHARED_RUN = make(train={"epochs": 1, "scheduler": {"StepLR": {"step_size": 1, "gamma": 0.5}}})


def digest_of(folder: Path) -> dict[str, str]:
    """Every file's SHA-256 in a folder, by relative path (what a test compares to say "untouched")."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """ONE finished run of SHARED_RUN through `nnctl.train`, trained once per session, for the tests that
    only read a trained run (eval, predict, summary, export, resume refusals on a copy). Under
    pytest-xdist the workers share it: the first one trains it under a lock, the others wait and reuse it.
    A test that writes into a run copies this one first (shutil.copytree); at the end of the session the
    folder must still have exactly the files and bytes it had after training, else the teardown fails."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above every worker's own: one run for all of them
    run, done = root / "digits-run", root / "digits-run.json"
    with FileLock(root / "digits-run.lock"):
        if not done.exists():
            if run.exists():
                shutil.rmtree(run)  # a worker that failed while training it: train it again
            result = nnctl.train(SHARED_RUN, out=str(run))
            assert result.run_dir == run and len(result.history) == 1
            done.write_text(json.dumps(digest_of(run)))
    before = json.loads(done.read_text())
    yield run
    assert digest_of(run) == before, f"a test wrote into the shared run {run}: copy it first"


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
    that docs/reliability.md quotes (configs tried, corruptions tried and caught, kills resumed).
    Under a lock beside it: pytest-xdist workers finish their modules at the same time."""
    target = os.environ.get("NNCTL_RELIABILITY_REPORT")
    if not target:
        return
    with FileLock(target + ".lock"):
        old = {}
        if os.path.exists(target):
            try:
                old = json.loads(Path(target).read_text())
            except ValueError:
                old = {}
        for k, v in stats.items():
            old[k] = old.get(k, 0) + v
        Path(target).write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
