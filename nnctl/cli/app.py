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
    """The commands, as a library call: typer parses, runs the command and raises SystemExit."""
    app()


def run() -> None:
    """The console script and ``python -m nnctl``: ``main()``, then leave without tearing Python down.

    By the time a command returns, everything it wrote is closed, fsynced and renamed into place
    (``nnctl.files``), its worker processes are joined and its loggers closed. What is left at the
    normal interpreter exit is destroying the ~3,000 modules torch, matplotlib and friends loaded and
    every object they hold: 0.5-1.5 s on this project's 2-core machine, paid by every command and
    every trial (docs/benchmarks.md, "The whole run"). So: the threads Python would join, the
    ``atexit`` handlers it would run (multiprocessing, logging, TensorBoard, MLflow), the standard
    streams flushed, then ``os._exit`` with the same exit code. An exception other than SystemExit
    takes Python's normal path, and so does every exit under a profiler or a tracer (cProfile, a
    debugger, coverage), which write their results after the program returns.
    """
    import atexit
    import os
    import sys
    import threading

    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code
    if sys.getprofile() is not None or sys.gettrace() is not None:
        # under a profiler or a debugger (python -m cProfile -m nnctl, pdb, coverage's tracer): they write
        # their results after this returns, so the exit is Python's own
        raise SystemExit(code)
    if code is None:
        code = 0
    elif not isinstance(code, int):  # SystemExit("message"): Python prints it and exits 1
        print(code, file=sys.stderr)
        code = 1
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that left (`nnctl runs | head -1`: not an error, as in main)
            pass
    os._exit(code)
