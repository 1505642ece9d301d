"""Variance-adaptive bounds on the accuracy drop itself: the signed loss and betting (Waudby-Smith & Ramdas).

The **signed loss** of a text is +1 when the final layer is right and the exit wrong, -1 when the exit is
right and the final layer wrong, 0 otherwise: its mean is exactly the accuracy drop (final accuracy minus
early-exit accuracy). The binary "final right, exit wrong" rate that :mod:`.risk` bounds exactly with the
binomial tail is only an upper proxy of that drop; on data where an exit fixes some of the final layer's
errors the proxy wastes the budget. The signed loss takes three values, so no exact binomial tail
applies; here it is bounded by **betting** (Waudby-Smith & Ramdas, "Estimating means of bounded random
variables by betting", JRSS-B 2023), the bound behind RCPS (Bates et al. 2021, ``WSR_mu_plus`` in
aangelopoulos/rcps) and the "Fast yet Safe" code (Jazbec et al. 2024, ``ucb_wsr``):

* map the loss to [0, 1]: x = (s + 1) / 2; the null "drop > eps" is "mean of x > m", m = (eps + 1) / 2;
* the capital K_t = prod_{i <= t} (1 - lambda_i (x_i - m)) with a predictable bet lambda_i (RCPS's
  plug-in: lambda_i = sqrt(2 log(1/delta) / (n sigma_{i-1}^2)), sigma_{i-1}^2 the regularised running
  variance of the texts before i, started at 1/4; truncated at 3/4 / (1 - m) as in Waudby-Smith & Ramdas,
  where RCPS truncates at 1: with few discordant texts the variance is tiny and the cap is what binds).
  Under the null every factor has mean <= 1 and stays >= 1/4 (x - m <= 1 - m), so K is a nonnegative
  supermartingale and, by Ville's
  inequality, P(max_t K_t >= 1/alpha) <= alpha: **p = min(1, 1 / max_t K_t)** is a valid p-value for any
  level. Only the one-sided (upper) process is needed (no hedging with the lower one: we never bound the
  drop from below here).
* The p-value depends on the **order** of the texts; any order fixed before looking at the losses keeps
  them i.i.d., so it is valid; :func:`order` fixes it by a seeded permutation (seed :data:`ORDER_SEED`),
  the same for every candidate setting, so a result is reproducible.

Its margin is about sqrt(2 log(1/delta) var / n), with var ~ (discordance) / 4 on the [0, 1] scale. It
is not the default: the exact score test of :mod:`.exact` certifies more in every case measured
(benchmarks/bench_exact_power.py, docs/BENCHMARKS.md); ``certify(method="betting")`` runs it, and the
serve watch uses the betting confidence *sequence* (:mod:`..model.watch`), which must hold at every time.

:func:`..risk.discordant_upper_bound` is another exact bound for the paired difference (conditioning on
the discordant texts, see its docstring): valid, but it pays for two bounds and is looser than betting in
the cases measured (tests/test_risk.py), so it is offered, not used by default.
"""
from __future__ import annotations

import math

import numpy as np

ORDER_SEED = 0  # the seeded order of the calibration texts for the betting p-value
BET_CAP = 0.75  # bets truncated at BET_CAP / (1 - m): a factor never falls below 1 - BET_CAP (WSR's c = 3/4)


def order(n: int, seed: int = ORDER_SEED) -> np.ndarray:
    """The fixed order in which the betting process reads n calibration texts (a seeded permutation)."""
    return np.random.default_rng(seed).permutation(n)


def signed_losses(at_right: np.ndarray, final_right: np.ndarray) -> np.ndarray:
    """+1 (final right, exit wrong), -1 (exit right, final wrong), 0 otherwise; mean = the accuracy drop."""
    return final_right.astype(np.int8) - at_right.astype(np.int8)


def betting_log_capital(x: np.ndarray, m, alpha: float) -> np.ndarray:
    """max_t log K_t of the betting process for "mean of x >= m" over rows of ``x`` [..., n] in [0, 1]
    (read left to right), bets tuned for level ``alpha`` (RCPS's predictable plug-in, capped at
    BET_CAP / (1 - m)).
    Computed in float64 unless ``x`` is float32 (the benchmark's replays)."""
    x = np.asarray(x)
    x = x if x.dtype == np.float32 else x.astype(np.float64)
    n = x.shape[-1]
    t = np.arange(1, n + 1, dtype=x.dtype)
    mu = (np.cumsum(x, -1) + 0.5) / (t + 1)  # mu[i] uses texts 0..i
    var = (np.cumsum((x - mu) ** 2, -1) + 0.25) / (t + 1)
    var = np.concatenate([np.full(x.shape[:-1] + (1,), 0.25, dtype=x.dtype), var[..., :-1]], -1)  # texts < i
    m = np.asarray(m, dtype=x.dtype)[..., None] if np.ndim(m) else x.dtype.type(m)
    lam = np.minimum(np.sqrt(x.dtype.type(2 * math.log(1 / alpha) / n) / var), BET_CAP / (1 - m))
    logk = np.cumsum(np.log1p(-lam * (x - m)), -1)
    return np.maximum(logk.max(-1), 0.0)  # K_0 = 1


def betting_p_value(signed: np.ndarray, epsilon, alpha: float) -> np.ndarray:
    """Valid p-value(s) of "accuracy drop > epsilon" from signed losses [..., n] (already in their fixed
    order): min(1, 1 / max_t K_t), the bets tuned for level ``alpha``."""
    x = (np.asarray(signed, dtype=np.float64) + 1) / 2
    m = (np.asarray(epsilon, dtype=np.float64) + 1) / 2
    return np.exp(-betting_log_capital(x, m, alpha))


def betting_upper_bound(signed: np.ndarray, alpha: float) -> float:
    """(1 - alpha) upper confidence bound of the accuracy drop from signed losses [n] (in their fixed
    order): the smallest eps whose null "drop > eps" is rejected at alpha (bisection; 1 when none is)."""
    signed = np.asarray(signed)
    if float(betting_p_value(signed, 1.0 - 1e-9, alpha)) > alpha:
        return 1.0
    lo, hi = -1.0, 1.0 - 1e-9
    for _ in range(50):
        mid = (lo + hi) / 2
        if float(betting_p_value(signed, mid, alpha)) <= alpha:
            hi = mid
        else:
            lo = mid
    return hi
