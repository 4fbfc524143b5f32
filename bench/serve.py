"""nnctl serve under load: dynamic batching against --max-batch 1 and against offline `nnctl.predict`.

    python bench/serve.py            # the measurement (about 5 minutes on 2 cores)
    python bench/serve.py --tiny     # tiny sizes: checks that it works (under a minute)

Two models: configs/digits_cnn.yaml (1x8x8 input), trained 1 epoch into a temporary folder, and a
3x32x32 CNN (four 3x3 convolutions, 32 and 64 channels, two poolings, written here), trained 1 epoch on
synthetic data. Throughput does not depend on what the weights learned.

Two kinds of request, each one sample: a PNG upload (multipart, as the page and `curl -F files=@x.png`
send), and JSON tensors (`{"inputs": [t]}`, t the recorded input shape as nested lists of float32 values
with 4 decimals). The offline limit is `nnctl.predict` in this process on the same inputs (the PNG
files, decoded by the same decoder; or the same tensors), batch 256, no process start: the better of 1
and 2 torch threads, once in every round (the median of the rounds). The client is a bounded one on loopback: C keep-alive connections (C = 1, 8, 64
concurrent clients), each sending its next request when the last is answered, until a fixed number of
requests is answered; a minimal asyncio HTTP/1.1 client (requests prepared beforehand), so that on 2
shared cores the client takes as little CPU from the server as it can. Latency: from writing a request
to reading its whole answer. Both servers (`nnctl serve` with --max-batch 32 --max-wait-ms 5, and with
--max-batch 1; torch's threads as nnctl serve sets them: the cores less one) run at once, idle when not
measured, and are measured in alternating order, `--runs` rounds (median throughput, latencies of all
rounds), so load from elsewhere falls on both. Each row also gives the server's CPU time a request (all
its threads, from /proc; in brackets its main thread's, the event loop's: HTTP, the app, the answers),
the median of the rounds: what batching cannot share between requests.

Targets (issue 22): at 64 clients batching gives at least 3x the throughput of --max-batch 1 and at least
50% of the offline throughput; at 1 client p99 latency is below 4x p50. The table of targets also gives
offline / --max-batch 1 at 64 clients: the most batching could give (it cannot beat offline).
"""

from __future__ import annotations

import asyncio
import json
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


def write_tensors(shape: list[int], n: int) -> list:
    """n float32 samples of the shape, with 4 decimals (what the JSON requests carry, exactly)."""
    import torch

    rng = np.random.default_rng(1)
    return [torch.from_numpy(np.round(rng.random(shape), 4).astype(np.float32)) for _ in range(n)]


def offline(model, inputs: list) -> tuple[float, int]:
    """nnctl.predict on the inputs (batch 256), once with 1 and once with 2 torch threads: the better, in
    samples a second (the ceiling), and its threads."""
    import nnctl
    import torch

    best, threads = 0.0, 0
    default = torch.get_num_threads()
    try:
        for n in sorted({1, min(2, default)}):
            torch.set_num_threads(n)
            t0 = time.perf_counter()
            preds = nnctl.predict(model, inputs, batch_size=256)
            rate = len(inputs) / (time.perf_counter() - t0)
            assert not preds.failed
            if rate > best:
                best, threads = rate, n
    finally:
        torch.set_num_threads(default)
    return best, threads


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


def json_request_bytes(t, top_k: int = 1) -> bytes:
    body = json.dumps({"inputs": [t.double().numpy().round(4).tolist()], "top_k": top_k}).encode()
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
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


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) of a process so far: (its main thread, the event loop's; all its threads)
    from /proc (Linux; nan elsewhere)."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        main = total = 0.0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            seconds = (int(fields[11]) + int(fields[12])) / tick
            total += seconds
            main += seconds if int(tid) == pid else 0.0
        return main, total
    except (OSError, ValueError, AttributeError):
        return float("nan"), float("nan")


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


# --- the measurement -----------------------------------------------------------------------------

BATCHING, ONE = "batching (--max-batch 32)", "--max-batch 1"


def measure(name: str, run: Path, shape: list[int], folder: Path, args) -> list[tuple[str, str, dict]]:
    """Both request kinds for one model: [(kind, table text, summary)]."""
    import nnctl

    n = 64 if args.quick else 512
    files = write_pngs(folder / name.split()[0], shape, n)
    tensors = write_tensors(shape, n)
    kinds = {"one PNG a request": ([request_bytes(f.read_bytes()) for f in files], [str(f) for f in files]),
             "JSON tensors, one sample a request": ([json_request_bytes(t) for t in tensors], tensors)}
    model = nnctl.load(run)
    for _, inputs in kinds.values():
        nnctl.predict(model, inputs[:8])  # warm-up
    limits: dict[str, list[tuple[float, int]]] = {kind: [] for kind in kinds}
    totals = {1: 40, 8: 80, 64: 192} if args.quick else {1: 600, 8: 1200, 64: 2400}
    servers = {BATCHING: start_server(run, 32), ONE: start_server(run, 1)}
    results: dict[tuple[str, str, int], list] = {}
    try:
        for proc, port in servers.values():
            wait_ready(proc, port)
        for _, port in servers.values():  # warm each server's connection handling, decoder and parser
            for requests, _ in kinds.values():
                asyncio.run(load(port, requests, 8, 64))
        order = list(servers)
        for r in range(args.runs):
            for kind, (_, inputs) in kinds.items():  # the offline limit in every round too: the same load falls on it
                limits[kind].append(offline(model, inputs))
            for k, clients in enumerate(totals):
                for kind, (requests, _) in kinds.items():
                    for variant in (order if (r + k) % 2 == 0 else order[::-1]):
                        proc, port = servers[variant]
                        before = cpu_seconds(proc.pid)
                        wall, lat, bad = asyncio.run(load(port, requests, clients, totals[clients]))
                        after = cpu_seconds(proc.pid)
                        cell = results.setdefault((kind, variant, clients), [[], [], 0, [], []])
                        cell[0].append(totals[clients] / wall)
                        cell[1].extend(lat)
                        cell[2] += bad
                        cell[3].append((after[1] - before[1]) / totals[clients] * 1e6)  # server CPU µs a request
                        cell[4].append((after[0] - before[0]) / totals[clients] * 1e6)  # of which the event loop
                        print(f"  {name}, {kind}: {variant}, {clients} clients: {totals[clients] / wall:.0f} req/s",
                              file=sys.stderr, flush=True)
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    out = []
    for kind in kinds:
        rows = []
        for (kd, variant, clients), (rates, lat, bad, cpu, loop) in results.items():
            if kd != kind:
                continue
            rows.append([variant, clients, totals[clients] * len(rates), round(common.median(rates), 1),
                         round(percentile(lat, 50) * 1000, 2), round(percentile(lat, 95) * 1000, 2),
                         round(percentile(lat, 99) * 1000, 2), bad,
                         f"{common.median(cpu):.0f} ({common.median(loop):.0f})"])
        rows.sort(key=lambda row: (row[1], row[0] != BATCHING))
        limit = common.median([rate for rate, _ in limits[kind]])
        threads = "/".join(str(t) for t in sorted({t for _, t in limits[kind]}))
        rows.append([f"offline nnctl.predict (batch 256, {threads} thread{'' if threads == '1' else 's'})", "-",
                     n * len(limits[kind]), round(limit, 1), "-", "-", "-", 0, "-"])
        text = common.table(f"nnctl serve, {name}: {kind}", ["variant", "clients", "requests", "req/s", "p50 ms",
                                                              "p95 ms", "p99 ms", "not 200",
                                                              "server CPU µs/req (event loop)"], rows)
        b64 = common.median(results[(kind, BATCHING, 64)][0])
        one64 = common.median(results[(kind, ONE, 64)][0])
        lat1 = results[(kind, BATCHING, 1)][1]
        out.append((kind, text, {"batch/one": b64 / one64, "batch/offline": b64 / limit, "offline/one": limit / one64,
                                 "p99/p50": percentile(lat1, 99) / percentile(lat1, 50)}))
    return out


def main() -> None:
    args = common.parser(__doc__.splitlines()[0], runs=3).parse_args()
    args.runs = 1 if args.quick else args.runs
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    load_before = os.getloadavg()
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="nnctl-bench-serve-") as tmp:
        folder = Path(tmp)
        for name, (run, shape) in train_models(folder, args.quick).items():
            for kind, _, s in measure(name, run, shape, folder, args):
                what = f"{name}, {kind.split(',')[0].replace('one ', '')}"
                verdicts += [[what, "batching / --max-batch 1 at 64 clients", f"{s['batch/one']:.2f}x",
                              common.verdict(s["batch/one"], 3.0, lower_is_better=False)],
                             [what, "offline / --max-batch 1 at 64 clients (the most batching can give)",
                              f"{s['offline/one']:.2f}x", "-"],
                             [what, "batching / offline predict at 64 clients", f"{s['batch/offline'] * 100:.0f}%",
                              common.verdict(s["batch/offline"], 0.5, lower_is_better=False)],
                             [what, "p99 / p50 latency at 1 client", f"{s['p99/p50']:.2f}x",
                              common.verdict(s["p99/p50"], 4.0)]]
    loads = "load average {:.2f} before, {:.2f} after".format(load_before[0], os.getloadavg()[0])
    common.table("nnctl serve: the targets of issue 22", ["model, request", "measure", "value", "target"], verdicts,
                 note=f"{common.machine()}; {loads}; `python bench/serve.py{' --tiny' if args.quick else ''}`")


if __name__ == "__main__":
    main()
