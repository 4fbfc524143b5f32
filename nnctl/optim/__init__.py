"""Optimizers, schedulers and losses: the registries, their checks, the resume rules."""
