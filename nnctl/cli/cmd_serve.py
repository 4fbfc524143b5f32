"""``nnctl serve RUN``: a trained run as an HTTP service (nnctl.api.serve); ``--print-openapi`` its schema."""

from __future__ import annotations

import json
import re
from typing import Optional

import typer

from nnctl.cli.common import app, handle_errors
from nnctl.cli.render import _clean, _err

LOOPBACK = ("127.0.0.1", "localhost", "::1")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kib|kb|k|mib|mb|m|gib|gb|g)?\s*$", re.I)
_UNITS = {"b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def _bytes(text: str) -> int:
    from nnctl.errors import UsageError

    m = _SIZE.match(text)
    if not m:
        raise UsageError(f"--max-body {text!r}: give a size such as 16MiB, 512KiB or 1000000 (bytes)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


@app.command()
@handle_errors
def serve(
    source: Optional[str] = typer.Argument(None, help="A run folder or a checkpoint (.pt)."),
    host: str = typer.Option("127.0.0.1", "--host", help="The address to listen on (another than loopback "
                                                          "is reachable from other machines: use --token)."),
    port: int = typer.Option(8000, "--port", help="The port (0: any free one)."),
    device: str = typer.Option("cpu", "--device", help="auto | cpu | cuda | cuda:N | mps"),
    which: str = typer.Option("best", "--which", help="For a run folder: best or last."),
    max_batch: int = typer.Option(32, "--max-batch", help="Samples a forward pass at most (1: no batching)."),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", help="How long a batch waits for more requests."),
    max_queue: int = typer.Option(1024, "--max-queue", help="Requests waiting at most; then 503 (Retry-After)."),
    max_body: str = typer.Option("16MiB", "--max-body", help="The largest request body; larger: 413."),
    timeout: float = typer.Option(30.0, "--timeout", help="Seconds a request may take (body and answer): 408 "
                                                          "or 504 beyond."),
    drain_timeout: float = typer.Option(30.0, "--drain-timeout", help="On SIGTERM: seconds to answer what is "
                                                                      "in flight before exiting."),
    top_k: int = typer.Option(1, "--top-k", "-k", help="Classes an answer shows unless the request says (top_k)."),
    token: Optional[str] = typer.Option(None, "--token", envvar="NNCTL_SERVE_TOKEN", show_envvar=True,
                                        help="Require Authorization: Bearer TOKEN on every endpoint but /health "
                                             "and the page."),
    workers: int = typer.Option(1, "--workers", help="Server processes (1: one model, one batching worker)."),
    print_openapi: bool = typer.Option(False, "--print-openapi", help="Print the OpenAPI schema (JSON) and exit."),
):
    """Serve a trained run over HTTP: POST /predict (images or tensors, dynamic batching), /health, /ready,
    /info, /metrics, and a page at / to try it. SIGTERM drains what is in flight and exits 0."""
    from nnctl import api
    from nnctl.errors import UsageError

    if print_openapi:
        print(json.dumps(api.serve_openapi(), indent=2))
        return
    if source is None:
        raise UsageError("nnctl serve RUN_OR_CHECKPOINT: give a run folder or a checkpoint")
    if workers != 1:
        raise UsageError(f"--workers {workers}: this nnctl serves with one process (one model, one batching "
                         "worker); run more servers on other ports behind a proxy to scale out")
    if host not in LOOPBACK:
        _err(f"warning: listening on {host}: reachable from other machines"
             + ("" if token else "; anyone who reaches it can use the model (set --token or NNCTL_SERVE_TOKEN)"))

    def listening(url: str, predictor) -> None:
        print(_clean(f"serving {source} ({predictor.task}, input {list(predictor.pre.input_shape or [])}, "
                     f"{predictor.device}) on {url}"), flush=True)
        print(_clean(f"  page {url}/  predict POST {url}/predict  ready {url}/ready  metrics {url}/metrics"),
              flush=True)

    served = api.serve(source, host=host, port=port, device=device, which=which, max_batch=max_batch,
                       max_wait_ms=max_wait_ms, max_queue=max_queue, max_body=_bytes(max_body), timeout=timeout,
                       drain_timeout=drain_timeout, top_k=top_k, token=token, on_listening=listening)
    how = f"stopped by {served.stopped_by}" if served.stopped_by else "stopped"
    requests = f"{served.answered} predict request{'' if served.answered == 1 else 's'}"
    print(f"{how}: {requests} answered in {served.batches} batch{'' if served.batches == 1 else 'es'}", flush=True)
