"""The HTTP app: /health, /ready, /info, /predict, /metrics, the page at /, the OpenAPI schema.

``POST /predict`` takes image files (``multipart/form-data``, fields ``files``, or ``file``, and
``top_k``) or JSON ``{"inputs": [...], "top_k": k, "dtype": "float32" | "uint8"}`` where each input is a
tensor of the recorded input shape or a batch of them, as ``nnctl.predict`` takes tensors; it answers
``{"predictions": [row, ...]}`` with each row exactly the JSON line ``nnctl predict --format jsonl``
prints for the same input (``nnctl.use.predict.jsonl_line``), or those lines themselves with
``?format=jsonl``. The body is parsed and its images decoded in a thread pool, never on the event loop
(``nnctl.serving.reading``); the samples then queue for the one inference worker
(``nnctl.serving.batcher``).

The hot path is plain ASGI: the ``Gate`` (the outermost layer: token, metrics) hands ``POST /predict``
to ``Server.predict`` itself, past FastAPI's routing, dependency solving and Request/Response objects
(most of a request's Python work on the event loop when the model is small; FastAPI still describes the
endpoint in the OpenAPI schema, and its route answers the same way). The other endpoints are FastAPI's.

Refusals, each a JSON ``{"detail": "<one line>"}``: 401 without the token (``--token``; every endpoint
but /health and the page, which holds nothing and asks for the token); 413 for a body over ``max_body``
(by its Content-Length before reading it, else while reading); 408 for a body not sent within
``timeout``; 415 for another content type; 422 for an input it cannot use (undecodable, a
decompression bomb, the wrong shape or dtype, NaN or infinity, an unknown field, no input); 503 with
Retry-After while warming up, when the queue is full, and when the server is shutting down; 504 when the
answer takes longer than ``timeout``; 499 (counted in /metrics, never seen: nobody is listening) when
the client closed its connection before its body was sent.

Shutting down (``drain``, called by ``nnctl.serving.lifecycle`` when uvicorn's graceful shutdown
begins): every request still reading its body, being decoded or waiting for its answer is bounded by
``drain_timeout`` from then on, and answered 503 "shutting down" at that deadline (or 408/504 at its
own, if sooner); uvicorn's own deadline, which cancels what is left (a 500 and a traceback), is set
later. A request cancelled anyway (the event loop held past both, a second signal) is answered the
same 503 by the Gate: no path ends in uvicorn's "Exception in ASGI application".
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from nnctl._version import __version__
from nnctl.files import json_ready
from nnctl.use.predict import Predictor, jsonl_line

from nnctl.serving import page
from nnctl.serving.batcher import Batcher, InferenceFailed, Job, QueueFull, refuse
from nnctl.serving.metrics import CONTENT_TYPE, Metrics
from nnctl.serving.reading import Refused, form_inputs, json_inputs, one_line, query

MiB = 1 << 20
OPEN_PATHS = ("/health", "/")  # no token needed: alive or not, and the page (it holds no data)
ENDPOINTS = ("/", "/health", "/ready", "/info", "/predict", "/metrics", "/openapi.json")
CLIENT_LEFT = 499  # nginx's "client closed request": the body never came whole; only /metrics sees it


@dataclass
class ServeOptions:
    """How ``nnctl serve`` serves (its options; see ``nnctl serve --help``)."""

    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    which: str = "best"
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    max_body: int = 16 * MiB
    timeout: float = 30.0
    drain_timeout: float = 30.0
    top_k: int = 1
    token: str | None = None
    name: str = ""  # what /info calls the model (the run folder's or checkpoint's name)

    def problems(self) -> list[str]:
        out = []
        for key, low in (("max_batch", 1), ("max_queue", 1), ("max_body", 1), ("top_k", 1), ("port", 0)):
            if getattr(self, key) < low:
                out.append(f"--{key.replace('_', '-')} must be at least {low}, not {getattr(self, key)}")
        for key in ("max_wait_ms", "timeout", "drain_timeout"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= (0 if key == "max_wait_ms" else 0.001)):
                out.append(f"--{key.replace('_', '-')} must be a positive number of "
                           f"{'milliseconds' if key == 'max_wait_ms' else 'seconds'}, not {value}")
        if self.port > 65535:
            out.append(f"--port must be at most 65535, not {self.port}")
        return out


def info(predictor: Predictor, options: ServeOptions) -> dict:
    pre = predictor.pre
    return {"name": options.name, "task": str(predictor.task), "input_shape": list(pre.input_shape or []),
            "classes": pre.classes, "preprocessing": pre.to_dict(), "device": str(predictor.device),
            "nnctl": __version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "batching": {"max_batch": options.max_batch, "max_wait_ms": options.max_wait_ms,
                         "max_queue": options.max_queue, "timeout_s": options.timeout},
            "top_k": options.top_k, "notes": list(predictor.notes)}


# --- the app ---------------------------------------------------------------------------------------

class Server:
    """One served model: its predictor, options, metrics, the worker, the decoding pool, and /predict."""

    def __init__(self, predictor: Predictor, options: ServeOptions):
        self.predictor = predictor
        self.options = options
        self.metrics = Metrics()
        self.batcher = Batcher(predictor, options.max_batch, options.max_wait_ms / 1000, options.max_queue,
                               self.metrics)
        # parsing and decoding: JSON parsing holds the GIL, PNG decoding and the forward pass mostly not; two
        # threads overlap a body's parsing with the worker's pass, more only contend for the GIL
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nnctl-serve-decode")
        self.answered = 0
        self.drain_at: float | None = None  # the event loop's time by which everything is answered, once draining
        self._bounds: set[asyncio.Timeout] = set()  # the deadlines of the requests in flight

    # --- POST /predict, as plain ASGI --------------------------------------------------------------

    async def predict(self, scope, receive, send) -> None:
        try:
            body, media = await self._predict(scope, receive)
        except Refused as exc:
            await send_json(send, exc.status, {"detail": exc.detail})
            return
        await send_bytes(send, 200, media, body)

    async def _predict(self, scope, receive) -> tuple[bytes, bytes]:
        self.not_ready_refusal()
        top_k, fmt = query(scope.get("query_string", b""))
        content_type, length = b"", None
        for key, value in scope["headers"]:
            if key == b"content-type":
                content_type = value
            elif key == b"content-length":
                length = value
        limit = self.options.max_body
        if length is not None and length.isdigit() and int(length) > limit:
            raise Refused(413, f"the body is {int(length):,} bytes, more than --max-body {limit:,}")
        self.batcher.coming(+1)  # the worker may wait for this one while it is read and decoded
        try:
            body = await self._within(self._read(receive), Refused(
                408, f"the body was not sent within --timeout {self.options.timeout:g} s"))
        except BaseException:
            self.batcher.coming(-1)
            raise
        try:
            groups, k = await self._within(self._infer(content_type.decode("latin-1"), body, top_k), Refused(
                504, f"no answer within --timeout {self.options.timeout:g} s"))
        except InferenceFailed as exc:
            raise Refused(500, str(exc)) from None
        rows = self.predictor.answers(groups, k).rows
        self.answered += 1
        if fmt == "jsonl":
            return "".join(jsonl_line(r) for r in rows).encode(), b"application/x-ndjson"
        text = json.dumps({"predictions": [json_ready(r.to_dict()) for r in rows]}, allow_nan=False)
        return text.encode(), b"application/json"

    async def _read(self, receive) -> bytes:
        limit = self.options.max_body
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Refused(CLIENT_LEFT, "the client closed the connection before its whole body was sent")
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise Refused(413, f"the body is more than --max-body {limit:,} bytes")
                chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _infer(self, content_type: str, body: bytes, top_k: int | None):
        """Parse and decode in the pool, which queues the request for the worker; wait for the worker's answer
        (one wake-up of the event loop a batch, not one a step): (groups, top_k)."""
        kind = content_type.split(";")[0].strip().lower()
        if kind not in ("application/json", "multipart/form-data"):
            self.batcher.coming(-1)
            raise Refused(415, "send image files as multipart/form-data (field files) or tensors as "
                               'application/json {"inputs": [...]}' + (f", not {kind}" if kind else ""))
        job = Job.here()
        try:
            self.pool.submit(self._queue, job, kind, content_type, body, top_k)
        except RuntimeError:  # the pool is shut down: the server is stopping
            self.batcher.coming(-1)
            raise Refused(503, self.shutting_down()) from None
        try:
            await job.future
        finally:
            if job.future.cancelled():  # timed out or shutting down: the worker skips it if it has not started it
                job.abandoned = True
        return job.groups, job.top_k

    def _queue(self, job: Job, kind: str, content_type: str, body: bytes, top_k: int | None) -> None:
        """In the pool: the body's inputs, queued for the worker, or the job refused with why."""
        handed = False  # to the batcher: no longer coming, queued or refused
        try:
            if kind == "application/json":
                groups, body_k = json_inputs(body, self.predictor)
            else:
                groups, body_k = form_inputs(body, content_type, self.predictor)
            handed = True
            self.batcher.submit(job, groups, top_k or body_k or self.options.top_k)
        except QueueFull as exc:
            refuse(job, Refused(503, f"busy: {exc}; try again"))
        except Exception as exc:  # noqa: BLE001  Refused, or a fault of nnctl's own: raised where the request waits
            refuse(job, exc)
        finally:
            if not handed:
                self.batcher.coming(-1)

    async def _within(self, awaitable, refusal: Refused):
        """Await within ``--timeout`` (else ``refusal``), and within the drain deadline once shutting down
        (else 503 "shutting down")."""
        loop = asyncio.get_running_loop()
        own = loop.time() + self.options.timeout
        bound = asyncio.timeout_at(own if self.drain_at is None else min(own, self.drain_at))
        try:
            async with bound:
                self._bounds.add(bound)
                try:
                    return await awaitable
                finally:
                    self._bounds.discard(bound)
        except TimeoutError:
            if not bound.expired():
                raise
            if self.drain_at is not None and self.drain_at < own:
                raise Refused(503, self.shutting_down()) from None
            raise refusal from None

    def drain(self) -> None:
        """Graceful shutdown begins (on the event loop): what is in flight has ``drain_timeout`` seconds."""
        self.drain_at = asyncio.get_running_loop().time() + self.options.drain_timeout
        for bound in list(self._bounds):
            when = bound.when()
            if when is None or when > self.drain_at:
                bound.reschedule(self.drain_at)

    def drain_left(self) -> float:
        if self.drain_at is None:
            return self.options.drain_timeout
        return max(0.0, self.drain_at - asyncio.get_running_loop().time())

    def shutting_down(self) -> str:
        return f"shutting down: not answered within --drain-timeout {self.options.drain_timeout:g} s"

    def not_ready_refusal(self) -> None:
        if self.batcher.failure:
            raise Refused(503, self.batcher.failure)
        if not self.batcher.ready.is_set():
            raise Refused(503, "warming up: the model is loaded and its first batch is running")


class _Raw(Response):
    """A route's answer that is plain ASGI (FastAPI's /predict route answers through ``Server.predict``)."""

    def __init__(self, asgi):
        self.asgi = asgi
        self.background = None

    async def __call__(self, scope, receive, send) -> None:
        await self.asgi(scope, receive, send)


def create_app(predictor: Predictor, options: ServeOptions) -> tuple[FastAPI, Server]:
    server = Server(predictor, options)

    app = FastAPI(title="nnctl serve", version=__version__, docs_url=None, redoc_url=None,  # lifespan: the Gate's
                  description="A trained nnctl run as an HTTP service (dynamic batching, metrics, a page).")

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused):
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body"))
        return JSONResponse({"detail": one_line(f"{where}: {first.get('msg', 'invalid')}")}, status_code=422)

    @app.get("/health", summary="Alive (no token needed)")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", summary="200 once the model is loaded and its warm-up batch has run, else 503")
    async def ready() -> dict:
        server.not_ready_refusal()
        return {"ready": True}

    @app.get("/info", summary="The model: name, input shape, classes, preprocessing record, device, versions")
    async def get_info() -> dict:
        return json_ready(info(predictor, options))

    @app.post("/predict", summary="Predict image files (multipart) or tensors (JSON)", openapi_extra=PREDICT_BODY,
              responses={200: {"description": 'the rows of nnctl predict --format jsonl: {"predictions": [...]}'},
                         413: {"description": "body too large"}, 422: {"description": "an input it cannot use"},
                         503: {"description": "warming up, queue full or shutting down (Retry-After)"},
                         504: {"description": "no answer within --timeout"}})
    async def post_predict(top_k: int | None = Query(None, ge=1),
                           format: str = Query("json", pattern="^(json|jsonl)$")) -> Response:
        return _Raw(server.predict)  # the Gate hands /predict to Server.predict before FastAPI; this route too

    @app.get("/metrics", summary="Prometheus text format")
    async def get_metrics() -> Response:
        return Response(server.metrics.text(), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page.HTML)

    return app, server


PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "image files (PNG, JPEG, ...), decoded as training decoded its images"},
        "top_k": {"type": "integer", "minimum": 1}}}},
    "application/json": {"schema": {"type": "object", "required": ["inputs"], "additionalProperties": False,
                                     "properties": {
        "inputs": {"type": "array", "description": "tensors (nested lists of numbers): each one sample of the "
                                                   "recorded input shape, or a batch of them"},
        "top_k": {"type": "integer", "minimum": 1},
        "dtype": {"type": "string", "enum": ["float32", "uint8"],
                  "description": "float32: values on the model's scale; uint8: raw values, scaled as recorded"}}}},
}}}


class Gate:
    """The outermost layer (pure ASGI): the token, the in-flight gauge, every request counted and timed, and
    ``POST /predict`` handed to ``Server.predict`` directly (the hot path)."""

    def __init__(self, app, server: Server):
        self.app = app
        self.server = server
        self.token = server.options.token.encode() if server.options.token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        m = self.server.metrics
        status = [0]

        async def counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        started = time.perf_counter()
        m.in_flight.inc()
        try:
            if self.token is not None and path not in OPEN_PATHS and not self._authorized(scope):
                await send_json(counted, 401, {"detail": "a token is needed: Authorization: Bearer <token>"},
                                [(b"www-authenticate", b"Bearer")])
            elif path == "/predict" and scope["method"] == "POST":
                await self.server.predict(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        except asyncio.CancelledError:
            # uvicorn cancels what its graceful shutdown left (the app's drain deadline, earlier, answers all but a
            # request whose event loop was held), and a second signal cancels everything: answered, not a 500
            # with "Exception in ASGI application" and a traceback in the log
            if status[0]:
                raise
            asyncio.current_task().uncancel()
            await send_json(counted, 503, {"detail": self.server.shutting_down()})
        finally:
            m.in_flight.dec()
            m.requests.labels(endpoint, str(status[0] or 500)).inc()
            m.latency.labels(endpoint).observe(time.perf_counter() - started)

    async def _lifespan(self, receive, send) -> None:
        """The worker starts with the server and ends with it (what is queued answered within what is left of
        the drain). A forced exit (a second signal) cancels the lifespan instead of ending it: the worker is
        stopped all the same, and the cancellation is no error to report (uvicorn would log a traceback)."""
        await receive()  # lifespan.startup
        self.server.batcher.start()
        await send({"type": "lifespan.startup.complete"})
        try:
            await receive()  # lifespan.shutdown: every request is answered or refused by now
        except asyncio.CancelledError:
            asyncio.current_task().uncancel()
            return
        finally:
            self.server.batcher.stop(self.server.drain_left())
            self.server.pool.shutdown(wait=False, cancel_futures=True)
        await send({"type": "lifespan.shutdown.complete"})

    def _authorized(self, scope) -> bool:
        for key, value in scope.get("headers", ()):
            if key == b"authorization":
                scheme, _, given = value.partition(b" ")
                return scheme.lower() == b"bearer" and secrets.compare_digest(given.strip(), self.token)
        return False


async def send_json(send, status: int, payload: dict, headers: list = ()) -> None:
    """A JSON answer as Starlette's JSONResponse writes it (compact, UTF-8); a 503 says Retry-After."""
    body = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    extra = [*headers, (b"retry-after", b"1")] if status == 503 else list(headers)
    await send_bytes(send, status, b"application/json", body, extra)


async def send_bytes(send, status: int, media: bytes, body: bytes, headers: list = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode()), (b"content-type", media), *headers]})
    await send({"type": "http.response.body", "body": body})


def build(predictor: Predictor, options: ServeOptions) -> tuple[Gate, Server]:
    """The ASGI app uvicorn serves (the FastAPI app inside its Gate) and its Server."""
    app, server = create_app(predictor, options)
    return Gate(app, server), server


def openapi() -> dict:
    """FastAPI's OpenAPI schema of the app; no model is needed (the endpoints are the same for every model)."""
    app, server = create_app(None, ServeOptions())
    server.pool.shutdown()
    return app.openapi()
