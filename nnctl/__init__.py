"""nnctl: train, fine-tune, inspect and export PyTorch models declared in YAML.

Importing this package does not import torch; the CLI stays fast to start.
"""

__version__ = "0.1.0"
