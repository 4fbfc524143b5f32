"""metrics.csv: one row an epoch, written and read here only."""

from __future__ import annotations

from typing import Any
from nnctl import files
import csv
import os
from nnctl.runs.rundir import RunDir
from nnctl.runs.status import _is_int
import io
from nnctl.errors import NnctlError
from nnctl.files import read_input

def write_metrics(run_dir, history: list[dict]) -> None:
    """metrics.csv: one row an epoch (rewritten atomically from the history)."""

    if not history:
        return
    columns: list[str] = []
    for row in history:
        for key in row:
            if key not in columns:
                columns.append(key)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    files.atomic_write(RunDir(run_dir).metrics, lambda fh: fh.write(buf.getvalue().encode()), run_file=True)

def read_metrics(folder: str | os.PathLike) -> list[dict]:
    """metrics.csv as rows of numbers (epoch an int); [] if absent or unreadable."""
    path = RunDir(folder).metrics
    if not path.exists():
        return []


    rows: list[dict] = []
    try:  # read_input: a regular file only (a FIFO named metrics.csv never blocks the listing)
        text = read_input(path, "metrics file", limit=64 << 20).decode()
        with io.StringIO(text, newline="") as fh:
            for r in csv.DictReader(fh):
                row: dict[str, Any] = {}
                for k, v in r.items():
                    if k is None or v in (None, ""):
                        continue
                    try:
                        row[k] = int(v) if k in ("epoch", "step") else float(v)
                    except ValueError:
                        row[k] = v
                epoch = row.get("epoch")
                if not (_is_int(epoch) and epoch > 0):
                    continue  # a damaged row (epoch 1e300, "x", missing): never a point to plot
                rows.append(row)
    except (OSError, NnctlError, csv.Error, UnicodeDecodeError):
        return []
    return rows
