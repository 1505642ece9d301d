"""Why `deebert export` composes its steps into one model: the same per-step graphs run as one ONNX
Runtime session per step (thread spinning on, and off) and as the one composed model, against the plain
ONNX Runtime classifier, at batch 1 and 32 over the same length-sorted token batches (full depth: every
step runs, so the figures compare the session layouts, not early exit); then the composed model's load
time with its weights beside it (as exported) and inside it.

    .venv/bin/python benchmarks/bench_onnx_sessions.py --checkpoint runs/i11-minilm [--precision int8]

The plain classifier is bench_runtime.py's (the checkpoint's final exit through torch.onnx.export,
ONNX Runtime's fusions, quantize_dynamic for int8). Layouts are interleaved, the fastest of --repeats
kept; the ratio is plain classifier time / layout time."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime import DATA, plain_onnx, sorted_batches  # noqa: E402

from deebert_cli.core.model.checkpoint import load_checkpoint  # noqa: E402
from deebert_cli.core.runtime.export import SAMPLE_TEXTS, _quantize, compose_steps, write_graphs  # noqa: E402
from deebert_cli.core.runtime.engine import pad_rows  # noqa: E402
from deebert_cli.core.runtime.stream import load_for_inference  # noqa: E402
from deebert_cli.core.runtime.onnx_backend import session_options  # noqa: E402


def per_step_graphs(ckdir: Path, out: Path, precision: str) -> list:
    """The export's per-step graphs (before composition), in ``out``."""
    ck = load_checkpoint(ckdir)
    model = ck.model.cpu().eval()
    enc = ck.tokenizer(list(SAMPLE_TEXTS), padding=True, return_tensors="pt")
    names, _ = write_graphs(model, out / "fp32", (enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids")),
                            learned=False)
    steps = [names["embed"], *names["layers"]]
    if precision == "int8":
        (out / "int8").mkdir()
        for g in steps:
            _quantize(out / "fp32" / g, out / "int8" / g)
    return [out / precision / g for g in steps]


def session(path: Path, threads: int, spinning: bool = True):
    so = session_options(ort, threads)
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_plain(s, batches):
    for ids, tt in batches:
        a, m, t = pad_rows(ids, 0, tt)
        s.run(None, {"input_ids": a, "attention_mask": m, "token_type_ids": t})


def run_steps(sessions, batches):
    for ids, tt in batches:
        a, m, t = pad_rows(ids, 0, tt)
        h = sessions[0].run(None, {"input_ids": a, "token_type_ids": t})[0]
        for s in sessions[1:]:
            h = s.run(None, {"hidden": h, "attention_mask": m})[0]


def run_composed(model, batches):
    for ids, tt in batches:
        a, m, t = pad_rows(ids, 0, tt)
        h = model.embed(a, t)
        for i in range(model.num_layers):
            h, _, _ = model.layer(i, h, m)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True, help="a checkpoint with its `deebert export --quantize int8`")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="/tmp/bench_runtime", help="where bench_runtime.py keeps the plain classifier")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ck = Path(args.checkpoint)
    texts = [json.loads(line)["text"] for line in (DATA / "test.jsonl").read_text().splitlines() if line.strip()][: args.n]
    composed = load_for_inference(ck, "onnx", precision=args.precision, threads=args.threads)
    tok = composed.tokenizer
    plain = session(plain_onnx(ck, Path(args.work) / "plain")[args.precision], args.threads)
    with tempfile.TemporaryDirectory() as d:
        files = per_step_graphs(ck, Path(d), args.precision)
        layouts = {
            "plain ORT classifier (one graph)": (run_plain, plain),
            "one session per step, spinning on": (run_steps, [session(f, args.threads) for f in files]),
            "one session per step, spinning off": (run_steps, [session(f, args.threads, False) for f in files]),
            "deebert's composed model (one session)": (run_composed, composed.model),
        }
        print(f"{ck}, {args.precision}, {len(texts)} movie test texts, {args.threads} threads, fastest of {args.repeats}")
        print(f"{'layout':40s} {'batch':>5s} {'ex/s':>7s} {'vs plain':>8s}")
        for bs in (1, 32):
            batches, _ = sorted_batches(tok, texts, bs)
            best = {}
            for _ in range(args.repeats):
                for name, (fn, obj) in layouts.items():
                    t = time.perf_counter()
                    fn(obj, batches)
                    best[name] = min(best.get(name, np.inf), time.perf_counter() - t)
            base = best["plain ORT classifier (one graph)"]
            for name in layouts:
                print(f"{name:40s} {bs:5d} {len(texts) / best[name]:7.0f} {base / best[name]:8.2f}")
        print_load_times(files, Path(d), args.threads)


def print_load_times(files: list, work: Path, threads: int) -> None:
    """Session creation of the composed model with its weights beside it (as exported) and inside it."""
    import onnx

    beside = work / "beside" / "model.onnx"
    compose_steps(files, beside)
    inside = work / "inside.onnx"
    onnx.save_model(onnx.load(str(beside)), str(inside))
    for name, path in (("weights beside the graph (model.onnx.data)", beside), ("weights inside the graph", inside)):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            session(path, threads)
            times.append(time.perf_counter() - t)
        print(f"load, {name}: {min(times):.3f} s (fastest of 3)")


if __name__ == "__main__":
    main()
