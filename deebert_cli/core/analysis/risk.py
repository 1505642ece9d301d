"""Thresholds with a guarantee: risk control for early exit (Learn then Test, fixed-sequence testing).

A threshold picked because it kept a validation split's accuracy drop within budget is a point estimate
chosen after many looks at one sample: on new data it can cost more. Here the threshold comes with a
statement about new data from the same distribution::

    P( risk(threshold) <= epsilon ) >= 1 - delta        (over the draw of the n calibration texts)

where risk is the expected per-text loss on new texts (the next million, not the split it was tuned on).

**Losses** (each 0 or 1 per text, so that an exact binomial bound applies):

* ``accuracy_drop``: the final layer is right and the exit is wrong. The accuracy drop (final accuracy
  minus exit accuracy) is this rate minus the rate of "final wrong, exit right", so controlling it
  controls the drop. A loss in {-1, 0, 1} bounded with Hoeffding would be far looser at n = 1,000.
* ``disagreement``: the exit's answer differs from the final layer's (needs no labels: calibrate on your
  own unlabelled texts). It bounds the accuracy drop too (a drop needs a disagreement).
* regression: ``error_increase`` = |exit - y| > |final - y| + tolerance, and ``disagreement`` =
  |exit - final| > tolerance.

**Method** (Angelopoulos et al., "Learn then Test", 2021; CALM, Schuster et al., NeurIPS 2022; "Fast yet
Safe", Jazbec et al., 2024): candidate settings are ordered from conservative to aggressive before any
data is seen (entropy thresholds upward, patience downward, learned-exit thresholds toward more exits).
For each, the null hypothesis "risk > epsilon" has the exact p-value P(Binomial(n, epsilon) <= k), k the
losses on the calibration texts. Fixed-sequence testing rejects in order while p <= delta and stops at the
first failure; the last rejected setting is returned. Family-wise error <= delta, so the guarantee holds
for the returned setting whatever the path (no monotonicity needed). Comparing K candidates (off-ramp
recipes) and keeping the best is covered by testing each at delta / K (union bound).

Everything here is numpy over an all-exits cache (logits of every exit for every text); nothing imports
torch. The binomial tail is computed exactly in log space (a dozen lines; scipy would be a 40 MB
dependency for one function).
"""
from __future__ import annotations

import math
import numpy as np

from ..model.guarantee import Guarantee
from . import exact
from .bounds import betting_p_value, betting_upper_bound, order, signed_losses

RISKS = ("accuracy_drop", "disagreement")  # classification
REGRESSION_RISKS = ("error_increase", "disagreement")
METHODS = ("exact", "binomial", "betting")  # accuracy drop: the drop's exact score test (the default), the binary
# loss's binomial bound, the drop's betting bound
DEFAULT_DELTA = 0.05
SELECTION_SEED = 1  # the seeded split of the calibration texts into a choosing part and a certifying part
# the candidate entropy thresholds, conservative to aggressive: 0.005 steps of normalized entropy
FINE_GRID = tuple(round(k * 0.005, 3) for k in range(1, 201))
LEARNED_GRID = tuple(round(1 - k * 0.01, 2) for k in range(1, 100))  # exit when score > t: 0.99 down to 0.01


# ------------------------------------------------------------------------------------------------
# exact binomial tail and bounds
# ------------------------------------------------------------------------------------------------
def binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), exact (log-space sum of the terms)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    i = np.arange(k + 1)
    logs = (math.lgamma(n + 1) - np.array([math.lgamma(j + 1) + math.lgamma(n - j + 1) for j in i])
            + i * math.log(p) + (n - i) * math.log1p(-p))
    top = logs.max()
    return float(min(1.0, math.exp(top) * np.exp(logs - top).sum()))


def p_value(losses: int, n: int, epsilon: float) -> float:
    """Valid p-value of "risk > epsilon" after ``losses`` of ``n`` (binary losses): P(Bin(n, eps) <= k)."""
    return binom_cdf(int(losses), int(n), float(epsilon))


def upper_bound(losses: int, n: int, delta: float) -> float:
    """One-sided (1 - delta) Clopper-Pearson upper confidence bound of a binary risk after ``losses`` of
    ``n``: the largest p with P(Bin(n, p) <= losses) >= delta (bisection, :func:`.exact.clopper_pearson_upper`)."""
    return exact.clopper_pearson_upper(int(losses), int(n), float(delta))


def lower_bound(losses: int, n: int, delta: float) -> float:
    """One-sided (1 - delta) Clopper-Pearson lower confidence bound: the smallest p with
    P(Bin(n, p) >= losses) >= delta."""
    if losses <= 0:
        return 0.0
    lo, hi = 0.0, losses / n
    for _ in range(60):
        mid = (lo + hi) / 2
        if 1.0 - binom_cdf(losses - 1, n, mid) >= delta:
            hi = mid
        else:
            lo = mid
    return lo


def discordant_upper_bound(bad: int, good: int, n: int, alpha: float) -> float:
    """An exact (1 - alpha) upper bound of the accuracy drop from the counts of +1 (``bad``) and -1
    (``good``) in n texts, by conditioning on the discordant ones.

    With d = P(discordant) and q = P(+1 | discordant), drop = d (2q - 1). Given D = bad + good discordant
    texts, ``bad`` is exactly Binomial(D, q) (i.i.d. texts), so the Clopper-Pearson bound q_U at alpha / 2
    covers q with probability >= 1 - alpha / 2 whatever D is, hence unconditionally; d_U (Clopper-Pearson
    of D / n at alpha / 2) covers d likewise. On both events drop <= max(0, d_U (2 q_U - 1)): the union
    bound gives coverage >= 1 - alpha. A test of q alone (McNemar) only tests drop <= 0; a budget eps > 0
    needs d too, which is why two bounds are paid."""
    if n <= 0:
        return 1.0
    d_u = upper_bound(bad + good, n, alpha / 2)
    q_u = upper_bound(bad, bad + good, alpha / 2) if bad + good else 1.0
    return max(0.0, d_u * (2 * q_u - 1))


def min_calibration_size(epsilon: float, delta: float) -> int | None:
    """The fewest calibration texts at which any setting can be certified: zero losses in n texts give
    p = (1 - epsilon)^n <= delta (None for a zero budget: no sample certifies it)."""
    if epsilon <= 0:
        return None
    if epsilon >= 1:
        return 1
    return math.ceil(math.log(delta) / math.log1p(-epsilon))


def needed_size(rate: float, epsilon: float, delta: float, cap: int = 10_000_000) -> int | None:
    """About how many calibration texts certify a setting whose true loss rate is ``rate`` (its expected
    loss count at n, rounded up, passes the test), or None when rate >= epsilon (never)."""
    if rate >= epsilon:
        return None
    if epsilon <= 0:
        return None
    n = max(1, min_calibration_size(epsilon, delta))
    while n <= cap:
        if p_value(math.ceil(rate * n), n, epsilon) <= delta:
            return n
        n = math.ceil(n * 1.05) + 1
    return None


def max_losses(n: int, epsilon: float, delta: float) -> int:
    """The most losses of ``n`` at which "risk > epsilon" is still rejected at level ``delta`` (-1: none).
    The p-value grows with the count, so a setting is certified exactly when its losses are <= this."""
    k = -1
    while k + 1 <= n and p_value(k + 1, n, epsilon) <= delta:
        k += 1
    return k


def fixed_sequence(loss_counts, n: int, epsilon: float, delta: float) -> tuple:
    """Test hypotheses "risk > epsilon" in the given order (conservative first) at level ``delta`` each,
    stopping at the first that is not rejected -> (how many were rejected, their p-values and the first
    failure's). The first ``rejected`` settings are certified; the last of them is the one to use."""
    pvals = []
    for k in loss_counts:
        p = p_value(int(k), n, epsilon)
        pvals.append(p)
        if p > delta:
            return len(pvals) - 1, pvals
    return len(pvals), pvals


# ------------------------------------------------------------------------------------------------
# exits and losses from an all-exits cache
# ------------------------------------------------------------------------------------------------
def _softmax_entropy(logits: np.ndarray, kind: str) -> np.ndarray:
    from ..model.policies import exit_entropy

    return np.asarray(exit_entropy(np.asarray(logits, dtype=np.float32), kind))


def candidates(policy: str, num_layers: int, num_labels: int, entropy: str = "normalized",
               regression: bool = False, grid=None) -> list:
    """The settings of ``policy`` tried, conservative to aggressive (each exits every text at the same
    layer or earlier than the one before: tests/test_risk.py checks it)."""
    if policy == "entropy":
        scale = 1.0 if entropy == "normalized" else math.log(num_labels)
        return sorted({float(t) * scale for t in (grid or FINE_GRID)} - {0.0})
    if policy == "patience":
        return list(range(num_layers - 2, -1, -1))  # L-1 and more: never before the last layer
    if policy == "learned":
        ts = sorted(grid or LEARNED_GRID, reverse=not regression)  # classification: exit when score > t
        return [float(t) for t in ts]
    raise ValueError(f"unknown policy '{policy}'")


def exit_layers(policy: str, value, logits: np.ndarray, scores: np.ndarray | None = None, entropy: str = "normalized",
                tolerance: float | None = None, regression: bool = False, ent: np.ndarray | None = None) -> np.ndarray:
    """0-based exit layer per text of ``policy`` at ``value`` from all-exits logits [L, n, C] (and learned
    exit scores [L-1, n]) -> [n]; the same decision steps the engines take."""
    from ..model.policies import LearnedPolicy, PatiencePolicy, first_exit, max_entropy, policy_exit

    L = logits.shape[0]
    if policy == "entropy":
        ent = _softmax_entropy(logits, entropy) if ent is None else ent
        top = max_entropy(logits.shape[-1], entropy)
        thr = np.full(L, math.inf if value >= top else float(value), dtype=np.float32)
        return np.asarray(first_exit(ent, thr))
    if policy == "patience":
        return np.asarray(policy_exit(PatiencePolicy(int(value), tolerance), np.asarray(logits, dtype=np.float32)))
    if policy == "learned":
        return np.asarray(policy_exit(LearnedPolicy(float(value), regression), np.asarray(logits, dtype=np.float32),
                                      np.asarray(scores, dtype=np.float32)))
    raise ValueError(f"unknown policy '{policy}'")


def losses(risk: str, layer: np.ndarray, logits: np.ndarray, labels=None, tolerance: float | None = None) -> np.ndarray:
    """Binary loss per text [n] of exiting at ``layer`` [n] (0-based), from all-exits logits [L, n, C]
    (regression: C = 1, the value) and labels [n] (not needed for ``disagreement``)."""
    n = logits.shape[1]
    rows = np.arange(n)
    if logits.shape[-1] == 1:  # regression
        tol = 0.0 if tolerance is None else tolerance
        at, final = logits[layer, rows, 0], logits[-1, :, 0]
        if risk == "disagreement":
            return np.abs(at - final) > tol
        y = np.asarray(labels, dtype=np.float64)
        return np.abs(at - y) > np.abs(final - y) + tol
    pred = logits.argmax(-1)  # [L, n]
    at, final = pred[layer, rows], pred[-1]
    if risk == "disagreement":
        return at != final
    y = np.asarray(labels)
    return (final == y) & (at != y)


# ------------------------------------------------------------------------------------------------
# certification
# ------------------------------------------------------------------------------------------------
def certify(logits, labels=None, *, risk: str = "accuracy_drop", epsilon: float, delta: float = DEFAULT_DELTA,
            policy: str = "entropy", scores=None, entropy: str = "normalized", tolerance: float | None = None,
            family: int = 1, grid=None, method: str | None = None) -> Guarantee:
    """The most aggressive setting of ``policy`` certified by fixed-sequence testing at level
    delta / family on the calibration texts (all-exits logits [L, n, C], labels [n] unless the risk is
    ``disagreement``; learned exit scores [L-1, n] for ``policy="learned"``). ``method`` (accuracy drop
    only): "exact" (the default there: the drop itself, the exact score test of :mod:`.exact`, which
    certifies what the binomial bound does when no exit fixes a final error and more when some do),
    "binomial" (the binary loss "final right, exit wrong", exact) or "betting" (the signed loss,
    :mod:`.bounds`)."""
    logits = np.asarray(logits, dtype=np.float32)
    L, n = logits.shape[:2]
    regression = logits.shape[-1] == 1
    method = _method_for(risk, method, regression, labels, policy)
    level = delta / family
    cands = candidates(policy, L, logits.shape[-1], entropy, regression, grid)
    ent = _softmax_entropy(logits, entropy) if policy == "entropy" else None
    perm = order(n) if method == "betting" else None
    rejected, last = 0, (np.full(n, L - 1), 0, 0, np.zeros(n))  # (layer, losses, -1 count, signed) certified
    for v in cands:  # fixed-sequence testing: stop at the first failure
        layer = exit_layers(policy, v, logits, scores, entropy, tolerance, regression, ent)
        k = int(losses(risk, layer, logits, labels, tolerance).sum())
        good, signed = 0, None
        if method == "binomial":
            ok = p_value(k, n, epsilon) <= level
        elif method == "exact":
            good = int((_signed(layer, logits, labels) < 0).sum())
            ok = exact.rejects(k, good, n, epsilon, level)
        else:
            signed = _signed(layer, logits, labels)[perm]
            ok = float(betting_p_value(signed, epsilon, level)) <= level
        if not ok:
            break
        rejected, last = rejected + 1, (layer, k, good, signed)
    layer, k, good, signed = last
    value = cands[rejected - 1] if rejected else None
    bound = _bound(method, k, good, signed, n, level, epsilon if rejected else 1.0)
    mean = float(layer.mean() + 1)
    drop = None
    if labels is not None and not regression:
        y, pred = np.asarray(labels), logits.argmax(-1)
        drop = float((pred[-1] == y).mean() - (pred[layer, np.arange(n)] == y).mean())
    return Guarantee(risk, float(epsilon), float(delta), int(n), policy, value, k, k / n, bound,
                     mean, 1 - mean / L, min(rejected + 1, len(cands)), family, _min_n(method, epsilon, level), entropy,
                     tolerance, drop, method=method, level=level)


def _min_n(method: str, epsilon: float, level: float) -> int | None:
    """The fewest calibration texts at which ``method`` certifies a setting with no loss at all."""
    n = min_calibration_size(epsilon, level)
    return exact.min_size(epsilon, level, n) if method == "exact" else n


def _bound(method: str, bad: int, good: int, signed: np.ndarray, n: int, level: float, known: float) -> float:
    """The (1 - level) upper bound of the risk at the certified setting, by the bound that certified it
    (``known``: a budget it certified)."""
    if method == "exact":
        return exact.upper_bound(bad, good, n, level, hi=known)
    return upper_bound(bad, n, level) if method == "binomial" else betting_upper_bound(signed, level)


def _method_for(risk: str, method: str | None, regression: bool, labels, policy: str) -> str:
    """The checks of :func:`certify`'s arguments -> the method to run ("exact" for an accuracy drop unless given)."""
    if risk not in (REGRESSION_RISKS if regression else RISKS):
        raise ValueError(f"risk must be one of {REGRESSION_RISKS if regression else RISKS}, got '{risk}'")
    if risk != "disagreement" and labels is None:
        raise ValueError(f"risk '{risk}' needs labels; 'disagreement' does not")
    if policy == "entropy" and regression:
        raise ValueError("entropy needs class probabilities: a regression checkpoint uses patience or learned exits")
    method = method or ("exact" if risk == "accuracy_drop" else "binomial")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got '{method}'")
    if method != "binomial" and risk != "accuracy_drop":
        raise ValueError(f"the {method} bound certifies the accuracy drop; risk '{risk}' uses method 'binomial'")
    return method


def _signed(layer: np.ndarray, logits: np.ndarray, labels) -> np.ndarray:
    """The signed loss per text of exiting at ``layer`` [n]: +1 final right and exit wrong, -1 the reverse."""
    pred, y = logits.argmax(-1), np.asarray(labels)
    return signed_losses(pred[layer, np.arange(len(layer))] == y, pred[-1] == y)


def selection_parts(n: int, fraction: float) -> tuple:
    """The split selection's two parts of n calibration texts (a seeded permutation, the same every run):
    (the first ``fraction``, where a choice such as the recipe is made; the rest, where it is certified),
    each sorted."""
    perm = np.random.default_rng(SELECTION_SEED).permutation(n)
    cut = int(round(fraction * n))
    return np.sort(perm[:cut]), np.sort(perm[cut:])


def check(g: Guarantee, logits, labels=None, scores=None, risk: str | None = None) -> dict:
    """Does a stored guarantee hold on new texts? The loss rate of its setting there (``risk``: the
    guarantee's own, or ``disagreement``, which bounds an accuracy drop from above, for unlabelled texts)
    against epsilon: ``holds`` (rate <= epsilon), ``exceeded`` (even the (1 - delta) lower bound is above
    epsilon: a significant excess, e.g. drift), or ``inconclusive`` (above epsilon, within noise)."""
    logits = np.asarray(logits, dtype=np.float32)
    L, n = logits.shape[:2]
    risk = risk or g.risk
    regression = logits.shape[-1] == 1
    layer = (np.full(n, L - 1) if g.value is None else
             exit_layers(g.policy, g.value, logits, scores, g.entropy, g.tolerance, regression))
    k = int(losses(risk, layer, logits, labels, g.tolerance).sum())
    rate, lo, hi = k / n, lower_bound(k, n, g.delta), upper_bound(k, n, g.delta)
    if risk == "accuracy_drop" and g.method == "exact":  # it certified the drop itself: check the drop
        good = int((_signed(layer, logits, labels) < 0).sum())
        rate = (k - good) / n
        lo, hi = -exact.upper_bound(good, k, n, g.delta, tol=2e-4), exact.upper_bound(k, good, n, g.delta, tol=2e-4)
    elif risk == "accuracy_drop" and g.method == "betting":  # it certified the drop itself: check the drop
        s = _signed(layer, logits, labels)[order(n)]
        rate, lo, hi = float(s.mean()), -betting_upper_bound(-s, g.delta), betting_upper_bound(s, g.delta)
    verdict = "holds" if rate <= g.epsilon else ("exceeded" if lo > g.epsilon else "inconclusive")
    out = {"risk": risk, "n": n, "losses": k, "rate": rate, "lower_bound": lo, "upper_bound": hi,
           "epsilon": g.epsilon, "verdict": verdict, "layer_saving": 1 - float(layer.mean() + 1) / L}
    if labels is not None and not regression:
        y, pred = np.asarray(labels), logits.argmax(-1)
        out["accuracy_drop"] = float((pred[-1] == y).mean() - (pred[layer, np.arange(n)] == y).mean())
    return out
