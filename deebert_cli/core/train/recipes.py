"""Stage 2's off-ramp recipes, and the choice between them by measurement.

A recipe is how the off-ramps read a layer and learn: pooling ([CLS] or mean), LayerNorm on the input,
self-distillation from the final classifier, temperature calibration. With none of them given,
``deebert train-exits`` trains every candidate on the one frozen-pass cache (each costs about a second
there; the pass is what costs) and keeps the one with the largest layer saving at the accuracy budget on
the evaluation split, measured exactly as ``deebert analyze`` does (sweep of the entropy rule from the
all-exits logits, recommended threshold for ``max_drop`` points); ties go to the more accurate, then to
the simpler recipe (earlier in :func:`candidates`). Regression checkpoints compare [CLS] and mean+norm
by the off-ramps' mean squared error (distillation and calibration need class probabilities).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..analysis.sweep import DEFAULT_GRID, recommend, sweep_from_logits
from ..metrics import regression_report

MEASURE = {
    "classification": "largest layer saving at the recommended threshold within the accuracy budget "
                      "(evaluation split); ties: higher accuracy, then the simpler recipe",
    "regression": "lowest mean squared error of the off-ramps, averaged over layers 1..L-1 (evaluation split)",
    "guaranteed": "the recipe whose point estimate saves most on a seeded 15% of the evaluation split, its threshold "
                  "certified (risk control) on the other 85% at the full delta",
}


@dataclass(frozen=True)
class Recipe:
    pooling: str = "cls"
    norm: bool = False
    distill: bool = False
    calibrate: bool = False

    @property
    def name(self) -> str:
        """'cls', 'mean+norm+distill+calibrate', ..."""
        parts = [self.pooling] + [n for n, on in (("norm", self.norm), ("distill", self.distill),
                                                   ("calibrate", self.calibrate)) if on]
        return "+".join(parts)

    @property
    def training(self) -> tuple:
        """What the trained weights depend on (calibration is fitted afterwards, on the same weights)."""
        return self.pooling, self.norm, self.distill


def candidates(task: str) -> list:
    """The recipes tried by default, simplest first: DeeBERT's [CLS] recipe and mean pooling + LayerNorm,
    each with and without distillation and calibration (classification); [CLS] and mean+norm (regression)."""
    if task == "regression":
        return [Recipe("cls"), Recipe("mean", True)]
    return [Recipe(p, n, d, c) for p, n in (("cls", False), ("mean", True)) for d in (False, True) for c in (False, True)]


def recipes_for(cfg, task: str, family_pooling: str = "cls") -> list:
    """The recipes stage 2 trains for ``cfg`` (a TrainExitsConfig): exactly the one given by the user's
    options (unset ones at DeeBERT's values; an unset or ``auto`` pooling is ``family_pooling``, what the
    family's own head reads), or every candidate when none is given."""
    if cfg.recipe_given:
        pooling = family_pooling if cfg.ramp_pooling in (None, "auto") else cfg.ramp_pooling
        return [Recipe(pooling, bool(cfg.ramp_norm), bool(cfg.distill), bool(cfg.calibrate))]
    return candidates(task)


def score(logits: torch.Tensor, labels: list, task: str, max_drop: float) -> dict:
    """The figures a recipe is judged by, from its all-exits logits [L, n, C] on the evaluation split.
    Classification: the threshold analyze would recommend for ``max_drop`` points (normalized entropy,
    analyze's default grid) and its accuracy, change, mean exit layer and layer saving, plus every exit's
    accuracy. Regression: every exit's MSE and their mean over the off-ramps."""
    L = logits.shape[0]
    if task == "regression":
        mses = [regression_report(logits[i, :, 0].tolist(), labels)["mse"] for i in range(L)]
        return {"layer_mse": mses, "mean_ramp_mse": sum(mses[:-1]) / max(L - 1, 1)}
    y = torch.tensor(labels)
    accs = [(logits[i].argmax(-1) == y).float().mean().item() for i in range(L)]
    rec = recommend(sweep_from_logits(logits, labels, list(DEFAULT_GRID), "normalized"), max_drop)
    return {"layer_accuracy": accs, "threshold": rec.threshold, "accuracy": rec.accuracy,
            "accuracy_change": rec.accuracy_change, "mean_exit_layer": rec.mean_exit_layer,
            "layer_saving": rec.layer_saving}


SELECT_FRACTION = 0.15  # the share of the evaluation split the recipe is chosen on (measured: 0.3 kept 71% of
# the point estimate's saving at 1,000 texts and 1 point, 0.15 75%: docs/BENCHMARKS.md)


def certify_recipes(kept_logits: list, labels: list, cfg, calibrated: bool = False) -> tuple:
    """The guaranteed threshold on the evaluation split (:func:`..analysis.risk.certify`; the budget is
    ``cfg.max_disagreement`` (a fraction) when given, else ``cfg.max_drop`` points of accuracy) of the one
    recipe it is for, the choice among several paid for by a split: the recipe is chosen on a seeded
    SELECT_FRACTION of the split (the one whose point estimate saves most there, :func:`score`) and only it
    is certified, at the full delta, on the other texts, which played no part in the choice. (Before, every
    recipe was certified on the whole split at delta / their number, a union bound;
    benchmarks/bench_guarantee.py measures both: docs/BENCHMARKS.md "Thresholds with a guarantee".)

    A recipe that calibrates fits its temperatures on the choosing part (stage2._try_recipes), so with
    ``calibrated`` even a single recipe is certified on the other texts only; a single recipe that does
    not is certified on the whole split. Returns (the Guarantee, the index of its recipe)."""
    from ..analysis.risk import certify, selection_parts

    risk = "disagreement" if cfg.max_disagreement is not None else "accuracy_drop"
    eps = cfg.max_disagreement if cfg.max_disagreement is not None else cfg.points / 100
    if len(kept_logits) == 1 and not calibrated:
        return certify(kept_logits[0].numpy(), labels, risk=risk, epsilon=eps, delta=cfg.delta), 0
    pick, rest = selection_parts(len(labels), SELECT_FRACTION)
    y = torch.tensor(labels)
    rows = [score(lg[:, torch.as_tensor(pick)], [labels[i] for i in pick], "classification", cfg.points)
            for lg in kept_logits]
    k = best(rows, "classification")
    g = certify(kept_logits[k].numpy()[:, rest], y[torch.as_tensor(rest)].tolist(), risk=risk, epsilon=eps,
                delta=cfg.delta)
    g.selection = "split"
    return g, k


def _measure(rows: list, task: str, k: int) -> tuple:
    if task == "regression":
        return (-rows[k]["mean_ramp_mse"], -k)
    return (round(rows[k]["layer_saving"], 12), round(rows[k]["accuracy"], 12), -k)


def best(rows: list, task: str) -> int:
    """Index of the chosen row (each a :func:`score` dict), by the task's :data:`MEASURE`."""
    return max(range(len(rows)), key=lambda k: _measure(rows, task, k))
