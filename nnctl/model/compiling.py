"""train.compile: the model compiled, its batch dimension dynamic, its graphs counted.

What runs forward is ``torch.compile(model)`` (under DDP, the inner module, which DDP then wraps, as
torch's guide "Where to apply torch.compile?" advises); the model itself is left as it is. Checkpoints
are the model's own ``state_dict`` (the trainer's TrainState holds the model, never the wrapper), so they
never hold ``_orig_mod.`` prefixes and load into the plain model; and whatever else uses the model (the
TensorBoard graph, the caller of ``nnctl.fit`` afterwards) gets the plain module, not a compiled one
(``nn.Module.compile()`` in place would make ``torch.jit.trace`` refuse it).

The last batch of an epoch is usually smaller. With ``dynamic`` unset, :class:`Runner` marks each input's
batch dimension dynamic (``torch._dynamo.mark_dynamic``) before the forward, so the first graph is
compiled for any batch size and the last batch reuses it (``dynamic=None`` alone would compile once
static, then recompile at the first other size). One caveat stays torch's: on a CPU, its convolution
picks a backend by batch size (16 and up, or not), and a batch of 1 is specialised, so such a last batch
compiles once more. :class:`Runner` counts graphs and recompilations (a new graph in a mode, training or
evaluation, that already had one), which the trainer reports at the end of its first epoch.

``torch._dynamo`` takes 2 s to import: it is imported only when a run compiles.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from nnctl.config.compute import CompileSection
from nnctl.errors import UsageError

TEST_BACKENDS = ("aot_eager", "eager")  # tracing without code generation: listed by torch as debug backends


def options(value: bool | CompileSection) -> dict | None:
    """torch.compile's keyword arguments for train.compile (None: not compiled)."""
    if value is False:
        return None
    section = value if isinstance(value, CompileSection) else CompileSection()
    out: dict[str, Any] = {"backend": section.backend, "fullgraph": section.fullgraph, "dynamic": section.dynamic}
    if section.mode is not None:
        out["mode"] = section.mode
    return out


def backend_problem(value: bool | CompileSection) -> str | None:
    """Why train.compile's backend cannot run here (None: it can, or nothing is compiled)."""
    if not isinstance(value, CompileSection) or value.backend == "inductor":  # inductor: always registered
        return None
    known = sorted(set(torch.compiler.list_backends()) | set(TEST_BACKENDS))
    if value.backend in known:
        return None
    return f"unknown torch.compile backend {value.backend!r}: this torch has {', '.join(known)}"


def compiled(model: nn.Module, value: bool | CompileSection) -> nn.Module:
    """``torch.compile(model)`` as train.compile says (the model itself when it says false)."""
    kwargs = options(value)
    if kwargs is None:
        return model
    problem = backend_problem(value)
    if problem is not None:
        raise UsageError(f"train.compile.backend: {problem}")
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:  # torch 2.14: a cache of its own
        kwargs["isolate_recompiles"] = True  # (this run's graphs and recompilations, counted from none)
    return torch.compile(model, **kwargs)


class Runner(nn.Module):
    """What runs forward when it is more than the model: floating inputs cast to the weights' dtype
    (bf16-true), the batch dimension marked dynamic and the compiled graphs counted (train.compile).
    ``no_sync`` is the wrapped DDP's (gradient accumulation)."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype | None, compiled: dict | None):
        super().__init__()
        self.inner = inner
        self.dtype = dtype
        self.compiled = compiled  # torch.compile's options, or None
        self.mark = compiled is not None and compiled.get("dynamic") is None
        self.graphs = self.recompilations = 0
        self.modes: set[tuple[bool, bool]] = set()  # (training, grad enabled) that have a graph
        self.counters = None
        if compiled is not None:
            import torch._dynamo  # noqa: F401  (torch.compile's machinery: imported only to compile)
            from torch._dynamo.utils import counters

            self.counters = counters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype is not None and x.is_floating_point():
            x = x.to(self.dtype)
        if self.counters is None:
            return self.inner(x)
        if self.mark and x.dim() and x.shape[0] > 1:  # a batch of 1 is specialised by torch: never marked
            torch._dynamo.mark_dynamic(x, 0)
        before = self.counters["stats"]["unique_graphs"]
        out = self.inner(x)
        new = self.counters["stats"]["unique_graphs"] - before
        if new:
            mode = (self.training, torch.is_grad_enabled())
            self.recompilations += mode in self.modes
            self.modes.add(mode)
            self.graphs += new
        return out

    def no_sync(self):
        return self.inner.no_sync() if hasattr(self.inner, "no_sync") else nullcontext()

    def note(self, epoch: int) -> str | None:
        """The compile note of an epoch ("note: compile: N graphs, M recompilations ..."), None if not compiled."""
        if self.compiled is None:
            return None
        g, r = self.graphs, self.recompilations
        why = "; TORCH_LOGS=recompiles shows why" if r else ""
        return (f"note: compile: {g} graph{'' if g == 1 else 's'}, {r} recompilation{'' if r == 1 else 's'} in "
                f"epoch {epoch + 1} (backend {self.compiled['backend']}{why})")


def note(runner_: nn.Module, epoch: int) -> str | None:
    """The compile note of what runs forward (None: it is not compiled)."""
    return runner_.note(epoch) if isinstance(runner_, Runner) else None


def runner(inner: nn.Module, value: bool | CompileSection, dtype: torch.dtype | None) -> nn.Module:
    """What runs forward: ``inner`` itself, or a :class:`Runner` around it when inputs are cast or the model
    is compiled (``inner`` then holds :func:`compiled`'s module)."""
    compiled = options(value)
    if dtype is None and compiled is None:
        return inner
    return Runner(inner, dtype, compiled)
