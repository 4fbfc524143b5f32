"""Training: one epoch and evaluation (loop), the trainer, policies, distributed ranks, signals, one run."""
