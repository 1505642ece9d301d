"""Watching the stored guarantee in production (`deebert serve --watch-rate`): detection and cost.

    # (a) detection: in-distribution traffic (movie test texts), then shifted traffic (SMS texts)
    .venv/bin/python benchmarks/bench_watch.py detect --checkpoint CKPT [--rates 0.01,0.05] [--replays 200]
    # (b) cost: throughput and p99 at 64 clients, watching off / 1% / 5%, torch and onnx side by side
    .venv/bin/python benchmarks/bench_watch.py cost --checkpoint CKPT [--n 300] [--clients 64]

(a) runs each text once through the checkpoint's stored exit setting and once to full depth and keeps one
bit per text ("the exit disagreed with the final layer"): the disagreement at full sampling. Then it
replays traffic many times, cheaply, on those cached bits, through the code the server runs
(:class:`deebert_cli.core.model.watch.Sampler` picks the watched requests, :class:`Watch` keeps the
confidence sequence and the state): ``--in-requests`` in-distribution requests (movie test texts drawn at
random), then shifted ones (SMS texts) until the state is ``exceeded`` (or ``--max-shift`` requests).
It reports N, the shifted requests until ``exceeded``, at each watch rate, and the false alarm rate: the
share of ``--replays`` replays of in-distribution traffic alone (``--false-alarm-requests`` requests each)
in which the state ever read ``exceeded`` (the guarantee's delta bounds it).
``--window W`` sets the watch's window (default: serve's 5,000; 0: the cumulative sequence alone);
``--bits IN,SHIFTED`` replays synthetic bits at two rates against a 2% disagreement guarantee (no model).

(b) starts one server per (runtime, watch rate) with the stored exit setting, sends the same single-text
requests from ``--clients`` concurrent clients, interleaved and repeated (the fastest kept), and prints
requests/s and p50/p99 with the ratios to watching off. The onnx runtime needs `deebert export` first."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SHARED = HERE.parents[1] / "shared" / "datasets"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/datasets")


def texts_of(paths: list) -> list:
    out = []
    for p in paths:
        out += [json.loads(l)["text"] for l in Path(p).read_text().splitlines() if l.strip()]
    return [t for t in out if t.strip()]


def disagreement_bits(checkpoint: str, texts: list, batch_size: int = 32) -> np.ndarray:
    """Per text: did the stored exit setting's answer differ from the final layer's (two passes)."""
    from deebert_cli.core.runtime.rules import ExitRule, resolve_rule
    from deebert_cli.core.runtime.stream import load_for_inference, predict_stream

    ckpt = load_for_inference(checkpoint, "torch", "cpu")
    rule, _ = resolve_rule(ckpt, None, None, "normalized")
    lines = [t.replace("\n", " ") for t in texts]
    exit_ = [p.label for p in predict_stream(ckpt, lines, rule, "cpu", batch_size=batch_size)]
    final = [p.label for p in predict_stream(ckpt, lines, ExitRule([0.0] * ckpt.model.num_layers), "cpu",
                                             batch_size=batch_size)]
    return np.asarray(exit_) != np.asarray(final)


def replay(g, delta, rate: float, seed: int, phases: list, window: int | None = None) -> tuple:
    """phases: [(bits pool, requests)] played in order, each request a text drawn at random from its pool
    -> (the first request index (0-based, over all phases) at which the state read exceeded or None,
    watched rows, the final snapshot). Each request is watched independently with probability ``rate``
    (as :class:`~deebert_cli.core.model.watch.Sampler` does; drawn here in one go, so that millions of
    requests replay quickly); the watched bits go through :class:`Watch`, the server's code."""
    from deebert_cli.core.model.watch import WINDOW, Watch

    rng = np.random.default_rng(seed)
    w = Watch(g, delta, rate, window=WINDOW if window is None else window)
    t = 0
    for pool, n in phases:
        watched = np.flatnonzero(rng.random(n) < rate)
        bits = pool[rng.integers(0, len(pool), size=len(watched))]
        for i, bit in zip(watched, bits):
            w.record(bool(bit))
            if w.state == "exceeded":
                return t + int(i), w.n, w.snapshot()
        t += n
    return None, w.n, w.snapshot()


def detect(args) -> None:
    from deebert_cli.core.model.guarantee import stored_guarantee
    from deebert_cli.core.model.checkpoint import load_checkpoint

    if args.bits:  # no model: a 2% disagreement guarantee (delta 0.05) and Bernoulli bits at two given rates
        from deebert_cli.core.model.guarantee import Guarantee

        p_in, p_shift = (float(x) for x in args.bits.split(","))
        g = Guarantee("disagreement", 0.02, 0.05, 1000, "entropy", 0.5, 0, 0.0, 0.0, 0.0, 0.0, 1)
        rng = np.random.default_rng(0)
        ind, shifted = rng.random(20000) < p_in, rng.random(20000) < p_shift
        print(f"synthetic bits: guarantee {g.describe()}; in-distribution {ind.mean():.4f}, shifted {shifted.mean():.4f}")
        return replays(args, g, ind, shifted)
    g = stored_guarantee(load_checkpoint(args.checkpoint).meta)
    if g is None:
        raise SystemExit(f"'{args.checkpoint}' stores no guarantee: run deebert calibrate first")
    t0 = time.perf_counter()
    movie = texts_of([SHARED / "movie_snippets" / "test.jsonl"])
    if args.shift == "sms":
        sms, what = texts_of(sorted((SHARED / "sms_spam").glob("*.jsonl"))), "SMS spam, all splits"
    elif args.shift == "mixed":  # a positive and a negative review in one text (clients sending mixed opinions)
        rows = [json.loads(l) for l in (SHARED / "movie_snippets" / "test.jsonl").read_text().splitlines() if l.strip()]
        by = {lab: [r["text"] for r in rows if r["label"] == lab] for lab in {r["label"] for r in rows}}
        a, b = sorted(by)
        rng = np.random.default_rng(0)
        pick = lambda lab: by[lab][rng.integers(len(by[lab]))]
        sms = [f"{pick(a)} {pick(b)}" if k % 2 else f"{pick(b)} {pick(a)}" for k in range(2000)]
        what = "two movie test reviews of opposite labels in one text"
    else:  # short:K: the movie test texts cut to their first K words (clients sending fragments)
        k = int(args.shift.split(":")[1])
        sms, what = [" ".join(t.split()[:k]) for t in movie], f"movie test texts cut to their first {k} words"
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.is_file():
        got = np.load(cache)
        ind, shifted = got["ind"], got["shifted"]
    else:
        ind, shifted = disagreement_bits(args.checkpoint, movie), disagreement_bits(args.checkpoint, sms)
        if cache is not None:
            np.savez(cache, ind=ind, shifted=shifted)
    print(f"checkpoint {args.checkpoint}: guarantee {g.describe()}; risk {g.risk}, epsilon {g.epsilon:g}, "
          f"delta {g.delta:g}, disagreement at calibration {g.disagreement_rate}")
    print(f"disagreement at full sampling (every text, {time.perf_counter() - t0:.0f} s): "
          f"in-distribution (movie test, {len(ind)} texts) {ind.mean():.4f}; "
          f"shifted ({what}, {len(shifted)} texts) {shifted.mean():.4f}")
    replays(args, g, ind, shifted)


def replays(args, g, ind: np.ndarray, shifted: np.ndarray) -> None:
    """Detection and false alarms at each watch rate, replayed on the per-text bits."""
    from deebert_cli.core.model.watch import WINDOW, Watch

    print(f"test: {Watch(g, args.delta, window=WINDOW if args.window is None else args.window).test()}")
    for rate in [float(r) for r in args.rates.split(",")]:
        ns, missed, before, t0 = [], 0, 0, time.perf_counter()
        for seed in range(args.detect_replays):
            at, _, _ = replay(g, args.delta, rate, seed, [(ind, args.in_requests), (shifted, args.max_shift)], args.window)
            if at is not None and at < args.in_requests:
                before += 1
            elif at is None:
                missed += 1
            else:
                ns.append(at - args.in_requests + 1)
        q = np.percentile(ns, [10, 50, 90]) if ns else [float("nan")] * 3
        print(f"watch rate {100 * rate:g}%: {args.in_requests} in-distribution requests then shifted: exceeded after "
              f"N = {q[1]:.0f} shifted requests (median; 10%-90%: {q[0]:.0f}-{q[2]:.0f}) in {len(ns)} of "
              f"{args.detect_replays} replays; exceeded before the shift in {before}; not within {args.max_shift} "
              f"in {missed} ({time.perf_counter() - t0:.0f} s)")
        alarms, t0 = 0, time.perf_counter()
        for seed in range(args.replays):
            at, n, _ = replay(g, args.delta, rate, 10_000 + seed, [(ind, args.false_alarm_requests)], args.window)
            alarms += at is not None
        print(f"watch rate {100 * rate:g}%: false alarms in {alarms} of {args.replays} replays of "
              f"{args.false_alarm_requests} in-distribution requests ({alarms / max(args.replays, 1):.3f}; delta "
              f"{args.delta or g.delta:g}) ({time.perf_counter() - t0:.0f} s)")


def cost(args) -> None:
    from bench_serve import Server, load

    texts = texts_of([SHARED / "movie_snippets" / "test.jsonl"])[: args.n]
    rates = [float(r) for r in args.rates.split(",")]
    rows, every = {}, {}
    for runtime in args.runtimes.split(","):
        servers = {r: Server(args.checkpoint, "--runtime", runtime, "--watch-rate", str(r), "--no-access-log",
                             "--batch-size", str(args.batch_size)) for r in rates}
        try:
            for s in servers.values():
                s.wait_ready()
            for s in servers.values():
                asyncio.run(load(s.url, texts[:32], 8))
            for _ in range(args.repeats):
                for r, s in servers.items():
                    res = asyncio.run(load(s.url, texts, args.clients))
                    every.setdefault((runtime, r), []).append(res)
                    if (runtime, r) not in rows or res["rps"] > rows[runtime, r]["rps"]:
                        rows[runtime, r] = res
        finally:
            for s in servers.values():
                s.stop()
    print(f"checkpoint {args.checkpoint}, {len(texts)} single-text requests (movie test), {args.clients} clients, "
          f"stored exit setting, fastest of {args.repeats} interleaved runs, {os.cpu_count()} CPUs (shared machine)")
    print(f"{'runtime':8s} {'watch':>6s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'req/s vs off':>13s} {'p99 vs off':>11s}  spread over repeats (req/s; p99 ms)")
    for runtime in args.runtimes.split(","):
        off = rows[runtime, rates[0]]
        for r in rates:
            x = rows[runtime, r]
            print(f"{runtime:8s} {100 * r:5g}% {x['rps']:8.1f} {1000 * x['p50']:8.1f} {1000 * x['p99']:8.1f} "
                  f"{x['rps'] / off['rps']:13.3f} {x['p99'] / off['p99']:11.3f}  "
                  f"{min(e['rps'] for e in every[runtime, r]):.1f}-{max(e['rps'] for e in every[runtime, r]):.1f}; "
                  f"{1000 * min(e['p99'] for e in every[runtime, r]):.0f}-{1000 * max(e['p99'] for e in every[runtime, r]):.0f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["detect", "cost"])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--rates", default=None, help="watch rates (detect: 0.01,0.05; cost: 0,0.01,0.05)")
    ap.add_argument("--delta", type=float, default=None, help="the watch's delta (default: the guarantee's)")
    ap.add_argument("--shift", default="sms", help="shifted traffic: sms (SMS spam texts), mixed (a positive and a negative review in one text) or short:K (movie test texts cut to K words)")
    ap.add_argument("--cache", default=None, help="an .npz file keeping the per-text bits of this checkpoint and --shift")
    ap.add_argument("--window", type=int, default=None, help="the watch's window (watched rows per block; 0: cumulative only; default: serve's)")
    ap.add_argument("--bits", default=None, help="detect without a model: synthetic bits 'IN,SHIFTED' (two rates), 20000 texts each")
    ap.add_argument("--in-requests", type=int, default=20000, help="in-distribution requests before the shift")
    ap.add_argument("--max-shift", type=int, default=200000, help="shifted requests at most")
    ap.add_argument("--detect-replays", type=int, default=50)
    ap.add_argument("--replays", type=int, default=200, help="in-distribution replays for the false alarm rate")
    ap.add_argument("--false-alarm-requests", type=int, default=100000)
    ap.add_argument("--n", type=int, default=300, help="cost: requests per run")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--runtimes", default="torch,onnx")
    args = ap.parse_args()
    if args.rates is None:
        args.rates = "0.01,0.05" if args.mode == "detect" else "0,0.01,0.05"
    detect(args) if args.mode == "detect" else cost(args)


if __name__ == "__main__":
    main()
