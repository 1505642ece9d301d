"""The DeeBERT recipe vs each off-ramp improvement, on one backbone, measured in one run.

    .venv/bin/python benchmarks/bench_offramps.py --checkpoint runs/minilm

For every variant: train the off-ramps (stage 2) on the stage-1 checkpoint, choose thresholds on the
validation split for an accuracy budget (0.5 and 1 point), and report on the test split the accuracy
change vs full depth, the layer saving, and the wall-clock saving of a real early-exit run (batch 32,
interleaved with a full-depth run, fastest of 2). Prints a markdown table; writes JSON beside the runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

from deebert_cli.core.analysis.sweep import outcome, recommend, search_per_layer, sweep_from_logits
from deebert_cli.core.model.checkpoint import load_checkpoint
from deebert_cli.core.config import TrainExitsConfig
from deebert_cli.core.data.examples import DataSpec, prepare_data, to_examples
from deebert_cli.core.data.encoding import encode
from deebert_cli.core.data.readers import load_splits
from deebert_cli.core.runtime.rules import ExitRule
from deebert_cli.core.runtime.stream import predict_stream
from deebert_cli.core.runtime.passes import collect
from deebert_cli.core.train.stage2 import train_exits

GRID = [round(0.025 * k, 3) for k in range(41)]
VARIANTS = {
    # name: (train-exits options, threshold search)
    "DeeBERT recipe (cls)": ({"ramp_pooling": "cls"}, "global"),
    "+ mean pooling + LayerNorm": ({"ramp_pooling": "mean", "ramp_norm": True}, "global"),
    "+ distillation": ({"ramp_pooling": "cls", "distill": True}, "global"),
    "+ calibration": ({"ramp_pooling": "cls", "calibrate": True}, "global"),
    "+ per-layer thresholds": ({"ramp_pooling": "cls"}, "per-layer"),
    "mean+norm + distill + calibrate": ({"ramp_pooling": "mean", "ramp_norm": True, "distill": True, "calibrate": True}, "global"),
    "mean+norm + distill + calibrate + per-layer": ({"ramp_pooling": "mean", "ramp_norm": True, "distill": True, "calibrate": True}, "per-layer"),
}


def all_logits(ck, ex):
    enc = encode(ck.tokenizer, ex.texts, ex.pairs, ck.meta.get("max_length", 128))
    return collect(ck.model, enc, ck.tokenizer.pad_token_id, 64, "cpu", pooled=False, all_logits=True)["logits"]


def wall(ck, texts, thresholds, repeats=2):
    """Fastest of ``repeats`` runs for each thresholds vector (interleaved)."""
    L = ck.model.num_layers
    best = [math.inf] * len(thresholds)
    for _ in range(repeats):
        for k, t in enumerate(thresholds):
            start = time.perf_counter()
            for _ in predict_stream(ck, texts, ExitRule(list(t) + [0.0]), "cpu", batch_size=32):
                pass
            best[k] = min(best[k], time.perf_counter() - start)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="runs/minilm", help="stage-1 (or later) checkpoint")
    ap.add_argument("--out", default="runs/offramps")
    ap.add_argument("--budgets", default="0.5,1.0")
    ap.add_argument("--plot", default="docs/offramps.png", help="curves per variant on the test split")
    ap.add_argument("--replot", action="store_true", help="only redraw the plot from the saved JSON")
    args = ap.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    if args.replot:
        plot(json.loads(Path(f"{args.out}.json").read_text()), budgets, args.plot)
        return
    base = load_checkpoint(args.checkpoint)
    spec = DataSpec(**base.meta["data"])
    val = prepare_data(spec).eval
    test, _ = to_examples(load_splits(spec.dataset)["test"], spec, "test", base.label_names)
    L = base.model.num_layers
    trained = {}
    results = []
    t_start = time.perf_counter()
    for name, (opts, search) in VARIANTS.items():
        key = json.dumps(opts, sort_keys=True)
        if key not in trained:
            out = f"{args.out}-{len(trained)}"
            res = train_exits(TrainExitsConfig(checkpoint=args.checkpoint, output=out, device="cpu", **opts))
            ck = load_checkpoint(out)
            trained[key] = (ck, all_logits(ck, val), all_logits(ck, test), res)
        ck, vlog, tlog, res = trained[key]
        row = {"variant": name, "options": opts, "search": search,
               "val_layer_accuracy": [l["accuracy"] for l in res.eval.layers]}
        chosen = []
        for b in budgets:
            if search == "global":
                rec = recommend(sweep_from_logits(vlog, val.labels, GRID, "normalized"), b)
                thr = [rec.threshold] * (L - 1)
            else:
                thr, _ = search_per_layer(vlog, val.labels, GRID, "normalized", b)
            t = outcome(tlog, test.labels, thr, "normalized")
            chosen.append(thr)
            row[f"budget_{b:g}"] = {"thresholds": thr, "test_accuracy": t.accuracy, "test_change": t.accuracy_change,
                                    "test_layer_saving": t.layer_saving, "test_histogram": t.histogram}
        secs = wall(ck, test.texts, [[0.0] * (L - 1)] + chosen)
        for b, s in zip(budgets, secs[1:]):
            row[f"budget_{b:g}"]["wall_saving"] = 1 - s / secs[0]
        row["test_curve"] = [dataclasses.asdict(r) for r in sweep_from_logits(tlog, test.labels, GRID, "normalized")]
        results.append(row)
        print(f"[{time.perf_counter() - t_start:6.0f}s] {name}: " + "; ".join(
            f"{b:g}pt: {row[f'budget_{b:g}']['test_change']:+.2f} pts, {100 * row[f'budget_{b:g}']['test_layer_saving']:.1f}% layers, "
            f"{100 * row[f'budget_{b:g}']['wall_saving']:.1f}% time" for b in budgets), flush=True)
    Path(f"{args.out}.json").write_text(json.dumps(results, indent=2))
    if args.plot:
        plot(results, budgets, args.plot)
    full = outcome(next(iter(trained.values()))[2], test.labels, [0.0] * (L - 1), "normalized").accuracy
    print(f"\nstage-1 checkpoint {args.checkpoint}; test split n={len(test)}, full-depth test accuracy {100 * full:.2f}%; "
          f"thresholds chosen on validation (n={len(val)})\n")
    head = "| variant | val accuracy of off-ramps 1..L-1 |" + "".join(
        f" {b:g}-pt budget: test Δ acc | layer saving | time saving |" for b in budgets)
    print(head)
    print("|" + "---|" * (2 + 3 * len(budgets)))
    for r in results:
        cells = [r["variant"], " / ".join(f"{100 * a:.1f}" for a in r["val_layer_accuracy"][:-1])]
        for b in budgets:
            x = r[f"budget_{b:g}"]
            cells += [f"{x['test_change']:+.2f}", f"{100 * x['test_layer_saving']:.1f}%", f"{100 * x['wall_saving']:.1f}%"]
        print("| " + " | ".join(cells) + " |")


def plot(results, budgets, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6), constrained_layout=True)
    full = 100 * results[0]["test_curve"][0]["accuracy"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, r in enumerate(x for x in results if x["search"] == "global"):
        pts = [c for c in r["test_curve"] if 100 * c["accuracy"] >= full - 6]
        ax.plot([100 * c["layer_saving"] for c in pts], [100 * c["accuracy"] for c in pts], "-", color=colors[k % 10],
                alpha=0.8, label=f"{r['variant']} (global threshold sweep)")
    markers = {b: m for b, m in zip(budgets, "os^D")}
    for k, r in enumerate(results):
        for b in budgets:
            x = r[f"budget_{b:g}"]
            ax.plot(100 * x["test_layer_saving"], full + x["test_change"], markers[b], color="black" if r["search"] == "per-layer" else "none",
                    markeredgecolor="black", markersize=7)
            ax.annotate(f"{k + 1}", (100 * x["test_layer_saving"], full + x["test_change"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
    for b in budgets:
        ax.axhline(full - b, ls=":", lw=0.8, color="tab:red")
        ax.text(1, full - b + 0.05, f"-{b:g} point", fontsize=8, color="tab:red")
    ax.axhline(full, ls=":", lw=0.8, color="gray")
    ax.set_xlabel("layer saving vs full depth on the test split (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Off-ramp variants on all-MiniLM-L6-v2 / movie reviews (test split)\n"
                 "lines: global-threshold sweeps; markers: thresholds chosen on validation\n"
                 f"({', '.join(f'{m} = {b:g}-point budget' for b, m in markers.items())}; filled = per-layer thresholds; "
                 "numbers = table rows)", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
