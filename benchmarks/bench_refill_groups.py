"""How a refill step is split into width groups: the serving core (no HTTP) under a closed loop of
concurrent clients, for several per-call costs ``call_tokens`` (see core.runtime.engine.width_groups).

    .venv/bin/python benchmarks/bench_refill_groups.py --checkpoint runs/minilm --threshold 0.7 [--runtime onnx]
    .venv/bin/python benchmarks/bench_refill_groups.py --checkpoint runs/minilm --lags 0.25,0.5,1 [--runtime onnx]

For each value: requests/s, layer calls, rows per call, padded / real tokens and layer seconds per
padded token; beside them `deebert predict`'s refill engine on the same texts (length-sorted windows).
With --lags, instead: requests/s and p50/p99 latency of the serving core for each refill lag (how many
batches of newer rows may pass a waiting row before its part-full queue runs: BatchingServer's
``max_lag`` over its batch size), at the backend's own call_tokens, and at full depth (threshold 0) for
reference.
Values are interleaved and repeated, the fastest run kept."""
from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import torch

from deebert_cli.core.runtime.engine import backend_for
from deebert_cli.core.runtime.rules import ExitRule
from deebert_cli.core.runtime.stream import load_for_inference, predict_stream
from deebert_cli.core.serve.batching import BatchingServer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "movie_snippets" / "test.jsonl"
PACKAGED = Path(__file__).resolve().parents[1] / "deebert_cli" / "data" / "movie_snippets" / "test.jsonl"
BATCH = 32  # rows per layer step, for the serving core and predict's refill engine alike


def counted(backend) -> dict:
    """Wrap backend.layer to count calls, rows, padded and real tokens, and its seconds (the onnx
    runtime's backend is the loaded model itself: :func:`serve_core` takes the wrapper off again)."""
    st = {"seconds": 0.0, "calls": 0, "rows": 0, "padded": 0, "real": 0}
    layer = backend.layer

    def wrapped(i, hidden, mask, score=False):
        t = time.perf_counter()
        out = layer(i, hidden, mask, score)
        st["seconds"] += time.perf_counter() - t
        st["calls"] += 1
        st["rows"] += hidden.shape[0]
        st["padded"] += hidden.shape[0] * hidden.shape[1]
        st["real"] += int(mask.sum())
        return out

    backend.layer = wrapped
    return st


def serve_core(ckpt, rule, texts, clients: int, call_tokens: int | None = None, lag: float | None = None) -> tuple:
    """-> (wall seconds, layer-call stats, sorted request latencies)."""
    srv = BatchingServer(ckpt, rule, "cpu", batch_size=BATCH, max_lag=None if lag is None else max(1, round(BATCH * lag)))
    be = srv.engine.backend
    default = be.call_tokens
    if call_tokens is not None:
        be.call_tokens = call_tokens
    st = counted(be)
    srv.start()
    nxt, lock, lat = [0], threading.Lock(), []

    def client():
        while True:
            with lock:
                k = nxt[0]
                nxt[0] += 1
            if k >= len(texts):
                return
            t = time.perf_counter()
            srv.submit([texts[k]]).future.result()
            lat.append(time.perf_counter() - t)

    t = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    srv.drain(10)
    del be.layer  # the instance attribute set by counted(): back to the class's method
    be.call_tokens = default
    return wall, st, sorted(lat)


def lags(ckpt, texts, args) -> None:
    """Throughput and latency of the serving core for each refill lag (--lags)."""
    L = ckpt.model.num_layers
    # full depth (at the backend's own lag) for reference, then the threshold at each lag
    configs = [("full depth", 0.0, None)] + [(f"lag {float(v):g}", args.threshold, float(v)) for v in args.lags.split(",")]
    best: dict = {}
    for _ in range(args.repeats):
        for name, thr, lag in configs:
            wall, _, lat = serve_core(ckpt, ExitRule([thr] * L), texts, args.clients, lag=lag)
            if name not in best or wall < best[name][0]:
                best[name] = (wall, lat)
    print(f"{args.checkpoint}, runtime {args.runtime}{' ' + args.onnx_precision if args.runtime == 'onnx' else ''}, "
          f"threshold {args.threshold}, {len(texts)} single-text requests, {args.clients} client threads, batch size {BATCH}, "
          f"fastest of {args.repeats}; lag = batches of newer rows that may pass a waiting row")
    print(f"{'configuration':>14s} {'req/s':>7s} {'p50 ms':>7s} {'p99 ms':>7s}")
    for name, _, _ in configs:
        wall, lat = best[name]
        q = lambda p: 1000 * lat[min(len(lat) - 1, int(p * len(lat)))]  # noqa: E731
        print(f"{name:>14s} {len(texts) / wall:7.1f} {q(0.5):7.1f} {q(0.99):7.1f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="runs/minilm")
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--runtime", default="torch")
    ap.add_argument("--onnx-precision", default="fp32")
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--values", default="8,16,32,64,128,256")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--lags", default=None, help="compare refill lags (fractions of a batch) instead of call_tokens")
    args = ap.parse_args()
    src = SHARED if SHARED.is_file() else PACKAGED
    texts = [json.loads(line)["text"] for line in src.read_text().splitlines() if line.strip()][: args.n]
    opts = {"precision": args.onnx_precision} if args.runtime == "onnx" else {}
    ckpt = load_for_inference(args.checkpoint, args.runtime, **opts)
    if args.lags:
        return lags(ckpt, texts, args)
    default = backend_for(ckpt, "cpu").call_tokens
    rule = ExitRule([args.threshold] * ckpt.model.num_layers)
    values = [int(v) for v in args.values.split(",")]
    best: dict = {}
    for _ in range(args.repeats):
        for v in values:
            wall, st, _ = serve_core(ckpt, rule, texts, args.clients, v)
            if v not in best or wall < best[v][0]:
                best[v] = (wall, st)
        t = time.perf_counter()
        list(predict_stream(ckpt, texts, rule, "cpu", batch_size=BATCH, engine="refill"))
        best["predict"] = min(best.get("predict", (1e9,)), (time.perf_counter() - t,), key=lambda x: x[0])
    print(f"{args.checkpoint}, runtime {args.runtime}{' ' + args.onnx_precision if args.runtime == 'onnx' else ''}, "
          f"threshold {args.threshold}, {len(texts)} single-text requests, {args.clients} client threads, "
          f"torch threads {torch.get_num_threads()}, fastest of {args.repeats}")
    print(f"the backend's call_tokens: {default}")
    print(f"{'call_tokens':>11s} {'req/s':>7s} {'calls':>6s} {'rows/call':>9s} {'padded/real':>11s} {'us/padded token':>15s}")
    for v in values:
        wall, st = best[v]
        print(f"{v:11d} {len(texts) / wall:7.1f} {st['calls']:6d} {st['rows'] / st['calls']:9.1f} "
              f"{st['padded'] / st['real']:11.2f} {st['seconds'] / st['padded'] * 1e6:15.1f}")
    print(f"deebert predict --engine refill --batch-size 32 on the same texts: {len(texts) / best['predict'][0]:.1f} ex/s")


if __name__ == "__main__":
    main()
