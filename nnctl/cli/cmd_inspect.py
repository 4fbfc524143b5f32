"""Commands that look at a model or the config language: summary, layers, schema."""

from __future__ import annotations

import json
from typing import Optional

import typer

from nnctl.cli.common import SetOpt, app, handle_errors
from nnctl.cli.render import _err, print_layers, print_summary


@app.command()
@handle_errors
def summary(
    source: str = typer.Argument(..., help="A config, a checkpoint, or a run folder."),
    depth: int = typer.Option(1, "--depth", "-d", min=0, help="Levels of nested blocks to open (0: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts instead of a table."),
    which: str = typer.Option("best", "--which", help="For a run folder: best (default) or last."),
    graph: Optional[str] = typer.Option(None, "--graph", help="Also draw the model (branches, shortcuts, "
                                                              "output shapes) to this .png, .svg or .pdf file."),
    set_: Optional[list[str]] = SetOpt,
    processes: int = typer.Option(1, "--processes", "-n", min=1, max=65536,
                                  help="The training state one rank holds with this many processes "
                                       "(train.distributed.strategy: ddp, a copy each; fsdp, 1/N each)."),
):
    """Per-layer table: output shapes, parameters, trainable/frozen, MACs; totals."""
    from nnctl import api

    result = api.summarize(source, depth=depth, which=which, overrides=set_ or [], graph=graph, processes=processes)
    if graph is not None:
        _err(f"graph: {graph}")
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    print_summary(result)


@app.command()
@handle_errors
def layers(
    name: Optional[str] = typer.Argument(None, help="Show one layer type's arguments."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """The layer types a config may name (torch.nn) and their arguments, from PyTorch's signatures."""
    from nnctl import api

    info = api.layer_types(name)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    print_layers(info, one=bool(name))


@app.command()
@handle_errors
def schema(
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Write to this file instead of stdout."),
):
    """A JSON Schema of the config, for YAML editors (yaml-language-server)."""
    # straight from the config layer, not through nnctl.api: `nnctl schema` never imports torch
    from nnctl.config.schema import json_schema

    text = json.dumps(json_schema(), indent=2)
    if output:
        from nnctl.files import atomic_write  # refuses a folder, a device or a FIFO as the target

        atomic_write(output, lambda fh: fh.write((text + "\n").encode()))
    else:
        print(text)
