"""Rendering for the command line: rich tables, lines and colours."""

from __future__ import annotations

import json
import os
import sys

from nnctl.runs.rundir import RunDir  # no torch: the names of a run folder's files

_ANSI = None


def _clean(text: str) -> str:
    """One printable line: terminal escape sequences removed, other control characters shown escaped."""
    global _ANSI
    if _ANSI is None:
        import re

        _ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-Z\\-_])")
    text = _ANSI.sub("", str(text))
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
    return con


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
    parts = [f"epoch {row['epoch']}/{epochs}"]
    for key in ("train_loss", "val_loss", "val_accuracy", "val_mae", "val_mse"):
        if key in row:
            parts.append(f"{key} {row[key]:.4f}" if key != "val_mse" else f"{key} {row[key]:.4g}")
    parts.append(f"lr {row['lr']:.3g}")
    parts.append(f"{row['seconds']:.2f}s")
    if best:
        parts.append("*")
    return "  ".join(parts)


def _final_table(con, run) -> None:
    from rich.table import Table

    result, run_dir, plot = run.fit, run.run_dir, run.plot
    name = run.name or run_dir.name
    epochs = f"{result.epochs_run} epoch{'' if result.epochs_run == 1 else 's'}"
    table = Table(title=f"{_esc(name)}: {epochs} in {result.seconds:.1f}s"
                        + (" (stopped early)" if result.stopped_early else ""), title_justify="left")
    table.add_column("")
    table.add_column("value", justify="right")
    final = result.final
    for key in ("train_loss", "val_loss", "val_accuracy", "val_mae", "val_mse"):
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


_STATE_STYLE = {"running": "cyan", "finished": "green", "interrupted": "yellow", "failed": "red"}


def _console_err():
    from rich.console import Console

    return Console(stderr=True)


def _render_predictions(preds, fmt: str) -> str:
    import csv
    import io

    classification = preds.task == "classification"
    if fmt == "jsonl":
        return "".join(json.dumps(_finite(r.to_dict()), allow_nan=False) + "\n" for r in preds.rows)
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
                w.writerow(cells + [r.error or ""])
        else:
            w.writerow(["input", "values", "error"])
            for r in preds.rows:
                w.writerow([r.input, " ".join(f"{v:.6g}" for v in (r.values or [])), r.error or ""])
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


def _finite(obj):
    import math

    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj
