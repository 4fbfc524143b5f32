"""``nnctl tune CONFIG`` (a hyperparameter search, Optuna) and ``nnctl tune show FOLDER`` (what it found)."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from nnctl.cli.common import app, handle_errors, reader_may_leave
from nnctl.cli.render import _clean, _err


def _params_text(params: dict) -> str:
    parts = []
    for path, value in params.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        parts.append(f"{path}={shown}")
    return " ".join(parts)


@reader_may_leave
def _trial_line(outcome) -> None:
    head = f"trial {outcome.number}"
    if outcome.state == "running":
        print(_clean(f"{head}: {_params_text(outcome.params)}"), flush=True)
    elif outcome.state == "complete":
        print(_clean(f"{head}: complete, {outcome.value:.4f} at epoch {outcome.epoch} ({outcome.seconds:.1f} s)"),
              flush=True)
    elif outcome.state == "pruned":
        print(_clean(f"{head}: pruned after epoch {outcome.epoch} ({outcome.value:.4f}; {outcome.seconds:.1f} s)"),
              flush=True)
    else:
        print(_clean(f"{head}: failed: {outcome.error}"), flush=True)


def _print_summary(s) -> None:
    counts = s.counts
    done = sum(counts.get(k, 0) for k in ("complete", "pruned", "failed"))
    order = ("complete", "pruned", "failed", "retried", "running", "died", "waiting")
    tally = ", ".join(f"{counts[k]} {k}" for k in order if counts.get(k))
    print(_clean(f"search {s.folder}: {s.metric} ({s.direction}), {done} of {s.target} trials done ({tally or 'none'})"))
    if s.trials:
        width = max(len(str(t.number)) for t in s.trials)
        for t in s.trials:
            value = f"{t.value:.4f}" if t.value is not None else "-"
            epoch = f"epoch {t.epoch}" if t.epoch is not None else ""
            tail = f"  {t.error}" if t.error and t.state in ("failed", "retried", "died") else ""
            print(_clean(f"  {t.number:>{width}}  {t.state:<8} {value:>8}  {epoch:<9} {_params_text(t.params)}"
                         f"{tail[:200]}"))
    if s.best is None:
        print("no trial has completed yet")
    else:
        b = s.best
        print(_clean(f"best: trial {b.number}, {s.metric} {b.value:.4f} at epoch {b.epoch}, run {b.run}"))
        for path, value in b.params.items():
            print(_clean(f"  {path} = {value}"))
        for what, command in s.commands.items():
            print(_clean(f"{what}: {command}"))
    written = ([s.best_yaml] if s.best_yaml else []) + list(s.pictures)
    if written:
        print(_clean(f"wrote {', '.join(written)}"))
    for note in s.notes:
        _err(f"note: {note}")


@app.command()
@handle_errors
def tune(
    target: str = typer.Argument(..., help="A config with a tune: section; or `show` and a search folder."),
    folder: Optional[str] = typer.Argument(None, help="tune show: the search folder (runs/<name>-tune)."),
    workers: int = typer.Option(1, "--workers", help="Worker processes on this machine, all on one study."),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", min=1, help="Each trial a DDP run of N processes "
                                                                         "(as nnctl train --nproc-per-node)."),
    out: Optional[str] = typer.Option(None, "--out", help="The search folder (default: runs/<name>-tune)."),
    overrides: list[str] = typer.Option([], "--set", help="key.path=value, as for train (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="tune show: print the summary as JSON."),
    storage: Optional[str] = typer.Option(None, "--storage", help="tune show: the study's database URL (one "
                                                                  "with a password is not recorded)."),
):
    """Search hyperparameters with Optuna (the config's tune: section): every trial a run folder. The same
    command continues a stopped search. `nnctl tune show FOLDER`: the best trial, best.yaml and pictures."""
    from nnctl import api
    from nnctl.errors import UsageError

    if target == "show":
        if folder is None:
            raise UsageError("nnctl tune show FOLDER: give the search folder (runs/<name>-tune)")
        summary = api.tune_show(folder, storage=storage)
        if as_json:
            print(json.dumps(summary.to_dict(), indent=2, allow_nan=False))
        else:
            _print_summary(summary)
        return
    if folder is not None:
        raise UsageError(f"unexpected argument {folder!r}: nnctl tune CONFIG, or nnctl tune show FOLDER")
    if as_json or storage:
        raise UsageError("--json and --storage apply to nnctl tune show FOLDER")
    result = api.tune(target, overrides=overrides, out=out, workers=workers, nproc_per_node=nproc_per_node,
                      on_trial=_trial_line)
    if result.stopped == "timeout":
        _err("note: tune.timeout reached: no new trial started (the same command continues the search)")
    sys.stdout.flush()
    _print_summary(api.tune_show(result.folder))
