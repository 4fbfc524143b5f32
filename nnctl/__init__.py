"""nnctl: train, fine-tune, inspect and export PyTorch models declared in YAML.

The public API (``nnctl.build``, ``load``, ``train``, ``predict``, ``evaluate``, ``summarize``,
``export``, ``check``, ...: ``nnctl.__all__``, the same names as ``nnctl.api.__all__``) lives in
``nnctl.api`` and is imported lazily: ``import nnctl`` does not import torch, so the CLI stays
fast to start. No submodule shares a name with a public function (the loop is
``nnctl.training``, the check pipeline ``nnctl.checking``), so ``nnctl.train``, ``nnctl.check``
and ``nnctl.export`` are always the functions.
"""

from nnctl._version import __version__

# nnctl.api.__all__, written out so that `import nnctl` imports nothing heavy (tests/test_cli_thin.py checks
# that the two lists agree)
__all__ = ["build", "load", "load_config", "load_record", "check", "prepare", "fit", "train", "launch", "predict",
           "evaluate", "summarize", "layer_types", "freeze", "export", "cache_info", "cache_clear", "list_runs",
           "compare", "tune", "tune_show", "serve", "serve_openapi", "__version__"]


def __getattr__(name: str):
    if name in __all__:
        from nnctl import api

        return getattr(api, name)
    raise AttributeError(f"module 'nnctl' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
