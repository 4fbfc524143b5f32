"""Starting a run's processes: one process of a run (``train``), or N of them through
``torch.distributed.run``, the engine behind torchrun (``launch``).

``train`` is one process of a run, a plain one or a torchrun worker: SIGTERM while the run
starts stops it cleanly (exit 143; the handler is restored afterwards), a rank that loses
contact with another is an NnctlError that says so, and the process group the run opened is
closed at its end.

``launch`` claims the run folder (and its lock) before any worker starts, and holds it for the
workers and their restarts (``--max-restarts``): the workers find its path in RunDir's
``LOCKED_ENV`` and do not lock it again. The workers are ``nnctl train`` with the same options,
so each rank runs exactly what a plain run runs. On several machines (``--nnodes`` other than 1)
the rendezvous decides which machine holds global rank 0, so no launcher claims a folder: rank 0's
worker does, as under plain torchrun, and the other machines write nothing. Every rank checks that
it trains the same config and data as the others (``nnctl.training.ranks``); every worker of a
machine refused (exit 2) makes the launcher's exit 2 too.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch.distributed as tdist

from nnctl import checking as CHK
from nnctl.config import loader as CL
from nnctl.errors import NnctlError, UsageError
from nnctl.data.sources.read import read_paths
from nnctl.runs import checkpoint as K
from nnctl.runs.claim import claim_existing, claim_new
from nnctl.runs.rundir import LOCKED_ENV
from nnctl.training import distributed as DIST
from nnctl.training import run as R
from nnctl.training.signals import stop_on_sigterm

_LOST = ("gloo", "NCCL", "Connection reset", "Connection closed")  # what a rank sees when another one dies


def is_worker() -> bool:
    """Whether torchrun started this process (LOCAL_RANK is set): its processes exist already."""
    return "LOCAL_RANK" in os.environ


def is_main_process() -> bool:
    """Rank 0 of a torchrun run, or a plain process: the one that reports and writes the run's record."""
    return DIST.dist_from_env().main


def set_timeout(seconds: int) -> None:
    """A worker started by plain torchrun with ``nnctl train --rdzv-timeout SECONDS``: its process group's
    timeout (the launcher's workers inherit it from the launcher)."""
    os.environ[DIST.TIMEOUT_ENV] = str(int(seconds))


def train(config: str | None = None, **options) -> R.RunResult:
    """One process of a run: ``nnctl.training.run.train`` (same options), with SIGTERM handled while it
    starts, a lost rank reported as such, and the process group it opened closed at the end."""
    dist = options.pop("dist", None) or DIST.dist_from_env()
    opened = dist.enabled and not (tdist.is_available() and tdist.is_initialized())
    try:
        with stop_on_sigterm():
            return R.train(config, dist=dist, **options)
    except RuntimeError as exc:
        text = str(exc)
        if dist.enabled and (isinstance(exc, getattr(tdist, "DistError", RuntimeError))  # backend, store, network
                             or any(w in text for w in _LOST)):
            raise NnctlError(f"rank {dist.rank}: lost contact with another process of the run "
                             f"({' '.join(text.split())[:160]})") from None
        raise
    finally:
        if opened:
            DIST.close_distributed()


# nnctl train's options a worker gets from its launcher, in order: (keyword, flag)
_FORWARDED = (("device", "--device"), ("epochs", "--epochs"), ("seed", "--seed"), ("out", "--out"),
              ("resume", "--resume"), ("init", "--init"))


def worker_args(config: str | None, options: Mapping[str, Any]) -> list[str]:
    """The ``nnctl train`` arguments of a worker: the launcher's own ``train`` options (overrides, out,
    resume, init, partial, force, epochs, seed, device), without the launch options."""
    unknown = set(options) - {key for key, _ in _FORWARDED} - {"overrides", "partial", "force"}
    if unknown:
        raise TypeError(f"launch() got unexpected options: {sorted(unknown)}")
    args = [config] if config else []
    for key, flag in _FORWARDED:
        if options.get(key) is not None:
            args += [flag, str(options[key])]
    for item in options.get("overrides") or ():
        args += ["--set", item]
    args += [flag for key, flag in (("partial", "--partial"), ("force", "--force")) if options.get(key)]
    return args


@dataclass(frozen=True)
class Torchrun:
    """torchrun's options: processes a machine, machines (``"2"`` or ``"1:4"``), this machine's rank, the
    rendezvous (host:port and id; needed for more than one machine), restarts of failed workers, and
    ``rdzv_timeout``: seconds the rendezvous waits for every machine (torchrun's join_timeout, and its
    store's read_timeout and close_timeout), which are also the process group's timeout (a collective
    waiting for a rank that is gone fails after them)."""

    nproc_per_node: int
    nnodes: str = "1"
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str = "nnctl"
    max_restarts: int = 0
    rdzv_timeout: int | None = None

    @property
    def several_machines(self) -> bool:
        return str(self.nnodes) != "1"

    def args(self, forwarded: list[str]) -> list[str]:
        """torch.distributed.run's command line starting ``nnctl train <forwarded>`` in every worker."""
        args = ["--nproc-per-node", str(self.nproc_per_node), "--nnodes", str(self.nnodes),
                "--max-restarts", str(self.max_restarts)]
        conf = {key: int(self.rdzv_timeout) for key in ("join_timeout", "read_timeout", "close_timeout")
                if self.rdzv_timeout is not None}
        if self.rdzv_endpoint:
            args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", self.rdzv_endpoint, "--rdzv-id", self.rdzv_id]
            if self.node_rank is not None:  # c10d numbers the machines itself (torchrun ignores --node-rank);
                conf["is_host"] = int(self.node_rank == 0)  # node 0 is the endpoint's machine: it serves it
        elif str(self.nnodes) == "1":
            args += ["--standalone"]
        else:
            raise NnctlError("--nnodes > 1 needs --rdzv-endpoint host:port (the same on every machine)")
        if conf:
            args += ["--rdzv-conf", ",".join(f"{key}={value}" for key, value in conf.items())]
        return args + ["-m", "nnctl", "train", *forwarded]


def launch(config: str | None, torchrun: Torchrun, **options) -> Path | None:
    """Train in ``torchrun.nproc_per_node`` processes on this machine (``torchrun.nnodes`` machines)
    through torch.distributed.run; returns the run folder (None: several machines without --out, where
    global rank 0 names it on its machine). ``options``: ``train``'s (overrides, out, resume, init,
    partial, force, epochs, seed, device)."""
    overrides = list(options.get("overrides") or ())
    out, resume = options.get("out"), options.get("resume")
    forwarded = worker_args(config, options)
    if config is not None:
        CL.load(config, overrides)  # config mistakes surface once, here, not in N workers
    source = R.resume_source(resume, out) if resume else None
    if source is not None:  # a refused resume (finished, changed config): one line here, not N workers failing
        sets = overrides + [f"{key}={options[name]}" for name, key in
                            (("epochs", "train.epochs"), ("seed", "seed"), ("device", "train.device"))
                            if options.get(name) is not None]  # as run.train turns these options into --set
        checked = CHK.load_checked(config, sets, purpose="train") if config is not None else None
        R.accepted_resume(source, checked.cfg if checked else None, checked.doc if checked else None, checked,
                          sets, bool(options.get("force")))
    timeout = {DIST.TIMEOUT_ENV: str(torchrun.rdzv_timeout)} if torchrun.rdzv_timeout is not None else {}
    if torchrun.several_machines:  # the rendezvous decides which machine holds global rank 0: its worker
        out = str(source.continue_in) if source is not None and source.continue_in is not None else out
        with _environment(timeout):  # claims the run folder there, as under plain torchrun
            _run_torchrun(torchrun.args(forwarded), out)
        return Path(out) if out else None
    # one machine: the launcher takes the run folder and its lock, and holds it for its workers (and restarts)
    continuing = source is not None and source.continue_in is not None
    if continuing:
        claim = claim_existing(source.continue_in)
        out = str(source.continue_in)
    else:
        cfg, _ = CL.load(config, overrides) if config is not None else (None, None)
        if cfg is None:
            cfg, _ = CL.from_dict(K.load(source.checkpoint)["config"], str(source.checkpoint))
        claim = claim_new(cfg.name, out, input_dirs=read_paths(cfg)[1])  # never inside the data it reads
        if out is None:
            forwarded = forwarded + ["--out", str(claim.folder)]
        out = str(claim.folder)
    try:
        with _environment({**timeout, LOCKED_ENV: os.path.abspath(out)}):
            _run_torchrun(torchrun.args(forwarded), out)
    except BaseException as exc:
        if not continuing:
            claim.abandon(exc)  # keeps the record a worker wrote (status.json), else records this error
        raise
    finally:
        claim.release()
    return Path(out)


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """os.environ with ``values`` set (the workers inherit them), restored afterwards."""
    held = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in held.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run_torchrun(args: list[str], out: str) -> None:
    import torch.distributed.run as torchrun  # only when workers are launched (tests/test_imports.py)

    try:
        torchrun.run(torchrun.parse_args(args))
    except Exception as exc:  # ChildFailedError: a worker failed or was killed
        text = " ".join(str(exc).split())
        codes = {getattr(f, "exitcode", None) for f in (getattr(exc, "failures", None) or {}).values()}
        if codes == {UsageError.exit_code}:  # every worker refused the run (usage, config, ranks disagreeing)
            raise UsageError(f"distributed training refused: every worker of this machine exited with "
                             f"{UsageError.exit_code} (their errors are above)") from None
        raise NnctlError(f"distributed training failed: {text[:400]}"
                         + (f"; the last checkpoint is in {out}" if out else "")) from None
