"""Save a checkpoint, then try to save a bigger one and export weights under a 4 KiB file-size limit.

Usage: python tests/helpers/save_when_disk_full.py TARGET.pt

Prints one line for the checkpoint save (SAVED, or ERROR with the exception's class name, whether
it is an OSError, whether its errno is EFBIG, and its message) and one for the export (EXPORTED,
or EXPORT-ERROR and the message).
"""

from __future__ import annotations

import errno
import resource
import signal
import sys

import torch

from nnctl.runs import checkpoint as K
from nnctl.use import export as E
from nnctl.errors import NnctlError


def main(argv: list[str]) -> None:
    target = argv[0]
    K.save(target, {"config": {}, "model": {"w": torch.ones(3)}, "epoch": 1})
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    big = {"config": {}, "model": {"w": torch.zeros(100_000)}, "epoch": 2}
    try:
        K.save(target, big)
        print("SAVED")
    except NnctlError as exc:
        print("ERROR", type(exc).__name__, isinstance(exc, OSError), exc.errno == errno.EFBIG, exc)
    try:
        E.export({"model": big["model"], "config": {}}, None, "safetensors", target + ".safetensors")
        print("EXPORTED")
    except NnctlError as exc:
        print("EXPORT-ERROR", exc)


if __name__ == "__main__":
    main(sys.argv[1:])
