"""The one seed rule: derived seeds for (seed, epoch, step, rank, ...)."""

from __future__ import annotations


_MASK = (1 << 63) - 1


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers: seed * 1_000_003 + epoch, and so on."""
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p)) & _MASK
    return h
