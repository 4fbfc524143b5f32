"""Run the nnctl CLI, halting in the middle of one checkpoint write so that a test can kill it there.

Usage: NNCTL_TEST_KILL_AT_WRITE=K NNCTL_TEST_MARK=PATH python tests/helpers/nnctl_halt_in_write.py NNCTL-ARGS...

The K-th write of a .pt file puts half of the new checkpoint on disk (flushed and fsynced), writes
the checkpoint's path into the file PATH, then sleeps 120 s: the test waits for PATH and kills
the process there. Other writes go through unchanged.
"""

from __future__ import annotations

import io
import os
import sys
import time

from nnctl.runs import checkpoint as K

real_atomic_write = K.atomic_write
pt_writes = 0


def halting_atomic_write(path, write, *args, **kwargs):
    def halting(fh):
        global pt_writes
        if not str(path).endswith(".pt"):
            return write(fh)
        pt_writes += 1
        if pt_writes != int(os.environ["NNCTL_TEST_KILL_AT_WRITE"]):
            return write(fh)
        buf = io.BytesIO()
        write(buf)
        data = buf.getvalue()
        fh.write(data[: len(data) // 2])  # half of the new checkpoint is on disk
        fh.flush()
        os.fsync(fh.fileno())
        with open(os.environ["NNCTL_TEST_MARK"], "w") as mark:
            mark.write(str(path))
        time.sleep(120)  # the test kills us here, in the middle of a checkpoint write

    return real_atomic_write(path, halting, *args, **kwargs)


def main(argv: list[str]) -> None:
    K.atomic_write = halting_atomic_write
    sys.argv = ["nnctl", *argv]
    from nnctl.cli.app import main as nnctl_main

    nnctl_main()


if __name__ == "__main__":
    main(sys.argv[1:])
