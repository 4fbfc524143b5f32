"""Progress bars for training and cache building."""

from __future__ import annotations

import time
from nnctl.cli.render import _epoch_line, _short_metrics

# --- train ---------------------------------------------------------------------------

class _Progress:
    """Renders fit() events: rich bars on a terminal, one plain line an epoch otherwise."""

    def __init__(self, console, fancy: bool):
        self.con = console
        self.fancy = fancy
        self.progress = None
        self.last_refresh = 0.0
        self.epoch_began = 0.0

    def __call__(self, e) -> None:
        if e.kind == "start":
            if self.fancy:
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                           TimeRemainingColumn)

                self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                         TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                         TimeRemainingColumn(), console=self.con, transient=False)
                self.progress.start()
                self.t_epochs = self.progress.add_task("epochs", total=e.epochs, info="")
                self.t_steps = self.progress.add_task("steps ", total=e.steps, info="")
        elif e.kind == "epoch_start":
            self.epoch_began = time.perf_counter()
            if self.progress:
                self.progress.update(self.t_epochs, completed=e.epoch)
                self.progress.reset(self.t_steps, total=e.steps, completed=e.step, info="")
        elif e.kind == "step" and self.progress:
            now = time.perf_counter()
            if now - self.last_refresh > 0.25:  # read the loss (a host sync) a few times a second only
                self.last_refresh = now
                loss = e.sums.last()
                rate = (e.sums.seen / max(now - self.epoch_began, 1e-9))
                self.progress.update(self.t_steps, completed=e.step, info=f"loss {loss:.4f}  {rate:,.0f} samples/s")
            else:
                self.progress.update(self.t_steps, completed=e.step)
        elif e.kind == "epoch_end":
            row = e.row
            text = _epoch_line(row, e.epochs, best=e.message == "best")
            if self.progress:
                self.progress.update(self.t_epochs, completed=e.epoch + 1, info=_short_metrics(row))
                self.progress.console.print(text, markup=False, highlight=False)
            else:
                print(text, flush=True)
        elif e.kind in ("stop", "note"):
            if self.progress:
                self.progress.console.print(e.message, markup=False, highlight=False)
            else:
                print(e.message, flush=True)

    def close(self):
        if self.progress:
            self.progress.stop()
            self.progress = None


class _cache_progress:
    """On a terminal: a bar with files/s while data.cache: true decodes an image folder into the cache."""

    def __init__(self, console):
        self.con, self.bar, self.scope = console, None, None

    def __enter__(self):
        if self.con is None:
            return self
        from nnctl.data.cache import progress_to

        def update(done: int, total: int) -> None:
            if self.bar is None:
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                                           TimeRemainingColumn)

                self.bar = Progress(TextColumn("decoding into the cache"), BarColumn(), MofNCompleteColumn(),
                                    TaskProgressColumn(), TextColumn("{task.fields[rate]} files/s"),
                                    TimeRemainingColumn(), console=self.con, transient=True)
                self.bar.start()
                self.task = self.bar.add_task("decode", total=total, rate="-")
                self.t0 = time.perf_counter()
            rate = done / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, completed=done, rate=f"{rate:,.0f}")
            if done >= total:
                self.bar.stop()
                self.bar = None

        self.scope = progress_to(update)
        self.scope.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        if self.scope is not None:
            self.scope.__exit__(*exc)
        return False
