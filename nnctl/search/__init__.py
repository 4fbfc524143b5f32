"""Hyperparameter search on Optuna (``nnctl tune``): the ``tune:`` section's space, the study, trials as runs.

Imported only by ``nnctl tune`` / ``nnctl.tune`` (Optuna is the ``tune`` extra)."""
