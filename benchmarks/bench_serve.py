"""`deebert serve` under load: a lean asyncio HTTP/1.1 client on loopback, 1 / 8 / 64 concurrent clients.

    .venv/bin/python benchmarks/bench_serve.py --checkpoint runs/minilm [--threshold T]

Three servers run side by side on 127.0.0.1 (free ports), each sent the same single-text requests
(movie-review test texts):
  (a) full depth (--threshold 0), batching across requests;
  (b) the recommended threshold (analyze's, for --max-drop points, unless --threshold is given), batching
      across requests (the refill engine);
  (c) the same threshold with --no-batching (each request alone, i.e. batch 1 here).
Runs are interleaved and repeated (the fastest kept), so drift on a shared machine hits them alike.
Prints throughput (requests/s = texts/s) and p50/p99 latency, then the ratios: (b)/(a) throughput against
the ideal layer speedup L / mean exit layer, and (b)/(c)."""
from __future__ import annotations

import argparse
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

import httpx

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "movie_snippets" / "test.jsonl"
PACKAGED = Path(__file__).resolve().parents[1] / "deebert_cli" / "data" / "movie_snippets" / "test.jsonl"


def load_texts(path: Path, n: int) -> list:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["text"] for r in rows[:n]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recommended_threshold(checkpoint: str, max_drop: float) -> float:
    """What `deebert analyze` recommends for a ``max_drop``-point accuracy budget."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "analyze.json"
        subprocess.run([sys.executable, "-m", "deebert_cli", "analyze", "--checkpoint", checkpoint, "--max-drop",
                        str(max_drop), "--json", str(out), "--device", "cpu"], check=True, capture_output=True)
        return float(json.loads(out.read_text())["recommendation"]["threshold"])


class Server:
    def __init__(self, checkpoint: str, *args: str):
        # serve watches 1% of the requests by default (--watch-rate 0.01); this file's figures were measured
        # without watching, so a server runs with --watch-rate 0 unless its row is about watching (passes one)
        if "--watch-rate" not in args:
            args = ("--watch-rate", "0", *args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "deebert_cli", "serve", "--checkpoint", checkpoint, "--device", "cpu",
               "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server on port {self.port} exited")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server on port {self.port} did not come up")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Connection:
    """A minimal HTTP/1.1 keep-alive client for POST /predict. The client shares the machine's CPUs with
    the servers, so the load generator is kept lean (as wrk or hey would be) rather than httpx's
    AsyncClient, whose per-request Python work competes with the server it measures."""

    def __init__(self, host: str, port: int):
        self.host, self.port, self.reader, self.writer = host, port, None, None

    async def post_json(self, path: str, body: dict) -> tuple:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        return status, json.loads(await self.reader.readexactly(length))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def load(url: str, texts: list, clients: int) -> dict:
    """``clients`` concurrent clients (one keep-alive connection each), each sending one text per request
    until every text is sent."""
    latencies, layers, nxt = [], [], 0
    host, port = url.removeprefix("http://").split(":")
    conns = [Connection(host, int(port)) for _ in range(clients)]

    async def one_client(conn):
        nonlocal nxt
        while nxt < len(texts):
            text = texts[nxt]
            nxt += 1
            t = time.perf_counter()
            status, out = await conn.post_json("/predict", {"inputs": text})
            latencies.append(time.perf_counter() - t)
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {out}")
            layers.append(out[0]["exit_layer"])

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(one_client(c) for c in conns))
    finally:
        for c in conns:
            c.close()
    wall = time.perf_counter() - t0
    latencies.sort()
    q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))]
    return {"rps": len(texts) / wall, "p50": q(0.50), "p99": q(0.99), "mean_exit": sum(layers) / len(layers)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="runs/minilm")
    ap.add_argument("--threshold", type=float, default=None, help="normalized entropy; default: analyze's recommendation")
    ap.add_argument("--max-drop", type=float, default=0.5, help="accuracy budget (points) for the recommendation")
    ap.add_argument("--n", type=int, default=400, help="requests per run (one test text each)")
    ap.add_argument("--clients", default="1,8,64")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per configuration; the fastest is kept")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--runtime", default="torch", help="the servers' --runtime (torch or onnx)")
    ap.add_argument("--onnx-precision", default="fp32", help="with --runtime onnx: fp32 or int8")
    ap.add_argument("--max-lag", type=int, default=None, help="the batching servers' --max-lag (default: theirs)")
    args = ap.parse_args()
    src = SHARED if SHARED.is_file() else PACKAGED
    texts = load_texts(src, args.n)
    thr = args.threshold if args.threshold is not None else recommended_threshold(args.checkpoint, args.max_drop)
    bs = ["--batch-size", str(args.batch_size), "--runtime", args.runtime]
    if args.runtime == "onnx":
        bs += ["--onnx-precision", args.onnx_precision]
    lag = ["--max-lag", str(args.max_lag)] if args.max_lag is not None else []
    servers = {
        "(a) full depth, batching": Server(args.checkpoint, "--threshold", "0", *bs, *lag),
        "(b) threshold, batching": Server(args.checkpoint, "--threshold", str(thr), *bs, *lag),
        "(c) threshold, each alone": Server(args.checkpoint, "--threshold", str(thr), "--no-batching", *bs),
    }
    clients = [int(c) for c in args.clients.split(",")]
    try:
        for s in servers.values():
            s.wait_ready()
        L = httpx.get(servers["(a) full depth, batching"].url + "/info").json()["num_layers"]
        for s in servers.values():  # warm-up
            asyncio.run(load(s.url, texts[:32], 8))
        best: dict = {}
        for _ in range(args.repeats):
            for c in clients:
                for name, s in servers.items():
                    r = asyncio.run(load(s.url, texts, c))
                    if (name, c) not in best or r["rps"] > best[name, c]["rps"]:
                        best[name, c] = r
    finally:
        for s in servers.values():
            s.stop()
    import torch

    print(f"checkpoint {args.checkpoint}, {len(texts)} single-text requests from {src.parent.name}/{src.name}, "
          f"threshold {thr:g} (normalized entropy), batch size {args.batch_size}, runtime {args.runtime}"
          f"{' ' + args.onnx_precision if args.runtime == 'onnx' else ''}"
          f"{f', max lag {args.max_lag}' if args.max_lag is not None else ''}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, fastest of {args.repeats} interleaved runs")
    print(f"{'configuration':28s} {'clients':>7s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'mean exit':>9s}")
    for c in clients:
        for name in servers:
            r = best[name, c]
            print(f"{name:28s} {c:7d} {r['rps']:8.1f} {1000 * r['p50']:8.1f} {1000 * r['p99']:8.1f} {r['mean_exit']:9.2f}")
    mean_exit = best["(b) threshold, batching", clients[0]]["mean_exit"]
    ideal = L / mean_exit
    print(f"ideal layer speedup L / mean exit layer = {L} / {mean_exit:.2f} = {ideal:.2f}x")
    for c in clients:
        a, b, cc = best["(a) full depth, batching", c], best["(b) threshold, batching", c], best["(c) threshold, each alone", c]
        sp = b["rps"] / a["rps"]
        print(f"{c:3d} clients: (b)/(a) throughput {sp:.2f}x = {sp / ideal:.2f} of ideal; p99 (b) {1000 * b['p99']:.1f} ms "
              f"vs (a) {1000 * a['p99']:.1f} ms; (b)/(c) throughput {b['rps'] / cc['rps']:.2f}x")


if __name__ == "__main__":
    main()
