"""The command line: parse the arguments, call nnctl.api, render what it returns; errors -> exit codes.

The CLI is thin (LightningCLI's model): every command parses and validates its own arguments,
makes one call into the library (``nnctl.api``), and renders the value returned (``render.py``:
tables and lines; ``progress.py``: bars). The library never prints; it claims run folders,
launches torchrun workers and handles signals, not this package. Only ``nnctl/cli/`` knows typer
and rich. The library is imported inside the command bodies, so that `nnctl --help`, `--version`
and `schema` never import torch.

    app.py          the entry point (nnctl.cli.app:main) and check
    common.py       the Typer app, the error handler (exit codes), shared options
    cmd_inspect.py  summary, layers, schema
    cmd_train.py    train, freeze
    cmd_use.py      export-weights, eval, predict
    cmd_runs.py     runs, compare, cache info|clear
    cmd_serve.py    serve

Exit codes: 0 success, 1 runtime failure, 2 usage or config error,
128 + signal for a run stopped by SIGINT (130) or SIGTERM (143).
"""

from __future__ import annotations

from typing import Optional

import typer

from nnctl.cli.common import SetOpt, app, handle_errors
from nnctl.cli.render import _err, _warn


# --- check ----------------------------------------------------------------------------

@app.command()
@handle_errors
def check(
    config: str = typer.Argument(..., help="The YAML config to validate."),
    set_: Optional[list[str]] = SetOpt,
    strict: bool = typer.Option(False, "--strict", help="Treat lint warnings as errors (exit 2)."),
):
    """Validate a config and lint it, without training."""
    from nnctl.config import structure as CS
    from nnctl.config import loader as CL
    from nnctl.errors import ConfigError

    doc = CL.load_document(config, set_ or [])
    structural = CS.validate_all(doc)
    if structural.problems:
        # keys, types, ranges: reported without paying for import torch (about 0.15 s, README "Start-up
        # time"); the layers and shapes, which need torch, are checked once these are fixed (every line a
        # problem, file:line:column, as the malformed corpus's tests read them)
        raise ConfigError(structural.problems)
    from nnctl import checking as M

    result = M.check(doc)  # THE check pipeline: what nnctl train refuses before it reads a sample
    if result.problems:
        raise ConfigError(result.problems)
    result.refuse()  # a package the config asks for and lacks (train.log: tensorboard): exit 1, as train
    plan, warnings = result.plan, result.warnings
    _warn(warnings)
    if strict and warnings:
        _err(f"error: --strict: {len(warnings)} warning{'s' if len(warnings) > 1 else ''} above count as "
             "errors")
        raise typer.Exit(2)
    out = list(plan.output_shape) if plan.output_shape else "?"
    print(f"ok: {config}: {len(plan.root.children)} layers, {plan.root.params:,} parameters, "
          f"input {list(plan.input_shape)} -> output {out}"
          + (f", {len(warnings)} warning(s)" if warnings else ""))


# the other commands register on the same app, in the order `nnctl --help` lists them
from nnctl.cli import cmd_inspect, cmd_train, cmd_use, cmd_runs, cmd_tune, cmd_serve  # noqa: E402,F401


def main() -> None:
    app()
