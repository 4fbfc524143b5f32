"""nnctl: train, fine-tune, inspect and export PyTorch models declared in YAML.

The public API (``nnctl.build``, ``load``, ``train``, ``predict``, ``evaluate``,
``summarize``, ``export``, ``check``, ``load_record``) lives in ``nnctl.api`` and is
imported lazily: ``import nnctl`` does not import torch, so the CLI stays fast to start.
"""

__version__ = "0.2.0"

__all__ = ["build", "load", "load_record", "train", "predict", "evaluate", "summarize", "export", "check",
           "load_config", "__version__"]


_PENDING_RENAME = {"train", "export"}  # submodules of these names are being renamed


def __getattr__(name: str):
    if name in __all__ and name not in _PENDING_RENAME:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'nnctl' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
