"""`deebert predict-dataset` (Ray Data) vs `deebert predict` on the same lines, side by side.

    .venv/bin/python benchmarks/bench_ray.py --checkpoint runs/minilm --threshold 0.3

Both commands run end to end as subprocesses on the same N lines (movie-review training texts repeated
and cut to N): predict reads one file with torch on every core (and once more with one thread, OMP_NUM_THREADS=1);
predict-dataset reads the same lines
split over --files text files, on a local Ray instance limited to --cpus CPUs, with that many
one-thread actors. Runs are interleaved and repeated (fastest kept). To separate Ray's fixed costs
(starting Ray, starting the actors, loading the checkpoint in each, writing shards) from its per-row
cost, predict-dataset also runs on --small lines: the difference between the two runs is the time the
extra rows took. Prints rows/s for each, the ratio, and checks that both gave the same exit histogram.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "movie_snippets" / "train.jsonl"
PACKAGED = Path(__file__).resolve().parents[1] / "deebert_cli" / "data" / "movie_snippets" / "train.jsonl"


def corpus(n: int) -> list:
    src = SHARED if SHARED.is_file() else PACKAGED
    texts = [json.loads(l)["text"] for l in src.read_text().splitlines() if l.strip()]
    return [t.replace("\t", " ") for t in (texts * (n // len(texts) + 1))[:n]]


def write_inputs(folder: Path, lines: list, files: int) -> tuple:
    """One file for predict, the same lines over ``files`` files for predict-dataset."""
    folder.mkdir(parents=True)
    (folder / "all.txt").write_text("\n".join(lines) + "\n")
    parts = folder / "parts"
    parts.mkdir()
    step = -(-len(lines) // files)
    for k in range(files):
        (parts / f"part{k:03d}.txt").write_text("\n".join(lines[k * step:(k + 1) * step]) + "\n")
    return folder / "all.txt", parts


def run(cmd: list, env: dict) -> tuple:
    """(wall seconds, stderr) of one command; it must succeed."""
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    sec = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return sec, p.stderr


def histogram(stderr: str) -> str:
    m = re.search(r"exit layers: (.*)", stderr)
    return m.group(1).strip() if m else "?"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="runs/minilm")
    ap.add_argument("--threshold", type=float, default=0.3, help="normalized entropy threshold")
    ap.add_argument("--n", type=int, default=20000, help="lines")
    ap.add_argument("--small", type=int, default=500, help="lines of the fixed-cost run")
    ap.add_argument("--files", type=int, default=8, help="input files for predict-dataset")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs for the local Ray instance (= one-thread actors)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per configuration; the fastest is kept")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        lines = corpus(args.n)
        big_all, big_parts = write_inputs(work / "big", lines, args.files)
        _, small_parts = write_inputs(work / "small", lines[: args.small], min(args.files, 2))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                           os.environ.get("PYTHONPATH", "")]))
        deebert = [sys.executable, "-m", "deebert_cli"]
        common = ["--checkpoint", args.checkpoint, "--threshold", str(args.threshold), "--device", "cpu"]
        ray_opts = ["--concurrency", str(args.cpus), "--num-cpus", "1", "--local-cpus", str(args.cpus),
                    "--object-store-mb", "400", "--format", "parquet"]
        k = iter(range(10**6))
        predict = lambda: deebert + ["predict", "--input", str(big_all), "--output", str(work / f"p{next(k)}.jsonl"),
                                     "--format", "jsonl"] + common
        configs = {
            "deebert predict": predict,
            "deebert predict (1 thread)": predict,
            "predict-dataset": lambda: deebert + ["predict-dataset", "--input", str(big_parts / "*.txt"),
                                                  "--output", str(work / f"o{next(k)}")] + common + ray_opts,
            "predict-dataset (small)": lambda: deebert + ["predict-dataset", "--input", str(small_parts / "*.txt"),
                                                          "--output", str(work / f"o{next(k)}")] + common + ray_opts,
        }
        times = {c: [] for c in configs}
        hist = {}
        for _ in range(args.repeats):
            for name, cmd in configs.items():
                sec, err = run(cmd(), dict(env, OMP_NUM_THREADS="1") if "1 thread" in name else env)
                times[name].append(sec)
                hist[name] = histogram(err)
                print(f"  {name}: {sec:.1f} s; exits {hist[name]}", file=sys.stderr, flush=True)
        best = {c: min(v) for c, v in times.items()}
        print(f"checkpoint {args.checkpoint}, {args.n} lines (movie train texts repeated), threshold {args.threshold}; "
              f"predict: torch on {os.cpu_count()} cores; predict-dataset: local Ray with {args.cpus} CPUs, "
              f"{args.cpus} one-thread actors, {args.files} input files; fastest of {args.repeats} interleaved runs, "
              "end to end (process start to exit)")
        print(f"{'command':28s} {'lines':>7s} {'seconds':>8s} {'rows/s':>8s}")
        for c, n in (("deebert predict", args.n), ("deebert predict (1 thread)", args.n), ("predict-dataset", args.n),
                     ("predict-dataset (small)", args.small)):
            print(f"{c:28s} {n:7d} {best[c]:8.1f} {n / best[c]:8.1f}")
        fixed = best["predict-dataset (small)"]
        marginal = (args.n - args.small) / (best["predict-dataset"] - fixed)
        for c in ("deebert predict", "deebert predict (1 thread)"):
            print(f"predict-dataset / {c}, end to end: {best[c] / best['predict-dataset']:.2f}x rows/s")
        print(f"predict-dataset per-row rate without its fixed cost: ({args.n} - {args.small}) lines / "
              f"({best['predict-dataset']:.1f} - {fixed:.1f}) s = {marginal:.1f} rows/s "
              f"({marginal / (args.n / best['deebert predict']):.2f}x predict's end-to-end rate)")
        print(f"exit histogram, predict:         {hist['deebert predict']}")
        print(f"exit histogram, predict-dataset: {hist['predict-dataset']}")
        print("same exits" if hist["deebert predict"] == hist["predict-dataset"] else "EXITS DIFFER")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
