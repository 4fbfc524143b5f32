"""The one seed rule: every seed nnctl derives from the config's ``seed``.

- ``derive(seed, *parts)``: a 63-bit seed from integers (``seed * 1_000_003 + epoch``, and so
  on, modulo 2**63): the data order of an epoch (``derive(seed, epoch)``), a batch's augmentation
  (``derive(seed, epoch, step, rank, salt)``), each with a salt of its own where two would meet.
- ``rank_seed(seed, rank, epoch=0)``: the global RNG (dropout, noise) of a distributed worker that
  starts without its own saved stream: ``seed + 1_000_003 * rank + epoch``, so each rank draws
  from a stream of its own, and a resume with another process count from one of that epoch.

The numbers are part of nnctl's reproducibility (exact resume, bit-identical reruns): changing
either rule changes every run's batches, so neither may change.
"""

from __future__ import annotations

STRIDE = 1_000_003  # a prime: the multiplier of both rules
_MASK = (1 << 63) - 1


def derive(seed: int, *parts: int) -> int:
    """A 63-bit seed from the seed and integers: ((seed * STRIDE + parts[0]) * STRIDE + parts[1]) ... mod 2**63."""
    h = 0
    for p in (seed, *parts):
        h = (h * STRIDE + int(p)) & _MASK
    return h


def rank_seed(seed: int, rank: int, epoch: int = 0) -> int:
    """The global RNG's seed of distributed ``rank`` (from ``epoch``): seed + STRIDE * rank + epoch."""
    return seed + STRIDE * rank + epoch
