"""nnctl: train, fine-tune, inspect and export PyTorch models declared in YAML.

The public API (``nnctl.build``, ``load``, ``train``, ``predict``, ``evaluate``,
``summarize``, ``export``, ``check``, ``load_record``, ``list_runs``, ``compare``) lives in ``nnctl.api`` and is
imported lazily: ``import nnctl`` does not import torch, so the CLI stays fast to start.
No submodule shares a name with a public function (the loop is ``nnctl.loop``, weights
out ``nnctl.exporting``), so ``nnctl.train`` and ``nnctl.export`` are always the functions.
"""

from nnctl._version import __version__

__all__ = ["build", "load", "load_record", "train", "predict", "evaluate", "summarize", "export", "check",
           "load_config", "list_runs", "compare", "__version__"]


def __getattr__(name: str):
    if name in __all__:
        from nnctl import api

        return getattr(api, name)
    raise AttributeError(f"module 'nnctl' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
