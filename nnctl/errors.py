"""Error types shared by every step. No torch, no printing.

Exit codes (DESIGN.md section 7): 0 success, 1 runtime failure, 2 usage or
config error. The CLI maps these exceptions to those codes.
"""

from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config, located in its file."""

    message: str
    path: str = ""  # YAML path such as model.layers[3].Conv2d.kernel_size
    file: str = ""
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based

    def format(self) -> str:
        where = _printable(self.file or "<config>")
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        head = f"{where}: "
        if self.path:
            head += f"{_printable(self.path)}: "
        # one line a problem, whatever the underlying message carried
        return head + " ".join(self.message.split())


def _printable(text: str) -> str:
    """Control characters (a newline in a --set key, an escape sequence in a file name) shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class NnctlError(Exception):
    """A failure the user can act on; exit code 1 unless a subclass says otherwise."""

    exit_code = 1


class UsageError(NnctlError):
    """Wrong command-line usage or a file that is not what it should be (exit 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """Every problem found in one config, reported together (exit 2)."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(p.format() for p in self.problems))


class CheckpointError(UsageError):
    """A checkpoint or weights file that cannot be used (corrupt, hostile, mismatched)."""


class Pruned(NnctlError):
    """A hyperparameter search stopped this run after an epoch: its metric was not promising (Optuna's
    pruner). The run's checkpoints up to that epoch are kept; its record's state is ``pruned``."""

    def __init__(self, epoch: int, metric: str, value: float):
        self.epoch, self.metric, self.value = epoch, metric, value
        super().__init__(f"pruned by the search after epoch {epoch} ({metric} {value:.4g})")
