"""What every config section shares (no torch): the strict pydantic base, the cross-field problem
carrier, and the one-key entries (``Adam`` or ``{Adam: {lr: 0.1}}``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class _CrossProblems(ValueError):
    def __init__(self, problems: list[tuple[tuple, str]]):
        super().__init__("; ".join(m for _, m in problems))
        self.problems = problems


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


_EXAMPLES = {"loss": ("cross_entropy", "{label_smoothing: 0.1}"),
             "scheduler": ("StepLR", "{step_size: 10}"),
             "augmentation": ("RandomCrop", "{size: 32, padding: 4}")}


def _one_key(value: Any, what: str) -> tuple[str, dict]:
    """`Adam`, `{Adam: {lr: 0.1}}` or `{Adam: null}` -> ("Adam", {...})."""
    example, args_example = _EXAMPLES.get(what, ("Adam", "{lr: 0.001}"))
    kind = "name" if what == "loss" else "class name"
    if isinstance(value, str):
        return value, {}
    if isinstance(value, dict) and len(value) == 1:
        (name, args), = value.items()
        if not isinstance(name, str):
            raise ValueError(f"{what} name must be a {kind} such as {example}")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise ValueError(f"the arguments of {what} {name} must be a mapping such as {args_example}")
        return name, args
    raise ValueError(f"expected one {what} {kind}, alone or with a mapping of its arguments, "
                     f"such as {{{example}: {args_example}}}")
