"""Early exit on ONNX Runtime vs the plain classifier on each runtime, side by side in one process.

    .venv/bin/python benchmarks/bench_runtime.py --checkpoint runs/minilm-copy --json docs/bench_runtime.json
    .venv/bin/python benchmarks/bench_runtime.py --checkpoint runs/minilm-copy --cold-start 7 --before /path/to/old/checkout

Rows (the movie-review test split; batch 1 and batch 32; every configuration length-sorts its texts and
runs the same batches): the plain transformers classifier in eager PyTorch; that classifier exported with
torch.onnx.export (eager attention, ONNX Runtime's transformer fusions) run by ONNX Runtime in fp32 and
after quantize_dynamic (int8); deebert on the torch runtime and on the onnx runtime (fp32 and int8), each
at full depth (threshold 0) and at the threshold analyze recommends for a --max-drop budget (computed with
the analyze core on the validation split). Configurations are interleaved and repeated, the fastest run
kept, so load on a shared machine hits them alike. Printed ratios:

  * ideal fraction: (plain ORT classifier time / deebert onnx time at the threshold) / (L / mean exit
    layer), for fp32 and for int8 (deebert int8 against the int8 classifier); goal >= 0.9;
  * full-depth overhead: plain ORT classifier time / deebert onnx time at threshold 0; goal >= 0.9;
  * beside the ideal, a reading aid: the token-weighted ideal L / (mean exit layer weighted by each
    text's tokens). A layer costs about in proportion to its tokens, and long texts exit later, so this
    is the speedup that skipping layers alone could give; the goals stay with L / mean exit.

It also checks correctness (every exit's logits, onnx fp32 vs torch, over the test set; labels and exit
layers of deebert onnx vs torch at the threshold, and how many rows' entropy lies within the tolerance of
it) and, with --cold-start N, times whole `deebert predict` processes on one line (median of N).
The checkpoint folder receives its ONNX export (onnx/), so pass a copy if the original must stay as it is.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("/work/shared/datasets/movie_snippets")
if not DATA.is_dir():
    DATA = ROOT / "deebert_cli" / "data" / "movie_snippets"


def rows_of(path: Path) -> tuple:
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def recommended_threshold(ckpt, texts, labels, max_drop: float) -> tuple:
    """analyze's recommendation on these texts (its sweep over its default grid) -> (threshold, SweepRow)."""
    from deebert_cli.core.analysis.sweep import DEFAULT_GRID, recommend, sweep_from_logits
    from deebert_cli.core.data.encoding import encode
    from deebert_cli.core.runtime.passes import collect

    names = ckpt.label_names
    y = [names.index(l) for l in labels]
    enc = encode(ckpt.tokenizer, texts, None, ckpt.meta.get("max_length", 128))
    logits = collect(ckpt.model, enc, ckpt.tokenizer.pad_token_id, 64, "cpu", pooled=False, all_logits=True)["logits"]
    rec = recommend(sweep_from_logits(logits, y, list(DEFAULT_GRID), "normalized"), max_drop)
    return rec.threshold, rec


def plain_onnx(ckpt_dir: Path, out: Path) -> dict:
    """The checkpoint's final exit as a plain classifier graph (fp32 with ORT fusions, and int8)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from onnxruntime.transformers.optimizer import optimize_model

    from deebert_cli.core.runtime.export import _quantize

    out.mkdir(parents=True, exist_ok=True)
    fp32, int8 = out / "classifier.onnx", out / "classifier.int8.onnx"
    if not int8.is_file():
        model = AutoModelForSequenceClassification.from_pretrained(ckpt_dir).eval()
        model.set_attn_implementation("eager")
        tok = AutoTokenizer.from_pretrained(ckpt_dir)
        enc = tok(["a short one", "a longer example text with padding in the batch"], padding=True, return_tensors="pt")
        names = ["input_ids", "attention_mask", "token_type_ids"]
        axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"logits": {0: "batch"}}
        with torch.no_grad():
            torch.onnx.export(model, tuple(enc[n] for n in names), str(fp32), input_names=names, output_names=["logits"],
                              dynamic_axes=axes, opset_version=17, dynamo=False)
        cfg = model.config
        opt = optimize_model(str(fp32), model_type="bert", num_heads=cfg.num_attention_heads, hidden_size=cfg.hidden_size)
        opt.save_model_to_file(str(fp32))
        _quantize(fp32, int8)
    return {"fp32": fp32, "int8": int8}


class PlainOrt:
    def __init__(self, path: Path, tok, threads: int):
        import onnxruntime as ort

        from deebert_cli.core.runtime.onnx_backend import session_options

        # the same session options as deebert's own model (ORT's default thread spinning)
        so = session_options(ort, threads)
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.tok = tok

    def __call__(self, batches) -> list:
        from deebert_cli.core.runtime.engine import pad_rows

        out = []
        for ids, tt in batches:
            a, m, t = pad_rows(ids, self.tok.pad_token_id, tt)
            out += self.sess.run(None, {"input_ids": a, "attention_mask": m, "token_type_ids": t})[0].argmax(-1).tolist()
        return out


class Eager:
    def __init__(self, ckpt_dir: Path):
        from transformers import AutoModelForSequenceClassification

        self.model = AutoModelForSequenceClassification.from_pretrained(ckpt_dir).eval()

    @torch.no_grad()
    def __call__(self, batches) -> list:
        from deebert_cli.core.runtime.engine import pad_rows

        out = []
        for ids, tt in batches:
            a, m, t = pad_rows(ids, 0, tt)
            out += self.model(input_ids=torch.from_numpy(a), attention_mask=torch.from_numpy(m),
                              token_type_ids=torch.from_numpy(t)).logits.argmax(-1).tolist()
        return out


def sorted_batches(tok, texts, bs, max_length=128) -> tuple:
    """Length-sorted batches of token ids (what deebert's engine does within its window) + the order."""
    from deebert_cli.core.data.encoding import encode

    enc = encode(tok, texts, None, max_length)
    order = sorted(range(len(texts)), key=lambda i: (len(enc.input_ids[i]), i))
    return [([enc.input_ids[i] for i in order[s:s + bs]], [enc.token_type_ids[i] for i in order[s:s + bs]])
            for s in range(0, len(order), bs)], order


def deebert_run(ckpt, thr, bs, engine="shrink"):
    from deebert_cli.core.runtime.rules import ExitRule
    from deebert_cli.core.runtime.stream import PredictStats, predict_stream

    def run(texts):
        stats = PredictStats(ckpt.model.num_layers)
        preds = list(predict_stream(ckpt, texts, ExitRule([thr] * ckpt.model.num_layers), "cpu", batch_size=bs,
                                    stats=stats, engine=engine))
        return [r.label for r in preds], stats.mean_exit_layer, [r.exit_layer for r in preds]
    return run


def token_counts(tok, texts, max_length: int = 128) -> list:
    from deebert_cli.core.data.encoding import encode

    return [len(ids) for ids in encode(tok, texts, None, max_length).input_ids]


def token_weighted_exit(tokens: list, exits: list) -> float:
    """Mean exit layer weighted by each text's token count: the layers' share of the work that early exit
    skips when a layer costs in proportion to its tokens (long texts tend to exit later)."""
    return sum(k * e for k, e in zip(tokens, exits)) / sum(tokens)


def correctness(ref, onnx, texts, thr) -> dict:
    """Every exit's logits onnx fp32 vs torch over ``texts``; labels and exit layers of predict at ``thr``."""
    from deebert_cli.core.model.policies import normalized_entropy
    from deebert_cli.core.runtime.engine import pad_rows
    from deebert_cli.core.runtime.rules import ExitRule
    from deebert_cli.core.runtime.stream import predict_stream

    batches, order = sorted_batches(onnx.tokenizer, texts, 32)
    worst, ents = 0.0, []
    m = onnx.model
    for ids, tt in batches:
        a, mask, t = pad_rows(ids, onnx.tokenizer.pad_token_id, tt)
        with torch.no_grad():
            want = ref.model(torch.from_numpy(a), torch.from_numpy(mask), torch.from_numpy(t)).numpy()
        h = m.embed(a, t)
        for i in range(m.num_layers):
            h, logits, _ = m.layer(i, h, mask)
            worst = max(worst, float(np.abs(logits - want[i]).max()))
        ents.append(np.asarray(normalized_entropy(torch.from_numpy(want))))  # [L, b]
    ent = np.concatenate(ents, axis=1)  # [L, n] in sorted order
    L = m.num_layers
    rule = ExitRule([thr] * L)
    a = list(predict_stream(ref, texts, rule, "cpu", batch_size=32))
    b = list(predict_stream(onnx, texts, rule, "cpu", batch_size=32))
    tol = 1e-4  # on normalized entropy; |onnx - torch| logits stay below 1e-4 (see max_abs_logit_diff)
    near = set()
    for j, row in enumerate(order):
        if (np.abs(ent[: L - 1, j] - thr) < tol).any():
            near.add(row)
    diff_exit = [k for k in range(len(texts)) if a[k].exit_layer != b[k].exit_layer]
    return {"max_abs_logit_diff": worst, "rows": len(texts), "labels_differ": sum(x.label != y.label for x, y in zip(a, b)),
            "exit_layers_differ": len(diff_exit), "exit_differs_outside_tolerance": len(set(diff_exit) - near),
            "entropy_tolerance": tol, "rows_within_tolerance_of_threshold": len(near)}


def bench(args) -> dict:
    from deebert_cli.core.model.checkpoint import load_checkpoint
    from deebert_cli.core.config import ExportConfig
    from deebert_cli.core.errors import UserError
    from deebert_cli.core.runtime.export import export_checkpoint
    from deebert_cli.core.runtime.stream import load_for_inference

    torch.set_num_threads(args.threads)
    ck = Path(args.checkpoint)
    try:
        load_for_inference(ck, "onnx", precision="int8")
    except UserError:
        print("exporting", ck, file=sys.stderr)
        export_checkpoint(ExportConfig(checkpoint=str(ck), quantize="int8"))
    ref = load_checkpoint(ck)
    L = ref.model.num_layers
    vtexts, vlabels = rows_of(DATA / "validation.jsonl")
    texts, labels = rows_of(DATA / args.split)
    texts, labels = texts[: args.n], labels[: args.n]
    thr, rec = recommended_threshold(ref, vtexts, vlabels, args.max_drop)
    print(f"recommended threshold {thr:g} for a {args.max_drop:g}-point budget (validation: mean exit layer "
          f"{rec.mean_exit_layer:.2f} of {L}, {rec.accuracy_change:+.2f} points)", file=sys.stderr)
    onnx = {p: load_for_inference(ck, "onnx", precision=p, threads=args.threads) for p in ("fp32", "int8")}
    plain = plain_onnx(ck, Path(args.work) / "plain")
    y = [ref.label_names.index(l) for l in labels]
    tokens = token_counts(onnx["fp32"].tokenizer, texts)
    configs = {
        "transformers eager (torch)": ("eager", Eager(ck)),
        "ORT classifier fp32": ("plain", PlainOrt(plain["fp32"], onnx["fp32"].tokenizer, args.threads)),
        "ORT classifier int8": ("plain", PlainOrt(plain["int8"], onnx["fp32"].tokenizer, args.threads)),
    }
    for name, c in (("torch", ref), ("onnx fp32", onnx["fp32"]), ("onnx int8", onnx["int8"])):
        configs[f"deebert {name}, threshold 0"] = ("deebert", (c, 0.0, "shrink"))
        configs[f"deebert {name}, threshold {thr:g}"] = ("deebert", (c, thr, "shrink"))
        if name != "torch":  # --engine refill: every layer step on full batches (batch sizes above 1)
            configs[f"deebert {name}, threshold {thr:g}, refill"] = ("deebert", (c, thr, "refill"))
    results = {}
    for bs in args.batch_sizes:
        best = {k: math.inf for k in configs}
        got = {}
        for rep in range(args.repeats):
            for name, (kind, obj) in configs.items():
                if kind == "deebert" and obj[2] == "refill" and bs == 1:
                    continue  # at batch 1 the engines coincide (one row per step)
                t0 = time.perf_counter()
                if kind == "deebert":
                    pred, mean, exits = deebert_run(*obj[:2], bs, obj[2])(texts)
                else:  # tokenizing and sorting are timed too, as they are inside deebert's runs
                    batches, order = sorted_batches(onnx["fp32"].tokenizer, texts, bs)
                    sorted_pred, mean = obj(batches), float(L)
                    pred = [0] * len(texts)
                    for p, row in zip(sorted_pred, order):
                        pred[row] = p
                best[name] = min(best[name], time.perf_counter() - t0)
                if name not in got:  # outside the timing
                    weighted = float(L) if kind != "deebert" else token_weighted_exit(tokens, exits)
                    got[name] = (sum(int(p == t) for p, t in zip(pred, y)) / len(y), mean, weighted)
            print(f"batch {bs}: repeat {rep + 1}/{args.repeats} done", file=sys.stderr)
        results[bs] = {k: {"seconds": best[k], "ex_per_s": len(texts) / best[k], "accuracy": got[k][0],
                           "mean_exit_layer": got[k][1], "token_weighted_exit_layer": got[k][2]}
                       for k in configs if k in got}
    return {"checkpoint": str(ck), "split": args.split, "n": len(texts), "layers": L, "threshold": thr,
            "max_drop": args.max_drop, "threads": args.threads, "repeats": args.repeats, "results": results,
            "correctness": correctness(ref, onnx["fp32"], texts, thr)}


def ratios(r: dict) -> dict:
    thr, L = r["threshold"], r["layers"]
    out = {}
    for bs, res in r["results"].items():
        for p in ("fp32", "int8"):
            base = res[f"ORT classifier {p}"]
            zero = res[f"deebert onnx {p}, threshold 0"]
            exits = res[f"deebert onnx {p}, threshold {thr:g}"]
            ideal = L / exits["mean_exit_layer"]
            token_ideal = L / exits["token_weighted_exit_layer"]  # a reading aid: the goals use `ideal`
            for engine in ("", ", refill"):  # the default engine, and --engine refill where it ran
                at = res.get(f"deebert onnx {p}, threshold {thr:g}{engine}")
                if at is not None:
                    speedup = base["seconds"] / at["seconds"]
                    out[f"batch {bs}, {p}{engine}"] = {"speedup": speedup, "ideal": ideal, "ideal_fraction": speedup / ideal,
                                                       "token_weighted_ideal": token_ideal,
                                                       "token_weighted_fraction": speedup / token_ideal,
                                                       "threshold0_vs_classifier": base["seconds"] / zero["seconds"]}
    return out


def cold_start(args) -> dict:
    """Whole `deebert predict` processes on one line: median seconds of N interleaved runs."""
    line = b"A gorgeous, witty, seductive movie.\n"
    runs = {
        "python -c pass": ([sys.executable, "-c", "pass"], None),
        "python -c 'import numpy, onnxruntime, tokenizers'": ([sys.executable, "-c", "import numpy, onnxruntime, tokenizers"], None),
        "deebert predict --runtime onnx": ([sys.executable, "-m", "deebert_cli", "predict", "--checkpoint", args.checkpoint,
                                            "--runtime", "onnx", "--no-summary"], str(ROOT)),
        "deebert predict --runtime onnx --onnx-precision int8": (
            [sys.executable, "-m", "deebert_cli", "predict", "--checkpoint", args.checkpoint, "--runtime", "onnx",
             "--onnx-precision", "int8", "--no-summary"], str(ROOT)),
        "deebert predict (torch runtime)": ([sys.executable, "-m", "deebert_cli", "predict", "--checkpoint", args.checkpoint,
                                             "--device", "cpu", "--no-summary"], str(ROOT)),
    }
    if args.before:
        runs["deebert predict (torch runtime), before"] = (
            [sys.executable, "-m", "deebert_cli", "predict", "--checkpoint", args.checkpoint, "--device", "cpu", "--no-summary"],
            args.before)
    times = {k: [] for k in runs}
    for _ in range(args.cold_start):
        for name, (cmd, path) in runs.items():
            env = dict(os.environ)
            if path:
                env["PYTHONPATH"] = path
            t0 = time.perf_counter()
            p = subprocess.run(cmd, input=line, capture_output=True, env=env)
            times[name].append(time.perf_counter() - t0)
            if p.returncode:
                raise SystemExit(f"{name} failed: {p.stderr.decode()[-500:]}")
    return {k: {"median_s": statistics.median(v), "runs": v} for k, v in times.items()}


def load_times(args) -> dict:
    """load_checkpoint of --before's code vs this checkout's, in one process (imports warm), interleaved,
    fastest of N: the checkpoint-loading work itself, without the imports both pay."""
    import importlib

    mods = {}
    for name, root in (("before", args.before), ("after", str(ROOT))):
        for k in [k for k in sys.modules if k == "deebert_cli" or k.startswith("deebert_cli.")]:
            del sys.modules[k]
        sys.path.insert(0, root)
        try:  # this layout, or a checkout from before core/ became packages
            mods[name] = importlib.import_module("deebert_cli.core.model.checkpoint")
        except ModuleNotFoundError:
            mods[name] = importlib.import_module("deebert_cli.core.checkpoint")
        sys.path.pop(0)
    mods["before"].load_checkpoint(args.checkpoint)  # warm the imports
    best = {k: math.inf for k in mods}
    for _ in range(args.load):
        for k, m in mods.items():
            t0 = time.perf_counter()
            m.load_checkpoint(args.checkpoint)
            best[k] = min(best[k], time.perf_counter() - t0)
    return {"load_checkpoint_seconds": best, "files": {k: m.__file__ for k, m in mods.items()}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True, help="a copy of the checkpoint (its export goes into onnx/)")
    ap.add_argument("--split", default="test.jsonl")
    ap.add_argument("--n", type=int, default=100000, help="at most this many texts")
    ap.add_argument("--max-drop", type=float, default=0.5)
    ap.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--work", default="/tmp/bench_runtime", help="where the plain classifier graphs go")
    ap.add_argument("--cold-start", type=int, default=0, help="also time N whole predict processes (0: skip)")
    ap.add_argument("--no-bench", action="store_true", help="only the cold-start runs")
    ap.add_argument("--before", default=None, help="another checkout's root: its torch runtime's cold start beside ours")
    ap.add_argument("--load", type=int, default=0, help="with --before: time N warm load_checkpoint calls of each")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    report = {}
    if not args.no_bench:
        report = bench(args)
        report["ratios"] = ratios(report)
        for bs, res in report["results"].items():
            print(f"\nbatch {bs} ({report['n']} texts of {args.split}, {args.threads} threads, fastest of {args.repeats}):")
            print(f"| configuration | ex/s | accuracy | mean exit layer |\n|---|---:|---:|---:|")
            for k, v in res.items():
                print(f"| {k} | {v['ex_per_s']:.0f} | {100 * v['accuracy']:.2f}% | {v['mean_exit_layer']:.2f} |")
        print("\n| batch, precision | onnx speedup at threshold | ideal (L / mean exit) | fraction of ideal "
              "| token-weighted ideal | fraction of it | threshold 0 vs classifier |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for k, v in report["ratios"].items():
            print(f"| {k} | {v['speedup']:.2f}x | {v['ideal']:.2f}x | {v['ideal_fraction']:.2f} | {v['token_weighted_ideal']:.2f}x "
                  f"| {v['token_weighted_fraction']:.2f} | {v['threshold0_vs_classifier']:.2f} |")
        print("\ncorrectness:", json.dumps(report["correctness"]))
    if args.cold_start:
        report["cold_start"] = cold_start(args)
        print("\ncold start, one line (median of", args.cold_start, "interleaved runs):")
        for k, v in report["cold_start"].items():
            print(f"  {k}: {v['median_s']:.2f} s  (runs: {', '.join(f'{x:.2f}' for x in v['runs'])})")
    if args.load and args.before:
        report["load"] = load_times(args)
        print("\nload_checkpoint, imports warm (fastest of", args.load, "interleaved):",
              {k: round(v, 3) for k, v in report["load"]["load_checkpoint_seconds"].items()})
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
