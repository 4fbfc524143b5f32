"""nnctl serve (issue 22): real servers on free loopback ports, every wait bounded, no server left behind.

Two kinds of server: `nnctl serve` itself in a subprocess (one for the module's read-only tests, on the
session's trained digits run), and the same app under uvicorn in a thread of this process where the test
must hold the model still (a gate in its forward pass: warm-up, a full queue, a timeout), which a
subprocess cannot do honestly.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nnctl

from .conftest import ROOT, helper_command, run_cli

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from nnctl.serving import lifecycle  # noqa: E402  (after the extra's check)
from nnctl.serving.app import ServeOptions, build  # noqa: E402
from nnctl.use.predict import Predictor  # noqa: E402

WAIT = 60  # seconds: the longest any test waits for a server to come up


# --- helpers -------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digit_pngs(folder: Path, n: int, size: int = 8) -> list[Path]:
    """The first n built-in digits as grayscale PNGs (0..255), named by index and label."""
    rows = np.loadtxt(gzip.open(ROOT / "nnctl" / "data" / "digits.csv.gz"), delimiter=",", max_rows=n)
    out = []
    for i, row in enumerate(rows):
        px = (row[:64].reshape(8, 8) * 255 / 16).round().astype(np.uint8)
        path = folder / f"d{i:02d}-{int(row[64])}.png"
        Image.fromarray(px, "L").resize((size, size), Image.NEAREST).save(path)
        out.append(path)
    return out


def bomb_png() -> bytes:
    """A PNG that says it is 30000 x 30000 pixels (900 M, over PIL's bomb limit) in a few hundred bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 30001))
            + chunk(b"IEND", b""))


def wait_ready(url: str, proc: subprocess.Popen | None = None, headers: dict | None = None) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited {proc.returncode}: {proc.stderr.read()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=2, headers=headers).status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready within {WAIT} s")


@contextlib.contextmanager
def cli_server(source, *args: str, env: dict | None = None, command: list[str] | None = None,
               headers: dict | None = None, port: int | None = None):
    """`nnctl serve SOURCE --port P ARGS` (or ``command``, listening on ``port``) in a subprocess: yields (url,
    process); killed in the end whatever happens."""
    port = port or free_port()
    cmd = command or [sys.executable, "-m", "nnctl", "serve", str(source), "--port", str(port), *args]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, headers)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


class Gated(torch.nn.Module):
    """A trained model whose forward pass waits for ``gate`` (set: it runs); counts its calls."""

    def __init__(self, inner: torch.nn.Module, fail_on: int | None = None):
        super().__init__()
        self.inner = inner
        self.nnctl_meta = inner.nnctl_meta
        self.gate = threading.Event()
        self.calls = 0
        self.fail_on = fail_on

    def forward(self, x):
        self.calls += 1
        assert self.gate.wait(WAIT), "the test never opened the gate"
        if self.calls == self.fail_on:
            raise RuntimeError("a fault of the model itself")
        return self.inner(x)


@contextlib.contextmanager
def thread_server(model, uvicorn_out: list | None = None, **options):
    """The app under uvicorn in a thread of this process (the same build and uvicorn settings as nnctl serve);
    ``uvicorn_out`` receives the uvicorn server (to stop it as a signal does: ``should_exit``)."""
    opts = ServeOptions(port=0, **options)
    sock = lifecycle.bind("127.0.0.1", 0)
    asgi, server = build(Predictor.load(model), opts)
    uv = lifecycle.uvicorn_server(asgi, opts)
    if uvicorn_out is not None:
        uvicorn_out.append(uv)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = lifecycle.url_of(sock)
    try:
        deadline = time.monotonic() + WAIT
        while not uv.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        yield url, server
    finally:
        if isinstance(model, Gated):
            model.gate.set()
        uv.should_exit = True
        thread.join(WAIT)
        sock.close()
        assert not thread.is_alive()


def post_files(url: str, paths: list[Path], **params) -> httpx.Response:
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    return httpx.post(f"{url}/predict", files=files, params=params, timeout=30)


def raw_exchange(url: str, request: bytes) -> str:
    """Send raw bytes on a fresh connection; the reply as text, read until the server closes or 10 s pass."""
    host, port = url.removeprefix("http://").split(":")
    chunks = []
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := s.recv(65536):
                chunks.append(chunk)
                text = b"".join(chunks)
                head, _, body = text.partition(b"\r\n\r\n")
                length = [int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")]
                if length and len(body) >= length[0]:
                    break
    return b"".join(chunks).decode()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


# --- the module's server: nnctl serve on the session's digits run ----------------------------------

@pytest.fixture(scope="module")
def served(digits_run):
    # a 256 KiB body limit (the 413 tests) and 50 ms to gather a batch (the batching test)
    with cli_server(digits_run, "--max-body", "256KiB", "--max-wait-ms", "50") as (url, proc):
        yield url
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    return digit_pngs(tmp_path_factory.mktemp("digits"), 16, size=24)  # 24x24: resized to 8x8 as recorded


def test_health_ready_info(served, digits_run):
    assert httpx.get(f"{served}/health").json() == {"status": "ok"}
    assert httpx.get(f"{served}/ready").json() == {"ready": True}
    info = httpx.get(f"{served}/info").json()
    record = nnctl.load_record(digits_run).to_dict()
    assert info["input_shape"] == [1, 8, 8] and info["classes"] == [str(i) for i in range(10)]
    assert info["preprocessing"] == json.loads(json.dumps(record))
    assert info["device"] == "cpu" and info["nnctl"] == nnctl.__version__ and info["torch"] == torch.__version__
    assert info["task"] == "classification" and info["name"] == digits_run.name


def test_images_answer_exactly_what_predict_prints(served, digits_run, pngs):
    """One request alone forms its own forward pass: the very bytes of `nnctl predict --format jsonl`."""
    chosen = pngs[:3]
    r = run_cli("predict", str(digits_run), *[p.name for p in chosen], "--top-k", "3", "--format", "jsonl",
                cwd=chosen[0].parent)
    assert r.returncode == 0, r.stderr
    got = post_files(served, chosen, top_k=3, format="jsonl")
    assert got.status_code == 200 and got.headers["content-type"] == "application/x-ndjson"
    assert got.text == r.stdout
    as_json = post_files(served, chosen, top_k=3).json()
    assert as_json == {"predictions": [json.loads(line) for line in r.stdout.splitlines()]}
    top3 = json.loads(r.stdout.splitlines()[0])
    (one,) = post_files(served, chosen[:1]).json()["predictions"]  # the default top_k: 1, as nnctl predict's
    assert {k: one[k] for k in ("input", "classes", "names")} == {
        "input": top3["input"], "classes": top3["classes"][:1], "names": top3["names"][:1]}
    # a pass of 1 sample, not of 3: the same class, the probability within float32 rounding
    assert one["probabilities"] == pytest.approx(top3["probabilities"][:1], abs=1e-6)


def test_tensors_answer_exactly_what_predict_answers(served, digits_run):
    """JSON tensors, float32 values and uint8 raw ones, a sample and a batch: nnctl.predict's rows, equal."""
    g = torch.Generator().manual_seed(0)
    floats = torch.rand(1, 8, 8, generator=g)  # one sample of the input shape
    raw = torch.randint(0, 17, (3, 1, 8, 8), generator=g).to(torch.uint8)  # a batch of raw digit values
    want_f = [r.to_dict() for r in nnctl.predict(digits_run, [floats], top_k=4)]
    want_u = [r.to_dict() for r in nnctl.predict(digits_run, [raw], top_k=4)]
    got_f = httpx.post(f"{served}/predict", json={"inputs": [floats.tolist()], "top_k": 4}).json()
    got_u = httpx.post(f"{served}/predict", json={"inputs": [raw.tolist()], "top_k": 4, "dtype": "uint8"}).json()
    assert got_f["predictions"] == want_f and got_u["predictions"] == want_u
    assert [r["input"] for r in got_u["predictions"]] == ["tensor#0[0]", "tensor#0[1]", "tensor#0[2]"]


def test_sixteen_concurrent_requests_are_batched_with_the_same_answers(served, pngs):
    before = httpx.get(f"{served}/metrics").text
    alone = [post_files(served, [p], top_k=3).json()["predictions"][0] for p in pngs]
    mid = httpx.get(f"{served}/metrics").text

    async def all_at_once():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*[client.post(f"{served}/predict", params={"top_k": 3},
                                                      files=[("files", (p.name, p.read_bytes(), "image/png"))])
                                          for p in pngs])

    answers = asyncio.run(all_at_once())
    after = httpx.get(f"{served}/metrics").text
    assert [a.status_code for a in answers] == [200] * 16
    passes = metric(after, "nnctl_serve_batch_size_count") - metric(mid, "nnctl_serve_batch_size_count")
    samples = metric(after, "nnctl_serve_batch_size_sum") - metric(mid, "nnctl_serve_batch_size_sum")
    assert samples == 16 and passes < 16, (passes, samples)  # some forward pass held more than one request
    assert metric(mid, "nnctl_serve_batch_size_count") - metric(before, "nnctl_serve_batch_size_count") == 16
    for a, b in zip(answers, alone):
        row = a.json()["predictions"][0]
        # the same classes; the probabilities within float32 rounding (a batch of another size may sum in
        # another order in the BLAS kernel: the last bit, never the class)
        assert row["input"] == b["input"] and row["classes"] == b["classes"] and row["names"] == b["names"]
        assert row["probabilities"] == pytest.approx(b["probabilities"], abs=1e-6)


@pytest.mark.parametrize("files,detail", [
    ([("files", ("junk.png", b"not an image at all", "image/png"))],
     "junk.png: not a readable image (not a format PIL recognises; 19 bytes)"),
    ([("files", ("bomb.png", bomb_png(), "image/png"))], "bomb.png: refused as a possible decompression bomb"),
    ([("files", ("empty.png", b"", "image/png"))], "empty.png: an empty file, not an image"),
    ([("other", ("x.png", b"x", "image/png"))], "unknown field 'other': the form takes files (image files) and top_k"),
    ([], "no image file in the form (field files)"),
])
def test_unusable_images_are_422_with_one_line(served, files, detail):
    r = httpx.post(f"{served}/predict", files=files or [("top_k", (None, "2"))], timeout=30)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(detail) and "\n" not in r.json()["detail"]


NAN_SAMPLE = [[[float("nan")] + [0.0] * 7] + [[0.0] * 8] * 7]


@pytest.mark.parametrize("body,detail", [
    ({"inputs": [[[0.0] * 8]]}, "tensor#0: shape [1, 8]: the model takes samples of shape [1, 8, 8] "
                                "(a batch: [N, 1, 8, 8])"),
    ({"inputs": [[[[0.5] * 8] * 8]], "dtype": "uint8"}, "tensor#0: dtype uint8 takes whole numbers from 0 to 255"),
    ({"inputs": [[[["a"] * 8] * 8]]}, "tensor#0: not a tensor of numbers"),
    ({"inputs": [[[[True] * 8] * 8]]}, "tensor#0: holds true/false values; give numbers"),
    ({"inputs": [[[[0.0] * 8] * 8]], "dtype": "int64"}, "dtype must be float32 (model-scale values) or uint8"),
    ({"inputs": [[[[0.0] * 8] * 8]], "colour": 1}, "unknown field 'colour': the body takes inputs, top_k, dtype"),
    ({"inputs": []}, '"inputs" must be a non-empty list of tensors'),
    ({"inputs": [[[[0.0] * 8] * 8]], "top_k": 0}, "top_k must be a whole number of at least 1, not '0'"),
    # numpy reads these as numbers (1.5, NaN, 1.0); the server does not
    ({"inputs": [[[["1.5"] * 8] * 8]]}, "tensor#0: not a tensor of numbers (it holds text)"),
    ({"inputs": [[[[None] + [0.0] * 7] * 8]]}, "tensor#0: not a tensor of numbers (it holds null)"),
    ({"inputs": [[[[1.0] * 7 + [True]] * 8]]}, "tensor#0: holds true/false values; give numbers"),
    ({"inputs": [[[[0.0] * 8] * 8], [[[0.0] * 8] * 7]]}, "tensor#1: shape [1, 7, 8]"),
    ({"inputs": [[[[0.0] * 8] * 8 + [[0.0] * 7]]]}, "tensor#0: not a tensor of numbers"),  # ragged
])
def test_unusable_tensors_are_422_with_one_line(served, body, detail):
    r = httpx.post(f"{served}/predict", json=body, timeout=30)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(detail), r.json()


def test_nan_and_infinity_are_422(served):
    for value in ("NaN", "Infinity", "-Infinity"):  # Python's JSON reads these literals
        text = json.dumps({"inputs": [NAN_SAMPLE]}).replace("NaN", value)
        r = httpx.post(f"{served}/predict", content=text, headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"] == "tensor#0: holds 1 non-finite values (NaN or infinity)"


def test_a_body_over_the_limit_is_413_before_it_is_read(served):
    """Content-Length over --max-body: 413 with only the headers sent (the body never comes)."""
    reply = raw_exchange(served, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 104857600\r\n\r\n")
    assert reply.startswith("HTTP/1.1 413"), reply
    assert "the body is 104,857,600 bytes, more than --max-body 262,144" in reply
    # without a Content-Length (chunked), counted while reading: 413 too
    r = httpx.post(f"{served}/predict", content=iter([b"x" * 65536] * 8), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["detail"] == "the body is more than --max-body 262,144 bytes"


def test_other_content_types_and_bad_queries(served):
    r = httpx.post(f"{served}/predict", content=b"hello", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = httpx.post(f"{served}/predict", json={"inputs": [[[[0.0] * 8] * 8]]}, params={"top_k": "x"})
    assert r.status_code == 422 and r.json()["detail"].startswith("top_k: ")
    r = httpx.post(f"{served}/predict", json={"inputs": [[[[0.0] * 8] * 8]]}, params={"top_k": "0"})
    assert r.status_code == 422 and r.json() == {"detail": "top_k: must be a whole number of at least 1, not '0'"}
    r = httpx.post(f"{served}/predict", json={"inputs": [[[[0.0] * 8] * 8]]}, params={"format": "xml"})
    assert r.status_code == 422 and r.json() == {"detail": "format: must be json or jsonl, not 'xml'"}
    r = httpx.post(f"{served}/predict", content=b"--x\r\n", headers={"content-type": "multipart/form-data"})
    assert r.status_code == 422
    assert r.json() == {"detail": "not a readable multipart form (no boundary in its Content-Type)"}
    assert httpx.get(f"{served}/predict").status_code == 405  # FastAPI's route: POST only


def test_a_bounded_smoke_test_of_200_requests(served, pngs):
    """200 requests from 8 concurrent clients on loopback: every one answered 200, all within 60 s."""
    async def client_loop(client, k):
        codes = []
        for i in range(25):
            p = pngs[(k * 25 + i) % len(pngs)]
            r = await client.post(f"{served}/predict", files=[("files", (p.name, p.read_bytes(), "image/png"))])
            codes.append(r.status_code)
        return codes

    async def main():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.wait_for(asyncio.gather(*[client_loop(client, k) for k in range(8)]), 60)

    codes = [c for part in asyncio.run(main()) for c in part]
    assert codes == [200] * 200
    text = httpx.get(f"{served}/metrics").text
    assert metric(text, 'nnctl_serve_requests_total{endpoint="/predict",status="200"}') >= 200
    assert metric(text, "nnctl_serve_in_flight") == 1  # only the /metrics request itself


def test_openapi_has_both_bodies_and_the_cli_prints_it(served, cli):
    schema = httpx.get(f"{served}/openapi.json").json()
    code, out, _ = cli("serve", "--print-openapi")
    assert code == 0 and json.loads(out) == schema
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    assert {"/health", "/ready", "/info", "/predict", "/metrics"} <= set(schema["paths"])


def test_the_page_is_served_whole_with_nothing_from_elsewhere(served):
    r = httpx.get(f"{served}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<script>" in r.text and "http://" not in r.text and "https://" not in r.text and "src=\"//" not in r.text


# --- the CLI's refusals ------------------------------------------------------------------------------

def test_a_second_server_on_the_port_is_a_clear_error(cli, digits_run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = cli("serve", str(digits_run), "--port", str(port))
    assert code == 1 and out == ""
    assert err.strip() == (f"error: port {port} on 127.0.0.1 is in use (another server is listening there?): stop it "
                           "or choose another --port")


def test_another_host_than_loopback_warns(cli, digits_run):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        code, _, err = cli("serve", str(digits_run), "--host", "0.0.0.0", "--port", str(taken.getsockname()[1]))
    assert code == 1
    assert err.splitlines()[0] == ("warning: listening on 0.0.0.0: reachable from other machines; anyone who reaches "
                                   "it can use the model (set --token or NNCTL_SERVE_TOKEN)")


def test_exported_weights_and_configs_cannot_be_served(cli, digits_run, tmp_path):
    out = tmp_path / "w.safetensors"
    assert nnctl.export(digits_run, "safetensors", str(out)).path
    code, _, err = cli("serve", str(out), "--port", str(free_port()))
    assert code == 2
    assert err.strip() == ("error: w.safetensors holds weights only, without the config; nnctl serve needs a run "
                           "folder or an nnctl checkpoint (.pt)")
    code, _, err = cli("serve", str(ROOT / "configs" / "digits_cnn.yaml"), "--port", str(free_port()))
    assert code == 2 and "nnctl serve needs a trained model" in err


def test_bad_options_are_refused(cli, digits_run):
    code, _, err = cli("serve", str(digits_run), "--max-batch", "0")
    assert code == 2 and "--max-batch must be at least 1, not 0" in err
    code, _, err = cli("serve", str(digits_run), "--max-body", "lots")
    assert code == 2 and "--max-body 'lots': give a size such as 16MiB" in err


def test_without_the_extra_serve_names_the_pip_command(tmp_path, digits_run):
    block = ("import sys, importlib.abc\n"
             "class Block(importlib.abc.MetaPathFinder):\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] in ('fastapi', 'uvicorn'): raise ModuleNotFoundError(name)\n"
             "sys.meta_path.insert(0, Block())\n"
             "from nnctl.cli.app import main\n"
             f"sys.argv = ['nnctl', 'serve', {str(digits_run)!r}, '--port', '{free_port()}']\n"
             "main()\n")
    r = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == "error: nnctl serve needs fastapi, uvicorn, not installed: pip install 'nnctl[serve]'"
    assert list(tmp_path.iterdir()) == []


# --- a model held still: warm-up, a full queue, a timeout, a failing model, the token -------------------

@pytest.fixture(scope="module")
def trained(digits_run):
    return nnctl.load(digits_run)


def test_ready_is_503_until_the_warm_up_batch_has_run(trained):
    model = Gated(trained)
    with thread_server(model) as (url, server):
        assert httpx.get(f"{url}/health").status_code == 200
        r = httpx.get(f"{url}/ready")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["detail"] == "warming up: the model is loaded and its first batch is running"
        r = httpx.post(f"{url}/predict", json={"inputs": [[[[0.0] * 8] * 8]]})
        assert r.status_code == 503
        model.gate.set()  # the warm-up batch runs
        assert server.batcher.ready.wait(WAIT)
        assert httpx.get(f"{url}/ready").status_code == 200
        assert httpx.post(f"{url}/predict", json={"inputs": [[[[0.0] * 8] * 8]]}).status_code == 200


def _wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_full_queue_is_503_with_retry_after_and_a_slow_answer_504(trained):
    model = Gated(trained)
    model.gate.set()
    body = {"inputs": [[[[0.0] * 8] * 8]]}
    with thread_server(model, max_batch=1, max_queue=1, timeout=1.5) as (url, server):
        assert server.batcher.ready.wait(WAIT)
        model.gate.clear()
        calls = model.calls

        async def three():
            async with httpx.AsyncClient(timeout=30) as client:
                first = asyncio.create_task(client.post(f"{url}/predict", json=body))
                await asyncio.to_thread(_wait_for, lambda: model.calls > calls, "the worker took the first")
                second = asyncio.create_task(client.post(f"{url}/predict", json=body))  # waits in the queue
                await asyncio.to_thread(_wait_for, lambda: len(server.batcher._queue) == 1, "the second queued")
                third = await client.post(f"{url}/predict", json=body)  # the queue is full
                return await first, await second, third

        first, second, third = asyncio.run(three())
        assert third.status_code == 503 and third.headers["retry-after"] == "1"
        assert third.json()["detail"] == "busy: 1 requests are waiting already (--max-queue 1); try again"
        assert first.status_code == 504 and second.status_code == 504  # the gate held them past --timeout
        assert first.json()["detail"] == "no answer within --timeout 1.5 s"
        model.gate.set()  # the worker goes on: the queue is not stuck
        r = httpx.post(f"{url}/predict", json=body, timeout=30)
        assert r.status_code == 200 and len(r.json()["predictions"]) == 1


def test_a_failing_model_answers_500_and_the_worker_goes_on(trained):
    model = Gated(trained, fail_on=2)  # call 1: the warm-up; call 2 raises
    model.gate.set()
    body = {"inputs": [[[[0.0] * 8] * 8]]}
    with thread_server(model) as (url, server):
        assert server.batcher.ready.wait(WAIT)
        r = httpx.post(f"{url}/predict", json=body, timeout=30)
        assert r.status_code == 500
        assert r.json()["detail"] == ("the model failed on this batch: RuntimeError: a fault of the model itself")
        assert httpx.post(f"{url}/predict", json=body, timeout=30).status_code == 200


def test_a_body_sent_too_slowly_is_408(trained):
    with thread_server(trained, timeout=0.5) as (url, _):
        reply = raw_exchange(url, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                   b"Content-Length: 100\r\n\r\n{\"inputs\"")
        assert reply.startswith("HTTP/1.1 408"), reply
        assert reply.endswith('{"detail":"the body was not sent within --timeout 0.5 s"}'), reply


def test_the_token_is_needed_everywhere_but_health_and_the_page(trained):
    with thread_server(trained, token="s3cret") as (url, _):
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/").status_code == 200
        for path in ("/ready", "/info", "/metrics", "/openapi.json"):
            r = httpx.get(f"{url}{path}")
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
        r = httpx.post(f"{url}/predict", json={"inputs": [[[[0.0] * 8] * 8]]})
        assert r.status_code == 401 and r.json() == {"detail": "a token is needed: Authorization: Bearer <token>"}
        assert httpx.get(f"{url}/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{url}/info", headers={"Authorization": "Basic s3cret"}).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert httpx.get(f"{url}/info", headers=good).status_code == 200
        r = httpx.post(f"{url}/predict", json={"inputs": [[[[0.0] * 8] * 8]]}, headers=good)
        assert r.status_code == 200


@pytest.mark.slow  # a real-process test (README test command kept under ~6 minutes; .ci/run runs it)
def test_the_token_from_the_environment(digits_run):
    good = {"Authorization": "Bearer from-env"}
    with cli_server(digits_run, env={"NNCTL_SERVE_TOKEN": "from-env"}, headers=good) as (url, _):
        assert httpx.get(f"{url}/info").status_code == 401
        assert httpx.get(f"{url}/info", headers=good).status_code == 200


def test_the_model_file_changing_on_disk_changes_nothing(digits_run, tmp_path, pngs):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    with thread_server(str(run)) as (url, server):
        assert server.batcher.ready.wait(WAIT)
        before = post_files(url, pngs[:4], top_k=3).json()
        for ckpt in run.glob("*.pt"):
            ckpt.write_bytes(b"overwritten")
        assert post_files(url, pngs[:4], top_k=3).json() == before


# --- SIGTERM: stop accepting, answer what is in flight, exit 0 ----------------------------------------

@pytest.mark.slow
def test_sigterm_drains_the_requests_in_flight_and_exits_0(digits_run):
    port = free_port()
    cmd = helper_command("serve_slow", str(digits_run), str(port), "0.7")
    with cli_server(None, command=cmd, port=port) as (url, proc):
        body = {"inputs": [[[[0.0] * 8] * 8]]}

        async def during_sigterm():
            async with httpx.AsyncClient(timeout=30) as client:
                flying = [asyncio.create_task(client.post(f"{url}/predict", json=body)) for _ in range(3)]
                await asyncio.sleep(0.4)  # all three accepted; the first is in its forward pass
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                with pytest.raises(httpx.ConnectError):  # no longer accepting
                    await httpx.AsyncClient(timeout=5).post(f"{url}/predict", json=body)
                return await asyncio.gather(*flying)

        answers = asyncio.run(during_sigterm())
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert proc.wait(WAIT) == 0
        out = proc.stdout.read()
        assert out.splitlines()[-1] == "stopped by SIGTERM: 3 answered", out


# --- shutting down, and clients that leave: one line of JSON, never uvicorn's 500 and a traceback ---------

SLOW_JSON = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
             b'{"inputs":')  # 10 of 1000 bytes: a client whose body is slow
SLOW_FORM = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=bb\r\n"
             b"Content-Length: 1000\r\n\r\n--bb\r\nContent-Disposition: form-data; name=\"files\"; "
             b'filename="x.png"\r\nContent-Type: image/png\r\n\r\n\x89PNG')  # an upload cut short
SHUT = "shutting down: not answered within --drain-timeout {:g} s"
ASGI_ERROR = "Exception in ASGI application"  # what uvicorn logs, with a traceback, for an exception the app let out


def read_reply(s: socket.socket) -> tuple[str, dict]:
    """Read until the server closes the connection: (the head, the JSON body)."""
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).decode().partition("\r\n\r\n")
    return head, json.loads(body)


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def test_shutdown_while_a_body_is_still_coming_answers_503_at_the_drain_deadline(trained, caplog):
    """The outside tester's case (--drain-timeout shorter than --timeout): uvicorn cancelled the body's read at
    its graceful-shutdown deadline: a text/plain 500 and a traceback. Now the app's own drain deadline answers."""
    uv = []
    with thread_server(trained, uvicorn_out=uv, timeout=30, drain_timeout=0.5) as (url, server):
        with socket.create_connection(address(url), timeout=10) as s:
            s.sendall(SLOW_JSON)
            _wait_for(lambda: server._bounds, "the body is being read")
            started = time.monotonic()
            uv[0].should_exit = True  # what SIGTERM does
            head, body = read_reply(s)
            took = time.monotonic() - started
    assert head.startswith("HTTP/1.1 503 "), head
    assert "content-type: application/json" in head.lower() and "retry-after: 1" in head.lower()
    assert body == {"detail": SHUT.format(0.5)}
    assert 0.4 < took < 0.5 + lifecycle.UVICORN_GRACE  # the app's deadline, before uvicorn's
    assert ASGI_ERROR not in caplog.text and "Traceback" not in caplog.text


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_shutdown_answers_503_to_requests_the_worker_has_not_answered(trained, caplog):
    """One request in a forward pass that outlasts the drain, one waiting in the worker's queue: both answered
    503 at the drain deadline (uvicorn would have cancelled their wait: a 500 and a traceback each). The pass
    ends after the event loop has closed: the worker ends quietly (no "Event loop is closed" in its thread)."""
    model = Gated(trained)
    model.gate.set()
    body = {"inputs": [[[[0.0] * 8] * 8]]}
    uv = []
    with thread_server(model, uvicorn_out=uv, max_batch=1, timeout=30, drain_timeout=0.5) as (url, server):
        assert server.batcher.ready.wait(WAIT)
        model.gate.clear()
        calls = model.calls

        async def two():
            async with httpx.AsyncClient(timeout=30) as client:
                first = asyncio.create_task(client.post(f"{url}/predict", json=body))
                await asyncio.to_thread(_wait_for, lambda: model.calls > calls, "the worker took the first")
                second = asyncio.create_task(client.post(f"{url}/predict", json=body))
                await asyncio.to_thread(_wait_for, lambda: len(server.batcher._queue) == 1, "the second queued")
                uv[0].should_exit = True
                return await first, await second

        answers = asyncio.run(two())
    model.gate.set()
    server.batcher._thread.join(WAIT)
    assert not server.batcher._thread.is_alive()
    assert [(r.status_code, r.json()) for r in answers] == [(503, {"detail": SHUT.format(0.5)})] * 2
    assert ASGI_ERROR not in caplog.text and "Traceback" not in caplog.text


def test_a_second_signal_still_answers_in_json(trained, caplog):
    """A second SIGTERM or SIGINT (uvicorn's force exit) skips the drain: the event loop's end cancels what is in
    flight, and the Gate answers it 503 in JSON instead of letting the cancellation out."""
    uv = []
    with thread_server(trained, uvicorn_out=uv, timeout=30, drain_timeout=30) as (url, server):
        with socket.create_connection(address(url), timeout=10) as s:
            s.sendall(SLOW_JSON)
            _wait_for(lambda: server._bounds, "the body is being read")
            uv[0].force_exit = True
            uv[0].should_exit = True
            head, body = read_reply(s)
    assert head.startswith("HTTP/1.1 503 ") and body == {"detail": SHUT.format(30)}
    assert ASGI_ERROR not in caplog.text and "Traceback" not in caplog.text


@pytest.mark.parametrize("request_head", [SLOW_JSON, SLOW_FORM], ids=["json", "multipart"])
def test_a_client_that_leaves_mid_body_is_counted_not_a_traceback(trained, caplog, request_head):
    with thread_server(trained) as (url, server):
        with socket.create_connection(address(url), timeout=10) as s:
            s.sendall(request_head)
            _wait_for(lambda: server._bounds, "the body is being read")
        left = 'nnctl_serve_requests_total{endpoint="/predict",status="499"}'
        _wait_for(lambda: left in httpx.get(f"{url}/metrics").text, "the request counted")
        assert metric(httpx.get(f"{url}/metrics").text, left) == 1
        assert httpx.post(f"{url}/predict", json={"inputs": [[[[0.0] * 8] * 8]]}).status_code == 200
    assert ASGI_ERROR not in caplog.text and "ClientDisconnect" not in caplog.text


@pytest.mark.slow  # real processes (.ci/run runs them)
@pytest.mark.parametrize("timeout,drain,status,detail", [
    (30, 1, 503, SHUT.format(1)),
    (1, 3, 408, "the body was not sent within --timeout 1 s"),
])
def test_sigterm_during_a_slow_body_is_one_json_line_whatever_the_two_timeouts(digits_run, timeout, drain, status,
                                                                               detail):
    """The outside tester's reproduction (/tmp/recheck3/f4.sh), on nnctl serve itself: SIGTERM while a client sends
    a slow body; serve exits 0 and logs no traceback."""
    with cli_server(digits_run, "--timeout", str(timeout), "--drain-timeout", str(drain)) as (url, proc):
        with socket.create_connection(address(url), timeout=20) as s:
            s.sendall(SLOW_JSON)
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            head, body = read_reply(s)
        assert proc.wait(WAIT) == 0
        err = proc.stderr.read()
    assert head.startswith(f"HTTP/1.1 {status} ") and body == {"detail": detail}
    assert ASGI_ERROR not in err and "Traceback" not in err


def test_serving_leaves_a_core_to_the_event_loop(monkeypatch):
    """torch's threads while serving: the usable cores less one (the forward pass's threads otherwise wait for the
    core the event loop holds), at most torch's default, at least 1; OMP_NUM_THREADS, where set, decides."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for cores, default, want in ((2, 2, 1), (1, 1, 1), (16, 16, 15), (16, 4, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert lifecycle.inference_threads(default) == want, (cores, default)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert lifecycle.inference_threads(2) == 2


# --- a batch answers each request as alone (nnctl.use.predict: the serving hot path) ----------------------

@pytest.mark.parametrize("loss", ["cross_entropy", "nll"])
def test_a_pass_finishes_its_groups_together_bit_for_bit_as_each_alone(trained, loss):
    """Predictor.deliver finishes the groups wholly in a pass together (one softmax and top-k for the pass, one
    finiteness check): every group's answers equal its own softmax (or exp, for nll) and top-k in plain
    PyTorch, non-finite rows included."""
    predictor = Predictor.load(trained)
    predictor.loss = loss
    g = torch.Generator().manual_seed(0)
    out = torch.randn(40, 10, generator=g) * 6
    out[[3, 17, 18]] = torch.tensor(float("nan"))
    sizes = [1, 1, 3, 1, 5, 1, 1, 8, 2, 1, 1, 6, 1, 8]
    assert sum(sizes) == 40
    groups = [_group(f"g{i}", n) for i, n in enumerate(sizes)]
    predictor.deliver([(grp, 0, grp.n) for grp in groups], out, 3)
    at = 0
    for grp in groups:
        rows = out[at:at + grp.n]
        probs = rows.exp() if loss == "nll" else torch.softmax(rows, dim=1)
        top_p, top_i = probs.topk(3, dim=1)
        assert torch.equal(grp.top_i, top_i) and torch.equal(grp.top_p.nan_to_num(-1), top_p.nan_to_num(-1))
        assert grp.bad == [i for i in range(grp.n) if not torch.isfinite(rows[i]).all()]
        at += grp.n
    answered = [r.to_dict() for r in predictor.answers(groups, 3).rows]
    assert sum("error" in r for r in answered) == 3 and len(answered) == 40


def test_a_pass_scales_its_pieces_together_as_each_alone(trained):
    """Predictor.forward scales runs of pieces of one dtype and kind together: the model's outputs equal those
    of the pieces scaled one at a time (Preprocessing.from_raw) in plain PyTorch, bit for bit."""
    predictor = Predictor.load(trained)
    g = torch.Generator().manual_seed(1)
    images = [_group(f"i{k}", 1, torch.randint(0, 256, (1, 1, 8, 8), generator=g, dtype=torch.uint8), image=True)
              for k in range(5)]
    raw = [_group(f"u{k}", 3, torch.randint(0, 17, (3, 1, 8, 8), generator=g, dtype=torch.uint8)) for k in range(3)]
    floats = [_group(f"f{k}", 2, torch.rand(2, 1, 8, 8, generator=g)) for k in range(4)]
    groups = images[:3] + raw[:2] + floats[:2] + images[3:] + floats[2:] + raw[2:]
    pieces = [(grp, 0, grp.n) for grp in groups] + [(raw[0], 1, 2)]
    with torch.inference_mode():
        got = predictor.forward(pieces)
        x = torch.cat([predictor.pre.from_raw(grp.x[a:b], image=grp.image) for grp, a, b in pieces])
        want = trained(x).float()
    assert torch.equal(got, want)


def _group(name: str, n: int, x: torch.Tensor | None = None, image: bool = False):
    from nnctl.use.inputs import _Group

    return _Group(name, torch.zeros(n, 1, 8, 8) if x is None else x, image=image)


# --- the page, in a real headless Chromium ------------------------------------------------------------

def _chromium() -> str:
    """Debian's chromium (.ci/run installs it); Playwright drives it, no browser download."""
    pytest.importorskip("playwright.sync_api")
    for path in (os.environ.get("NNCTL_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")):
        if path and os.path.exists(path):
            return path
    if os.environ.get("CI_REQUIRE_CHROMIUM"):
        pytest.fail("chromium is not installed (.ci/run installs it)")
    pytest.skip("chromium is not installed: apt-get install -y --no-install-recommends chromium")


def test_the_page_in_chromium_uploads_a_png_and_shows_the_answer(served, pngs, tmp_path):
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    image = pngs[3]
    want = post_files(served, [image], top_k=5).json()["predictions"][0]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 640})
            outside = []
            page.on("request", lambda req: outside.append(req.url) if not req.url.startswith((served, "blob:", "data:"))
                    else None)
            page.goto(f"{served}/", timeout=30_000)
            page.wait_for_function("document.getElementById('info').children.length > 0", timeout=30_000)
            assert page.inner_text("#title") == want_name(served)
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#results .row", timeout=30_000)
            names = page.locator("#results .name").all_inner_texts()
            probs = page.locator("#results .prob").all_inner_texts()
            widths = page.locator("#results .fill").evaluate_all("els => els.map(e => e.style.width)")
            status = page.inner_text("#status")
            page.screenshot(path=str(tmp_path / "page.png"))
        finally:
            browser.close()
    assert names == want["names"]
    assert probs == [f"{p:.4f}" for p in want["probabilities"]]
    assert [float(w.rstrip("%")) for w in widths] == pytest.approx([p * 100 for p in want["probabilities"]],
                                                                   abs=0.051)  # each bar: its probability
    assert status.startswith("answered in ") and outside == []
    assert (tmp_path / "page.png").stat().st_size > 10_000


def want_name(url: str) -> str:
    return httpx.get(f"{url}/info").json()["name"]


def test_the_serving_package_never_hides_the_function():
    """nnctl/serving/, not nnctl/serve/: importing a submodule sets the package's attribute of its name, which
    would replace the public function nnctl.serve by a module."""
    from nnctl import api

    assert "nnctl.serving.app" in sys.modules  # imported above
    assert nnctl.serve is api.serve and callable(nnctl.serve)
