"""How a model's layers behave: per-exit quality, exact sweeps of every exit policy (entropy thresholds,
patience values) from one all-exits pass,
a recommended threshold for an accuracy budget, dead weight, and examples by exit layer."""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .model.checkpoint import load_checkpoint
from .config import AnalyzeConfig
from .data.examples import DataSpec, eval_examples, to_examples
from .data.encoding import encode
from .data.readers import load_splits
from .device import resolve_device
from .errors import UserError
from .model.policies import LearnedPolicy, exit_entropy, first_exit, max_entropy, patience_exit, policy_exit
from .runtime.rules import ExitRule
from .runtime.stream import PredictStats, predict_stream
from .metrics import accuracy, macro_f1, regression_report

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
class PatienceRow:
    """The patience policy at one patience value (exact, from the all-exits logits)."""

    patience: int
    accuracy: float
    macro_f1: float
    accuracy_change: float  # percentage points vs full depth
    mean_exit_layer: float
    layer_saving: float
    histogram: list


@dataclass
class RegressionPatienceRow:
    """The patience policy on a regression checkpoint at one patience value and tolerance."""

    patience: int
    tolerance: float
    mse: float
    pearson: float
    spearman: float
    mse_change: float  # vs full depth (positive = worse)
    mean_exit_layer: float
    layer_saving: float
    histogram: list


@dataclass
class RegressionSweepRow:
    """A thresholded policy (learned exits) on a regression checkpoint at one threshold."""

    threshold: float
    mse: float
    pearson: float
    spearman: float
    mse_change: float
    mean_exit_layer: float
    layer_saving: float
    histogram: list


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
    per_layer: dict | None = None  # thresholds searched per layer for the budget, and how they do
    stored_thresholds: list | None = None  # what was written into the checkpoint (predict's default)
    cls_spread: list = field(default_factory=list)  # per layer: spread of [CLS] states across inputs
    warnings: list = field(default_factory=list)
    timing: dict = field(default_factory=dict)
    patience_sweep: list = field(default_factory=list)  # PatienceRow per patience value
    patience_recommendation: PatienceRow | None = None  # largest saving within max_drop
    task: str = "classification"  # regression: layers hold mse/pearson/spearman, no entropy sweep
    learned_sweep: list = field(default_factory=list)  # learned exits (BERxiT): SweepRow / RegressionSweepRow per threshold
    runtime: dict = field(default_factory=dict)  # --runtime onnx: the export's accuracy beside torch fp32 (exact)

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


def patience_sweep(logits: torch.Tensor, labels: list, values: list) -> list:
    """Exact outcome of the patience policy at every patience value from all-exits logits [L, n, C]
    (the same decision steps predict's engines take, so this equals running predict with --patience N)."""
    L, n, C = logits.shape
    preds = logits.argmax(-1)  # [L, n]
    y = torch.tensor(labels)
    full_acc = (preds[-1] == y).sum().item() / n
    rows = []
    for N in values:
        layer = patience_exit(logits, N)  # [n] 0-based
        pred = preds.gather(0, layer.view(1, -1)).squeeze(0)
        acc = (pred == y).sum().item() / n
        mean = (layer.float() + 1).mean().item()
        rows.append(PatienceRow(int(N), acc, macro_f1(pred.tolist(), labels, C), 100 * (acc - full_acc), mean,
                                1 - mean / L, torch.bincount(layer, minlength=L).tolist()))
    return rows


def regression_patience_sweep(values_all: torch.Tensor, targets: list, patience: list, tolerance: float) -> list:
    """Exact outcome of the patience policy on a regression checkpoint from all-exits outputs [L, n, 1]:
    per patience value, MSE / Pearson / Spearman of the values at the exit layer, and the exit histogram."""
    L = values_all.shape[0]
    full = regression_report(values_all[-1, :, 0].tolist(), targets)["mse"]
    rows = []
    for N in patience:
        layer = patience_exit(values_all, N, tolerance)  # [n] 0-based
        pred = values_all[:, :, 0].gather(0, layer.view(1, -1)).squeeze(0).tolist()
        rep = regression_report(pred, targets)
        mean = (layer.float() + 1).mean().item()
        rows.append(RegressionPatienceRow(int(N), tolerance, rep["mse"], rep["pearson"], rep["spearman"], rep["mse"] - full,
                                          mean, 1 - mean / L, torch.bincount(layer, minlength=L).tolist()))
    return rows


def learned_sweep(logits: torch.Tensor, labels: list, scores: torch.Tensor, grid: list, regression: bool = False) -> list:
    """Exact outcome of the learned-exit policy at every threshold of ``grid`` from all-exits logits
    [L, n, C] and exit scores [L-1, n] (the engines' decision steps): SweepRow per threshold, or
    RegressionSweepRow for a regression checkpoint."""
    L, n, C = logits.shape
    rows = []
    if regression:
        full = regression_report(logits[-1, :, 0].tolist(), labels)["mse"]
    else:
        preds = logits.argmax(-1)
        y = torch.tensor(labels)
        full_acc = (preds[-1] == y).sum().item() / n
    for t in grid:
        layer = policy_exit(LearnedPolicy(float(t), regression), logits, scores)
        mean = (layer.float() + 1).mean().item()
        hist = torch.bincount(layer, minlength=L).tolist()
        if regression:
            pred = logits[:, :, 0].gather(0, layer.view(1, -1)).squeeze(0).tolist()
            rep = regression_report(pred, labels)
            rows.append(RegressionSweepRow(float(t), rep["mse"], rep["pearson"], rep["spearman"], rep["mse"] - full,
                                           mean, 1 - mean / L, hist))
        else:
            pred = preds.gather(0, layer.view(1, -1)).squeeze(0)
            acc = (pred == y).sum().item() / n
            rows.append(SweepRow(float(t), acc, macro_f1(pred.tolist(), labels, C), 100 * (acc - full_acc), mean,
                                 1 - mean / L, hist))
    return rows


def recommend_patience(rows: list, max_drop: float) -> PatienceRow | None:
    """The patience value with the largest layer saving within ``max_drop`` points (ties: more accurate,
    then larger patience)."""
    ok = [r for r in rows if -r.accuracy_change <= max_drop + 1e-9]
    return max(ok, key=lambda r: (round(r.layer_saving, 12), r.accuracy, r.patience)) if ok else None


def outcome(logits: torch.Tensor, labels: list, thresholds: list, kind: str, ent: torch.Tensor | None = None) -> SweepRow:
    """The entropy rule with one threshold per layer (``thresholds``: L-1 values) on all-exits logits."""
    L, n, C = logits.shape
    ent = exit_entropy(logits, kind) if ent is None else ent
    top = max_entropy(C, kind)
    thr = torch.tensor([math.inf if t >= top else float(t) for t in thresholds] + [0.0])
    layer = first_exit(ent, thr)
    preds = logits.argmax(-1)
    y = torch.tensor(labels)
    pred = preds.gather(0, layer.view(1, -1)).squeeze(0)
    acc = (pred == y).sum().item() / n
    full = (preds[-1] == y).sum().item() / n
    mean = (layer.float() + 1).mean().item()
    return SweepRow(float("nan"), acc, macro_f1(pred.tolist(), labels, C), 100 * (acc - full), mean, 1 - mean / L,
                    torch.bincount(layer, minlength=L).tolist())


def search_per_layer(logits: torch.Tensor, labels: list, grid: list, kind: str, max_drop: float) -> tuple:
    """Greedy search of one threshold per layer (L-1 values from ``grid``) maximising layer saving with an
    accuracy drop within ``max_drop`` points: from full depth, repeatedly take the raise of one layer's
    threshold with the best saving gained per accuracy point lost. Returns (thresholds, SweepRow)."""
    L = logits.shape[0]
    grid = sorted(set([0.0, *grid]))
    ent = exit_entropy(logits, kind)
    cur = [0] * (L - 1)
    best = outcome(logits, labels, [grid[j] for j in cur], kind, ent)
    while True:
        choice = None
        for i in range(L - 1):
            for j in range(cur[i] + 1, len(grid)):
                cand = cur.copy()
                cand[i] = j
                row = outcome(logits, labels, [grid[k] for k in cand], kind, ent)
                gain = row.layer_saving - best.layer_saving
                if -row.accuracy_change > max_drop + 1e-9 or gain <= 1e-12:
                    continue
                score = gain / max(100 * (best.accuracy - row.accuracy), 1e-6)
                if choice is None or score > choice[0]:
                    choice = (score, cand, row)
        if choice is None:
            break
        _, cur, best = choice
    return [grid[j] for j in cur], best


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


def wanted_policies(cfg: AnalyzeConfig, ckpt) -> set:
    """The exit policies to compare: ``cfg.exit_policy``, or every one that applies to the checkpoint
    (entropy: classification only; learned: with learned exits). Asking for one that cannot apply, or
    leaving out entropy while asking for entropy-only figures, is a UserError."""
    applies = {"patience"} | ({"entropy"} if ckpt.task != "regression" else set())
    applies |= {"learned"} if ckpt.model.ramp_cfg.learned_exit else set()
    if not cfg.exit_policy:
        return applies
    want = set(cfg.exit_policy)
    if "entropy" in want and ckpt.task == "regression":
        raise UserError("entropy needs class probabilities: a regression checkpoint compares patience (and learned) exits")
    if "learned" in want and "learned" not in applies:
        raise UserError(f"'{cfg.checkpoint}' has no learned exits: run `deebert train-exits --learned-exits` first")
    if "entropy" not in want and (cfg.per_layer or cfg.store_thresholds):
        raise UserError("--per-layer and --store-thresholds are about entropy thresholds: include entropy in --exit-policy")
    return want


def analyze(cfg: AnalyzeConfig, progress=None) -> Analysis:
    """Run every analysis of ``deebert analyze`` on the checkpoint's evaluation split (or ``cfg.split``)."""
    from .runtime.passes import collect, exit_scores

    device = resolve_device(cfg.device)
    ckpt = load_checkpoint(cfg.checkpoint)
    if not ckpt.exits_trained:
        raise UserError(f"the off-ramps of '{cfg.checkpoint}' are not trained: run `deebert train-exits` first")
    model, tok, names = ckpt.model, ckpt.tokenizer, ckpt.label_names
    L = model.num_layers
    spec = DataSpec(**ckpt.meta.get("data", {}))
    overrides = {k: getattr(cfg, k) for k in ("dataset", "text_column", "text_pair_column", "label_column") if getattr(cfg, k)}
    spec = dataclasses.replace(spec, **overrides)
    # a file given with --dataset is evaluated whole (it is one split; nothing is carved out of it)
    whole_file = bool(cfg.dataset) and Path(cfg.dataset).expanduser().is_file()
    ex, source = eval_examples(spec, names, cfg.split or ("train" if whole_file else None))
    if whole_file:
        source = f"all of '{cfg.dataset}'" if cfg.split in (None, "train") else source
    max_length = ckpt.meta.get("max_length", 128)

    learned = model.ramp_cfg.learned_exit
    scores = None  # learned exit scores [L-1, n] of the evaluation split

    def all_logits(examples, cls=False):
        nonlocal scores
        enc = encode(tok, examples.texts, examples.pairs, max_length)
        got = collect(model.to(device), enc, tok.pad_token_id, cfg.batch_size, device, pooled=learned and cls,
                      all_logits=True, cls=cls)
        if cls and learned:
            scores = exit_scores(model, got["pooled"].to(device))
        return (got["logits"], got["cls"]) if cls else got["logits"]

    logits, cls_states = all_logits(ex, cls=True)  # [L, n, C], [L, n, H]
    lgrid = sorted(set(cfg.learned_thresholds or DEFAULT_GRID))
    want = wanted_policies(cfg, ckpt)
    learned = learned and "learned" in want
    if ckpt.task == "regression":
        a = _analyze_regression(cfg, ckpt, spec, source, ex, logits)
        a.learned_sweep = learned_sweep(logits, ex.labels, scores, lgrid, regression=True) if learned else []
        return a
    # how much the first-token state varies across inputs, per layer (std over inputs, mean over dims)
    spread = cls_states.std(1).mean(-1).tolist() if len(ex) > 1 else [float("nan")] * L
    warnings = []
    flat = [i + 1 for i in range(L - 1) if spread[i] < 0.05 * spread[-1]]
    if flat and model.ramp_cfg.pooling == "cls":
        warnings.append(
            f"the [CLS] states of layer(s) {', '.join(map(str, flat))} barely vary across the evaluation set "
            f"(spread {min(spread[i - 1] for i in flat):.4f}-{max(spread[i - 1] for i in flat):.4f} vs "
            f"{spread[-1]:.4f} at layer {L}), so their off-ramps cannot tell inputs apart; retrain with "
            "`deebert train-exits --ramp-pooling mean --ramp-norm`")
    labels = ex.labels
    layers = []
    for i in range(L):
        p = logits[i].argmax(-1).tolist()
        layers.append({"layer": i + 1, "accuracy": accuracy(p, labels), "macro_f1": macro_f1(p, labels, len(names))})
    grid = cfg.thresholds or list(DEFAULT_GRID if cfg.entropy == "normalized" else [t * math.log(len(names)) for t in DEFAULT_GRID])
    grid = sorted(set(grid))
    rows = sweep_from_logits(logits, labels, grid, cfg.entropy) if "entropy" in want else []
    rec = recommend(rows, cfg.max_drop)
    prows = patience_sweep(logits, labels, sorted(set(cfg.patience if cfg.patience is not None else range(L)))) if "patience" in want else []
    prec = recommend_patience(prows, cfg.max_drop)

    per_layer = None
    if cfg.per_layer:
        fine = sorted(set(grid) | {round(k * 0.025, 3) * (1 if cfg.entropy == "normalized" else math.log(len(names))) for k in range(41)})
        pl_thr, pl_row = search_per_layer(logits, labels, fine, cfg.entropy, cfg.max_drop)
        per_layer = {"thresholds": pl_thr, **dataclasses.asdict(pl_row)}
        per_layer.pop("threshold")

    test = None
    if cfg.split is None and not whole_file and cfg.test_split and rows:
        splits = load_splits(spec.dataset)
        if cfg.test_split in splits and cfg.test_split not in (spec.train_split, spec.eval_split):
            tex, _ = to_examples(splits[cfg.test_split], spec, cfg.test_split, names)
            tlogits = all_logits(tex)
            trows = sweep_from_logits(tlogits, tex.labels, grid, cfg.entropy)
            held = next((r for r in trows if r.threshold == rec.threshold), None) if rec else None
            test = {"split": cfg.test_split, "n": len(tex), "sweep": [dataclasses.asdict(r) for r in trows],
                    "at_recommended": dataclasses.asdict(held) if held else None}
            if per_layer is not None:
                prow = dataclasses.asdict(outcome(tlogits, tex.labels, per_layer["thresholds"], cfg.entropy))
                prow.pop("threshold")
                test["at_per_layer"] = prow

    # wall-clock: real early-exit runs over the evaluation texts at full depth and chosen thresholds,
    # interleaved and repeated (fastest run kept) so that load on a shared machine hits them alike
    timed = {t: [t] * (L - 1) for t in sorted({0.0, *(cfg.timing_thresholds or []), *([rec.threshold] if rec else [])})}
    if per_layer is not None:
        timed["per-layer"] = per_layer["thresholds"]
    lines = [t if p is None else f"{t}\t{p}" for t, p in zip(ex.texts, ex.pairs or [None] * len(ex))]
    seconds, timed_acc = time_runs(cfg, ckpt, device, timed, lines, labels)
    runtime = runtime_report(cfg, timed_acc, layers, rows, rec)
    for r in rows:
        if r.threshold in seconds:
            r.measured_seconds = seconds[r.threshold]
            r.wall_saving = 1 - seconds[r.threshold] / seconds[0.0]
    if per_layer is not None:
        per_layer["measured_seconds"] = seconds["per-layer"]
        per_layer["wall_saving"] = 1 - seconds["per-layer"] / seconds[0.0]

    stored = None
    if cfg.store_thresholds:
        if per_layer is not None:
            stored = per_layer["thresholds"]
        elif rec is not None:
            stored = [rec.threshold] * (L - 1)
        else:
            raise UserError(f"no threshold keeps the accuracy drop within {cfg.max_drop:g} points: nothing stored")
        store_thresholds(ckpt.path, {"entropy": cfg.entropy, "values": stored, "max_drop": cfg.max_drop,
                                     "search": "per-layer" if per_layer is not None else "global",
                                     "chosen_on": source})

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
        per_layer=per_layer, stored_thresholds=stored, cls_spread=spread, warnings=warnings,
        timing={"batch_size": cfg.batch_size, "repeats": cfg.timing_repeats, "device": str(device),
                "runtime": cfg.runtime if cfg.runtime == "torch" else f"onnx ({cfg.onnx_precision})",
                "seconds": {str(k): v for k, v in seconds.items()}},
        runtime=runtime,
        patience_sweep=prows, patience_recommendation=prec,
        learned_sweep=learned_sweep(logits, labels, scores, lgrid) if learned else [],
    )


def time_runs(cfg: AnalyzeConfig, ckpt, device, timed: dict, lines: list, labels: list) -> tuple:
    """Real early-exit runs over ``lines`` on ``cfg.runtime`` at every entry of ``timed`` (key -> L-1
    thresholds), interleaved and repeated (fastest kept) so that load on a shared machine hits them alike
    -> (seconds per key, accuracy per key of the runtime's own predictions)."""
    run_ckpt, run_device = ckpt, device
    if cfg.runtime == "onnx":
        from .runtime.stream import load_for_inference

        run_ckpt, run_device = load_for_inference(cfg.checkpoint, "onnx", precision=cfg.onnx_precision), None
    L = ckpt.model.num_layers
    seconds, acc = {k: math.inf for k in timed}, {}
    for _ in range(cfg.timing_repeats):
        for key, vals in timed.items():
            start = time.perf_counter()
            got = [r.label for r in predict_stream(run_ckpt, lines, ExitRule(list(vals) + [0.0], cfg.entropy), run_device,
                                                   batch_size=cfg.batch_size)]
            seconds[key] = min(seconds[key], time.perf_counter() - start)
            acc[key] = accuracy(got, labels)
    assert L == run_ckpt.model.num_layers
    return seconds, acc


def runtime_report(cfg: AnalyzeConfig, timed_acc: dict, layers: list, rows: list, rec) -> dict:
    """On --runtime onnx: the accuracy of the export's own predictions (fp32 or int8) at full depth and at
    the recommended threshold, beside the exact torch fp32 figures of the same thresholds."""
    if cfg.runtime != "onnx":
        return {}
    out = {"runtime": "onnx", "precision": cfg.onnx_precision, "full_depth_accuracy": timed_acc[0.0],
           "torch_fp32_full_depth_accuracy": layers[-1]["accuracy"]}
    if rec is not None:
        out["at_recommended"] = {"threshold": rec.threshold, "accuracy": timed_acc[rec.threshold],
                                 "torch_fp32_accuracy": rec.accuracy}
    return out


def _analyze_regression(cfg: AnalyzeConfig, ckpt, spec: DataSpec, source: str, ex, values: torch.Tensor) -> Analysis:
    """analyze for a regression checkpoint from all-exits outputs [L, n, 1]: per-layer MSE and Pearson /
    Spearman correlation, and the patience sweep at ``cfg.tolerance`` (entropy does not apply)."""
    from .training import layer_metrics

    if cfg.store_thresholds or cfg.per_layer:
        raise UserError("--store-thresholds and --per-layer are about entropy thresholds, which do not apply to a regression checkpoint")
    model = ckpt.model
    L = model.num_layers
    layers = [layer_metrics(i, values[i], ex.labels, "regression", 1) for i in range(L)]
    prows = regression_patience_sweep(values, ex.labels, sorted(set(cfg.patience if cfg.patience is not None else range(L))),
                                      cfg.tolerance) if "patience" in wanted_policies(cfg, ckpt) else []
    counts = model.parameter_counts()
    return Analysis(
        checkpoint=str(cfg.checkpoint),
        model={"family": model.family, "layers": L, "base_model": ckpt.meta.get("base_model"), "labels": ckpt.label_names,
               "backbone_parameters": counts.backbone, "off_ramp_parameters": counts.ramps, "overhead": counts.overhead,
               "ramp": model.ramp_cfg.to_dict()},
        dataset={**dataclasses.asdict(spec), "evaluated_on": source, "n": len(ex)},
        entropy="n/a", layers=layers, sweep=[], max_drop=cfg.max_drop, recommendation=None, test=None,
        dead_weight={}, examples={}, patience_sweep=prows, task="regression",
    )


def plot_regression(a: Analysis, path: str) -> None:
    """PNG for a regression checkpoint: MSE vs layer saving of the patience sweep, and per-exit correlation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    ax = axes[0]
    ps = a.patience_sweep
    ax.plot([100 * r.layer_saving for r in ps], [r.mse for r in ps], "^-", color="tab:brown",
            label=f"patience policy (tolerance {ps[0].tolerance:g})" if ps else "patience policy")
    for r in ps:
        ax.annotate(f"N={r.patience}", (100 * r.layer_saving, r.mse), fontsize=7, xytext=(0, 6),
                    textcoords="offset points", ha="center")
    if a.learned_sweep:
        ax.plot([100 * r.layer_saving for r in a.learned_sweep], [r.mse for r in a.learned_sweep], "D-",
                color="tab:cyan", label="learned exits")
    ax.axhline(a.layers[-1]["mse"], color="gray", lw=0.8, ls=":", label="full depth")
    ax.set_xlabel("layer saving vs full depth (%)")
    ax.set_ylabel("MSE (lower is better)")
    ax.set_title("Speed/error trade-off")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1]
    ls = [l["layer"] for l in a.layers]
    ax.plot(ls, [l["pearson"] for l in a.layers], "o-", label="Pearson")
    ax.plot(ls, [l["spearman"] for l in a.layers], "s-", label="Spearman")
    ax.set_xticks(ls)
    ax.set_xlabel("exit layer")
    ax.set_ylabel("correlation with the target")
    ax.set_title("Correlation of each exit (no early exit)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def store_thresholds(path, thresholds: dict) -> None:
    """Write ``thresholds`` into the checkpoint's deebert.json (atomically: temp file, then rename);
    predict uses them when no threshold is given."""
    import json
    from pathlib import Path

    from .model.checkpoint import META_FILE
    from .files import atomic_text_file

    meta_path = Path(path) / META_FILE
    meta = json.loads(meta_path.read_text())
    meta["thresholds"] = thresholds
    with atomic_text_file(meta_path) as f:
        f.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def plot_analysis(a: Analysis, path: str) -> None:
    """PNG: accuracy vs layer saving (sweep, with measured wall-clock saving), per-exit accuracy, and the
    exit histogram at the recommended threshold."""
    try:
        import matplotlib
        if a.task == "regression":
            return plot_regression(a, path)

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
            label="entropy policy: layer saving (exact, all-exits pass)")
    pshown = [r for r in a.patience_sweep if 100 * r.accuracy >= floor]
    if pshown:
        ax.plot([100 * r.layer_saving for r in pshown], [100 * r.accuracy for r in pshown], "^-", color="tab:brown",
                label="patience policy (exact; labels = N)")
        for r in pshown:
            ax.annotate(f"N={r.patience}", (100 * r.layer_saving, 100 * r.accuracy), fontsize=7, xytext=(0, -10),
                        textcoords="offset points", ha="center", color="tab:brown")
    lshown = [r for r in a.learned_sweep if 100 * r.accuracy >= floor]
    if lshown:
        ax.plot([100 * r.layer_saving for r in lshown], [100 * r.accuracy for r in lshown], "D-", color="tab:cyan",
                label="learned exits (exact; labels = threshold)")
    timed = [r for r in shown if r.wall_saving is not None]
    if timed:
        ax.plot([100 * r.wall_saving for r in timed], [100 * r.accuracy for r in timed], "s", color="tab:orange",
                markersize=8, label="measured wall-clock saving")
    if a.per_layer is not None:
        pl = a.per_layer
        ax.plot([100 * pl["layer_saving"]], [100 * pl["accuracy"]], "*", color="tab:green", markersize=14,
                label="per-layer thresholds (searched)")
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
    ys = [100 * r.accuracy for r in shown + pshown + lshown]
    ax.set_ylim(min(ys + [full - a.max_drop]) - 1, max(ys + [full]) + 1)
    if clipped:
        ax.text(0.99, 0.02, f"{clipped} threshold(s) below {floor:.1f}% not shown", transform=ax.transAxes,
                ha="right", fontsize=8, color="gray")
    ax.set_xlabel("saving vs full depth (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Speed/accuracy trade-off by exit policy ({a.entropy} entropy)")
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
