"""Exact sweeps of every exit policy over one all-exits pass: the outcome of the entropy rule at every
threshold (one per layer too), of the patience rule at every patience value, of the learned exits at every
threshold; the recommended threshold for an accuracy budget, dead weight, one exit's figures. Pure
functions of the logits (a cache), with no model, data or device: analyze reports them, stage 2 picks its
recipe with them."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..metrics import accuracy, macro_f1, regression_report
from ..model.policies import LearnedPolicy, exit_entropy, first_exit, max_entropy, patience_exit, policy_exit

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
    wall_saving_noise: float | None = None  # its uncertainty, from the spread of the repeated runs (report.time_runs)


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


def layer_metrics(i: int, logits: torch.Tensor, labels: list, task: str, num_labels: int) -> dict:
    """One exit's figures from its logits [n, C]: {"layer", "accuracy", "macro_f1"} or, for regression,
    {"layer", "mse", "pearson", "spearman"}."""
    if task == "regression":
        return {"layer": i + 1, **regression_report(logits[:, 0].tolist(), labels)}
    p = logits.argmax(-1).tolist()
    return {"layer": i + 1, "accuracy": accuracy(p, labels), "macro_f1": macro_f1(p, labels, num_labels)}
