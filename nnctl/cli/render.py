"""Rendering for the command line: rich tables, lines and colours."""

from __future__ import annotations

import json
import os
import sys

from nnctl.files import display_name, json_ready  # no torch: names as text any writer can encode; strict JSON
from nnctl.runs.rundir import RunDir  # no torch: the names of a run folder's files

_ANSI = None


def _clean(text: str) -> str:
    """One printable line: terminal escape sequences removed, other control characters shown escaped, a
    name's bytes that are not UTF-8 shown as \\xNN (``files.display_name``)."""
    global _ANSI
    if _ANSI is None:
        import re

        _ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-Z\\-_])")
    text = _ANSI.sub("", display_name(text))
    return "".join(c if c.isprintable() or c == "\n" else repr(c)[1:-1] for c in text)


def _esc(text) -> str:
    """_clean, with rich markup escaped: a run folder named lr[bold]0.1 is shown as it is named."""
    from rich.markup import escape

    return escape(_clean(text))


def _err(text: str) -> None:
    try:
        sys.stderr.write("\n".join(_clean(line) for line in text.rstrip("\n").split("\n")) + "\n")
        sys.stderr.flush()
    except (BrokenPipeError, OSError):
        pass


def _console():
    from rich.console import Console

    con = Console()
    if not con.is_terminal and "COLUMNS" not in os.environ:
        con = Console(width=160)  # logs and pipes: no wrapping of table cells
    con.on_broken_pipe = lambda: _reader_left(con)  # rich's own exits 1: the reader leaving is not our failure
    return con


def _reader_left(con) -> None:
    """stdout's reader left (``nnctl train | head``): the console goes quiet, stdout to /dev/null."""
    con.quiet = True
    _stdout_to_devnull()


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null (its reader left): later prints, Python's exit flush included, go nowhere."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


def _warn(problems) -> None:
    for p in problems:
        text = p.format()
        head, _, rest = text.partition(": ")
        _err(f"{head}: warning: {rest}")


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _short_metrics(row: dict) -> str:
    if "val_accuracy" in row:
        return f"val acc {row['val_accuracy']:.4f}"
    if "val_loss" in row:
        return f"val loss {row['val_loss']:.4g}"
    return f"loss {row['train_loss']:.4g}"


def _epoch_line(row: dict, epochs: int, best: bool = False) -> str:
    from nnctl.tasks import SHOWN_METRICS

    parts = [f"epoch {row['epoch']}/{epochs}"]
    for key in SHOWN_METRICS:
        if key in row:
            parts.append(f"{key} {row[key]:.4f}" if key != "val_mse" else f"{key} {row[key]:.4g}")
    parts.append(f"lr {row['lr']:.3g}")
    parts.append(f"{row['seconds']:.2f}s")
    if best:
        parts.append("*")
    return "  ".join(parts)


def _final_table(con, run) -> None:
    from rich.table import Table

    from nnctl.tasks import SHOWN_METRICS

    result, run_dir, plot = run.fit, run.run_dir, run.plot
    name = run_dir.name  # the run (runs/digits-cnn-2), not its config's name
    last, first = result.epochs_run, getattr(result, "first_epoch", 1)
    ran = last - first + 1
    epochs = (f"{ran} epoch{'' if ran == 1 else 's'}" if first == 1 else
              f"epoch{'s' if ran > 1 else ''} {first}{f'-{last}' if ran > 1 else ''} of {last}, resumed,")
    table = Table(title=f"{_esc(name)}: {epochs} in {result.seconds:.1f}s"
                        + (" (stopped early)" if result.stopped_early else ""), title_justify="left")
    table.add_column("")
    table.add_column("value", justify="right")
    final = result.final
    for key in SHOWN_METRICS:
        if key in final:
            table.add_row(f"final {key.replace('_', ' ')}", f"{final[key]:.4f}")
    if result.best.get("value") is not None:
        table.add_row(f"best {_esc(result.best['metric'].replace('_', ' '))}",
                      f"{result.best['value']:.4f} (epoch {result.best['epoch']})")
    table.add_row("run folder", _esc(run_dir))
    folder = RunDir(run_dir)
    table.add_row("checkpoints", folder.last.name + (f", {folder.best.name}" if result.best_path else ""))
    table.add_row("metrics", folder.metrics.name + (f", {folder.curves.name}" if plot else ""))
    con.print(table)


# --- runs, compare --------------------------------------------------------------------------

def _fmt_seconds(s) -> str:
    if not isinstance(s, int | float):
        return "-"
    s = float(s)
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def _fmt_best(best) -> str:
    if not isinstance(best, dict) or not isinstance(best.get("value"), int | float):
        return "-"
    return _esc(f"{best.get('metric')} {best['value']:.4f} (epoch {best.get('epoch')})")


def _fmt_started(iso) -> str:
    return _esc(iso[:19].replace("T", " ")) if isinstance(iso, str) and iso else "-"


_STATE_STYLE = {"running": "cyan", "finished": "green", "interrupted": "yellow", "failed": "red", "pruned": "magenta"}


def _console_err():
    from rich.console import Console

    return Console(stderr=True)


def _render_predictions(preds, fmt: str) -> str:
    import csv
    import io

    classification = preds.task.has_classes  # top-k classes; else values (per label, or raw)
    if fmt == "jsonl":
        from nnctl.use.predict import jsonl_line  # the one form of a row as a JSON line (nnctl serve's too)

        return "".join(jsonl_line(r) for r in preds.rows)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        if classification:
            k = preds.top_k
            w.writerow(["input"] + [f"{c}{i + 1}" for i in range(k) for c in ("class", "name", "probability")]
                       + ["error"])
            for r in preds.rows:
                cells: list = [r.input]
                for i in range(k):
                    if r.classes is not None and i < len(r.classes):
                        cells += [r.classes[i], r.names[i], f"{r.probabilities[i]:.6g}"]
                    else:
                        cells += ["", "", ""]
                w.writerow([display_name(c) for c in cells] + [display_name(r.error or "")])
        else:
            w.writerow(["input", "values", "error"])
            for r in preds.rows:
                w.writerow([display_name(r.input), " ".join(f"{v:.6g}" for v in (r.values or [])),
                            display_name(r.error or "")])
        return buf.getvalue()
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(preds.rows) - len(preds.failed)} predicted, {len(preds.failed)} failed",
                  title_justify="left")
    table.add_column("input")
    if classification:
        table.add_column("class")
        table.add_column("name")
        table.add_column("probability", justify="right")
        for r in preds.rows:
            if r.error is not None:
                table.add_row(_esc(r.input), "-", "-", f"error: {_esc(r.error)}")
                continue
            table.add_row(_esc(r.input), " ".join(map(str, r.classes)), ", ".join(_esc(n) for n in r.names),
                          " ".join(f"{p:.4f}" for p in r.probabilities))
    else:
        table.add_column("values")
        for r in preds.rows:
            vals = "error: " + _esc(r.error) if r.error is not None else " ".join(f"{v:.4g}" for v in r.values[:12])
            if r.values is not None and len(r.values) > 12:
                vals += f" ... ({len(r.values)} values)"
            table.add_row(_esc(r.input), vals)
    buf = Console(file=io.StringIO(), width=int(os.environ.get("COLUMNS", 160)), force_terminal=False)
    buf.print(table)
    return buf.file.getvalue()


# JSON-ready: NaN and infinity -> null; every string through ``display_name`` (no surrogates); the library's
_finite = json_ready


# --- summary, layers, freeze, eval ----------------------------------------------------------

def print_summary(result) -> None:
    """nnctl summary's table (a nnctl.model.summary.Summary) and its totals."""
    from rich.table import Table

    table = Table(title=f"{_esc(result.name)}: input {list(result.input_shape)}", title_justify="left")
    for col, justify in (("#", "left"), ("layer", "left"), ("output shape", "left"), ("params", "right"),
                         ("status", "left"), ("MACs", "right"), ("line", "right")):
        table.add_column(col, justify=justify)
    for row in result.rows:
        indent = "  " * row.depth
        table.add_row(indent + row.name, indent + row.type, str(row.output_shape) if row.output_shape else "-",
                      _fmt_int(row.params), row.status, _fmt_int(row.macs), str(row.line or ""))
    con = _console()
    con.print(table)
    con.print(f"total params: {_fmt_int(result.total_params)}   trainable: {_fmt_int(result.trainable_params)}   "
              f"frozen: {_fmt_int(result.frozen_params)}")
    con.print(f"parameter size: {_fmt_bytes(result.param_bytes)}   buffers: {_fmt_bytes(result.buffer_bytes)}   "
              f"activations (one sample, estimate): {_fmt_bytes(result.activation_bytes)}   "
              f"MACs (one sample): {_fmt_int(result.total_macs)}")
    if result.augment:  # one line: the training batches' augmentation
        con.print(f"augment (training batches): {result.augment}", markup=False)
    if result.inputs:  # a trained model: what predict and eval feed it (its preprocessing record)
        con.print(f"inputs: {result.inputs}", markup=False)
    if result.per_rank:  # what training holds a rank (parameters, gradients, the optimizer's state)
        r = result.per_rank
        how = (f"{r['strategy']}, {r['processes']} processes" if r["processes"] > 1 else "one process")
        con.print(f"training state a rank ({how}): parameters {_fmt_bytes(r['parameters'])}, gradients "
                  f"{_fmt_bytes(r['gradients'])}, optimizer state {_fmt_bytes(r['optimizer'])} "
                  f"({r['optimizer_slots']} tensor(s) a parameter)", markup=False)
    if result.lines_of:  # a run's rows are at the lines of its config.yaml, not of the file it was trained from
        con.print(f"line: in {display_name(result.lines_of)}", markup=False)


def print_layers(info: list[dict], one: bool) -> None:
    """nnctl layers: one type's arguments (one=True), or every type with its arguments."""
    from rich.table import Table

    con = _console()
    if one:
        d = info[0]
        con.print(f"[bold]{d['name']}[/bold]: {d['summary']}")
        table = Table()
        for col in ("#", "argument", "type", "default", "note"):
            table.add_column(col)
        for i, a in enumerate(d["arguments"]):
            table.add_row(str(i), a["name"], a["type"], "required" if a["required"] else a["default"],
                          "inferred from the input shape when omitted" if a["inferred"] else "")
        con.print(table)
        con.print("A scalar is the first argument, a list the positional arguments in this order, "
                  "a mapping the keyword arguments.")
        return
    table = Table(title="torch.nn layer types (plus Sequential and Residual)")
    table.add_column("layer")
    table.add_column("arguments (PyTorch's order; * = required)")
    for d in info:
        args = ", ".join(("*" if a["required"] else "") + a["name"] for a in d["arguments"])
        table.add_row(d["name"], args)
    table.add_row("Sequential", "a list of layer entries")
    table.add_row("Residual", "a list of layer entries: x + body(x); or {layers, shortcut, after}: "
                              "after(body(x) + shortcut(x))")
    table.add_row("Concat", "{dim (default 1), branches: [[layers], [], ...]}: torch.cat of the branches "
                            "([] is the identity)")
    con.print(table)


def print_frozen(result) -> None:
    """nnctl freeze: the children table of a nnctl.use.freeze.Frozen, the totals, the checkpoint written."""
    from rich.table import Table

    table = Table(title=f"{_esc(result.name)}: children", title_justify="left")
    for col, j in (("#", "right"), ("name", "left"), ("type", "left"), ("params", "right"), ("status", "left")):
        table.add_column(col, justify=j)
    for r in result.children:
        table.add_row(str(r["index"]), r["name"], r["type"], _fmt_int(r["params"]), r["status"])
    con = _console()
    con.print(table)
    con.print(f"total params: {_fmt_int(result.total)}   trainable: {_fmt_int(result.trainable)}   "
              f"frozen: {_fmt_int(result.frozen)}")
    if result.output:
        con.print(_clean(f"wrote {result.output}: train from it with  nnctl train CONFIG --init {result.output}"),
                  markup=False, highlight=False)


def print_per_class(result) -> None:
    """nnctl eval --confusion: per-class precision, recall and support."""
    from rich.table import Table

    table = Table(title=f"per class ({result.split})", title_justify="left")
    for col, j in (("#", "right"), ("class", "left"), ("precision", "right"), ("recall", "right"),
                   ("support", "right")):
        table.add_column(col, justify=j)
    for r in result.per_class:
        table.add_row(str(r["class"]), _esc(r["name"]), "-" if r["precision"] is None else f"{r['precision']:.4f}",
                      "-" if r["recall"] is None else f"{r['recall']:.4f}", f"{r['support']:,}")
    _console().print(table)


# --- runs, compare, cache -------------------------------------------------------------------

def print_runs(infos: list, folder: str) -> None:
    """nnctl runs: one row a run (nnctl.runs.RunInfo), then why runs stopped and what their records lack."""
    from rich.table import Table
    from rich.text import Text

    from nnctl.runs.records import format_value

    con = _console()
    if not infos:
        con.print(f"no runs in {_clean(folder)}", markup=False, highlight=False)
        return
    table = Table(title=f"{len(infos)} run{'' if len(infos) == 1 else 's'} in {_esc(folder)}",
                  title_justify="left")
    for col, justify in (("run", "left"), ("state", "left"), ("epochs", "right"), ("best", "left"),
                         ("parameters", "right"), ("time", "right"), ("started (UTC)", "left"),
                         ("differs", "left")):
        # what differs is the point of the table: folded onto more lines, never cut with an ellipsis
        table.add_column(col, justify=justify, overflow="fold" if col in ("differs", "run") else "ellipsis",
                         no_wrap=col not in ("differs", "run", "best"))
    for i in infos:
        state = i.state + (" (early stop)" if i.stopped_early and i.state == "finished" else "")
        table.add_row(_esc(i.name), Text(_clean(state), style=_STATE_STYLE.get(i.state, "")),
                      f"{i.epochs_done}/{i.epochs_total if i.epochs_total is not None else '?'}",
                      _fmt_best(i.best).replace(" (epoch ", " @").rstrip(")") if i.best else "-",
                      _fmt_int(i.parameters["total"]) if i.parameters else "-",
                      _fmt_seconds(i.wall_seconds), _fmt_started(i.started_at)[:16],
                      _esc(", ".join(f"{k}={format_value(v)}" for k, v in i.differs.items()) or "-"))
    con.print(table)
    for i in infos:  # why a run stopped, in full, under the table
        if i.state in ("failed", "interrupted") and i.error and i.error.get("message"):
            text = " ".join(str(i.error["message"]).split())
            con.print(Text(_clean(f"{i.name}: {i.state}: {text[:400]}"), style=_STATE_STYLE[i.state]))
    for i in infos:  # a damaged record: what was left out of it
        for note in i.notes:
            con.print(Text(_clean(f"{i.name}: {note}"), style="yellow"))


def print_comparison(comparison) -> None:
    """nnctl compare: the config differences, the metrics side by side, the picture of the curves."""
    from rich.table import Table

    from nnctl.runs.records import _unique_names, format_value
    from nnctl.tasks import SHOWN_METRICS

    con = _console()
    names = [_esc(n) for n in _unique_names([r.path for r in comparison.runs])]
    table = Table(title="config differences" if comparison.differences else "config: no differences",
                  title_justify="left")
    table.add_column("key")
    for n in names:
        table.add_column(n)
    for key, values in comparison.differences.items():
        table.add_row(_esc(key), *[_esc(format_value(v)) for v in values])
    if comparison.differences:
        con.print(table)
    else:
        con.print("config: no differences", markup=False, highlight=False)
    table = Table(title="metrics", title_justify="left")
    table.add_column("")
    for n in names:
        table.add_column(n, justify="right")
    finals = comparison.finals()
    keys = [k for k in SHOWN_METRICS if any(k in f for f in finals)]
    for k in keys:
        table.add_row(f"final {k.replace('_', ' ')}",
                      *[f"{f[k]:.4f}" if isinstance(f.get(k), float) else "-" for f in finals])
    metrics = {(r.best or {}).get("metric") for r in comparison.runs if (r.best or {}).get("value") is not None}
    if len(metrics) == 1:  # one monitored metric: named once, in the row's label
        table.add_row(f"best {_esc(metrics.pop().replace('_', ' '))}",
                      *[f"{r.best['value']:.4f} (epoch {r.best['epoch']})" if (r.best or {}).get("value") is not None
                        else "-" for r in comparison.runs])
    else:
        table.add_row("best", *[_fmt_best(r.best) for r in comparison.runs])
    table.add_row("state", *[r.state for r in comparison.runs])
    table.add_row("epochs", *[f"{r.epochs_done}/{r.epochs_total if r.epochs_total is not None else '?'}"
                              for r in comparison.runs])
    table.add_row("time", *[_fmt_seconds(r.wall_seconds) for r in comparison.runs])
    con.print(table)
    con.print(f"curves: {_clean(comparison.plot)}", markup=False, highlight=False)
    for r in comparison.runs:  # a damaged record: what was left out of it
        for note in r.notes:
            con.print(_clean(f"{r.name}: {note}"), markup=False, highlight=False)


def print_cache(directory, found: list, total: int) -> None:
    """nnctl cache info: one row an entry of the decoded-image cache."""
    import time

    from rich.table import Table

    table = Table(title=f"decoded-image cache {_esc(directory)}: {len(found)} entr{'y' if len(found) == 1 else 'ies'}, "
                        f"{_fmt_bytes(total)}")
    for col in ("key", "image folder", "images", "shape", "size", "last used", "status"):
        table.add_column(col, justify="right" if col in ("images", "size") else "left")
    for e in found:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)) if e.last_used else ""
        table.add_row(e.key[:12], _esc(e.root or ""), _fmt_int(e.images) if e.images is not None else "",
                      "x".join(map(str, e.shape[1:])) if e.shape else "", _fmt_bytes(e.bytes), used,
                      _clean(e.status + (" (verified)" if getattr(e, "verified", False) else "")))
    _console().print(table)
