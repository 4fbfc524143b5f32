"""'; did you mean X?': the one way a misspelt name gets its suggestion (layers, keys, optimizers, ...)."""

from __future__ import annotations

import difflib

CORE_LAYERS = ("Conv2d", "Linear", "Dropout2d", "Dropout", "MaxPool2d", "ReLU", "Softmax", "LogSoftmax",
               "ReflectionPad2d", "InstanceNorm2d", "Flatten", "Sequential", "Residual", "BatchNorm2d")


def suggest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """'; did you mean X?' or '' (case-insensitive close match; the documented core wins ties)."""
    lowered = {c.lower(): c for c in choices}
    target = str(word).lower()
    hits = difflib.get_close_matches(target, list(lowered), n=5, cutoff=0.6)
    if not hits:
        return ""
    # the fewest edits first (two letters swapped count one: Adma -> Adam, not Adamax), then the closest
    # by difflib's ratio, then the documented core
    score = lambda h: (-_edits(target, h), round(difflib.SequenceMatcher(None, target, h).ratio(), 6),
                       lowered[h] in CORE_LAYERS)
    best = max(hits, key=score)
    return f"; did you mean {lowered[best]!r}?"


def _edits(a: str, b: str) -> int:
    """Edit distance with adjacent transpositions (optimal string alignment): insert, delete, replace, swap."""
    prev2, prev = None, list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], prev2[j - 2] + 1)
        prev2, prev = prev, row
    return prev[-1]
