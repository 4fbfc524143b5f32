"""The Typer app every command registers on, the error handler that maps nnctl's errors to exit codes,
and the options several commands share.

Exit codes: 0 success, 1 runtime failure, 2 usage or config error, 128 + signal for a run
stopped by SIGINT (130) or SIGTERM (143).
"""

from __future__ import annotations

import functools
import os

import typer

from nnctl._version import __version__
from nnctl.cli.render import _err, _stdout_to_devnull

app = typer.Typer(
    name="nnctl",
    help="Train, fine-tune, inspect and export PyTorch models declared in YAML.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def reader_may_leave(fn):
    """A callback that prints a long job's progress (``nnctl train | head``): when the reader of stdout
    leaves, the rest of the output goes to /dev/null and the job goes on, as it would with nobody
    watching; the job's own record (status.json, the checkpoints) says how it ended, never a pipe."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BrokenPipeError:
            _stdout_to_devnull()
            return None

    return wrapper


def handle_errors(fn):
    """Turn nnctl's errors into one-line messages and exit codes; never a traceback for a user mistake."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from nnctl.errors import ConfigError, NnctlError

        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            for p in exc.problems:
                _err(p.format())
            raise typer.Exit(2) from None
        except BrokenPipeError:  # `nnctl schema | head`: the reader left; not an error of ours
            _stdout_to_devnull()
            raise typer.Exit(0) from None
        except NnctlError as exc:
            _err(f"error: {' '.join(str(exc).split())}")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _err("interrupted")
            raise typer.Exit(130) from None
        except typer.Exit:
            raise
        except MemoryError:
            _err("error: out of memory")
            raise typer.Exit(1) from None
        except OSError as exc:  # the environment, not nnctl: stdout on a full disk, a vanished folder, ...
            if os.environ.get("NNCTL_DEBUG"):
                raise
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else " (writing the output)"
            _err(f"error: {exc.strerror or exc}{where}")
            raise typer.Exit(1) from None
        except Exception as exc:  # a bug in nnctl, not a user mistake: say so, keep it short
            if os.environ.get("NNCTL_DEBUG"):
                raise
            _err(f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]} "
                 "(set NNCTL_DEBUG=1 for a traceback and please report it)")
            raise typer.Exit(1) from None

    return wrapper


def _version(value: bool):
    if value:
        print(f"nnctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    """Train, fine-tune, inspect and export PyTorch models declared in YAML."""


SetOpt = typer.Option(None, "--set", "-s", help="Override a config value: key.path=value (repeatable), "
                                               "e.g. train.optimizer.Adam.lr=0.01")
