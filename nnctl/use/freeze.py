"""Freezing for fine-tuning (``nnctl freeze``): a model's children with their frozen/trainable status,
and a checkpoint holding the weights and the freeze selection, for ``nnctl train --init``.

The selection itself (first / children / names / unfreeze) is resolved by ``nnctl.model.freeze``;
this module opens the source, applies it and writes the checkpoint (the one payload builder,
``nnctl.runs.checkpoint.make_payload``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

from nnctl.config import schema as C
from nnctl.files import check_output
from nnctl.model import freeze as F
from nnctl.runs import checkpoint as K
from nnctl.use.source import open_source


@dataclass
class Frozen:
    """What ``freeze`` did: the model's children (rows of ``nnctl.model.freeze.children_rows``), the
    parameter counts, the freeze selection (None: nothing frozen) and the checkpoint written (or None)."""

    name: str  # the config's name
    children: list[dict]
    total: int
    trainable: int
    plan: dict | None
    output: str | None = None

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    def to_dict(self) -> dict[str, Any]:
        """The ``nnctl freeze --json`` form."""
        return {"children": self.children, "total": self.total, "trainable": self.trainable,
                "frozen": self.frozen, "plan": self.plan, "output": self.output}


def freeze(source: Any, *, first: int | None = None, children: Sequence[int] | None = None,
           names: Sequence[str] | None = None, unfreeze: Sequence[str] | None = None,
           train_frozen_norm: bool = False, output: str | os.PathLike | None = None,
           which: str = "best") -> Frozen:
    """Freeze a model's children (a config, a checkpoint or a run folder): without a selector, the
    source's own selection (a checkpoint's). ``output``: also write a checkpoint with the weights and
    the selection (never over an input)."""
    src = open_source(source, (), which)
    model, cfg, state = src.model, src.cfg, src.state
    if any(v is not None for v in (first, children, names, unfreeze)):
        freezing = F.make_freeze(model, first, None if children is None else list(children),
                                 None if names is None else list(names),
                                 None if unfreeze is None else list(unfreeze), train_frozen_norm)
        F.apply(model, freezing)
    else:
        freezing = (state or {}).get("freeze")
    rows = F.children_rows(model)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if output is not None:
        payload = K.make_payload("freeze", C.resolved(cfg), model.state_dict(), freeze=freezing,
                                 input_shape=list(cfg.model.input_shape), source=os.path.basename(source),
                                 preprocessing=(state or {}).get("preprocessing"))
        inputs, input_dirs = src.read_paths()  # never over what was read, nor inside a data folder
        check_output(output, inputs, what="-o", input_dirs=input_dirs)
        K.save(output, payload, inputs, run_file=False, input_dirs=input_dirs)
    return Frozen(cfg.name, rows, total, trainable, freezing, None if output is None else os.fspath(output))
