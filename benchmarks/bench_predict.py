"""Early exit vs full depth, batch 1 vs batch 32, shrink vs refill: measured side by side in one run.

    .venv/bin/python benchmarks/bench_predict.py --checkpoint runs/minilm --threshold 0.3

Each configuration runs the same texts; configurations are interleaved and repeated (fastest kept) so
that drift on a shared machine hits them alike. Prints:
  (a) wall-clock speedup of early exit over full depth, divided by the ideal layer-count speedup
      (L / mean exit layer), at batch 1 and at batch 32;
  (b) batched early-exit throughput divided by batch-1 early-exit throughput;
  (c) the refill engine's throughput divided by the shrinking batch's;
  (d) (b) again with the refill engine reading --server-window lines at a time (default 64) instead of
      1,024: predict sorts each window by length, and a server whose N clients each send one text holds
      at most N texts to sort, so this is the batch-32 / batch-1 ratio such a server can reach before any
      HTTP cost (benchmarks/bench_serve.py's (b)/(c) at N clients).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from deebert_cli.core.runtime.rules import ExitRule
from deebert_cli.core.runtime.stream import PredictStats, load_for_inference, predict_stream

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "movie_snippets" / "test.jsonl"
PACKAGED = Path(__file__).resolve().parents[1] / "deebert_cli" / "data" / "movie_snippets" / "test.jsonl"


def load_texts(path: Path, n: int) -> list:
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    return [r["text"] for r in rows[:n]]


def timed(ckpt, texts, thr, batch_size, engine="shrink", window=1024):
    L = ckpt.model.num_layers
    stats = PredictStats(L)
    t = time.perf_counter()
    for _ in predict_stream(ckpt, texts, ExitRule([thr] * L), "cpu", batch_size=batch_size, engine=engine,
                            window=max(window, batch_size), stats=stats):
        pass
    return time.perf_counter() - t, stats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="runs/minilm")
    ap.add_argument("--threshold", type=float, default=0.3, help="normalized entropy threshold")
    ap.add_argument("--n", type=int, default=400, help="texts (from the movie-review test split)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs per configuration; the fastest is kept")
    ap.add_argument("--runtime", default="torch", help="torch or onnx (the checkpoint's `deebert export`)")
    ap.add_argument("--onnx-precision", default="fp32", help="with --runtime onnx: fp32 or int8")
    ap.add_argument("--server-window", type=int, default=64, help="lines a server with this many clients can sort, for (d)")
    args = ap.parse_args()
    src = SHARED if SHARED.is_file() else PACKAGED
    texts = load_texts(src, args.n)
    opts = {"precision": args.onnx_precision} if args.runtime == "onnx" else {}
    ckpt = load_for_inference(args.checkpoint, args.runtime, **opts)
    L = ckpt.model.num_layers
    configs = {
        "full depth, batch 1": (0.0, 1, "shrink"),
        "early exit, batch 1": (args.threshold, 1, "shrink"),
        "full depth, batch 32": (0.0, 32, "shrink"),
        "early exit, batch 32 (shrink)": (args.threshold, 32, "shrink"),
        "early exit, batch 32 (refill)": (args.threshold, 32, "refill"),
        f"early exit, batch 32 (refill), window {args.server_window}": (args.threshold, 32, "refill", args.server_window),
    }
    timed(ckpt, texts[:64], args.threshold, 32)  # warm-up
    times = {k: [] for k in configs}
    stats = {}
    for _ in range(args.repeats):
        for name, config in configs.items():
            sec, st = timed(ckpt, texts, *config)
            times[name].append(sec)
            stats[name] = st
    med = {k: min(v) for k, v in times.items()}  # fastest run: least disturbed by other load
    print(f"checkpoint {args.checkpoint} ({L} layers), {len(texts)} texts from {src.parent.name}/{src.name}, "
          f"threshold {args.threshold} (normalized entropy), runtime {args.runtime}"
          f"{' ' + args.onnx_precision if args.runtime == 'onnx' else ''}, torch threads {torch.get_num_threads()}, "
          f"fastest of {args.repeats} interleaved runs")
    print(f"{'configuration':44s} {'seconds':>8s} {'ex/s':>8s} {'mean exit':>10s}")
    for k in configs:
        print(f"{k:44s} {med[k]:8.2f} {len(texts) / med[k]:8.1f} {stats[k].mean_exit_layer:10.2f}")
    mean_exit = stats["early exit, batch 1"].mean_exit_layer
    ideal = L / mean_exit
    s1 = med["full depth, batch 1"] / med["early exit, batch 1"]
    s32 = med["full depth, batch 32"] / med["early exit, batch 32 (shrink)"]
    s32r = med["full depth, batch 32"] / med["early exit, batch 32 (refill)"]
    print(f"ideal layer-count speedup L / mean exit layer = {L} / {mean_exit:.2f} = {ideal:.2f}x")
    print(f"(a) batch 1:  speedup {s1:.2f}x, measured / ideal = {s1 / ideal:.2f}")
    print(f"(a) batch 32: speedup {s32:.2f}x (shrink), measured / ideal = {s32 / ideal:.2f}; "
          f"refill {s32r:.2f}x, measured / ideal = {s32r / ideal:.2f}")
    print(f"(b) early-exit throughput, batch 32 / batch 1 = {med['early exit, batch 1'] / med['early exit, batch 32 (shrink)']:.2f}x")
    print(f"(c) refill / shrink throughput at batch 32 = {med['early exit, batch 32 (shrink)'] / med['early exit, batch 32 (refill)']:.2f}x")
    print(f"(d) early-exit throughput, batch 32 (refill) with a {args.server_window}-line window / batch 1 = "
          f"{med['early exit, batch 1'] / med[f'early exit, batch 32 (refill), window {args.server_window}']:.2f}x")


if __name__ == "__main__":
    main()
