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
from nnctl._version import __version__
from nnctl.cli.progress import _Progress, _cache_progress
from nnctl.cli.render import _STATE_STYLE, _clean, _console, _console_err, _err, _esc, _final_table, _finite, _fmt_best, _fmt_bytes, _fmt_int, _fmt_seconds, _fmt_started, _render_predictions, _warn

app = typer.Typer(
    name="nnctl",
    help="Train, fine-tune, inspect and export PyTorch models declared in YAML.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def handle_errors(fn):
    """Turn nnctl's errors into one-line messages and exit codes; never a traceback for a user mistake."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from nnctl.errors import ConfigError, NnctlError

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


# --- check ----------------------------------------------------------------------------

@app.command()
@handle_errors
def check(
    config: str = typer.Argument(..., help="The YAML config to validate."),
    set_: Optional[list[str]] = SetOpt,
    strict: bool = typer.Option(False, "--strict", help="Treat lint warnings as errors (exit 2)."),
):
    """Validate a config and lint it, without training."""
    from nnctl.config import structure as CS
    from nnctl.config import loader as CL
    from nnctl.errors import ConfigError

    doc = CL.load_document(config, set_ or [])
    structural = CS.validate_all(doc)
    if structural.problems:
        # shown at once, before paying for import torch; the layer and shape problems follow
        for p in structural.problems:
            _err(p.format())
    from nnctl import checking as M

    result = M.check(doc)  # THE check pipeline: what nnctl train refuses before it reads a sample
    if result.problems:
        shown = {p.format() for p in structural.problems}
        rest = [p for p in result.problems if p.format() not in shown]
        if rest:
            raise ConfigError(rest)
        raise typer.Exit(2)
    result.refuse()  # a package the config asks for and lacks (train.log: tensorboard): exit 1, as train
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
    from nnctl import api

    src = api.open_source(source, overrides, which)
    return src.cfg, src.doc, src.model, src.plan, src.state


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
    from nnctl.model import graph as G
    from nnctl.model import summary as S
    from nnctl.errors import UsageError

    if graph is not None and not graph.lower().endswith((".png", ".svg", ".pdf")):
        raise UsageError(f"--graph {graph}: the picture's file name must end in .png, .svg or .pdf")
    cfg, doc, model, plan, _ = _load_source(source, set_ or [], which)
    from nnctl.data.augment.spec import describe

    spec = cfg.data.augment if cfg.data is not None else None
    result = S.summarize(model, plan, cfg.model.input_shape, depth=depth, augment=describe(spec) if spec else None)
    if graph is not None:
        G.draw_graph(model, cfg.model.input_shape, graph, title=f"{cfg.name}: input {list(cfg.model.input_shape)}",
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
    if result.augment:  # one line: the training batches' augmentation
        con.print(f"augment (training batches): {result.augment}", markup=False)


# --- layers, schema -------------------------------------------------------------------

@app.command()
@handle_errors
def layers(
    name: Optional[str] = typer.Argument(None, help="Show one layer type's arguments."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """The layer types a config may name (torch.nn) and their arguments, from PyTorch's signatures."""
    from nnctl.model import registry as L
    from nnctl.config.schema import suggest
    from nnctl.errors import UsageError

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
    from nnctl.config.schema import json_schema

    text = json.dumps(json_schema(), indent=2)
    if output:
        from nnctl.files import atomic_write  # refuses a folder, a device or a FIFO as the target

        atomic_write(output, lambda fh: fh.write((text + "\n").encode()))
    else:
        print(text)


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
    from nnctl.training import run as R

    if nproc_per_node is not None and "LOCAL_RANK" not in os.environ:
        forwarded = _forwarded_train_args(config, device, epochs, seed, set_ or [], out, resume, init, partial, force)
        return _launch(config, forwarded, out, resume, set_ or [], nproc_per_node, nnodes, node_rank,
                       rdzv_endpoint, rdzv_id, max_restarts)
    from nnctl.training import distributed as T

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
            from nnctl.errors import NnctlError

            raise NnctlError(f"rank {dist.rank}: lost contact with another process of the run "
                             f"({' '.join(str(exc).split())[:160]})") from None
        raise
    finally:
        progress.close()
        if dist.enabled:
            T.close_distributed()
    if dist.main:
        _final_table(con, result)


def _stop_on_sigterm() -> None:
    """Until the loop installs its own handler: SIGTERM while loading exits 143, cleanly."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        from nnctl.training.signals import Interrupted

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
    from nnctl.runs import rundir as RD
    from nnctl.config import loader as CL
    from nnctl.training import run as R

    if config is not None:
        CL.load(config, overrides)  # config mistakes surface once, here, not in N workers
    # the launcher takes the run folder and its lock, and holds it for its workers (and their restarts)
    source = R.resume_source(resume, out) if resume else None
    if source is not None and source.continue_in is not None:
        claim = R.claim_existing(source.continue_in)
        out = str(source.continue_in)
    else:
        cfg, _ = CL.load(config, overrides) if config is not None else (None, None)
        if cfg is None:
            from nnctl.runs import checkpoint as K

            cfg, _ = CL.from_dict(K.load(source.checkpoint)["config"], str(source.checkpoint))
        claim = R.claim_new(cfg.name, out)
        if out is None:
            forwarded = forwarded + ["--out", str(claim.folder)]
        out = str(claim.folder)
    os.environ[RD.LOCKED_ENV] = os.path.abspath(out)
    try:
        _run_torchrun(forwarded, out, nproc, nnodes, node_rank, endpoint, rdzv_id, max_restarts)
    except BaseException as exc:
        if not (source is not None and source.continue_in is not None):
            claim.abandon(exc)  # keeps the record a worker wrote (status.json), else records this error
        raise
    finally:
        claim.release()
        os.environ.pop(RD.LOCKED_ENV, None)


def _run_torchrun(forwarded, out, nproc, nnodes, node_rank, endpoint, rdzv_id, max_restarts) -> None:
    from torch.distributed import run as torchrun

    from nnctl.errors import NnctlError

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


# --- freeze, export-weights ---------------------------------------------------------------

def _int_list(text: str | None, what: str) -> list[int] | None:
    from nnctl.errors import UsageError

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
    from nnctl.runs import records as RS
    from nnctl.runs import checkpoint as K
    from nnctl.config import schema as C
    from nnctl.model import freeze as F

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
        inputs = [source] + ([str(RS.resolve(source, which))] if state is not None else [])
        from nnctl.files import check_output

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
    from nnctl import api

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


@app.command("runs")
@handle_errors
def runs_(
    folder: str = typer.Argument("runs", help="A folder of run folders (default: runs), or one run folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the runs as JSON."),
):
    """A table of the runs in a folder, by start time: state, epochs, best metric, what differs."""
    from rich.table import Table
    from rich.text import Text

    from nnctl.runs import records as RS

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
    from nnctl.runs import plots as PLOTS
    from rich.table import Table

    from nnctl.runs import records as RS

    comparison = RS.compare(runs)
    PLOTS.plot_comparison(comparison, out)
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
    from nnctl import api

    done = api.cache_clear(root=root, all=all_)
    print(f"removed {done.removed} entr{'y' if done.removed == 1 else 'ies'} ({_fmt_bytes(done.freed)}) "
          f"from {done.directory}")
    for key in done.busy:
        _err(f"note: {key[:12]} is being built by a running process: left alone")
    for key, why in getattr(done, "skipped", ()):
        _err(f"note: {key[:12]}: {why}: left alone")


def main() -> None:
    app()
