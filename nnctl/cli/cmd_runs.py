"""Commands over run folders and the decoded-image cache: runs, compare, cache info|clear."""

from __future__ import annotations

import json
from typing import Optional

import typer

from nnctl.cli.common import app, handle_errors
from nnctl.cli.render import _err, _fmt_bytes, print_cache, print_comparison, print_runs


@app.command("runs")
@handle_errors
def runs_(
    folder: str = typer.Argument("runs", help="A folder of run folders (default: runs), or one run folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the runs as JSON."),
):
    """A table of the runs in a folder, by start time: state, epochs, best metric, what differs."""
    # the run records' owner itself, not nnctl.api: listing reads only small text files and never imports
    # torch (the api's other doors do), so 100 runs list in about a second (README, Experiments)
    from nnctl.runs.records import list_runs

    infos = list_runs(folder)
    if as_json:
        print(json.dumps([i.to_dict() for i in infos], indent=2, allow_nan=False))
        return
    print_runs(infos, folder)


@app.command()
@handle_errors
def compare(
    runs: list[str] = typer.Argument(..., help="Two or more run folders."),
    out: str = typer.Option("compare.png", "--out", "-o", help="The picture of the curves (.png, .svg or .pdf)."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
):
    """Runs side by side: config differences, final and best metrics, one picture of their curves."""
    from nnctl import api

    comparison = api.compare(runs, out=out)
    if as_json:
        print(json.dumps(comparison.to_dict(), indent=2, allow_nan=False))
        return
    print_comparison(comparison)


# --- the decoded-image cache -----------------------------------------------------------

cache_app = typer.Typer(help="Show or free the decoded-image cache (data.cache: true): $NNCTL_CACHE_DIR, "
                             "default ~/.cache/nnctl/decoded.", no_args_is_help=True, add_completion=False,
                        rich_markup_mode=None)
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
@handle_errors
def cache_info(
    verify: bool = typer.Option(False, "--verify", help="Hash every data file in full (reads them all)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of a table."),
):
    """List the cache's entries: image folder, images, shape, size on disk, last used, status."""
    from nnctl import api

    directory, found = api.cache_info(verify=verify)
    total = sum(e.bytes for e in found)
    if as_json:
        print(json.dumps({"directory": str(directory), "bytes": total, "entries": [e.to_dict() for e in found]},
                         indent=1))
        return
    if not found:
        print(f"decoded-image cache {directory}: empty")
        return
    print_cache(directory, found, total)
    if verify:
        print("--verify: every entry's data file read whole and each chunk's SHA-256 compared with its header "
              "(without --verify: sizes and stamps, and sampled chunks of large files)")


@cache_app.command("clear")
@handle_errors
def cache_clear(
    root: Optional[str] = typer.Option(None, "--root", help="Only the entries of this image folder."),
    all_: bool = typer.Option(False, "--all", help="Every entry."),
):
    """Remove entries (--all, or --root DIR); an entry being built by a running process is left alone."""
    from nnctl import api

    done = api.cache_clear(root=root, all=all_)
    print(f"removed {done.removed} entr{'y' if done.removed == 1 else 'ies'} ({_fmt_bytes(done.freed)}) "
          f"from {done.directory}")
    for key in done.busy:
        _err(f"note: {key[:12]} is being built by a running process: left alone")
    for key, why in getattr(done, "skipped", ()):
        _err(f"note: {key[:12]}: {why}: left alone")


