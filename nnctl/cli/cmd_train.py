"""Commands that make weights: train (one process, or N through torchrun) and freeze (for fine-tuning)."""

from __future__ import annotations

import json
import os
from typing import Optional

import typer

from nnctl.cli.common import SetOpt, app, handle_errors, reader_may_leave
from nnctl.cli.progress import _Progress, _cache_progress
from nnctl.cli.render import _clean, _console, _final_table, print_frozen


@app.command()
@handle_errors
def train(
    config: Optional[str] = typer.Argument(None, help="The YAML config (optional with --resume)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N | mps"),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Override train.epochs."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Override seed."),
    set_: Optional[list[str]] = SetOpt,
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Run folder (default runs/<name>, never reused)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue a run: its folder or a checkpoint."),
    init: Optional[str] = typer.Option(None, "--init", help="Start from weights: an nnctl checkpoint, "
                                                            ".safetensors, or a .pt/.pth state_dict."),
    partial: bool = typer.Option(False, "--partial", help="With --init: load the keys that fit, skip the rest "
                                                          "(e.g. a new head), and report what was skipped."),
    force: bool = typer.Option(False, "--force", help="With --resume: accept a config that differs from the "
                                                      "checkpoint's."),
    nproc_per_node: Optional[int] = typer.Option(None, "--nproc-per-node", min=1,
                                                 help="Train with DistributedDataParallel in N processes on this "
                                                      "machine (through torch.distributed.run, as torchrun)."),
    nnodes: str = typer.Option("1", "--nnodes", help="Machines (torchrun's --nnodes, e.g. 2 or 1:4)."),
    node_rank: Optional[int] = typer.Option(None, "--node-rank", min=0, help="This machine's rank (static rendezvous)."),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", help="host:port of the rendezvous, for "
                                                                              "several machines."),
    rdzv_id: str = typer.Option("nnctl", "--rdzv-id", help="A job id shared by every machine of the run."),
    max_restarts: int = typer.Option(0, "--max-restarts", min=0, help="Restart failed workers up to N times; "
                                                                     "they resume from the last checkpoint."),
    rdzv_timeout: Optional[int] = typer.Option(None, "--rdzv-timeout", min=1, help="Seconds the rendezvous waits "
                                               "for every machine, and a rank for a silent one before the run "
                                               "fails (default: torchrun's 600 and 10 minutes)."),
):
    """Build, train, validate and checkpoint a model."""
    from nnctl import api
    from nnctl.errors import Pruned

    config_path = None if config is None else _PathArg(config)  # a path, even where it reads like YAML text
    options = dict(overrides=set_ or [], out=out, resume=resume, init=init, partial=partial, force=force,
                   epochs=epochs, seed=seed, device=device)
    if nproc_per_node is not None and not api.is_worker():  # the workers print; the launcher waits for them
        api.launch(config_path, nproc_per_node=nproc_per_node, nnodes=nnodes, node_rank=node_rank,
                   rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id, max_restarts=max_restarts,
                   rdzv_timeout=rdzv_timeout, **options)
        return
    if rdzv_timeout is not None:  # a worker of plain torchrun: its process group's timeout
        api.set_timeout(rdzv_timeout)
    main = api.is_main_process()  # under torchrun: rank 0 reports, the other ranks are quiet
    trial = os.environ.get("NNCTL_TUNE_TRIAL")  # a DDP trial of nnctl tune: rank 0 reports to its study
    con = _console()
    fancy = con.is_terminal and main and not trial
    bar = _Progress(con, fancy)
    progress = reader_may_leave(bar)  # `nnctl train | head`: the run goes on
    if not main or trial:  # a trial's lines are the search's to print
        say = lambda text: None  # noqa: E731
        progress = lambda event: None  # noqa: E731
    elif fancy:
        say = reader_may_leave(lambda text: con.print(text, markup=False, highlight=False))
    else:
        say = reader_may_leave(lambda text: print(text, flush=True))
    on_event = progress
    if trial and main:
        from nnctl.search.loop import remote_reporter

        report = remote_reporter(trial)
        on_event = lambda event: (progress(event), report(event))  # noqa: E731
    try:
        with _cache_progress(con if fancy else None):
            result = api.train(config_path, on_event=on_event, on_message=lambda text: say(_clean(text)), **options)
    except Pruned as exc:  # the search stopped this trial, on every rank: its record says pruned
        say(str(exc))
        return
    finally:
        reader_may_leave(bar.close)()
    if main and not trial:
        _final_table(con, result)


class _PathArg(os.PathLike):
    """The CONFIG argument as the API's path type: the file it names, exactly as typed (never YAML text)."""

    def __init__(self, text: str):
        self.text = text

    def __fspath__(self) -> str:
        return self.text


def _int_list(text: str | None, what: str) -> list[int] | None:
    from nnctl.errors import UsageError

    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"{what}: expected comma-separated child indices such as 0,2,5, got {text!r}") from None


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


@app.command()
@handle_errors
def freeze(
    source: str = typer.Argument(..., help="A config, a checkpoint, or a run folder."),
    first: Optional[int] = typer.Option(None, "--first", help="Freeze the first N children."),
    children: Optional[str] = typer.Option(None, "--children", help="Freeze children by index: 0,2,5"),
    names: Optional[str] = typer.Option(None, "--names", help="Freeze by dotted name, globs allowed: "
                                                              "features,classifier.1"),
    unfreeze: Optional[str] = typer.Option(None, "--unfreeze", help="Then make these names / globs trainable."),
    train_frozen_norm: bool = typer.Option(False, "--train-frozen-norm",
                                           help="Let frozen normalisation layers update their running statistics."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Write a checkpoint with the weights and "
                                                                      "the freeze selection, for nnctl train --init."),
    which: str = typer.Option("best", "--which", help="For a run folder: best or last."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Freeze children for fine-tuning; print the children table; -o writes a checkpoint with the selection."""
    from nnctl import api

    result = api.freeze(source, first=first, children=_int_list(children, "--children"), names=_names(names),
                        unfreeze=_names(unfreeze), train_frozen_norm=train_frozen_norm, output=output or None,
                        which=which)
    if as_json:
        print(json.dumps(dict(result.to_dict(), output=output), indent=2))
        return
    print_frozen(result)
