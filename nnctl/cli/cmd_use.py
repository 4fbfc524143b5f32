"""Commands that use a trained model: export-weights, eval, predict."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from nnctl.cli.common import SetOpt, app, handle_errors
from nnctl.cli.render import _console, _console_err, _err, _finite, _fmt_bytes, _render_predictions, print_per_class


@app.command("export-weights")
@handle_errors
def export_weights(
    source: str = typer.Argument(..., help="A checkpoint or a run folder."),
    fmt: str = typer.Option("safetensors", "--format", "-f", help="safetensors | pt | npz | onnx"),
    which: str = typer.Option("best", "--which", help="For a run folder: best or last."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Output file (default: CKPT_FOLDER/export/"
                                                                      "<best|last>.<format's suffix>)."),
    with_preprocess: bool = typer.Option(False, "--with-preprocess", help="onnx: fold the recorded scaling and "
                                                                          "normalisation into the graph, so it "
                                                                          "takes raw pixels."),
):
    """Export a checkpoint's weights: safetensors (default, with metadata), pt, npz or onnx."""
    from nnctl import api

    result = api.export(source, fmt, output, which=which, with_preprocess=with_preprocess)
    for note in result.notes:
        _err(f"note: {note}")
    line = f"wrote {result.path} ({fmt}, {result.tensors} tensors, {_fmt_bytes(result.bytes)})"
    if result.max_abs_diff is not None:
        line += f"; onnxruntime vs eager max |diff| = {result.max_abs_diff:.2e}"
    print(line)


@app.command("eval")
@handle_errors
def eval_(
    source: str = typer.Argument(..., help="A checkpoint or run folder (or a config, with --init)."),
    which: str = typer.Option("best", "--which", help="For a run folder: best or last."),
    split: Optional[str] = typer.Option(None, "--split", help="val (default), train, test (the dataset's own "
                                                              "test split, or data.test_root) or all (the default "
                                                              "for other data: --data, --set data.root=...)."),
    data: Optional[str] = typer.Option(None, "--data", help="Score on other data: a YAML file with a data: "
                                                            "section; the recorded preprocessing applies."),
    set_: Optional[list[str]] = SetOpt,
    init: Optional[str] = typer.Option(None, "--init", help="With a config: evaluate these weights, untrained."),
    partial: bool = typer.Option(False, "--partial", help="With --init: load the keys that fit."),
    confusion: bool = typer.Option(False, "--confusion", help="Write a confusion-matrix PNG and print "
                                                              "per-class precision and recall."),
    confusion_out: Optional[str] = typer.Option(None, "--confusion-out", help="Where the PNG goes (default: "
                                                                              "RUN/eval/confusion-SPLIT.png)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N | mps"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """The metrics of a checkpoint on a split of its data, or on other data."""
    from nnctl import api

    if partial and not init:
        from nnctl.errors import UsageError

        raise UsageError("--partial applies to --init WEIGHTS; there is no --init here")
    result = api.evaluate(source, which=which, split=split, data=data, overrides=set_ or [], init=init,
                        partial=partial, device=device, confusion=confusion, confusion_path=confusion_out)
    for note in result.notes:
        _err(f"note: {note}")
    if as_json:  # strict JSON: a non-finite number is null, never NaN
        print(json.dumps(_finite(result.to_dict()), indent=2, allow_nan=False))
        return
    print(f"scored: {result.scored}")
    head = {"split": result.split, "samples": result.samples,
            **({"epoch": result.epoch} if result.epoch is not None else {}), **result.metrics}
    print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in head.items()))
    if result.per_class:
        print_per_class(result)
    if result.confusion_png:
        print(f"wrote {result.confusion_png}")


@app.command()
@handle_errors
def predict(
    source: str = typer.Argument(..., help="A run folder or a checkpoint."),
    inputs: list[str] = typer.Argument(..., help="Image files, folders of them, or tensors files "
                                                 "(.pt, .npz, .safetensors: key x)."),
    which: str = typer.Option("best", "--which", help="For a run folder: best or last."),
    top_k: int = typer.Option(1, "--top-k", "-k", min=1, help="Classes to show for each input."),
    fmt: str = typer.Option("table", "--format", help="table | csv | jsonl"),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Write the results to this file "
                                                                     "(atomically) instead of stdout."),
    glob: Optional[str] = typer.Option(None, "--glob", help="In folders: only files matching this pattern, "
                                                            "e.g. '*.png'."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Inputs a forward pass."),
    device: str = typer.Option("cpu", "--device", help="auto | cpu | cuda | cuda:N | mps"),
):
    """Run a trained model on new inputs with its recorded preprocessing; exit 1 if any input failed."""
    from nnctl import api
    from nnctl.errors import UsageError

    if fmt not in ("table", "csv", "jsonl"):
        raise UsageError(f"--format must be table, csv or jsonl, not {fmt!r}")
    if output:
        from nnctl.files import check_output

        check_output(output, [source, *inputs], what="-o")
    con = _console()
    bar = None
    if con.is_terminal and sys.stderr.isatty():
        from rich.progress import Progress

        bar = Progress(console=_console_err(), transient=True)
    if bar is not None:
        bar.start()
        task = bar.add_task("predicting", total=None)
        on_progress = lambda done, total: bar.update(task, completed=done, total=total)  # noqa: E731
    else:
        on_progress = None
    try:
        preds = api.predict(source, inputs, which=which, device=device, batch_size=batch_size, top_k=top_k,
                            glob=glob, on_progress=on_progress)
    finally:
        if bar is not None:
            bar.stop()
    for note in preds.notes:
        _err(f"note: {note}")
    text = _render_predictions(preds, fmt)
    if output:
        from nnctl.files import atomic_write, check_output

        # never over an input: the arguments, and every file read inside a folder given as input
        check_output(output, [source, *inputs, *preds.files], what="-o", input_dirs=preds.input_dirs)
        atomic_write(output, lambda fh: fh.write(text.encode()), [source, *inputs, *preds.files],
                     input_dirs=preds.input_dirs)
        print(f"wrote {output} ({len(preds) - len(preds.failed)} predicted, {len(preds.failed)} failed)")
    elif fmt == "table":
        con.print(text, markup=False, highlight=False, end="")
    else:
        sys.stdout.write(text)
    for row in preds.failed:
        _err(f"error: {row.input}: {row.error}")
    if preds.failed:
        raise typer.Exit(1)


