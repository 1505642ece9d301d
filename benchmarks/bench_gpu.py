"""Early exit on a GPU (issue 29): deebert's engines against the fastest full-depth runs, side by side.

    python benchmarks/bench_gpu.py --checkpoint CK --data DIR --json gpu.json          # on a GPU
    python benchmarks/bench_gpu.py --checkpoint CK --data DIR --device cpu --quick     # tiny, on a CPU

Two models, each over the texts of DIR/test.jsonl (the movie-review test split), for each precision
(fp32, bf16: autocast, as ``--precision`` does) and batch size (1, 32, 256, 1024); every row tokenises,
length-sorts and batches inside its timing (:mod:`gpu_rows`):

(a) the checkpoint (MiniLM-L6, the ``make demo`` checkpoint), end to end;
(b) a BERT-base-shaped model (12 layers, 768 wide, random weights: timing only) with **scripted exits**:
    each text leaves at a layer drawn from the checkpoint's measured exit layers (its old engine at the
    stored threshold, fp32) stretched to 12 layers, while every step still computes its off-ramp,
    entropy and decision (ScriptedPolicy) and reads it back.

Rows: ``eager`` (transformers, SDPA), ``full graphs`` (the classifier on bucketed shapes, one CUDA graph
per bucket: the fastest full-depth baseline; ``--compile`` adds ``torch.compile`` reduce-overhead),
``threshold 0`` (deebert full depth, old engine), ``static, threshold 0`` (full depth, new engine),
``static engine`` (the stored threshold, new engine: static shapes, CUDA graphs, decisions read a step
late, refill at B = batch) and ``old engine`` (the stored threshold, shrink). Configurations are
interleaved and repeated after a warm-up pass (which captures the graphs), the fastest run kept. Printed:
texts/s, the ratio to eager and to the fastest full-depth row of the same precision, mean exit layer, the
static engine's graphs and buffer memory, and a profile of one layer step (:mod:`gpu_profile`).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_profile import print_profile, profile_step  # noqa: E402
from gpu_rows import Deebert, Eager, FullGraphs, as_checkpoint, stretch, sync  # noqa: E402

FULL_DEPTH = ("eager", "full graphs", "torch.compile")


def rows_of(path: Path) -> tuple:
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def bert_base(quick: bool = False):
    """A randomly initialised BERT-base-shaped highway model (768 wide, 12 layers; ``quick``: 32 wide)."""
    from transformers import BertConfig, BertForSequenceClassification

    from deebert_cli.core.model.highway import HighwayModel

    torch.manual_seed(0)
    kw = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64) if quick else {}
    return HighwayModel(BertForSequenceClassification(BertConfig(num_labels=2, **kw)))


@torch.no_grad()
def layer_costs(m, device, precision, rows=(1, 8, 32, 64, 128, 256, 512, 1024), width=32, reps=50) -> dict:
    """Milliseconds of one layer (+ its off-ramp) of model ``m`` at ``rows`` x ``width`` tokens: how the
    cost of a step grows with its rows (where a fixed batch B becomes compute-bound)."""
    from deebert_cli.core.device import autocast

    m = m.to(device).eval()
    out = {}
    for b in rows:
        hidden = torch.randn(b, width, m.hidden_size, device=device)
        attn = torch.ones(b, width, dtype=torch.int64, device=device)
        with autocast(device, precision):
            mask = m.prepare_mask(attn, hidden)
            for _ in range(5):
                m.run_layer(0, hidden, mask)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                m.exit_logits(0, m.run_layer(0, hidden, mask), attn)
            sync(device)
        out[b] = (time.perf_counter() - t0) / reps * 1e3
    return out


def configs(ckpt, device, precision, thr, compile: bool, script=None) -> dict:
    hf = ckpt.model.model
    out = {"eager": Eager(hf, ckpt.tokenizer, device, precision),
           "full graphs": FullGraphs(hf, ckpt.tokenizer, device, precision)}
    if compile:
        out["torch.compile"] = FullGraphs(hf, ckpt.tokenizer, device, precision, compile=True)
    out["threshold 0"] = Deebert(ckpt, device, precision, 0.0)
    out["static, threshold 0"] = Deebert(ckpt, device, precision, 0.0, "static")
    out["static engine"] = Deebert(ckpt, device, precision, thr, "static", script)
    out["old engine"] = Deebert(ckpt, device, precision, thr, "shrink", script)
    return out


def time_rows(cfgs: dict, texts: list, bs: int, repeats: int, device) -> tuple:
    """Warm up every row once (graphs are captured then), then ``repeats`` interleaved timed passes ->
    (best seconds by row, first answers by row, warm-up seconds by row)."""
    warm = {}
    for name, run in cfgs.items():
        t0 = time.perf_counter()
        run(texts, bs)
        sync(device)
        warm[name] = time.perf_counter() - t0
    best, got = {k: math.inf for k in cfgs}, {}
    for _ in range(repeats):
        for name, run in cfgs.items():
            sync(device)
            t0 = time.perf_counter()
            pred, exits = run(texts, bs)
            sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
            got.setdefault(name, (pred, exits))
    return best, got, warm


def table(best: dict, got: dict, warm: dict, y: list | None, L: int) -> dict:
    n = len(next(iter(got.values()))[0])
    fastest = min(best[k] for k in best if k in FULL_DEPTH)
    ref = got["old engine"][1]
    rows = {}
    for name, (pred, exits) in got.items():
        r = {"seconds": best[name], "texts_per_s": n / best[name], "n": n, "warmup_seconds": warm[name],
             "vs_eager": best["eager"] / best[name], "vs_fastest_full_depth": fastest / best[name],
             "mean_exit_layer": float(np.mean(exits)) + 1 if exits else float(L)}
        if y is not None:
            r["accuracy"] = sum(int(p == t) for p, t in zip(pred, y)) / n
        if name == "static engine":  # the same answers as the old engine?
            r["exit_layers_differ"] = sum(a != b for a, b in zip(exits, ref))
            r["labels_differ"] = sum(a != b for a, b in zip(pred, got["old engine"][0]))
        rows[name] = r
    return rows


def print_rows(title: str, rows: dict, L: int) -> None:
    print(f"\n{title}\n  {'row':<20} {'texts/s':>9} {'vs eager':>9} {'vs fastest full':>15} {'accuracy':>9} "
          f"{'mean exit':>9} {'ideal':>6}")
    for name, r in rows.items():
        acc = f"{100 * r['accuracy']:.2f}%" if "accuracy" in r else "-"
        extra = f"  ({r['labels_differ']} labels, {r['exit_layers_differ']} exit layers differ from the old engine)" \
            if "exit_layers_differ" in r else ""
        print(f"  {name:<20} {r['texts_per_s']:>9.0f} {r['vs_eager']:>8.2f}x {r['vs_fastest_full_depth']:>14.2f}x "
              f"{acc:>9} {r['mean_exit_layer']:>9.2f} {L / r['mean_exit_layer']:>5.2f}x{extra}", flush=True)


def run_model(name: str, ckpt, texts, y, args, device, thr, script=None, out=None, save=lambda: None) -> dict:
    """Every precision x batch size of one model into ``out`` -> {results, graphs, full_graphs}; ``save()``
    after each batch size."""
    L = ckpt.model.num_layers
    out = {} if out is None else out
    out.update({"layers": L, "hidden": ckpt.model.hidden_size, "threshold": thr, "results": {}, "graphs": {},
           "full_graphs": {}, "attention": getattr(ckpt.model.config, "_attn_implementation", None)})
    for precision in args.precisions:
        cfgs = configs(ckpt, device, precision, thr, args.compile, script)
        for bs in args.batch_sizes:
            n = min(len(texts), args.b1_n) if bs == 1 and args.b1_n else len(texts)
            best, got, warm = time_rows(cfgs, texts[:n], bs, args.repeats, device)
            key = f"{precision} b{bs}"
            out["results"][key] = rows = table(best, got, warm, None if y is None else y[:n], L)
            out["graphs"][key] = cfgs["static engine"].report(bs)
            out["full_graphs"][key] = cfgs["full graphs"].report()
            print_rows(f"{name}: {precision}, batch {bs} ({n} texts)", rows, L)
            g = out["graphs"][key]
            print(f"  static engine: {g['steps']} static steps, {g['graphs']} CUDA graphs (captured in "
                  f"{g['capture_seconds']:.1f} s), buffers {g['buffer_bytes'] / 2**20:.1f} MiB, {g['wasted_rows']} "
                  f"rows computed past their exit (decisions read late)", flush=True)
            if device.type == "cuda":
                g["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
                print(f"  peak CUDA memory so far: {g['cuda_peak_bytes'] / 2**30:.2f} GiB", flush=True)
            save()
        del cfgs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def bench(args, save=lambda out: None) -> dict:
    """Every part in turn; ``save(out)`` after each (a run cut short by its time limit keeps what it did)."""
    from deebert_cli.core.device import resolve_device
    from deebert_cli.core.model.checkpoint import load_checkpoint

    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint)
    stored = ckpt.meta.get("thresholds", {}).get("values", [0.3])[0]
    thr = args.threshold if args.threshold is not None else stored
    texts, labels = rows_of(Path(args.data) / "test.jsonl")
    texts, labels = texts[: args.n], labels[: args.n]
    y = [ckpt.label_names.index(l) for l in labels]
    out = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "checkpoint": args.checkpoint, "n": len(texts), "threshold": thr, "repeats": args.repeats,
           "batch_sizes": args.batch_sizes, "precisions": args.precisions, "models": {}}
    print(f"{out['gpu']}: torch {out['torch']}, CUDA {out['cuda']}; {len(texts)} texts, threshold {thr:g}", flush=True)
    base = as_checkpoint(bert_base(args.quick), ckpt.tokenizer)
    out["profile"] = {}
    for name, m in (("checkpoint", ckpt), ("bert-base shape", base)):  # first: seconds, and the key to the rest
        for precision in args.precisions:
            got = out["profile"][f"{name} {precision}"] = profile_step(m, device, precision, args.profile_rows)
            print_profile(f"one layer step of the {name}, {precision}, {args.profile_rows} rows x 32 tokens:", got)
    if args.layer_costs:
        out["layer_costs"] = {}
        for name, m in (("checkpoint", ckpt.model), ("bert-base shape", base.model)):
            for precision in args.precisions:
                got = out["layer_costs"][f"{name} {precision}"] = layer_costs(m, device, precision)
                print(f"{precision}, {name}: one layer + off-ramp, ms at 32 tokens by rows: "
                      + ", ".join(f"{b}: {ms:.3f}" for b, ms in got.items()), flush=True)
    save(out)
    a = run_model("checkpoint", ckpt, texts, y, args, device, thr, out=out["models"].setdefault("checkpoint", {}),
                  save=lambda: save(out))
    # the one-off measurement --engine auto reads (deebert.json key gpu_measurement, copied in by hand)
    out["gpu_measurement"] = {p: {str(bs): round(a["results"][f"{p} b{bs}"]["static engine"]["vs_fastest_full_depth"], 3)
                                  for bs in args.batch_sizes} for p in args.precisions}
    save(out)
    # (b): the checkpoint's measured exits (old engine, fp32 or the first precision, the first batch size)
    first = a["results"][f"{args.precisions[0]} b{args.batch_sizes[0]}"]
    exits = Deebert(ckpt, device, args.precisions[0], thr)(texts, 32)[1]
    script = stretch(exits, ckpt.model.num_layers, 12, seed=0)
    print(f"\nscripted exits: the checkpoint's exit layers (mean {np.mean(exits) + 1:.2f} of {ckpt.model.num_layers}; "
          f"old engine row: {first['old engine']['mean_exit_layer']:.2f}) stretched to 12 layers (mean "
          f"{np.mean(script) + 1:.2f})", flush=True)
    b1 = args.b1_n
    args.b1_n = min(b1 or len(texts), args.b1_n_bert or len(texts))
    out["script_histogram"] = np.bincount(script, minlength=12).tolist()
    name = "bert-base shape, scripted exits"
    run_model(name, base, texts, None, args, device, thr, script, out["models"].setdefault(name, {}), lambda: save(out))
    args.b1_n = b1
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default="/work/shared/datasets/movie_snippets", help="folder with test.jsonl")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precisions", type=lambda s: s.split(","), default=["fp32", "bf16"])
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32, 256, 1024])
    p.add_argument("--threshold", type=float, default=None, help="default: the checkpoint's stored threshold")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--n", type=int, default=None, help="first N texts only")
    p.add_argument("--b1-n", type=int, default=400, help="batch 1 on the first N texts only")
    p.add_argument("--b1-n-bert", type=int, default=200, help="batch 1 of the BERT-base shape on the first N texts")
    p.add_argument("--profile-rows", type=int, default=256, help="rows of the profiled layer step")
    p.add_argument("--layer-costs", action="store_true", help="add one layer's time against its rows")
    p.add_argument("--compile", action="store_true", help="add torch.compile(mode='reduce-overhead') rows")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a CPU check): 24 texts, fp32, batch 1 and 4")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.quick:
        args.n, args.precisions, args.batch_sizes, args.repeats = args.n or 24, ["fp32"], [1, 4], 1
        args.b1_n, args.b1_n_bert, args.profile_rows = 8, 8, 4
    def save(out):
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1) + "\n")

    bench(args, save)


if __name__ == "__main__":
    main()
