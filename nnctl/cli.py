"""The command line: parse, call the library, render, map errors to exit codes.

Only this module knows typer and rich. Torch is imported inside the commands
that need it, so `nnctl --help`, `--version` and `schema` start fast.
Exit codes: 0 success, 1 runtime failure, 2 usage or config error,
128 + signal for a run stopped by SIGINT (130) or SIGTERM (143).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Optional

import typer

from . import __version__

app = typer.Typer(
    name="nnctl",
    help="Train, fine-tune, inspect and export PyTorch models declared in YAML.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


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


def handle_errors(fn):
    """Turn nnctl's errors into one-line messages and exit codes; never a traceback for a user mistake."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import ConfigError, NnctlError

        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            for p in exc.problems:
                _err(p.format())
            raise typer.Exit(2) from None
        except BrokenPipeError:  # `nnctl schema | head`: the reader left; not an error of ours
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except OSError:
                pass
            raise typer.Exit(0) from None
        except NnctlError as exc:
            _err(f"error: {' '.join(str(exc).split())}")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _err("interrupted")
            raise typer.Exit(130) from None
        except typer.Exit:
            raise
        except MemoryError:
            _err("error: out of memory")
            raise typer.Exit(1) from None
        except OSError as exc:  # the environment, not nnctl: stdout on a full disk, a vanished folder, ...
            if os.environ.get("NNCTL_DEBUG"):
                raise
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else " (writing the output)"
            _err(f"error: {exc.strerror or exc}{where}")
            raise typer.Exit(1) from None
        except Exception as exc:  # a bug in nnctl, not a user mistake: say so, keep it short
            if os.environ.get("NNCTL_DEBUG"):
                raise
            _err(f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]} "
                 "(set NNCTL_DEBUG=1 for a traceback and please report it)")
            raise typer.Exit(1) from None

    return wrapper


def _version(value: bool):
    if value:
        print(f"nnctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    """Train, fine-tune, inspect and export PyTorch models declared in YAML."""


SetOpt = typer.Option(None, "--set", "-s", help="Override a config value: key.path=value (repeatable), "
                                               "e.g. train.optimizer.Adam.lr=0.01")


def _warn(problems) -> None:
    for p in problems:
        text = p.format()
        head, _, rest = text.partition(": ")
        _err(f"{head}: warning: {rest}")


# --- check ----------------------------------------------------------------------------

@app.command()
@handle_errors
def check(
    config: str = typer.Argument(..., help="The YAML config to validate."),
    set_: Optional[list[str]] = SetOpt,
    strict: bool = typer.Option(False, "--strict", help="Treat lint warnings as errors (exit 2)."),
):
    """Validate a config and lint it, without training."""
    from . import config as C
    from .errors import ConfigError

    doc = C.load_document(config, set_ or [])
    structural = C.validate_all(doc)
    if structural.problems:
        # shown at once, before paying for import torch; the layer and shape problems follow
        for p in structural.problems:
            _err(p.format())
    from . import model as M

    result = M.check(doc)
    if result.problems:
        shown = {p.format() for p in structural.problems}
        rest = [p for p in result.problems if p.format() not in shown]
        if rest:
            raise ConfigError(rest)
        raise typer.Exit(2)
    cfg, plan, warnings = result.cfg, result.plan, result.warnings
    _warn(warnings)
    if strict and warnings:
        raise typer.Exit(2)
    out = list(plan.output_shape) if plan.output_shape else "?"
    print(f"ok: {config}: {len(plan.root.children)} layers, {plan.root.params:,} parameters, "
          f"input {list(plan.input_shape)} -> output {out}"
          + (f", {len(warnings)} warning(s)" if warnings else ""))


# --- summary ---------------------------------------------------------------------------

def _load_source(source: str, overrides: list[str], which: str = "best"):
    """A config or a checkpoint (or run folder) -> (cfg, doc, model, plan, checkpoint state or None)."""
    from . import api

    src = api.open_source(source, overrides, which)
    return src.cfg, src.doc, src.model, src.plan, src.state


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


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
):
    """Per-layer table: output shapes, parameters, trainable/frozen, MACs; totals."""
    from . import summary as S
    from .errors import UsageError

    if graph is not None and not graph.lower().endswith((".png", ".svg", ".pdf")):
        raise UsageError(f"--graph {graph}: the picture's file name must end in .png, .svg or .pdf")
    cfg, doc, model, plan, _ = _load_source(source, set_ or [], which)
    result = S.summarize(model, plan, cfg.model.input_shape, depth=depth, augment=cfg.data and cfg.data.augment)
    if graph is not None:
        S.draw_graph(model, cfg.model.input_shape, graph, title=f"{cfg.name}: input {list(cfg.model.input_shape)}",
                     plan=plan)
        _err(f"graph: {graph}")
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{_esc(cfg.name)}: input {list(cfg.model.input_shape)}", title_justify="left")
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
    if cfg.data is not None and cfg.data.augment:  # one line: the training batches' augmentation
        from .augment import describe

        con.print(f"augment (training batches): {describe(cfg.data.augment)}", markup=False)


# --- layers, schema -------------------------------------------------------------------

@app.command()
@handle_errors
def layers(
    name: Optional[str] = typer.Argument(None, help="Show one layer type's arguments."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """The layer types a config may name (torch.nn) and their arguments, from PyTorch's signatures."""
    from . import layers as L
    from .config import suggest
    from .errors import UsageError

    reg = L.registry()
    if name:
        if name not in reg:
            reason = L.refusal(name) if hasattr(L, "refusal") else None
            raise UsageError(reason or f"unknown layer type {name!r}{suggest(name, list(reg))}")
        info = [L.describe(reg[name])]
    else:
        info = [L.describe(reg[n]) for n in sorted(reg)]
    if as_json:
        print(json.dumps(info, indent=2))
        return
    from rich.table import Table

    con = _console()
    if name:
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


@app.command()
@handle_errors
def schema(
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Write to this file instead of stdout."),
):
    """A JSON Schema of the config, for YAML editors (yaml-language-server)."""
    from .config import json_schema

    text = json.dumps(json_schema(), indent=2)
    if output:
        from .files import atomic_write  # refuses a folder, a device or a FIFO as the target

        atomic_write(output, lambda fh: fh.write((text + "\n").encode()))
    else:
        print(text)


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
):
    """Build, train, validate and checkpoint a model."""
    from . import run as R

    if nproc_per_node is not None and "LOCAL_RANK" not in os.environ:
        forwarded = _forwarded_train_args(config, device, epochs, seed, set_ or [], out, resume, init, partial, force)
        return _launch(config, forwarded, out, resume, set_ or [], nproc_per_node, nnodes, node_rank,
                       rdzv_endpoint, rdzv_id, max_restarts)
    from . import loop as T

    dist = T.dist_from_env()
    _stop_on_sigterm()
    con = _console()
    fancy = con.is_terminal and dist.main
    progress = _Progress(con, fancy)
    if not dist.main:
        say = lambda text: None  # noqa: E731
    elif fancy:
        say = lambda text: con.print(text, markup=False, highlight=False)  # noqa: E731
    else:
        say = lambda text: print(text, flush=True)  # noqa: E731
    try:
        with _cache_progress(con if fancy else None):
            result = R.train(config, overrides=set_ or [], out=out, resume=resume, init=init, partial=partial,
                             force=force, epochs=epochs, seed=seed, device=device, on_event=progress,
                             on_message=lambda text: say(_clean(text)), dist=dist)
    except RuntimeError as exc:
        import torch.distributed as tdist

        text = str(exc)
        if dist.enabled and (isinstance(exc, getattr(tdist, "DistBackendError", RuntimeError))
                             or any(w in text for w in ("gloo", "NCCL", "Connection reset", "Connection closed"))):
            from .errors import NnctlError

            raise NnctlError(f"rank {dist.rank}: lost contact with another process of the run "
                             f"({' '.join(str(exc).split())[:160]})") from None
        raise
    finally:
        progress.close()
        if dist.enabled:
            T.close_distributed()
    if dist.main:
        _final_table(con, result)


class _cache_progress:
    """On a terminal: a bar with files/s while data.cache: true decodes an image folder into the cache."""

    def __init__(self, console):
        self.con, self.bar, self.scope = console, None, None

    def __enter__(self):
        if self.con is None:
            return self
        from .cache import progress_to

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


def _stop_on_sigterm() -> None:
    """Until the loop installs its own handler: SIGTERM while loading exits 143, cleanly."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        from .loop import Interrupted

        raise Interrupted(signum, None)

    signal.signal(signal.SIGTERM, handler)


def _forwarded_train_args(config, device, epochs, seed, set_, out, resume, init, partial, force) -> list[str]:
    args = [config] if config else []
    for flag, value in (("--device", device), ("--epochs", epochs), ("--seed", seed), ("--out", out),
                        ("--resume", resume), ("--init", init)):
        if value is not None:
            args += [flag, str(value)]
    for item in set_:
        args += ["--set", item]
    if partial:
        args.append("--partial")
    if force:
        args.append("--force")
    return args


def _launch(config, forwarded, out, resume, overrides, nproc, nnodes, node_rank, endpoint, rdzv_id,
            max_restarts) -> None:
    """Start the workers through torch.distributed.run (the engine behind torchrun)."""
    from . import config as C
    from . import run as R

    if config is not None:
        C.load(config, overrides)  # config mistakes surface once, here, not in N workers
    # the launcher takes the run folder and its lock, and holds it for its workers (and their restarts)
    source = R.resume_source(resume, out) if resume else None
    if source is not None and source.continue_in is not None:
        claim = R.claim_existing(source.continue_in)
        out = str(source.continue_in)
    else:
        cfg, _ = C.load(config, overrides) if config is not None else (None, None)
        if cfg is None:
            from . import checkpoint as K

            cfg, _ = C.from_dict(K.load(source.checkpoint)["config"], str(source.checkpoint))
        claim = R.claim_new(cfg.name, out)
        if out is None:
            forwarded = forwarded + ["--out", str(claim.folder)]
        out = str(claim.folder)
    os.environ[R.LOCKED_ENV] = os.path.abspath(out)
    try:
        _run_torchrun(forwarded, out, nproc, nnodes, node_rank, endpoint, rdzv_id, max_restarts)
    except BaseException as exc:
        if not (source is not None and source.continue_in is not None):
            claim.abandon(exc)  # keeps the record a worker wrote (status.json), else records this error
        raise
    finally:
        claim.release()
        os.environ.pop(R.LOCKED_ENV, None)


def _run_torchrun(forwarded, out, nproc, nnodes, node_rank, endpoint, rdzv_id, max_restarts) -> None:
    from torch.distributed import run as torchrun

    from .errors import NnctlError

    args = ["--nproc-per-node", str(nproc), "--nnodes", str(nnodes), "--max-restarts", str(max_restarts)]
    if endpoint:
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id]
        if node_rank is not None:
            args += ["--node-rank", str(node_rank)]
    elif str(nnodes) == "1":
        args += ["--standalone"]
    else:
        raise NnctlError("--nnodes > 1 needs --rdzv-endpoint host:port (the same on every machine)")
    args += ["-m", "nnctl", "train", *forwarded]
    try:
        torchrun.run(torchrun.parse_args(args))
    except Exception as exc:  # ChildFailedError: a worker failed or was killed
        text = " ".join(str(exc).split())
        raise NnctlError(f"distributed training failed: {text[:400]}"
                         + (f"; the last checkpoint is in {out}" if out else "")) from None


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
    table.add_row("checkpoints", "last.pt" + (", best.pt" if result.best_path else ""))
    table.add_row("metrics", "metrics.csv" + (", curves.png" if plot else ""))
    con.print(table)


# --- freeze, export-weights ---------------------------------------------------------------

def _int_list(text: str | None, what: str) -> list[int] | None:
    from .errors import UsageError

    if not text:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"{what}: expected comma-separated child indices such as 0,2,5, got {text!r}") from None


def _names(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


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
    from . import checkpoint as K
    from . import config as C
    from . import freeze as F

    cfg, doc, model, plan, state = _load_source(source, [], which)
    if any(v is not None for v in (first, children, names, unfreeze)):
        freezing = F.make_freeze(model, first, _int_list(children, "--children"), _names(names), _names(unfreeze),
                            train_frozen_norm)
        F.apply(model, freezing)
    else:
        freezing = (state or {}).get("freeze")
    rows = F.children_rows(model)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if output:
        payload = K.make_payload("freeze", C.resolved(cfg), model.state_dict(), freeze=freezing,
                                 input_shape=list(cfg.model.input_shape), source=os.path.basename(source),
                                 preprocessing=(state or {}).get("preprocessing"))
        inputs = [source] + ([str(K.resolve(source, which))] if state is not None else [])
        from .files import check_output

        check_output(output, inputs, what="-o")
        K.save(output, payload, inputs, run_file=False)
    if as_json:
        print(json.dumps({"children": rows, "total": total, "trainable": trainable, "frozen": total - trainable,
                          "plan": freezing, "output": output}, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{_esc(cfg.name)}: children", title_justify="left")
    for col, j in (("#", "right"), ("name", "left"), ("type", "left"), ("params", "right"), ("status", "left")):
        table.add_column(col, justify=j)
    for r in rows:
        table.add_row(str(r["index"]), r["name"], r["type"], _fmt_int(r["params"]), r["status"])
    con = _console()
    con.print(table)
    con.print(f"total params: {_fmt_int(total)}   trainable: {_fmt_int(trainable)}   frozen: {_fmt_int(total - trainable)}")
    if output:
        con.print(_clean(f"wrote {output}: train from it with  nnctl train CONFIG --init {output}"), markup=False,
                  highlight=False)


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
    from . import api

    result = api.export(source, fmt, output, which=which, with_preprocess=with_preprocess)
    for note in result.notes:
        _err(f"note: {note}")
    line = f"wrote {result.path} ({fmt}, {result.tensors} tensors, {_fmt_bytes(result.bytes)})"
    if result.max_abs_diff is not None:
        line += f"; onnxruntime vs eager max |diff| = {result.max_abs_diff:.2e}"
    print(line)


# --- eval ------------------------------------------------------------------------------

@app.command("eval")
@handle_errors
def eval_(
    source: str = typer.Argument(..., help="A checkpoint or run folder (or a config, with --init)."),
    which: str = typer.Option("best", "--which", help="For a run folder: best or last."),
    split: Optional[str] = typer.Option(None, "--split", help="val (default), train, test (the dataset's own "
                                                              "test split) or all (default with --data)."),
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
    from . import api

    if partial and not init:
        from .errors import UsageError

        raise UsageError("--partial applies to --init WEIGHTS; there is no --init here")
    result = api.evaluate(source, which=which, split=split, data=data, overrides=set_ or [], init=init,
                        partial=partial, device=device, confusion=confusion, confusion_path=confusion_out)
    for note in result.notes:
        _err(f"note: {note}")
    if as_json:  # strict JSON: a non-finite number is null, never NaN
        print(json.dumps(_finite(result.to_dict()), indent=2, allow_nan=False))
        return
    head = {"split": result.split, "samples": result.samples,
            **({"epoch": result.epoch} if result.epoch is not None else {}), **result.metrics}
    print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in head.items()))
    if result.per_class:
        from rich.table import Table

        table = Table(title=f"per class ({result.split})", title_justify="left")
        for col, j in (("#", "right"), ("class", "left"), ("precision", "right"), ("recall", "right"),
                       ("support", "right")):
            table.add_column(col, justify=j)
        for r in result.per_class:
            table.add_row(str(r["class"]), _esc(r["name"]), "-" if r["precision"] is None else f"{r['precision']:.4f}",
                          "-" if r["recall"] is None else f"{r['recall']:.4f}", f"{r['support']:,}")
        _console().print(table)
    if result.confusion_png:
        print(f"wrote {result.confusion_png}")


# --- predict ---------------------------------------------------------------------------

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
    from . import api
    from .errors import UsageError

    if fmt not in ("table", "csv", "jsonl"):
        raise UsageError(f"--format must be table, csv or jsonl, not {fmt!r}")
    if output:
        from .files import check_output

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
        from .files import atomic_write, check_output

        # never over an input: the arguments, and every file read inside a folder given as input
        check_output(output, [source, *inputs, *preds.files], what="-o")
        atomic_write(output, lambda fh: fh.write(text.encode()), [source, *inputs])
        print(f"wrote {output} ({len(preds) - len(preds.failed)} predicted, {len(preds.failed)} failed)")
    elif fmt == "table":
        con.print(text, markup=False, highlight=False, end="")
    else:
        sys.stdout.write(text)
    for row in preds.failed:
        _err(f"error: {row.input}: {row.error}")
    if preds.failed:
        raise typer.Exit(1)


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


@app.command("runs")
@handle_errors
def runs_(
    folder: str = typer.Argument("runs", help="A folder of run folders (default: runs), or one run folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the runs as JSON."),
):
    """A table of the runs in a folder, by start time: state, epochs, best metric, what differs."""
    from rich.table import Table
    from rich.text import Text

    from . import runs as RS

    infos = RS.list_runs(folder)
    if as_json:
        print(json.dumps([i.to_dict() for i in infos], indent=2, allow_nan=False))
        return
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
                      _esc(", ".join(f"{k}={RS.format_value(v)}" for k, v in i.differs.items()) or "-"))
    con.print(table)
    for i in infos:  # why a run stopped, in full, under the table
        if i.state in ("failed", "interrupted") and i.error and i.error.get("message"):
            text = " ".join(str(i.error["message"]).split())
            con.print(Text(_clean(f"{i.name}: {i.state}: {text[:400]}"), style=_STATE_STYLE[i.state]))
    for i in infos:  # a damaged record: what was left out of it
        for note in i.notes:
            con.print(Text(_clean(f"{i.name}: {note}"), style="yellow"))


@app.command()
@handle_errors
def compare(
    runs: list[str] = typer.Argument(..., help="Two or more run folders."),
    out: str = typer.Option("compare.png", "--out", "-o", help="The picture of the curves (.png, .svg or .pdf)."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
):
    """Runs side by side: config differences, final and best metrics, one picture of their curves."""
    from rich.table import Table

    from . import runs as RS

    comparison = RS.compare(runs)
    RS.plot_comparison(comparison, out)
    if as_json:
        print(json.dumps(comparison.to_dict(), indent=2, allow_nan=False))
        return
    con = _console()
    names = [_esc(n) for n in RS._unique_names([r.path for r in comparison.runs])]
    table = Table(title="config differences" if comparison.differences else "config: no differences",
                  title_justify="left")
    table.add_column("key")
    for n in names:
        table.add_column(n)
    for key, values in comparison.differences.items():
        table.add_row(_esc(key), *[_esc(RS.format_value(v)) for v in values])
    if comparison.differences:
        con.print(table)
    else:
        con.print("config: no differences", markup=False, highlight=False)
    table = Table(title="metrics", title_justify="left")
    table.add_column("")
    for n in names:
        table.add_column(n, justify="right")
    finals = comparison.finals()
    keys = [k for k in ("train_loss", "val_loss", "val_accuracy", "val_mae", "val_mse")
            if any(k in f for f in finals)]
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
    from . import api

    directory, found = api.cache_info(verify=verify)
    total = sum(e.bytes for e in found)
    if as_json:
        print(json.dumps({"directory": str(directory), "bytes": total, "entries": [e.to_dict() for e in found]},
                         indent=1))
        return
    if not found:
        print(f"decoded-image cache {directory}: empty")
        return
    from rich.table import Table

    table = Table(title=f"decoded-image cache {_esc(directory)}: {len(found)} entr{'y' if len(found) == 1 else 'ies'}, "
                        f"{_fmt_bytes(total)}")
    for col in ("key", "image folder", "images", "shape", "size", "last used", "status"):
        table.add_column(col, justify="right" if col in ("images", "size") else "left")
    for e in found:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)) if e.last_used else ""
        table.add_row(e.key[:12], _esc(e.root or ""), _fmt_int(e.images) if e.images is not None else "",
                      "x".join(map(str, e.shape[1:])) if e.shape else "", _fmt_bytes(e.bytes), used, _clean(e.status))
    _console().print(table)


@cache_app.command("clear")
@handle_errors
def cache_clear(
    root: Optional[str] = typer.Option(None, "--root", help="Only the entries of this image folder."),
    all_: bool = typer.Option(False, "--all", help="Every entry."),
):
    """Remove entries (--all, or --root DIR); an entry being built by a running process is left alone."""
    from . import api

    done = api.cache_clear(root=root, all=all_)
    print(f"removed {done.removed} entr{'y' if done.removed == 1 else 'ies'} ({_fmt_bytes(done.freed)}) "
          f"from {done.directory}")
    for key in done.busy:
        _err(f"note: {key[:12]} is being built by a running process: left alone")
    for key, why in getattr(done, "skipped", ()):
        _err(f"note: {key[:12]}: {why}: left alone")


def main() -> None:
    app()
