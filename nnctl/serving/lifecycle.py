"""A server's life: bind the port (a clear error when it is taken), load the model once, serve with uvicorn
(its timeouts set), and stop gracefully.

- The socket is bound here, before the model loads: a second server on a port in use fails at once with
  ``PortInUse`` (exit 1), naming the port; SO_REUSEADDR only (a restart is not kept out by the last
  one's closed connections), never SO_REUSEPORT (which would let two servers share a port silently).
- The model is loaded once (``Predictor.load``), before serving: a file changed on disk later changes
  nothing.
- torch's intra-op threads while serving: the usable cores less one (``inference_threads``; the
  environment's OMP_NUM_THREADS where set), restored afterwards.
- uvicorn's timeouts: ``timeout_keep_alive`` (an idle connection is closed after 5 s), the body must
  arrive within ``--timeout`` (the app's 408), ``h11_max_incomplete_event_size`` (headers bounded),
  ``timeout_graceful_shutdown`` = ``--drain-timeout`` + 1 s. No client holds the inference worker: it
  only sees requests whose inputs are decoded already.
- SIGTERM (and SIGINT): uvicorn stops accepting and tells the app (``Server.drain``), which answers what
  is in flight within ``--drain-timeout`` (a request not answered by then, a body still coming
  included: 503 "shutting down", one line of JSON); uvicorn's own deadline, a second later, cancels
  only what an event loop held past it left (the app's Gate answers that 503 too: never uvicorn's 500
  and traceback). The worker ends, and ``serve`` returns: the process exits 0. uvicorn
  re-raises the signal after its shutdown; the handler in place then is this module's, which only
  records it; the caller's own handlers are restored afterwards.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch
import uvicorn

from nnctl.errors import NnctlError
from nnctl.use.predict import Predictor

from nnctl.serving.app import Gate, ServeOptions, build

SIGNALS = (signal.SIGTERM, signal.SIGINT)
UVICORN_GRACE = 1.0  # seconds uvicorn waits past the app's drain deadline before it cancels what is left


class PortInUse(NnctlError):
    """The port is taken (another server?)."""


@dataclass
class Served:
    """How a server ended: ``url``, ``stopped_by`` (SIGTERM, SIGINT, or None), ``answered`` /predict requests."""

    url: str
    stopped_by: str | None
    answered: int
    batches: int


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so (proto 0: Nagle's 40 ms stalls)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(f"port {port} on {host} is in use (another server is listening there?): stop it or "
                            "choose another --port") from None
        raise NnctlError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, telling the app when its graceful shutdown begins (``Server.drain``: the app's own
    deadline for what is in flight, before uvicorn's)."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None]):
        super().__init__(config)
        self._on_shutdown = on_shutdown

    async def shutdown(self, sockets=None) -> None:
        self._on_shutdown()
        await super().shutdown(sockets=sockets)


def uvicorn_server(gate: Gate, options: ServeOptions) -> uvicorn.Server:
    """uvicorn for the app (``build``'s Gate), with the timeouts above; its logging left to the caller (nothing
    printed here)."""
    config = uvicorn.Config(gate, lifespan="on", log_config=None, log_level="warning", access_log=False,
                            timeout_keep_alive=5, timeout_graceful_shutdown=options.drain_timeout + UVICORN_GRACE,
                            h11_max_incomplete_event_size=64 * 1024, server_header=False)
    return _Uvicorn(config, gate.server.drain)


def serve(source: Any, options: ServeOptions, on_listening: Callable[[str, Predictor], None] | None = None) -> Served:
    """Serve ``source`` (a run folder, a checkpoint, or an ``nn.Module``) until SIGTERM or SIGINT."""
    sock = bind(options.host, options.port)
    try:
        predictor = Predictor.load(source, which=options.which, device=options.device, needs="nnctl serve")
        asgi, server = build(predictor, options)
        uv = uvicorn_server(asgi, options)
        url = url_of(sock)
        if on_listening is not None:
            on_listening(url, predictor)
        received: list[int] = []
        threads = torch.get_num_threads()
        torch.set_num_threads(inference_threads(threads))
        previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
        in_main = _main_thread()
        if in_main:  # what uvicorn restores and re-raises once it has drained: recorded, not fatal
            for sig in SIGNALS:
                signal.signal(sig, lambda signum, frame: received.append(signum))
        try:
            uv.run(sockets=[sock])  # uvicorn's event loop (uvloop where it is installed)
        finally:
            torch.set_num_threads(threads)
            if in_main:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
    finally:
        sock.close()
    stopped = signal.Signals(received[0]).name if received else None
    return Served(url, stopped, server.answered, server.batcher.batches)


def inference_threads(default: int) -> int:
    """torch's threads while serving: one core left to the event loop and the decoding threads (the usable
    cores less one, at least 1, at most torch's default), unless OMP_NUM_THREADS says how many. With every
    core given to the forward pass (torch's default), its threads wait for the cores the HTTP side holds:
    on 2 cores, a forward pass in the server took several times its time alone (docs/benchmarks.md)."""
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return default
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(default, cores - 1))


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
