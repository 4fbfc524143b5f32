"""Stopping on SIGINT/SIGTERM: a flag the loop polls; Interrupted."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator
from nnctl.errors import NnctlError

class Interrupted(NnctlError):
    """SIGINT / SIGTERM: the run saved a checkpoint and stopped (exit 128 + signal).

    ``finished``: the signal came after the run's last checkpoint (its last epoch, or the one early
    stopping ended it at): the run is finished (status.json says so) and there is nothing to resume;
    the process still exits 128 + signal, as it does for every signal (README, Training, "Stopping")."""

    def __init__(self, signum: int, checkpoint: str | None, finished: bool = False):
        self.signum = signum
        self.exit_code = 128 + signum
        self.checkpoint = checkpoint
        self.finished = finished
        name = signal.Signals(signum).name
        if finished:
            text = f"stopped by {name} after the run finished: {checkpoint or 'its last checkpoint'} holds its " \
                   "last epoch; nothing was lost and there is nothing to resume"
        else:
            text = f"stopped by {name}; " + (f"saved {checkpoint}; resume with --resume" if checkpoint
                                             else "nothing saved")
        super().__init__(text)


def signal_of(error: BaseException) -> int | None:
    """The signal an exception stands for: Interrupted's, SIGINT for KeyboardInterrupt, else None."""
    if isinstance(error, Interrupted):
        return error.signum
    return signal.SIGINT if isinstance(error, KeyboardInterrupt) else None


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
