"""How a model's layers behave: per-exit quality, exact threshold sweeps from one all-exits pass,
a recommended threshold for an accuracy budget, dead weight, and examples by exit layer."""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch

from .checkpoint import load_checkpoint
from .config import AnalyzeConfig
from .data import DataSpec, eval_examples, encode, load_splits, to_examples
from .device import resolve_device
from .errors import UserError
from .exits import exit_entropy, first_exit, max_entropy
from .inference import ExitRule, PredictStats, predict_stream
from .metrics import accuracy, macro_f1

DEFAULT_GRID = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass
class SweepRow:
    threshold: float
    accuracy: float
    macro_f1: float
    accuracy_change: float  # percentage points vs full depth (negative = worse)
    mean_exit_layer: float
    layer_saving: float  # 1 - mean exit layer / L
    histogram: list  # samples exiting at layers 1..L
    measured_seconds: float | None = None  # wall-clock of a real early-exit run (timed thresholds only)
    wall_saving: float | None = None  # 1 - seconds / seconds at full depth


@dataclass
class SplitSweep:
    split: str
    n: int
    rows: list


@dataclass
class Analysis:
    checkpoint: str
    model: dict  # family, layers, base model, labels, parameter counts
    dataset: dict  # spec, split, n
    entropy: str
    layers: list  # per exit: {"layer", "accuracy", "macro_f1"}
    sweep: list  # SweepRow on the evaluation split
    max_drop: float
    recommendation: SweepRow | None
    test: dict | None  # how the recommendation holds on a test split
    dead_weight: dict
    examples: dict  # layer -> [{"text", "label", "predicted"}] at ``example_threshold``
    example_threshold: float | None = None
    timing: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def sweep_from_logits(logits: torch.Tensor, labels: list, thresholds: list, kind: str) -> list:
    """Exact outcome of the entropy rule at every threshold from the all-exits logits [L, n, C].
    (Exits are deterministic, so this equals running predict at each threshold.)"""
    L, n, C = logits.shape
    ent = exit_entropy(logits, kind)  # [L, n]
    preds = logits.argmax(-1)  # [L, n]
    y = torch.tensor(labels)
    full_acc = (preds[-1] == y).sum().item() / n
    top = max_entropy(C, kind)
    rows = []
    for t in thresholds:
        thr = torch.full((L,), math.inf if t >= top else float(t))
        layer = first_exit(ent, thr)  # [n] 0-based
        pred = preds.gather(0, layer.view(1, -1)).squeeze(0)
        acc = (pred == y).sum().item() / n
        hist = torch.bincount(layer, minlength=L).tolist()
        mean = (layer.float() + 1).mean().item()
        rows.append(SweepRow(float(t), acc, macro_f1(pred.tolist(), labels, C), 100 * (acc - full_acc), mean,
                             1 - mean / L, hist))
    return rows


def recommend(rows: list, max_drop: float) -> SweepRow | None:
    """The threshold with the largest layer saving whose accuracy drop stays within ``max_drop`` points
    (ties: the more accurate, then the smaller threshold)."""
    ok = [r for r in rows if -r.accuracy_change <= max_drop + 1e-9]
    if not ok:
        return None
    return max(ok, key=lambda r: (round(r.layer_saving, 12), r.accuracy, -r.threshold))


def dead_weight(layers: list, rec: SweepRow | None, n: int, share: float = 0.01) -> dict:
    """Layers almost no sample exits at under ``rec`` (< ``share`` of samples, the last layer excluded)
    and layers after which accuracy stops rising (within 0.5 points of the best) or falls."""
    accs = [l["accuracy"] for l in layers]
    best = max(accs)
    saturates_at = next(i + 1 for i, a in enumerate(accs) if a >= best - 0.005)
    falls = [l["layer"] for prev, l in zip(layers, layers[1:]) if l["accuracy"] < prev["accuracy"] - 1e-9]
    rare = []
    if rec is not None:
        rare = [i + 1 for i, c in enumerate(rec.histogram[:-1]) if c < share * n]
    return {"rarely_exited_layers": rare, "exit_share_below": share, "accuracy_saturates_at_layer": saturates_at,
            "layers_after_saturation": list(range(saturates_at + 1, len(layers) + 1)), "accuracy_falls_at_layers": falls}


def analyze(cfg: AnalyzeConfig, progress=None) -> Analysis:
    """Run every analysis of ``deebert analyze`` on the checkpoint's evaluation split (or ``cfg.split``)."""
    from .training import collect

    device = resolve_device(cfg.device)
    ckpt = load_checkpoint(cfg.checkpoint)
    if not ckpt.exits_trained:
        raise UserError(f"the off-ramps of '{cfg.checkpoint}' are not trained: run `deebert train-exits` first")
    model, tok, names = ckpt.model, ckpt.tokenizer, ckpt.label_names
    L = model.num_layers
    spec = DataSpec(**ckpt.meta.get("data", {}))
    overrides = {k: getattr(cfg, k) for k in ("dataset", "text_column", "text_pair_column", "label_column") if getattr(cfg, k)}
    spec = dataclasses.replace(spec, **overrides)
    ex, source = eval_examples(spec, names, cfg.split)
    max_length = ckpt.meta.get("max_length", 128)

    def all_logits(examples):
        enc = encode(tok, examples.texts, examples.pairs, max_length)
        return collect(model.to(device), enc, tok.pad_token_id, cfg.batch_size, device, pooled=False, all_logits=True)["logits"]

    logits = all_logits(ex)  # [L, n, C]
    labels = ex.labels
    layers = []
    for i in range(L):
        p = logits[i].argmax(-1).tolist()
        layers.append({"layer": i + 1, "accuracy": accuracy(p, labels), "macro_f1": macro_f1(p, labels, len(names))})
    grid = cfg.thresholds or list(DEFAULT_GRID if cfg.entropy == "normalized" else [t * math.log(len(names)) for t in DEFAULT_GRID])
    grid = sorted(set(grid))
    rows = sweep_from_logits(logits, labels, grid, cfg.entropy)
    rec = recommend(rows, cfg.max_drop)

    test = None
    if cfg.split is None and cfg.test_split:
        splits = load_splits(spec.dataset)
        if cfg.test_split in splits and cfg.test_split not in (spec.train_split, spec.eval_split):
            tex, _ = to_examples(splits[cfg.test_split], spec, cfg.test_split, names)
            trows = sweep_from_logits(all_logits(tex), tex.labels, grid, cfg.entropy)
            held = next((r for r in trows if r.threshold == rec.threshold), None) if rec else None
            test = {"split": cfg.test_split, "n": len(tex), "sweep": [dataclasses.asdict(r) for r in trows],
                    "at_recommended": dataclasses.asdict(held) if held else None}

    # wall-clock: real early-exit runs over the evaluation texts at full depth and chosen thresholds
    timed = sorted({0.0, *(cfg.timing_thresholds or []), *([rec.threshold] if rec else [])})
    lines = [t if p is None else f"{t}\t{p}" for t, p in zip(ex.texts, ex.pairs or [None] * len(ex))]
    seconds = {}
    for t in timed:
        rule = ExitRule([t] * L, cfg.entropy)
        stats = PredictStats(L)
        start = time.perf_counter()
        for _ in predict_stream(ckpt, lines, rule, device, batch_size=cfg.batch_size, stats=stats):
            pass
        seconds[t] = time.perf_counter() - start
    for r in rows:
        if r.threshold in seconds:
            r.measured_seconds = seconds[r.threshold]
            r.wall_saving = 1 - seconds[r.threshold] / seconds[0.0]

    examples = {}
    ex_thr = cfg.example_threshold if cfg.example_threshold is not None else (rec.threshold if rec else None)
    if ex_thr is not None and cfg.examples:
        ent = exit_entropy(logits, cfg.entropy)
        top = max_entropy(len(names), cfg.entropy)
        thr = torch.full((L,), math.inf if ex_thr >= top else ex_thr)
        layer = first_exit(ent, thr)
        for i in range(L):
            idx = (layer == i).nonzero().flatten().tolist()[: cfg.examples]
            examples[str(i + 1)] = [{"text": ex.texts[j], "label": names[labels[j]],
                                     "predicted": names[int(logits[i, j].argmax())]} for j in idx]
    counts = model.parameter_counts()
    return Analysis(
        checkpoint=str(cfg.checkpoint),
        model={"family": model.family, "layers": L, "base_model": ckpt.meta.get("base_model"), "labels": names,
               "backbone_parameters": counts.backbone, "off_ramp_parameters": counts.ramps, "overhead": counts.overhead,
               "ramp": model.ramp_cfg.to_dict()},
        dataset={**dataclasses.asdict(spec), "evaluated_on": source, "n": len(ex)},
        entropy=cfg.entropy, layers=layers, sweep=rows, max_drop=cfg.max_drop, recommendation=rec, test=test,
        dead_weight=dead_weight(layers, rec, len(ex)), examples=examples, example_threshold=ex_thr,
        timing={"batch_size": cfg.batch_size, "seconds": {str(k): v for k, v in seconds.items()}, "device": str(device)},
    )


def plot_analysis(a: Analysis, path: str) -> None:
    """PNG: accuracy vs layer saving (sweep, with measured wall-clock saving), per-exit accuracy, and the
    exit histogram at the recommended threshold."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'deebert-cli[plot]' (or pip install matplotlib)") from None
    fig, axes = plt.subplots(1, 3, figsize=(16, 5), constrained_layout=True)
    ax = axes[0]
    full = 100 * a.layers[-1]["accuracy"]
    # focus on the region a user chooses from; thresholds far below the budget are clipped, not hidden
    floor = full - max(5.0, 8 * a.max_drop)
    shown = [r for r in a.sweep if 100 * r.accuracy >= floor]
    clipped = len(a.sweep) - len(shown)
    ax.plot([100 * r.layer_saving for r in shown], [100 * r.accuracy for r in shown], "o-",
            label="layer saving (exact, all-exits pass)")
    timed = [r for r in shown if r.wall_saving is not None]
    if timed:
        ax.plot([100 * r.wall_saving for r in timed], [100 * r.accuracy for r in timed], "s", color="tab:orange",
                markersize=8, label="measured wall-clock saving")
    ax.axhline(full, color="gray", lw=0.8, ls=":", label=f"full depth ({full:.1f}%)")
    ax.axhline(full - a.max_drop, color="tab:red", lw=0.8, ls="--", label=f"budget: -{a.max_drop:g} points")
    if a.recommendation:
        r = a.recommendation
        ax.annotate(f"recommended: {r.threshold:g}", (100 * r.layer_saving, 100 * r.accuracy),
                    textcoords="offset points", xytext=(-45, -45), ha="center", arrowprops={"arrowstyle": "->"})
    last_x = -99.0
    for r in shown:  # label thresholds that are not crowded together
        x = 100 * r.layer_saving
        if x - last_x >= 3:
            ax.annotate(f"{r.threshold:g}", (x, 100 * r.accuracy), fontsize=7, xytext=(0, 6),
                        textcoords="offset points", ha="center", color="tab:blue")
            last_x = x
    ys = [100 * r.accuracy for r in shown]
    ax.set_ylim(min(ys + [full - a.max_drop]) - 1, max(ys + [full]) + 1)
    if clipped:
        ax.text(0.99, 0.02, f"{clipped} threshold(s) below {floor:.1f}% not shown", transform=ax.transAxes,
                ha="right", fontsize=8, color="gray")
    ax.set_xlabel("saving vs full depth (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Speed/accuracy trade-off ({a.entropy} entropy thresholds)")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)

    ax = axes[1]
    ls = [l["layer"] for l in a.layers]
    ax.bar(ls, [100 * l["accuracy"] for l in a.layers], color="tab:green")
    for l in a.layers:
        ax.text(l["layer"], 100 * l["accuracy"] + 0.5, f"{100 * l['accuracy']:.1f}", ha="center", fontsize=8)
    lo = min(100 * l["accuracy"] for l in a.layers)
    ax.set_ylim(max(0, lo - 10), 100)
    ax.set_xticks(ls)
    ax.set_xlabel("exit layer")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy of each exit (no early exit)")
    ax.grid(alpha=0.3, axis="y")

    ax = axes[2]
    if a.recommendation:
        h = a.recommendation.histogram
        n = sum(h)
        ax.bar(ls, [100 * c / n for c in h], color="tab:purple", label=f"threshold {a.recommendation.threshold:g}")
        ax.set_title("Where samples exit (recommended threshold)")
        ax.legend(fontsize=8)
    ax.set_xticks(ls)
    ax.set_xlabel("exit layer")
    ax.set_ylabel("share of samples (%)")
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{a.model.get('base_model') or a.checkpoint} on {a.dataset['dataset']} ({a.dataset['evaluated_on']}, n={a.dataset['n']})")
    fig.savefig(path, dpi=120)
    plt.close(fig)
