"""Pictures of runs: learning curves and run comparisons."""

from __future__ import annotations

from nnctl import files
from nnctl.errors import NnctlError, UsageError
import os
from pathlib import Path
from nnctl.runs.records import Comparison, _unique_names
from nnctl.runs.rundir import RunDir
from nnctl.tasks import curve_for
import csv
from nnctl.runs import checkpoint as K
from nnctl.files import check_output

def plot_curves(run_dir, history: list[dict], title: str) -> str | None:
    """curves.png: losses (left) and the task's validation metric (right: ``Task.curve``) by epoch."""

    if not history:
        return None
    # a Figure drawn on the Agg canvas: no pyplot (its import, backend selection and figure manager
    # cost a run 0.1-0.3 s, and nothing here is shown on a screen)
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in history]
    curve = curve_for(history[0])
    fig = Figure(figsize=(10 if curve else 5.5, 3.6))
    axes = fig.subplots(1, 2 if curve else 1, squeeze=False)
    ax = axes[0][0]
    for key in ("train_loss", "val_loss"):
        if key in history[0]:
            ax.plot(epochs, [r.get(key) for r in history], marker="o", ms=3, label=key.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if curve:
        ax2 = axes[0][1]
        ax2.plot(epochs, [r.get(curve) for r in history], marker="o", ms=3, color="tab:green")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel(curve.replace("_", " "))
        ax2.grid(alpha=0.3)
    fig.suptitle(files.display_name(title))
    fig.tight_layout()
    path = RunDir(run_dir).curves
    files.save_figure(fig, path, "png", dpi=110, run_file=True)
    return str(path)

def plot_quietly(run_dir: Path, name: str) -> str | None:
    """curves.png from metrics.csv; a failure (disk full, a signal) never hides a finished run."""


    path = RunDir(run_dir).metrics
    if not path.exists():
        return None

    try:
        with K.deferred_signals(), open(path) as fh:
            rows = [{k: (float(v) if k != "epoch" else int(v)) for k, v in r.items() if v != ""}
                    for r in csv.DictReader(fh)]
            return plot_curves(run_dir, rows, name)  # looked up at call time (tests patch it)
    except (OSError, ValueError, NnctlError):
        return None

def plot_comparison(comparison: Comparison, out_png: str | os.PathLike = "compare.png",
                    data: tuple[list, list] = ([], [])) -> str:
    """The runs' curves overlaid: losses (train solid, val dashed) and the monitored metric; one colour
    a run; the legend names each run and what differs. Written atomically; never over an input (the runs'
    records, or ``data``: the (files, folders) of the data they trained on, nothing written inside those)."""

    out = Path(out_png)
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg", "pdf"):
        raise UsageError(f"-o {out}: the picture's file name must end in .png, .svg or .pdf")
    inputs = [path for run in map(RunDir, (r.path for r in comparison.runs))
              for path in (run.metrics, run.config, run.status, run.curves)] + list(data[0])
    input_dirs = list(data[1])
    check_output(out, inputs, what="-o", input_dirs=input_dirs)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = comparison.metric
    if metric in (None, "train_loss", "val_loss"):
        metric = curve_for(k for h in comparison.histories if h for k in h[0])
    panels = 2 if metric else 1
    n = len(comparison.runs)
    ncol = 1 if n <= 6 else 2
    legend_rows = -(-n // ncol)
    # 100 dpi: the panels keep their size (3.5 in); the legend below adds 0.2 in a row
    height = 3.5 + 0.2 * legend_rows + 0.1
    fig, axes = plt.subplots(1, panels, figsize=(11 if panels == 2 else 7, height), squeeze=False)
    colours = plt.get_cmap("tab10" if n <= 10 else "tab20")
    labels = [files.display_name(label) for label in comparison.labels(width=100 if ncol == 1 else 60)]
    from matplotlib.lines import Line2D

    handles = []
    for i, (info, rows) in enumerate(zip(comparison.runs, comparison.histories)):
        colour = colours(i % colours.N)
        epochs = [r.get("epoch") for r in rows]
        ax = axes[0][0]
        for key, style in (("train_loss", "-"), ("val_loss", "--")):
            if rows and key in rows[0]:
                ax.plot(epochs, [r.get(key) for r in rows], style, color=colour, lw=1.6, marker="o", ms=2.5)
        if metric:
            ax2 = axes[0][1]
            if rows and metric in rows[0]:
                ax2.plot(epochs, [r.get(metric) for r in rows], "-", color=colour, lw=1.6, marker="o", ms=2.5)
                best = info.best or {}
                if best.get("metric") == metric and best.get("epoch") is not None and best.get("value") is not None:
                    ax2.plot([best["epoch"]], [best["value"]], marker="*", ms=12, color=colour,
                             markeredgecolor="black", markeredgewidth=0.6, zorder=5)
        label = labels[i] if rows else f"{labels[i]}: no epoch finished ({info.state})"
        handles.append(Line2D([], [], color=colour, lw=2.2, ls="-" if rows else ":", label=label))
    ax = axes[0][0]
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("loss (train solid, val dashed)", fontsize=10)
    ax.grid(alpha=0.3)
    if metric:
        ax2 = axes[0][1]
        ax2.set_xlabel("epoch")
        ax2.set_ylabel(metric.replace("_", " "))
        ax2.set_title(f"{metric.replace('_', ' ')} (star: best epoch)", fontsize=10)
        ax2.grid(alpha=0.3)
    for a in axes[0]:
        a.xaxis.get_major_locator().set_params(integer=True)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    title = files.display_name(", ".join(_unique_names([r.path for r in comparison.runs])))
    fig.suptitle("nnctl compare: " + (title if len(title) <= 110 else title[:109] + "…"), fontsize=11)
    fig.tight_layout(rect=(0, (0.2 * legend_rows + 0.1) / height, 1, 1 - 0.3 / height))
    try:
        files.save_figure(fig, out, fmt, dpi=100, inputs=inputs, input_dirs=input_dirs)
    finally:
        plt.close(fig)
    comparison.plot = str(out)
    return str(out)
