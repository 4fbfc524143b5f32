"""Stopping on SIGINT/SIGTERM: a flag the loop polls; Interrupted."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator
from nnctl.errors import NnctlError

class Interrupted(NnctlError):
    """SIGINT / SIGTERM: the run saved a checkpoint and stopped (exit 128 + signal)."""

    def __init__(self, signum: int, checkpoint: str | None):
        self.signum = signum
        self.exit_code = 128 + signum
        self.checkpoint = checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}; " + (f"saved {checkpoint}; resume with --resume" if checkpoint
                                                   else "nothing saved"))


class _StopFlag:
    """SIGINT / SIGTERM set a flag; the loop stops at the next step boundary."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """While a run starts (config, data, model; before the loop's _StopFlag takes over): SIGTERM raises
    Interrupted (exit 143, nothing saved), cleanly. The previous handler is restored on leaving; outside
    the main thread (where Python cannot set handlers) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum, None)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if old is None else old)  # None: not set from Python
