"""An exact test of the accuracy drop itself: the paired score statistic, its p-value maximised over the
nuisance (an exact unconditional non-inferiority test for matched pairs, as Sidik 2003 and Lloyd &
Moldovan 2008 build it on the score statistic of Nam 1997 / Tango 1998).

Per text the signed loss is +1 (final right, exit wrong), -1 (exit right, final wrong) or 0; with
p = P(+1), q = P(-1), the accuracy drop is p - q. From the counts (a of +1, b of -1) of n texts we test
the null "p - q >= eps" (certifying the drop <= eps when rejected):

* **statistic**: the score statistic Z = (a - b - n eps) / sqrt(n (p~ + q~ - eps^2)), (p~, q~) the
  maximum-likelihood rates under p - q = eps (closed form, :func:`score`). Its variance is the null's own
  at the rates nearest the data, so Z is close to a standard normal whatever the discordance p + q:
  the p-value's maximum over the nuisance stays close to the nominal level. It is made monotone
  (raised +1 counts never lower it, raised -1 counts never raise it) by a running minimum over fewer -1,
  then maximum over fewer +1 (:func:`_monotone`; it reads only counts at or below the observed ones, so
  it does not depend on the grid), which the validity argument below needs.
* **p-value**: sup over the null of P(Z <= z_obs). The tail falls as p rises and rises as q rises (couple
  the texts: more +1 or fewer -1 only raise the monotone Z), so the sup is over the boundary p = q + eps,
  a one-dimensional nuisance, the discordance pi = p + q in [eps, 1]. Berger & Boos (JASA 1994) restrict
  it to a (1 - gamma) Clopper-Pearson bound pi_U from the discordant count (exact, whatever p and q) and
  add gamma: p = gamma + sup_{pi <= pi_U} P(Z <= z_obs). The sup over a continuum is bounded on cells
  [pi_j, pi_j+1] by the cell's worst point (p, q) = ((pi_j + eps) / 2, (pi_j+1 - eps) / 2), which the
  coupling puts above every boundary point of the cell.
* **the test at level alpha** (all that fixed-sequence testing needs) is a table per (n, eps, alpha): per
  cell the largest z whose tail at the worst point is <= alpha - gamma, their running minimum over the
  cells, and "reject when Z(a, b) <= the minimum over the cells below pi_U(a + b)". A cell's tail is
  summed over the counts within WINDOW standard deviations of its means; the mass outside (and outside
  the table's grid) is added whole, as if all of it were rejected, and outside the grid the test never
  rejects, so a table of any size gives a valid test.

Valid at alpha for any n (no approximation: the tails are exact sums of multinomial terms, the slack
covers rounding). Its margin is near the normal approximation's z sqrt(discordance / n) that the
betting bound (:mod:`.bounds`) pays some 1.5-2x of: tests/test_risk.py measures both on synthetic draws.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

GAMMA_SHARE = 0.02  # gamma = GAMMA_SHARE x alpha: the level spent on the nuisance's confidence bound
CELL = 0.1  # nuisance cells of width CELL x sqrt(pi / n): the worst point's drop is eps - width / 2
SPAN = 12.0  # the count grid reaches SPAN standard deviations past the top cell's mean
SLACK = 1e-9  # added to every computed tail (rounding): errs toward not rejecting
_TABLES: dict = {}  # (n, eps, alpha) -> _Table, the last few used


def _log_factorials(n: int) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])


@lru_cache(maxsize=65536)
def clopper_pearson_upper(k: int, n: int, gamma: float) -> float:
    """One-sided (1 - gamma) Clopper-Pearson upper bound of a rate after k successes in n trials (the one
    implementation: :func:`..risk.upper_bound` calls it)."""
    if k >= n:
        return 1.0
    lf, i = _log_factorials(n), np.arange(k + 1)
    base = lf[n] - lf[i] - lf[n - i]

    def cdf(p):
        logs = base + i * math.log(p) + (n - i) * math.log1p(-p)
        return math.exp(logs.max()) * np.exp(logs - logs.max()).sum()
    lo, hi = k / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) >= gamma else (lo, mid)
    return hi


def score(a, b, n: int, eps: float):
    """The score statistic of "p - q = eps" from a (+1) and b (-1) counts of n (arrays broadcast): the
    restricted maximum-likelihood q~ solves 2n q^2 - B q - b eps (1 - eps) = 0, B = a (1 - eps) +
    b (1 - 3 eps) - 2 (n - a - b) eps (Tango 1998); variance per text p~ + q~ - eps^2."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    big_b = a * (1 - eps) + b * (1 - 3 * eps) - 2 * (n - a - b) * eps
    q = (big_b + np.sqrt(np.maximum(big_b ** 2 + 8 * n * b * eps * (1 - eps), 0.0))) / (4 * n)
    q = np.maximum(q, max(-eps, 0.0))  # p~ = q~ + eps >= 0
    var = np.maximum(2 * q + eps - eps ** 2, 1e-300)
    return (a - b - n * eps) / np.sqrt(n * var)


def _monotone(z: np.ndarray) -> np.ndarray:
    """z[a, b] -> max over a' <= a of (min over b' <= b of z[a', b']): never lower for more +1, never higher
    for more -1 (what the coupling argument needs), equal to z wherever z already is so. It reads only
    counts at or below (a, b), so it is the same whatever grid it is computed on."""
    return np.maximum.accumulate(np.minimum.accumulate(z, axis=1), axis=0)


class _Table:
    """The level-alpha test for n texts and budget eps, over discordance cells up to ``top``."""

    def __init__(self, n: int, eps: float, alpha: float, top: float):
        self.n, self.eps, self.alpha = n, eps, alpha
        self.gamma = GAMMA_SHARE * alpha
        self.top = min(1.0, max(top, abs(eps)))
        p_top, q_top = (self.top + eps) / 2, (self.top - eps) / 2
        self.a_max = min(n, int(n * p_top + SPAN * math.sqrt(n * p_top) + 10))
        self.b_max = min(n, int(n * q_top + SPAN * math.sqrt(n * max(q_top, 1 / n)) + 10))
        a, b = np.meshgrid(np.arange(self.a_max + 1), np.arange(self.b_max + 1), indexing="ij")
        self.inside = a + b <= n
        z = np.where(self.inside, score(a, b, n, eps), np.inf)  # impossible counts: never drawn
        self.z = _monotone(z)
        self.edges, self.crit = self._cells()

    def _cells(self) -> tuple:
        """Cell edges [|eps| .. top] and per cell the running minimum of the cells' critical z."""
        n, eps = self.n, self.eps
        edges = [abs(eps)]
        while edges[-1] < self.top:
            edges.append(min(self.top, edges[-1] + CELL * math.sqrt(max(edges[-1], 1 / n) / n)))
        lf = _log_factorials(n)
        order = np.argsort(self.z, axis=None, kind="stable")
        rank = np.empty(order.size, dtype=np.int64)
        rank[order] = np.arange(order.size)
        rank = rank.reshape(self.z.shape)
        zs = self.z.ravel()[order]
        last = np.r_[zs[1:] != zs[:-1], True]  # the end of each run of equal z
        prev_last = np.maximum.accumulate(np.where(last, np.arange(zs.size), -1))  # the last run end <= r
        crit, target = [], self.alpha - self.gamma - 2 * SLACK
        for lo, hi in zip(edges[:-1], edges[1:]):
            p, q = (lo + eps) / 2, max((hi - eps) / 2, 0.0)
            (a0, a1), (b0, b1) = _window(n, p, self.a_max), _window(n, q, self.b_max)
            outside = _outside(a0, a1, n, p, lf) + _outside(b0, b1, n, q, lf) + SLACK  # counted as rejected
            ranks = rank[a0:a1 + 1, b0:b1 + 1].ravel()  # the window's counts, by z
            o = np.argsort(ranks)
            cum = np.cumsum(_multinomial(n, p, q, a0, a1, b0, b1, lf).ravel()[o]) + outside
            over = np.nonzero(cum > target)[0]
            stop = ranks[o][over[0]] if len(over) else zs.size  # the first count whose z-run would exceed
            end = prev_last[stop - 1] if stop > 0 and outside <= target else -1
            crit.append(zs[end] if end >= 0 else -np.inf)
        return np.array(edges), np.minimum.accumulate(np.array(crit, dtype=np.float64))

    def critical(self, pi_u: float) -> float:
        """The largest Z rejected when the discordance's bound is ``pi_u`` (within the table's reach)."""
        if pi_u <= self.eps:  # the drop is at most the discordance: below eps with 1 - gamma
            return math.inf
        j = int(np.searchsorted(self.edges, pi_u, side="left"))  # cells 1..j cover [eps, pi_u]
        return float(self.crit[max(j, 1) - 1])

    def z_at(self, a: int, b: int) -> float:
        """The statistic at (a, b); outside the grid, where the tables count every outcome as rejected,
        the test does not reject (conservative)."""
        if a > self.a_max or b > self.b_max:
            return math.inf
        return float(self.z[a, b])


WINDOW = 9.0  # a cell's tail is summed over its counts within WINDOW standard deviations; the rest is added whole


def _window(n: int, p: float, top: int) -> tuple:
    """The counts [lo, hi] (within 0..top) where Binomial(n, p) has its mass."""
    sd = math.sqrt(n * p * (1 - p)) + 1
    return max(0, int(n * p - WINDOW * sd)), min(top, int(math.ceil(n * p + WINDOW * sd)))


def _multinomial(n: int, p: float, q: float, a0: int, a1: int, b0: int, b1: int, lf: np.ndarray) -> np.ndarray:
    """P(A = a, B = b) for a in a0..a1, b in b0..b1, (A, B, rest) ~ Multinomial(n; p, q, 1 - p - q)."""
    a = np.arange(a0, a1 + 1)[:, None]
    b = np.arange(b0, b1 + 1)[None, :]
    c = n - a - b
    r = max(1 - p - q, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = lf[n] - lf[a] - lf[b] - lf[np.clip(c, 0, None)] + a * _log(p) + b * _log(q) + c * _log(r)
    return np.where(c >= 0, np.exp(np.nan_to_num(logs, nan=-np.inf)), 0.0)


def _outside(lo: int, hi: int, n: int, p: float, lf: np.ndarray) -> float:
    """P(Binomial(n, p) outside [lo, hi]), summed exactly."""
    if p <= 0:
        return 0.0 if lo == 0 else 1.0
    k = np.concatenate([np.arange(0, lo), np.arange(hi + 1, n + 1)])
    if not k.size:
        return 0.0
    logs = lf[n] - lf[k] - lf[n - k] + k * math.log(p) + (n - k) * math.log1p(-min(p, 1 - 1e-16))
    return float(np.exp(logs).sum())


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def _table(n: int, eps: float, alpha: float, top: float) -> _Table:
    key = (int(n), float(eps), float(alpha))
    t = _TABLES.get(key)
    if t is None or t.top < min(top, 1.0):
        if len(_TABLES) >= 16:
            _TABLES.pop(next(iter(_TABLES)))
        t = _TABLES[key] = _Table(n, eps, alpha, max(top, 2 * t.top if t else top))
    return t


def rejects(bad: int, good: int, n: int, epsilon: float, alpha: float) -> bool:
    """The exact test of "accuracy drop > epsilon" at level ``alpha`` from the counts of +1 (``bad``: final
    right, exit wrong) and -1 (``good``) among n texts: True when rejected (the drop certified <= eps)."""
    return bool(rejects_many([bad], [good], n, epsilon, alpha)[0])


def rejects_many(bad, good, n: int, epsilon: float, alpha: float) -> np.ndarray:
    """:func:`rejects` for arrays of counts [k] (one table for all)."""
    bad, good = np.asarray(bad).astype(np.int64), np.asarray(good).astype(np.int64)
    if epsilon >= 1:
        return np.ones(bad.shape, dtype=bool)
    if n <= 0 or epsilon <= -1:
        return np.zeros(bad.shape, dtype=bool)
    gamma = GAMMA_SHARE * alpha
    d = bad + good
    pi_u = {int(k): clopper_pearson_upper(int(k), int(n), gamma) for k in np.unique(d)}
    t = _table(n, epsilon, alpha, 1.25 * max(pi_u.values()))
    crit = {k: t.critical(u) for k, u in pi_u.items()}
    return np.array([t.z_at(int(x), int(y)) <= crit[int(x + y)] for x, y in zip(bad, good)], dtype=bool)


def upper_bound(bad: int, good: int, n: int, alpha: float, tol: float = 5e-5, hi: float | None = None) -> float:
    """(1 - alpha) upper confidence bound of the drop p - q (in [-1, 1]; swap the counts for a lower bound):
    the smallest eps the test certifies, to ``tol`` (bracketed from the observed drop, then bisection: the
    test is monotone in eps; each step builds one table). ``hi``: a budget known to be certified."""
    if n <= 0:
        return 1.0
    lo = (bad - good) / n  # not certified: there the statistic is 0
    if hi is None:
        step = 2 * math.sqrt(max(bad + good, 1)) / n + tol
        hi = min(1.0, lo + step)
        while hi < 1.0 and not rejects(bad, good, n, hi, alpha):
            lo, step = hi, 2 * step
            hi = min(1.0, lo + step)
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if rejects(bad, good, n, mid, alpha) else (mid, hi)
    return hi


def min_size(epsilon: float, alpha: float, start: int) -> int | None:
    """The fewest texts at which the test certifies zero losses (``start``: the exact binomial test's
    fewest, never more than the test needs: with no -1 it is the binomial test plus gamma and a cell)."""
    if start is None:
        return None
    n = start
    while not rejects(0, 0, n, epsilon, alpha):
        n += max(1, n // 200)
    return n
