"""The device and the ranks: device selection, torch.distributed set-up and tear-down."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
import torch
from nnctl.errors import UsageError
import os
import datetime
import torch.distributed as dist

# --- devices ------------------------------------------------------------------------

def select_device(spec: str) -> torch.device:
    """auto: CUDA, else MPS, else CPU. Asking for an absent device is an error, never a fallback."""
    spec = (spec or "auto").strip()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise UsageError("device mps requested but MPS is not available on this machine "
                             "(Apple silicon with a MPS-enabled PyTorch); use --device cpu or auto")
        return torch.device("mps")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"device {spec} requested but CUDA is not available "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                             "use --device cpu or auto")
        index = int(spec.split(":", 1)[1]) if ":" in spec else 0
        count = torch.cuda.device_count()
        if index >= count:
            raise UsageError(f"device {spec} requested but this machine has {count} CUDA device(s) "
                             f"(cuda:0 to cuda:{count - 1})")
        return torch.device("cuda", index)
    raise UsageError(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps")


# --- distributed ----------------------------------------------------------------------

@dataclass
class Dist:
    """This process's place in a torch.distributed run (world_size 1: a plain run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor) -> None:
        if self.enabled:

            dist.all_reduce(t)

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when flag is True on any rank (a collective: every rank must call it)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        self.all_reduce(t)
        return bool(t.item() > 0)

    def gather(self, obj: Any) -> list:
        if not self.enabled:
            return [obj]

        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def dist_from_env() -> Dist:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK, or a single process."""

    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return Dist()
    return Dist(rank, world, local) if world > 1 else Dist()


TIMEOUT_ENV = "NNCTL_DIST_TIMEOUT"  # seconds: nnctl train --rdzv-timeout, set by the launcher for its workers


def process_group_timeout() -> datetime.timedelta:
    """How long a collective waits for a rank that does not answer (a machine gone, a network cut)
    before it fails: --rdzv-timeout's seconds, else 10 minutes."""
    try:
        seconds = float(os.environ.get(TIMEOUT_ENV) or 600)
    except ValueError:
        seconds = 600.0
    return datetime.timedelta(seconds=seconds if seconds > 0 else 600)


def init_distributed(d: Dist, device: torch.device) -> None:
    """One process group: gloo on the CPU, nccl on CUDA (one device a rank)."""


    if not d.enabled or dist.is_initialized():
        return

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = process_group_timeout()
    # torchrun's store outlives a restart (--max-restarts): keys of the earlier attempt's
    # process group would be read again, so each attempt gets a prefix of its own
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    store = dist.PrefixStore(f"nnctl-attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)


def close_distributed() -> None:

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
