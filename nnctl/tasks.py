"""The task a run trains for, decided in ONE place, and everything that follows from it.

``task_for(loss, target)`` is the decision: ``data.target: input`` reconstructs the input,
``cross_entropy``/``nll`` classify, ``bce_with_logits`` scores independent 0/1 labels
(multilabel), every other loss regresses. Everything else asks the ``Task`` it returns:

======================  ==================  ============================  ===============  =======================
task                    losses              validation metrics            default monitor  an output becomes
======================  ==================  ============================  ===============  =======================
``classification``      cross_entropy, nll  val_loss, val_accuracy,       val_accuracy     the top-k classes with
                                            val_top5_accuracy (more than  (max)            softmax probabilities
                                            5 outputs)                                     (``answer: classes``)
``multilabel``          bce_with_logits     val_loss, val_accuracy        val_loss (min)   a sigmoid probability
                                                                                           per label (``labels``)
``regression``          mse, l1, l2, huber, val_loss, val_mse, val_mae    val_loss (min)   the raw values
                        smooth_l1                                                          (``values``)
``reconstruction``      as regression       as regression                 val_loss (min)   the raw values
======================  ==================  ============================  ===============  =======================

A ``Task`` is a string enum: ``Task.CLASSIFICATION == "classification"``, and ``str(task)``
(``task.value``) is the name written to files (the checkpoint's preprocessing record). No torch
here and no nnctl module but the errors: the config layer imports it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any, Self

LOSSES = ("cross_entropy", "nll", "mse", "l1", "l2", "bce_with_logits", "huber", "smooth_l1")
CLASSIFICATION_LOSSES = ("cross_entropy", "nll")
MULTILABEL_LOSSES = ("bce_with_logits",)
REGRESSION_LOSSES = ("mse", "l1", "l2", "huber", "smooth_l1")

# what a run can monitor (best checkpoint, early stopping): the columns of metrics.csv
MONITORS = ("val_loss", "val_accuracy", "val_top5_accuracy", "val_mse", "val_mae", "train_loss")
# the metrics the CLI shows (epoch lines, final and comparison tables), in this order; top-5
# accuracy is logged to metrics.csv and may be monitored, but is not shown
SHOWN_METRICS = ("train_loss", "val_loss", "val_accuracy", "val_mae", "val_mse")


def mode_of(metric: str) -> str:
    """min for losses and errors, max for accuracies."""
    return "max" if metric.endswith("accuracy") else "min"


class Task(StrEnum):
    """One task: the losses it allows, the metrics training logs, its default monitor, and how an
    output becomes an answer (``answer``: ``classes``, ``labels`` or ``values``)."""

    losses: tuple[str, ...]
    answer: str
    monitor: str

    def __new__(cls, name: str, losses: tuple[str, ...], answer: str, monitor: str) -> Self:
        task = str.__new__(cls, name)
        task._value_ = name
        task.losses = losses
        task.answer = answer
        task.monitor = monitor
        return task

    # classes: argmax; the top-k classes with their probabilities (softmax of the logits, exp of
    # nll's log-probabilities); scored by accuracy and top-5 accuracy
    CLASSIFICATION = "classification", CLASSIFICATION_LOSSES, "classes", "val_accuracy"
    # labels: one independent 0/1 label an output; its probability is the sigmoid of its logit;
    # scored by the share of labels whose logit's sign matches the target
    MULTILABEL = "multilabel", MULTILABEL_LOSSES, "labels", "val_loss"
    # values: the outputs as they are; scored by mse and mae
    REGRESSION = "regression", REGRESSION_LOSSES, "values", "val_loss"
    RECONSTRUCTION = "reconstruction", REGRESSION_LOSSES, "values", "val_loss"  # data.target: input

    @property
    def mode(self) -> str:
        """The default monitor's mode (max for an accuracy, min for a loss)."""
        return mode_of(self.monitor)

    @property
    def has_classes(self) -> bool:
        """Class labels: a class count, class names, a confusion matrix, top-k answers."""
        return self.answer == "classes"

    @property
    def curve(self) -> str:
        """The validation metric drawn beside the losses (curves.png, compare's second panel)."""
        return "val_accuracy" if self.answer in ("classes", "labels") else "val_mae"

    def metrics(self, outputs: float | None = None, prefix: str = "val_") -> tuple[str, ...]:
        """The validation metrics a run of this task logs, in metrics.csv's order (``prefix=""``:
        the keys of ``nnctl.training.loop.evaluate``). ``outputs``: the model's class scores per
        sample; top-5 accuracy only with more than 5 (``math.inf``: every metric the task can log)."""
        if self.answer == "classes":
            names = ("loss", "accuracy") + (("top5_accuracy",) if (outputs or 0) > 5 else ())
        elif self.answer == "labels":
            names = ("loss", "accuracy")
        else:
            names = ("loss", "mse", "mae")
        return tuple(prefix + n for n in names)

    def could_log(self, metric: str) -> bool:
        """Whether a run of this task can have ``metric`` (train_loss always; top-5 accuracy given
        enough classes)."""
        return metric == "train_loss" or metric in self.metrics(math.inf)


def loss_name(loss: Any) -> Any:
    """The name of a loss spec: a name, or ``{name: {args}}`` (its one key); anything else as is."""
    if isinstance(loss, Mapping) and len(loss) == 1:
        return next(iter(loss))
    return loss


def task_for(loss: Any, target: Any = "label") -> Task:
    """THE decision: the task of a run that trains with ``loss`` (a name or ``{name: {args}}``) on
    ``data.target`` (``label`` or ``input``)."""
    if target == "input":
        return Task.RECONSTRUCTION
    name = loss_name(loss)
    if name in CLASSIFICATION_LOSSES:
        return Task.CLASSIFICATION
    if name in MULTILABEL_LOSSES:
        return Task.MULTILABEL
    return Task.REGRESSION


def task_of_config(config: Mapping | None) -> Task:
    """The task of a config as plain data (config.yaml, a checkpoint's or an export's resolved
    config), with the schema's defaults (cross_entropy, target label) for what it lacks."""
    train = config.get("train") if isinstance(config, Mapping) else None
    data = config.get("data") if isinstance(config, Mapping) else None
    loss = train.get("loss", "cross_entropy") if isinstance(train, Mapping) else "cross_entropy"
    target = data.get("target", "label") if isinstance(data, Mapping) else "label"
    return task_for(loss, target)


def task_named(name: Any, default: Task = Task.CLASSIFICATION) -> Task:
    """The Task a record names (a preprocessing record's ``task``), or ``default`` for another value."""
    try:
        return Task(name)
    except ValueError:
        return default


def curve_for(columns: Iterable[str]) -> str | None:
    """The metric curve a run's metrics.csv columns hold (the task's curve), or None."""
    cols = set(columns)
    return next((task.curve for task in Task if task.curve in cols), None)
