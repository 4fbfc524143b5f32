"""nnctl serve under load: dynamic batching against --max-batch 1 and against offline `nnctl.predict`.

    python bench/serve.py            # the measurement (a few minutes on 2 cores)
    python bench/serve.py --tiny     # tiny sizes: checks that it works (under a minute)

Two models: configs/digits_cnn.yaml (1x8x8 input), trained 1 epoch into a temporary folder, and a
3x32x32 CNN (four 3x3 convolutions, 32 and 64 channels, two poolings, written here), trained 1 epoch on
synthetic data. Throughput does not depend on what the weights learned.

Each request uploads one PNG (multipart), as the page and `curl -F files=@x.png` do; the same PNG files
are the offline limit's inputs: `nnctl.predict(run, files)` in this process (batch 256, files decoded by
the same decoder; process start not counted, so the limit is strict). The client is a bounded one on
loopback: C keep-alive connections (C = 1, 8, 64 concurrent clients), each sending its next request when
the last is answered, until a fixed number of requests is answered; a minimal asyncio HTTP/1.1 client
(requests prepared beforehand), so that on 2 shared cores the client takes as little CPU from the server
as it can. Latency: from writing a request to reading its whole answer. Both servers (`nnctl serve` with
--max-batch 32 --max-wait-ms 5, and with --max-batch 1) run at once, idle when not measured, and are
measured in alternating order, so load from elsewhere falls on both.

Targets (issue 22): at 64 clients batching gives at least 3x the throughput of --max-batch 1 and at least
50% of the offline throughput; at 1 client p99 latency is below 4x p50.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import common

ROOT = common.ROOT

CNN32 = {
    "name": "cnn32", "seed": 0,
    "model": {"input_shape": [3, 32, 32], "layers": [
        {"Conv2d": {"out_channels": 32, "kernel_size": 3, "padding": 1}}, "ReLU",
        {"Conv2d": {"out_channels": 32, "kernel_size": 3, "padding": 1}}, "ReLU", {"MaxPool2d": 2},
        {"Conv2d": {"out_channels": 64, "kernel_size": 3, "padding": 1}}, "ReLU",
        {"Conv2d": {"out_channels": 64, "kernel_size": 3, "padding": 1}}, "ReLU", {"MaxPool2d": 2},
        "Flatten", {"Linear": {"out_features": 128}}, "ReLU", {"Linear": {"out_features": 10}}]},
    "data": {"source": "synthetic", "classes": 10, "size": 2000},
    "train": {"loss": "cross_entropy", "epochs": 1, "batch_size": 64},
}
BOUNDARY = b"nnctlbench"


# --- models and inputs --------------------------------------------------------------------------

def train_models(folder: Path, quick: bool) -> dict[str, tuple[Path, list[int]]]:
    import nnctl

    out = {}
    digits = nnctl.train(str(ROOT / "configs" / "digits_cnn.yaml"), out=str(folder / "digits-cnn"),
                         overrides=["train.epochs=1"])
    out["digits CNN (1x8x8)"] = (digits.run_dir, [1, 8, 8])
    cfg = dict(CNN32, data={**CNN32["data"], "size": 256 if quick else 2000})
    cnn = nnctl.train(cfg, out=str(folder / "cnn32"))
    out["CNN 3x32x32"] = (cnn.run_dir, [3, 32, 32])
    return out


def write_pngs(folder: Path, shape: list[int], n: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        c, h, w = shape
        px = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
        p = folder / f"{i:04d}.png"
        Image.fromarray(px[:, :, 0] if c == 1 else px, "L" if c == 1 else "RGB").save(p)
        paths.append(p)
    return paths


def offline(run: Path, files: list[Path], runs: int) -> float:
    """nnctl.predict on the files (batch 256): samples a second, the median of `runs`."""
    import nnctl

    model = nnctl.load(run)
    nnctl.predict(model, files[:8])  # warm-up
    took = []
    for _ in range(runs):
        t0 = time.perf_counter()
        preds = nnctl.predict(model, [str(f) for f in files], batch_size=256)
        took.append(time.perf_counter() - t0)
        assert not preds.failed
    return len(files) / common.median(took)


# --- servers and the client ----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, max_batch: int) -> tuple[subprocess.Popen, int]:
    """`nnctl serve` in a subprocess (not waited for: start two, then wait_ready each)."""
    port = free_port()
    cmd = [sys.executable, "-m", "nnctl", "serve", str(run), "--port", str(port), "--max-batch", str(max_batch),
           "--max-wait-ms", "5"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), port


def wait_ready(proc: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"nnctl serve exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            status, _ = asyncio.run(_one(port, b"GET /ready HTTP/1.1\r\nHost: b\r\n\r\n"))
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("nnctl serve was not ready within 120 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def request_bytes(png: bytes, top_k: int = 1) -> bytes:
    body = (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + png + b"\r\n--" + BOUNDARY + b"--\r\n")
    head = (f"POST /predict?top_k={top_k} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY.decode()}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = next(int(v) for k, _, v in (line.partition(b":") for line in lines[1:]) if k.lower() == b"content-length")
    return status, await reader.readexactly(length)


async def _one(port: int, raw: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        writer.write(raw)
        return await asyncio.wait_for(_read_answer(reader), 30)
    finally:
        writer.close()


async def load(port: int, requests: list[bytes], clients: int, total: int) -> tuple[float, list[float], int]:
    """`clients` connections send `total` requests in all, each its next when the last is answered:
    (wall seconds, latencies in seconds, answers that were not 200)."""
    latencies: list[float] = []
    bad = [0]
    counter = iter(range(total))

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in counter:
                t0 = time.perf_counter()
                writer.write(requests[i % len(requests)])
                status, _ = await asyncio.wait_for(_read_answer(reader), 60)
                latencies.append(time.perf_counter() - t0)
                bad[0] += status != 200
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*[client() for _ in range(clients)]), 600)
    return time.perf_counter() - t0, latencies, bad[0]


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


# --- the measurement -----------------------------------------------------------------------------

def measure(name: str, run: Path, shape: list[int], folder: Path, args) -> tuple[str, dict]:
    files = write_pngs(folder / name.split()[0], shape, 64 if args.quick else 512)
    requests = [request_bytes(f.read_bytes()) for f in files]
    limit = offline(run, files, 1 if args.quick else 3)
    totals = {1: 40, 8: 80, 64: 192} if args.quick else {1: 400, 8: 1500, 64: 3000}
    servers = {"batching (--max-batch 32)": start_server(run, 32), "--max-batch 1": start_server(run, 1)}
    results: dict[tuple[str, int], list] = {}
    try:
        for proc, port in servers.values():
            wait_ready(proc, port)
        for port_proc in servers.values():  # warm each server's connection handling and decoder
            asyncio.run(load(port_proc[1], requests, 8, 64))
        order = list(servers)
        for k, clients in enumerate(totals):
            for variant in (order if k % 2 == 0 else order[::-1]):
                wall, lat, bad = asyncio.run(load(servers[variant][1], requests, clients, totals[clients]))
                results[(variant, clients)] = [wall, lat, bad]
                print(f"  {name}: {variant}, {clients} clients: {totals[clients] / wall:.0f} req/s", file=sys.stderr,
                      flush=True)
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    rows = []
    for (variant, clients), (wall, lat, bad) in results.items():
        rows.append([variant, clients, totals[clients], round(totals[clients] / wall, 1),
                     round(percentile(lat, 50) * 1000, 2), round(percentile(lat, 95) * 1000, 2),
                     round(percentile(lat, 99) * 1000, 2), bad])
    rows.sort(key=lambda r: (r[1], r[0] != "batching (--max-batch 32)"))
    rows.append(["offline nnctl.predict (batch 256)", "-", len(files), round(limit, 1), "-", "-", "-", 0])
    text = common.table(f"nnctl serve, {name}: one PNG a request", ["variant", "clients", "requests", "req/s",
                                                                     "p50 ms", "p95 ms", "p99 ms", "not 200"], rows)
    b64 = totals[64] / results[("batching (--max-batch 32)", 64)][0]
    one64 = totals[64] / results[("--max-batch 1", 64)][0]
    lat1 = results[("batching (--max-batch 32)", 1)][1]
    summary = {"batch/one": b64 / one64, "batch/offline": b64 / limit,
               "p99/p50": percentile(lat1, 99) / percentile(lat1, 50)}
    return text, summary


def main() -> None:
    args = common.parser(__doc__.splitlines()[0], runs=1).parse_args()
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    texts, verdicts = [], []
    with tempfile.TemporaryDirectory(prefix="nnctl-bench-serve-") as tmp:
        folder = Path(tmp)
        for name, (run, shape) in train_models(folder, args.quick).items():
            text, s = measure(name, run, shape, folder, args)
            texts.append(text)
            verdicts += [[name, "batching / --max-batch 1 at 64 clients", f"{s['batch/one']:.2f}x",
                          common.verdict(s["batch/one"], 3.0, lower_is_better=False)],
                         [name, "batching / offline predict at 64 clients", f"{s['batch/offline'] * 100:.0f}%",
                          common.verdict(s["batch/offline"], 0.5, lower_is_better=False)],
                         [name, "p99 / p50 latency at 1 client", f"{s['p99/p50']:.2f}x",
                          common.verdict(s["p99/p50"], 4.0)]]
    common.table("nnctl serve: the targets of issue 22", ["model", "measure", "value", "target"], verdicts,
                 note=f"{common.machine()}; `python bench/serve.py{' --tiny' if args.quick else ''}`")


if __name__ == "__main__":
    main()
