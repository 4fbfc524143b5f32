"""THE check pipeline (nnctl.check is the public function): every problem of a config, in file order, before anything trains."""

from __future__ import annotations

from dataclasses import dataclass
from nnctl.config.schema import Config
from nnctl.errors import ConfigError, Problem
from nnctl.config.yamlio import Document
from nnctl.model.plan import Plan, lint, plan

@dataclass
class Checked:
    """Everything ``nnctl check`` finds in one pass: problems of every kind, and what was valid."""

    cfg: Config | None  # the whole config, when its structure is valid
    plan: Plan | None  # the model's plan, when the model section plans without problems
    problems: list[Problem]  # structural, layer, shape, optimizer and scheduler problems, in file order
    warnings: list[Problem]  # lint (only when there are no problems)


def _in_file_order(problems: list[Problem], file: str) -> list[Problem]:
    """One problem per place and message: the file's in line order, then those of --set options."""
    unique = {(p.file, p.line, p.column, p.path, p.message): p for p in problems}
    return sorted(unique.values(), key=lambda p: (p.file != file, p.line or 0, p.column or 0))


def check(doc: Document) -> Checked:
    """Validate a loaded document completely, reporting every mistake at once.

    The structure (pydantic) is validated first; the model section is then planned
    even when another section (a missing or broken ``data:``) fails, and the train
    section's optimizer and scheduler are checked when that section is valid on its
    own, so that structural and layer / shape problems come in one report.
    """
    from nnctl.config import structure as C
    from nnctl.data.augment.spec import check as augment_problems  # data.augment's names and arguments (torchvision's)
    from nnctl.optim.optimizers import validate as validate_train  # the module (nnctl.train is also an API function)

    checked = C.validate_all(doc)
    problems = list(checked.problems)
    plan_ = None
    if checked.model is not None:
        try:
            plan_ = plan(checked.model, doc)
        except ConfigError as exc:
            problems += exc.problems
    if checked.train is not None:
        problems += validate_train(checked.train, doc)
    problems += augment_problems(doc)
    if checked.cfg is not None and plan_ is not None and plan_.output_shape:
        from nnctl.optim.losses import check_loss  # loss arguments against the model's output width (class weights)

        problems += check_loss(checked.cfg, doc, int(plan_.output_shape[-1]))
    warnings_ = lint(checked.cfg, plan_) if checked.cfg is not None and plan_ is not None and not problems else []
    return Checked(checked.cfg, plan_, _in_file_order(problems, doc.file), warnings_)


def load_checked(source: str, overrides: list[str] | None = None) -> tuple[Config, Document, Plan]:
    """Load a config file and check all of it (structure, layers, shapes, optimizer) at once.

    Raises ConfigError with every problem; returns the config, its document and the plan.
    For ``train``: follow with ``config.require_data(cfg, doc)``.
    """

    from nnctl.config import loader as CL
    doc = CL.load_document(source, overrides)
    result = check(doc)
    if result.problems:
        raise ConfigError(result.problems)
    return result.cfg, doc, result.plan
