"""Run the nnctl CLI with a limit on the size of every file it writes (a disk that fills up).

Usage: python tests/helpers/nnctl_with_file_size_limit.py BYTES NNCTL-ARGS...

A write past BYTES fails with EFBIG (SIGXFSZ is ignored), as a write to a full disk fails.
"""

from __future__ import annotations

import resource
import signal
import sys


def main(argv: list[str]) -> None:
    limit = int(argv[0])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    sys.argv = ["nnctl", *argv[1:]]
    from nnctl.cli.app import main as nnctl_main

    nnctl_main()


if __name__ == "__main__":
    main(sys.argv[1:])
