"""The HTTP app (FastAPI): /health, /ready, /info, /predict, /metrics, the page at /, the OpenAPI schema.

``POST /predict`` takes image files (``multipart/form-data``, fields ``files``, or ``file``, and
``top_k``) or JSON ``{"inputs": [...], "top_k": k, "dtype": "float32" | "uint8"}`` where each input is a
tensor of the recorded input shape or a batch of them, as ``nnctl.predict`` takes tensors; it answers
``{"predictions": [row, ...]}`` with each row exactly the JSON line ``nnctl predict --format jsonl``
prints for the same input (``nnctl.use.predict.jsonl_line``), or those lines themselves with
``?format=jsonl``. Images are decoded by the one decoder (``nnctl.use.inputs.image_group``) and JSON
parsed in a thread pool, never on the event loop; the samples then queue for the one inference worker
(``nnctl.serving.batcher``).

Refusals, each a JSON ``{"detail": "<one line>"}``: 401 without the token (``--token``; every endpoint
but /health and the page, which holds nothing and asks for the token); 413 for a body over ``max_body``
(by its Content-Length before reading it, else while reading); 408 for a body not sent within
``timeout``; 415 for another content type; 422 for an input it cannot use (undecodable, a
decompression bomb, the wrong shape or dtype, NaN or infinity, an unknown field, no input); 503 with
Retry-After while warming up or when the queue is full; 504 when the answer takes longer than
``timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from nnctl._version import __version__
from nnctl.files import json_ready
from nnctl.use.inputs import _Group, image_group, tensor_group
from nnctl.use.predict import Predictor, jsonl_line

from nnctl.serving import page
from nnctl.serving.batcher import Batcher, InferenceFailed, QueueFull
from nnctl.serving.metrics import CONTENT_TYPE, Metrics

MiB = 1 << 20
OPEN_PATHS = ("/health", "/")  # no token needed: alive or not, and the page (it holds no data)
ENDPOINTS = ("/", "/health", "/ready", "/info", "/predict", "/metrics", "/openapi.json")
JSON_FIELDS = ("inputs", "top_k", "dtype")
FORM_FIELDS = ("files", "file", "top_k")


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


class Refused(Exception):
    """An input the server cannot use: (status, one-line reason)."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def info(predictor: Predictor, options: ServeOptions) -> dict:
    pre = predictor.pre
    return {"name": options.name, "task": str(predictor.task), "input_shape": list(pre.input_shape or []),
            "classes": pre.classes, "preprocessing": pre.to_dict(), "device": str(predictor.device),
            "nnctl": __version__, "torch": torch.__version__,
            "batching": {"max_batch": options.max_batch, "max_wait_ms": options.max_wait_ms,
                         "max_queue": options.max_queue, "timeout_s": options.timeout},
            "top_k": options.top_k, "notes": list(predictor.notes)}


# --- reading a request's inputs (in the thread pool) ----------------------------------------------

def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


def json_inputs(body: bytes, predictor: Predictor) -> tuple[list[_Group], int | None]:
    """A JSON body -> its inputs as groups (``tensor#k``, as ``nnctl.predict`` names tensors) and its top_k."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Refused(422, f"the body is not JSON ({_one_line(exc, 120)})") from None
    if not isinstance(data, dict):
        raise Refused(422, 'the body must be a JSON object: {"inputs": [...], "top_k": k}')
    unknown = sorted(set(map(str, data)) - set(JSON_FIELDS))
    if unknown:
        raise Refused(422, f"unknown field {unknown[0]!r}: the body takes {', '.join(JSON_FIELDS)}")
    top_k = _top_k(data.get("top_k"))
    dtype = data.get("dtype", "float32")
    if dtype not in ("float32", "uint8"):
        raise Refused(422, f"dtype must be float32 (model-scale values) or uint8 (raw values), not {dtype!r}")
    inputs = data.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise Refused(422, '"inputs" must be a non-empty list of tensors (nested lists of numbers)')
    shape = list(predictor.pre.input_shape or [])
    return [_tensor(f"tensor#{k}", value, dtype, shape) for k, value in enumerate(inputs)], top_k


def _tensor(name: str, value, dtype: str, shape: list[int]) -> _Group:
    if not isinstance(value, list):
        raise Refused(422, f"{name}: a {type(value).__name__}, not a tensor (a nested list of numbers)")
    try:
        t = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise Refused(422, f"{name}: not a tensor of numbers ({_one_line(exc, 120)})") from None
    if any(isinstance(v, bool) for v in _leaves(value)):
        raise Refused(422, f"{name}: holds true/false values; give numbers")
    if dtype == "uint8":
        finite = torch.isfinite(t)
        if not finite.all() or (t != t.round()).any() or (t < 0).any() or (t > 255).any():
            raise Refused(422, f"{name}: dtype uint8 takes whole numbers from 0 to 255")
        t = t.to(torch.uint8)
    g = tensor_group(name, t, shape)
    if g.error is not None:
        raise Refused(422, f"{name}: {g.error}")
    return g


def _leaves(value):
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        else:
            yield v


def _top_k(value) -> int | None:
    if value is None:
        return None
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise Refused(422, f"top_k must be a whole number, not {str(value)[:40]!r}") from None
    if isinstance(value, bool) or str(k) != str(value).strip() or k < 1:
        raise Refused(422, f"top_k must be a whole number of at least 1, not {str(value)[:40]!r}")
    return k


def image_inputs(files: list[tuple[str, bytes]], predictor: Predictor) -> list[_Group]:
    groups = [image_group(data, predictor.pre, name=name) for name, data in files]
    for g in groups:
        if g.error is not None:
            raise Refused(422, f"{g.name}: {g.error}")
    return groups


# --- the app ---------------------------------------------------------------------------------------

class Server:
    """One served model: its predictor, options, metrics, the worker and the decoding pool."""

    def __init__(self, predictor: Predictor, options: ServeOptions):
        self.predictor = predictor
        self.options = options
        self.metrics = Metrics()
        self.batcher = Batcher(predictor, options.max_batch, options.max_wait_ms / 1000, options.max_queue,
                               self.metrics)
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="nnctl-serve-decode")
        self.answered = 0

    async def read_body(self, request: Request) -> bytes:
        limit = self.options.max_body
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise Refused(413, f"the body is {int(length):,} bytes, more than --max-body {limit:,}")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.options.timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise Refused(413, f"the body is more than --max-body {limit:,} bytes")
                    chunks.append(chunk)
        except TimeoutError:
            raise Refused(408, f"the body was not sent within --timeout {self.options.timeout:g} s") from None
        body = b"".join(chunks)
        request._body = body  # starlette reads a form from the body already read
        return body

    async def inputs(self, request: Request, body: bytes) -> tuple[list[_Group], int | None]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        loop = asyncio.get_running_loop()
        if kind == "application/json":
            return await loop.run_in_executor(self.pool, json_inputs, body, self.predictor)
        if kind != "multipart/form-data":
            raise Refused(415, "send image files as multipart/form-data (field files) or tensors as "
                               'application/json {"inputs": [...]}' + (f", not {kind}" if kind else ""))
        try:
            form = await request.form(max_files=10_000, max_fields=100)
        except HTTPException as exc:  # starlette's own refusals of a malformed form
            raise Refused(422, f"not a readable multipart form ({_one_line(exc.detail, 120)})") from None
        files, top_k = [], None
        for key, value in form.multi_items():
            if key not in FORM_FIELDS:
                raise Refused(422, f"unknown field {key!r}: the form takes files (image files) and top_k")
            if key == "top_k":
                top_k = _top_k(value)
            elif isinstance(value, str):
                raise Refused(422, f"field {key!r} must be a file, not text")
            else:
                files.append((value.filename or f"{key}#{len(files)}", await value.read()))
        if not files:
            raise Refused(422, "no image file in the form (field files)")
        return await loop.run_in_executor(self.pool, image_inputs, files, self.predictor), top_k

    async def predict(self, request: Request, top_k: int | None, fmt: str) -> Response:
        self.not_ready_refusal()
        self.batcher.coming(+1)  # the worker may wait for this one while it is read and decoded
        try:
            body = await self.read_body(request)
            groups, body_k = await self.inputs(request, body)
            k = top_k or body_k or self.options.top_k
            try:
                job = self.batcher.submit(groups, k)
            except QueueFull as exc:
                raise Refused(503, f"busy: {exc}; try again") from None
        finally:
            self.batcher.coming(-1)
        try:
            async with asyncio.timeout(self.options.timeout):
                await asyncio.shield(job.future)
        except TimeoutError:
            job.abandoned = True
            raise Refused(504, f"no answer within --timeout {self.options.timeout:g} s") from None
        except InferenceFailed as exc:
            raise Refused(500, str(exc)) from None
        rows = self.predictor.answers(groups, k).rows
        self.answered += 1
        if fmt == "jsonl":
            return Response("".join(jsonl_line(r) for r in rows), media_type="application/x-ndjson")
        text = json.dumps({"predictions": [json_ready(r.to_dict()) for r in rows]}, allow_nan=False)
        return Response(text, media_type="application/json")

    def not_ready_refusal(self) -> None:
        if self.batcher.failure:
            raise Refused(503, self.batcher.failure)
        if not self.batcher.ready.is_set():
            raise Refused(503, "warming up: the model is loaded and its first batch is running")


def create_app(predictor: Predictor, options: ServeOptions) -> tuple[FastAPI, Server]:
    server = Server(predictor, options)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.batcher.start()
        try:
            yield
        finally:
            server.batcher.stop(options.drain_timeout)
            server.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="nnctl serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="A trained nnctl run as an HTTP service (dynamic batching, metrics, a page).")

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused):
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body"))
        return JSONResponse({"detail": _one_line(f"{where}: {first.get('msg', 'invalid')}")}, status_code=422)

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
                         503: {"description": "warming up or queue full (Retry-After)"},
                         504: {"description": "no answer within --timeout"}})
    async def post_predict(request: Request, top_k: int | None = Query(None, ge=1),
                           format: str = Query("json", pattern="^(json|jsonl)$")) -> Response:
        return await server.predict(request, top_k, format)

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
    """The outermost layer (pure ASGI): the token, the in-flight gauge, and every request counted and timed."""

    def __init__(self, app, server: Server):
        self.app = app
        self.server = server
        self.token = server.options.token.encode() if server.options.token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        m = self.server.metrics
        status = [500]

        async def counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        started = time.perf_counter()
        m.in_flight.inc()
        try:
            if self.token is not None and path not in OPEN_PATHS and not self._authorized(scope):
                await _send_json(counted, 401, {"detail": "a token is needed: Authorization: Bearer <token>"},
                                 [(b"www-authenticate", b"Bearer")])
            else:
                await self.app(scope, receive, counted)
        finally:
            m.in_flight.dec()
            m.requests.labels(endpoint, str(status[0])).inc()
            m.latency.labels(endpoint).observe(time.perf_counter() - started)

    def _authorized(self, scope) -> bool:
        for key, value in scope.get("headers", ()):
            if key == b"authorization":
                scheme, _, given = value.partition(b" ")
                return scheme.lower() == b"bearer" and secrets.compare_digest(given.strip(), self.token)
        return False


async def _send_json(send, status: int, payload: dict, headers: list) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
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
