"""Starting a run's processes: one process of a run (``train``), or N of them through
``torch.distributed.run``, the engine behind torchrun (``launch``).

``train`` is one process of a run, a plain one or a torchrun worker: SIGTERM while the run
starts stops it cleanly (exit 143; the handler is restored afterwards), a rank that loses
contact with another is an NnctlError that says so, and the process group the run opened is
closed at its end.

``launch`` claims the run folder (and its lock) before any worker starts, and holds it for the
workers and their restarts (``--max-restarts``): the workers find its path in RunDir's
``LOCKED_ENV`` and do not lock it again. The workers are ``nnctl train`` with the same options,
so each rank runs exactly what a plain run runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch.distributed as tdist

from nnctl import checking as CHK
from nnctl.config import loader as CL
from nnctl.errors import NnctlError
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
        if dist.enabled and (isinstance(exc, getattr(tdist, "DistBackendError", RuntimeError))
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
    rendezvous (host:port and id; needed for more than one machine) and restarts of failed workers."""

    nproc_per_node: int
    nnodes: str = "1"
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str = "nnctl"
    max_restarts: int = 0

    def args(self, forwarded: list[str]) -> list[str]:
        """torch.distributed.run's command line starting ``nnctl train <forwarded>`` in every worker."""
        args = ["--nproc-per-node", str(self.nproc_per_node), "--nnodes", str(self.nnodes),
                "--max-restarts", str(self.max_restarts)]
        if self.rdzv_endpoint:
            args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", self.rdzv_endpoint, "--rdzv-id", self.rdzv_id]
            if self.node_rank is not None:
                args += ["--node-rank", str(self.node_rank)]
        elif str(self.nnodes) == "1":
            args += ["--standalone"]
        else:
            raise NnctlError("--nnodes > 1 needs --rdzv-endpoint host:port (the same on every machine)")
        return args + ["-m", "nnctl", "train", *forwarded]


def launch(config: str | None, torchrun: Torchrun, **options) -> Path:
    """Train in ``torchrun.nproc_per_node`` processes on this machine (``torchrun.nnodes`` machines)
    through torch.distributed.run; returns the run folder. ``options``: ``train``'s (overrides, out,
    resume, init, partial, force, epochs, seed, device)."""
    overrides = list(options.get("overrides") or ())
    out, resume = options.get("out"), options.get("resume")
    forwarded = worker_args(config, options)
    if config is not None:
        CL.load(config, overrides)  # config mistakes surface once, here, not in N workers
    # the launcher takes the run folder and its lock, and holds it for its workers (and their restarts)
    source = R.resume_source(resume, out) if resume else None
    if source is not None:  # a refused resume (finished, changed config): one line here, not N workers failing
        sets = overrides + [f"{key}={options[name]}" for name, key in
                            (("epochs", "train.epochs"), ("seed", "seed"), ("device", "train.device"))
                            if options.get(name) is not None]  # as run.train turns these options into --set
        checked = CHK.load_checked(config, sets, purpose="train") if config is not None else None
        R.accepted_resume(source, checked.cfg if checked else None, checked.doc if checked else None, checked,
                          sets, bool(options.get("force")))
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
    held = os.environ.get(LOCKED_ENV)
    os.environ[LOCKED_ENV] = os.path.abspath(out)
    try:
        _run_torchrun(torchrun.args(forwarded), out)
    except BaseException as exc:
        if not continuing:
            claim.abandon(exc)  # keeps the record a worker wrote (status.json), else records this error
        raise
    finally:
        claim.release()
        if held is None:
            os.environ.pop(LOCKED_ENV, None)
        else:
            os.environ[LOCKED_ENV] = held
    return Path(out)


def _run_torchrun(args: list[str], out: str) -> None:
    import torch.distributed.run as torchrun  # only when workers are launched (tests/test_imports.py)

    try:
        torchrun.run(torchrun.parse_args(args))
    except Exception as exc:  # ChildFailedError: a worker failed or was killed
        text = " ".join(str(exc).split())
        raise NnctlError(f"distributed training failed: {text[:400]}"
                         + (f"; the last checkpoint is in {out}" if out else "")) from None
