"""How the model computes, as the config says it (no torch): ``train.precision`` and ``train.compile``.

Precision takes Lightning's names (``32-true``, ``bf16-mixed``, ``16-mixed``, ``bf16-true``); the
names nnctl used before (``fp32``, ``bf16``, ``fp16``) are aliases that mean what they meant, and the
resolved config records the canonical name. ``train.compile`` is ``false``, ``true`` or a mapping of
torch.compile's options (:class:`CompileSection`). What depends on the machine (native bfloat16, the
backends torch has) is ``nnctl.model.precision`` and ``nnctl.model.compiling``.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, model_validator

from nnctl.config.base import _CrossProblems, _Section

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true")
PRECISION_ALIASES = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


PRECISION_HELP = ("32-true | bf16-mixed (bfloat16 autocast) | 16-mixed (float16 autocast with a grad scaler; "
                  "bf16-mixed on a CPU) | bf16-true (bfloat16 weights and inputs, no autocast); fp32, bf16, fp16: "
                  "aliases of 32-true, bf16-mixed, 16-mixed")
COMPILE_HELP = "torch.compile the model: false, true, or {mode, dynamic, backend, fullgraph}"


class DistributedSection(_Section):
    """How several processes (--nproc-per-node, several machines) share the model: ``ddp`` keeps a whole
    copy on every rank (DistributedDataParallel); ``fsdp`` shards parameters, gradients and optimizer
    state over the ranks (FSDP2, ``fully_shard``): each holds 1/N. One process ignores it."""

    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="ddp (a copy a rank) | fsdp (FSDP2: 1/N a rank)")
    reshard_after_forward: bool = Field(True, description="fsdp: free the gathered layers after the forward "
                                                          "(less memory; gathered again for the backward)")
    cpu_offload: bool = Field(False, description="fsdp: keep the shards and optimizer state in CPU memory")


def canonical_precision(name: str) -> str:
    """A precision's canonical (Lightning) name: an alias becomes the name it stands for."""
    return PRECISION_ALIASES.get(name, name)


class CompileSection(_Section):
    mode: Literal[COMPILE_MODES] | None = Field(None, description="torch.compile's mode (the inductor backend's): "
                                                                  "default, reduce-overhead, max-autotune, "
                                                                  "max-autotune-no-cudagraphs")
    dynamic: bool | None = Field(None, description="null: nnctl marks the batch dimension dynamic, so the last, "
                                                   "smaller batch reuses the graph; true: every size dynamic; "
                                                   "false: every size static (a new batch size recompiles)")
    backend: str = Field("inductor", min_length=1, max_length=200,
                         description="a torch.compile backend: one of torch.compiler.list_backends(), or "
                                     "aot_eager / eager (tracing only, for tests)")
    fullgraph: bool = Field(False, description="refuse graph breaks: the whole forward is one graph")

    @model_validator(mode="after")
    def _mode_backend(self) -> "CompileSection":
        if self.mode not in (None, "default") and self.backend != "inductor":
            raise _CrossProblems([(("train", "compile", "mode"),
                                   f"mode {self.mode} is the inductor backend's option; backend {self.backend} "
                                   "takes none: remove mode, or use backend: inductor")])
        return self


def compile_value(value: Any) -> bool | CompileSection:
    """``train.compile`` as given: true / false, or a mapping validated as :class:`CompileSection` (each
    problem located under train.compile)."""
    if isinstance(value, bool | CompileSection):
        return value
    if not isinstance(value, dict):
        hint = ""
        if isinstance(value, str) and value.lower() in ("yes", "no", "on", "off", "y", "n"):
            hint = (f" (nnctl reads YAML 1.2: {value!r} is a string here; write "
                    f"{'true' if value.lower() in ('yes', 'on', 'y') else 'false'})")
        raise ValueError("expected true, false or a mapping of torch.compile's options {mode, dynamic, backend, "
                         f"fullgraph}}, got {value!r}{hint}")
    try:
        return CompileSection.model_validate(value)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            cross = err.get("ctx", {}).get("error")
            problems += cross.problems if isinstance(cross, _CrossProblems) else \
                [(("train", "compile", *err["loc"]), _message(err))]
        raise _CrossProblems(problems) from None


def _message(err: dict) -> str:
    """A CompileSection error in the words the rest of the structure uses."""
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        key, fields = str(err["loc"][-1]), list(CompileSection.model_fields)
        close = difflib.get_close_matches(key, fields, n=1)
        return f"unknown key {key!r}" + (f"; did you mean {close[0]!r}?" if close else
                                         f" (expected one of: {', '.join(fields)})")
    if kind == "literal_error":
        return f"{value!r} is not one of {', '.join(COMPILE_MODES)}"
    if kind == "bool_type":
        return f"expected true or false, got {value!r}"
    if kind == "string_type":
        return f"expected a string, got {value!r}"
    return err["msg"]


# the field types of TrainSection (nnctl.config.schema)
Precision = Annotated[Literal[PRECISIONS + tuple(PRECISION_ALIASES)], AfterValidator(canonical_precision)]
Compile = Annotated[bool | CompileSection, BeforeValidator(compile_value)]
