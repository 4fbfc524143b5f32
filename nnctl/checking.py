"""THE check pipeline: every problem of a config, in file order, before anything trains.

One function, :func:`check`, used by every entry point (``nnctl check``, ``nnctl train``,
``nnctl eval`` of a config, ``nnctl.check``, ``nnctl.prepare``, the tests' ``config_outcome``).
It runs the checks in this order and collects every problem (then the caller fails once):

1. structure: the schema, located at YAML lines (``nnctl.config.structure``);
2. model plan: layers, arguments and shapes on the meta device (``nnctl.model.plan``);
3. freeze selection against the planned model (``nnctl.model.freeze``);
4. data facts known without reading a sample: the class count of a built-in source or an
   image folder against the loss and the model's output width (``nnctl.data.loading``);
5. optimizer and scheduler classes and arguments (``nnctl.optim.optimizers``), and ``train.compile``'s
   backend among this torch's (``nnctl.model.compiling``);
6. augmentation names and arguments (``nnctl.data.augment.spec``);
7. loss arguments against the model's output width (``nnctl.optim.losses``);
8. what training needs (``purpose="train"``): a ``data:`` section; and, for every purpose,
   the packages the config asks for (``train.log: [tensorboard]`` / ``[mlflow]``: ``nnctl.runs.tensorboard``,
   ``nnctl.runs.mlflow``):
   a missing package is the environment's problem (exit 1), kept apart from the config's;
9. the search (a ``tune:`` section, for ``check`` and ``tune``): its metric against the task, and each
   parameter's ends and choices through this same pipeline (:func:`check_search`): a parameter none
   of whose values gives a valid config is refused at its line; Optuna installed (``tune`` extra);
10. lint: warnings, when there is no problem (``nnctl.model.plan.lint``); for ``check``, also what
    ``train.precision`` means on this machine's device (16-mixed on a CPU runs as bf16-mixed; bfloat16
    on a CPU without it is slow: ``nnctl.model.precision``), which training says in its run log.

Each package owns its own checks; this module only orders them and collects. Float bounds are
the structure's: every number of the document within float32's range
(``nnctl.config.structure.beyond_float32``), and the schema's own (loss weights, normalize).

What needs the samples is :func:`check_data`, run once the data is read, before anything is
written, by training and by ``nnctl eval`` (its own data or ``--data``): class labels against the
model's output width, a regression target's shape against the output's
(``nnctl.data.loading.check_targets``), and the targets the loss can use
(``nnctl.optim.losses.check_loss_targets``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from nnctl.config import loader as CL
from nnctl.config import structure as CS
from nnctl.config import tune as TUNE
from nnctl.config.schema import Config
from nnctl.config.yamlio import Document
from nnctl.data.augment.spec import check as augment_problems
from nnctl.data.loading import check_facts, check_targets, folder_warnings, score_warnings, split_problems
from nnctl.data.sources.folder import root_problem
from nnctl.data.sources.read import read_paths
from nnctl import files
from nnctl.errors import ConfigError, Problem, UsageError
from nnctl.model import compiling as COMPILE
from nnctl.model import precision as PREC
from nnctl.model.freeze import check_selection
from nnctl.model.plan import Plan, lint, plan
from nnctl.model.tv import weights_problems
from nnctl.optim.losses import check_loss, check_loss_targets
from nnctl.optim.optimizers import validate as validate_optimizer
from nnctl.runs import mlflow as MLF
from nnctl.runs.tensorboard import MissingPackage
from nnctl.runs.tensorboard import missing as missing_packages

# purpose -> (the activity that needs a data: section, or None; whether the training run's packages count)
PURPOSES = {"check": (None, True), "train": ("training", True), "eval": ("evaluation", False),
            "tune": ("the search", True)}


@dataclass
class Checked:
    """Everything the pipeline finds in one pass: problems of every kind, and what was valid."""

    cfg: Config | None  # the whole config, when its structure is valid
    plan: Plan | None  # the model's plan, when the model section plans without problems
    problems: list[Problem]  # every config problem, in file order (exit 2)
    warnings: list[Problem]  # lint (only when there are no problems)
    doc: Document | None = None
    missing: list[Problem] = field(default_factory=list)  # packages the config asks for and lacks (exit 1)

    def refuse(self) -> Checked:
        """Raise what training would refuse: ConfigError with every problem, else MissingPackage; self if none."""
        if self.problems:
            raise ConfigError(self.problems)
        if self.missing:
            raise MissingPackage(" ".join(p.format() for p in self.missing))
        return self


def _in_file_order(problems: list[Problem], file: str) -> list[Problem]:
    """One problem per place and message: the file's in line order, then those of --set options."""
    unique = {(p.file, p.line, p.column, p.path, p.message): p for p in problems}
    return sorted(unique.values(), key=lambda p: (p.file != file, p.line or 0, p.column or 0))


def check(doc: Document, purpose: str = "check") -> Checked:
    """Validate a loaded document completely, reporting every mistake at once.

    ``purpose``: ``check`` (what the config must satisfy to train, a ``data:`` section aside: a
    config with only ``model:`` is valid), ``train`` (also a ``data:`` section) or ``eval`` (a
    ``data:`` section; the packages that only training uses, such as tensorboard, do not count).
    The structure is validated first; the model section is then planned even when another
    section is broken, and the train section's optimizer and scheduler are checked when that
    section is valid on its own, so that every problem comes in one report.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {', '.join(PURPOSES)}, not {purpose!r}")
    sections = CS.validate_all(doc)
    cfg = sections.cfg
    problems = list(sections.problems)
    plan_ = None
    if sections.model is not None:
        try:
            plan_ = plan(sections.model, doc)
        except ConfigError as exc:
            problems += exc.problems
    if plan_ is not None:
        problems += check_selection(plan_, sections.freeze, doc)
    if cfg is not None and plan_ is not None:
        problems += check_facts(cfg, doc, plan_) + split_problems(cfg, doc) + _monitor_problems(cfg, doc, plan_)
    if plan_ is not None and purpose == "check":  # train and freeze build the model and refuse these there
        problems += weights_problems(plan_, doc)  # (a resumed run or --init needs no hub file: not for train)
    if sections.train is not None:
        problems += validate_optimizer(sections.train, doc)
        backend = COMPILE.backend_problem(getattr(sections.train, "compile", False))
        problems += [doc.problem(("train", "compile", "backend"), backend)] if backend else []
    problems += augment_problems(doc)
    if cfg is not None and plan_ is not None and plan_.output_shape:
        problems += check_loss(cfg, doc, int(plan_.output_shape[-1]))
    missing: list[Problem] = []
    if cfg is not None:
        needs_data, packages = PURPOSES[purpose]
        if needs_data is not None:
            try:
                CS.require_data(cfg, doc, what=needs_data)
            except ConfigError as exc:
                problems += exc.problems
            missing_root = root_problem(cfg.data) if purpose in ("train", "tune") else None
            if missing_root:  # refused before a run folder is made (nnctl check: a template may name it later)
                problems.append(doc.problem(("data", "root"), missing_root))
        store = MLF.local_store(cfg.train.mlflow.tracking_uri) if cfg.train.mlflow is not None else None
        if store is not None and MLF.wanted(cfg):  # MLflow's files inside a data folder would be read as data
            try:
                files.refuse_inside(store, read_paths(cfg)[1], "train.mlflow.tracking_uri",
                                    advice="give MLflow a store outside the data")
            except UsageError as exc:
                problems.append(doc.problem(("train", "mlflow", "tracking_uri"),
                                            str(exc).removeprefix("train.mlflow.tracking_uri ")))
        if packages:
            missing = missing_packages(cfg, doc) + MLF.missing(cfg, doc)
        if cfg.tune is not None and purpose in ("check", "tune") and not problems:
            problems += check_search(doc, cfg)
            missing += TUNE.missing(cfg, doc)
    warnings_ = lint(cfg, plan_) + score_warnings(cfg, doc, plan_) if cfg is not None and plan_ is not None \
        and not problems else []
    if cfg is not None and purpose == "check" and not problems:  # training notes it in its run log
        warnings_ += folder_warnings(cfg, doc)
    if cfg is not None and purpose == "check" and not problems:  # training says these in its run log
        here = PREC.resolve(cfg.train.precision, PREC.planned_device_type(cfg.train.device))
        warnings_ += [doc.problem(("train", "precision"), text) for _, text in here.messages]
    return Checked(cfg, plan_, _in_file_order(problems, doc.file), warnings_, doc, missing)


def load_checked(source: str, overrides: list[str] | None = None, purpose: str = "check") -> Checked:
    """Load a config file and check all of it at once (:func:`check`).

    Raises ConfigError with every problem (MissingPackage for a package it needs); returns the
    Checked result (``cfg``, ``doc``, ``plan``, ``warnings``).
    """
    return check(CL.load_document(source, overrides), purpose).refuse()


def _monitor_problems(cfg: Config, doc: Document, plan_: Plan) -> list[Problem]:
    """A monitored metric the run will not log for this model (val_top5_accuracy with 5 outputs or fewer),
    where it is named: train.checkpoint.monitor, train.early_stopping.monitor, tune.metric."""
    width = int(plan_.output_shape[-1]) if plan_.output_shape else None
    if width is None:
        return []
    named = [(("train", "checkpoint", "monitor"), cfg.train.checkpoint.monitor)]
    if cfg.train.early_stopping is not None:
        named.append((("train", "early_stopping", "monitor"), cfg.train.early_stopping.monitor))
    if cfg.tune is not None:
        named.append((("tune", "metric"), cfg.tune.metric))
    return [doc.problem(where, f"{metric}: top-5 accuracy needs more than 5 classes; this model has {width} "
                               "outputs") for where, metric in named
            if metric == "val_top5_accuracy" and metric not in cfg.task.metrics(width)]


def check_search(doc: Document, cfg: Config) -> list[Problem]:
    """The ``tune:`` section against the config it searches: the metric is one this task logs (and has
    validation data for), and every parameter has at least one end or choice that passes this pipeline
    (the others at their values in the file): otherwise its whole range is invalid, refused at its line.
    A combination that fails at a trial is that trial's failure, with its reason."""
    t = cfg.tune
    problems: list[Problem] = []
    metric = t.metric
    if metric is not None:
        no_val = cfg.data is not None and cfg.data.split == "fraction" and cfg.data.val_fraction == 0.0
        if not cfg.task.could_log(metric):
            problems.append(doc.problem(("tune", "metric"), f"a {cfg.train.loss_name} run does not log {metric}"))
        elif metric.startswith("val_") and no_val:
            problems.append(doc.problem(("tune", "metric"), f"{metric} needs validation data: val_fraction > 0"))
    base = {k: v for k, v in doc.data.items() if k != "tune"}
    for path, spec in t.params.items():
        reasons = []
        for value in TUNE.ends(spec):
            trial = Document(copy.deepcopy(base), doc.file, dict(doc.marks), dict(doc.overridden))
            try:
                CL.apply_overrides(trial, [f"{path}={TUNE.flow(value)}"])
            except ConfigError as exc:
                reasons.append(exc.problems[0].message)
                continue
            found = check(trial, "train").problems
            if not found:
                break
            reasons.append(f"{found[0].path + ': ' if found[0].path else ''}{found[0].message}")
        else:
            problems.append(doc.problem(("tune", "params", path), f"no value of {path} gives a valid config: "
                                                                  f"{reasons[0]}"))
    server = bool(t.storage) and "://" in t.storage and not t.storage.startswith("sqlite:///")
    if t.storage and not server and cfg.data is not None:  # a study file inside the data would be read as data
        try:
            files.refuse_inside(TUNE.storage_file(t.storage, Path(".")), read_paths(cfg)[1] + TUNE.searched_folders(cfg),
                                "tune.storage", advice="keep the study outside the data")
        except UsageError as exc:
            problems.append(doc.problem(("tune", "storage"), str(exc).removeprefix("tune.storage ")))
    return problems


def check_data(cfg: Config, doc: Document, plan_: Plan, data) -> list[Problem]:
    """What needs the samples, once ``data`` (a ``nnctl.data.store.DataBundle``) is read: the targets
    against the model's output (labels beyond its scores, a target of another shape) and against the
    loss. Located problems; the caller raises ConfigError (exit 2) before writing anything."""
    return check_targets(cfg, doc, plan_, data) + check_loss_targets(cfg, doc, data)
