"""A server's life: bind the port (a clear error when it is taken), load the model once, serve with uvicorn
(its timeouts set), and stop gracefully.

- The socket is bound here, before the model loads: a second server on a port in use fails at once with
  ``PortInUse`` (exit 1), naming the port; SO_REUSEADDR only (a restart is not kept out by the last
  one's closed connections), never SO_REUSEPORT (which would let two servers share a port silently).
- The model is loaded once (``Predictor.load``), before serving: a file changed on disk later changes
  nothing.
- uvicorn's timeouts: ``timeout_keep_alive`` (an idle connection is closed after 5 s), the body must
  arrive within ``--timeout`` (the app's 408), ``h11_max_incomplete_event_size`` (headers bounded),
  ``timeout_graceful_shutdown`` = ``--drain-timeout``. No client holds the inference worker: it only
  sees requests whose inputs are decoded already.
- SIGTERM (and SIGINT): uvicorn stops accepting, answers what is in flight (bounded by the drain
  timeout), the worker answers what is queued, and ``serve`` returns: the process exits 0. uvicorn
  re-raises the signal after its shutdown; the handler in place then is this module's, which only
  records it; the caller's own handlers are restored afterwards.
"""

from __future__ import annotations

import asyncio
import errno
import signal
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable

import uvicorn

from nnctl.errors import NnctlError
from nnctl.use.predict import Predictor

from nnctl.serving.app import ServeOptions, build

SIGNALS = (signal.SIGTERM, signal.SIGINT)


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


def uvicorn_server(asgi, options: ServeOptions) -> uvicorn.Server:
    """uvicorn for the app, with the timeouts above; its logging left to the caller (nothing printed here)."""
    config = uvicorn.Config(asgi, lifespan="on", log_config=None, log_level="warning", access_log=False,
                            timeout_keep_alive=5, timeout_graceful_shutdown=options.drain_timeout,
                            h11_max_incomplete_event_size=64 * 1024, server_header=False)
    return uvicorn.Server(config)


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
        previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
        in_main = _main_thread()
        if in_main:  # what uvicorn restores and re-raises once it has drained: recorded, not fatal
            for sig in SIGNALS:
                signal.signal(sig, lambda signum, frame: received.append(signum))
        try:
            asyncio.run(uv.serve(sockets=[sock]))
        finally:
            if in_main:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
    finally:
        sock.close()
    stopped = signal.Signals(received[0]).name if received else None
    return Served(url, stopped, server.answered, server.batcher.batches)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
