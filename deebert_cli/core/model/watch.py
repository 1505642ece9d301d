"""Watching a stored guarantee on live traffic: the arithmetic `deebert serve` and `predict-dataset` share.

A sampled share of the rows is also run to full depth; each gives one bit, "the exit's answer differed from
the final layer's" (the label-free risk: :func:`disagrees`). :class:`Watch` turns the bits into a running
verdict on the checkpoint's stored :class:`~.guarantee.Guarantee`:

* a **confidence sequence** for the disagreement rate (:class:`BettingCS`): lower and upper bounds that hold
  *simultaneously at every time* with probability >= 1 - alpha, so they may be read after every sample
  (a fixed-n interval read again and again would raise false alarms far more often than alpha). It is the
  hedged-capital betting confidence sequence with the predictable plug-in bets of Waudby-Smith & Ramdas,
  "Estimating means of bounded random variables by betting" (JRSS-B 2024, Theorem 3 and eq. (26)-(27)),
  on a grid of candidate rates; it is valid whatever the traffic's order (under the null that every
  conditional rate equals m), and tighter than Hoeffding-style sequences for small rates.
* a **state**: ``holds`` (the upper bound is within the budget), ``exceeded`` (a significant excess, see
  :meth:`Watch.test`) or ``inconclusive``. For a disagreement guarantee the bounds are read against epsilon
  directly. For an accuracy-drop (regression: error-increase) guarantee disagreement bounds the risk from
  above, so ``holds`` still reads the upper bound against epsilon; a drop cannot be seen without labels, so
  ``exceeded`` means drift: a lower bound above the (1 - delta/2) upper bound of the disagreement rate
  measured at calibration (the guarantee's ``disagreement_rate`` over its ``n`` texts, a Chernoff/KL bound).
* **two sequences**, so that drift is seen in a bounded number of rows whatever came before: the
  *cumulative* one over every watched row (it gives ``holds``; its bounds tighten forever) and a *windowed*
  one restarted every ``window`` watched rows (block k = 1, 2, ... is a fresh sequence over its own rows
  only). The cumulative sequence alone would need the shifted rows to outweigh the whole history before its
  lower bound moved: after a million in-budget rows, a million more. ``exceeded`` is read on either
  sequence's lower bound. **The correction**: with A the confidence the test spends (delta for a
  disagreement guarantee, delta/2 for drift, whose other delta/2 goes to the calibration bound), the
  cumulative sequence runs at A/2 and block k at A/2 * 6 / (pi^2 k^2); these sum to A/2 (sum 1/k^2 = pi^2/6)
  over unboundedly many blocks. Each sequence is anytime-valid on its own (Ville), so by the union bound
  the probability that *any* lower bound ever crosses the threshold while every conditional rate is within
  it is <= A/2 + A/2 = A: the false alarm probability over unbounded time stays <= delta. The price is a
  level that falls slowly with k (block 100 runs at 3e-5 of A: log(1/level) grows by 2 log k), paid in
  a few more rows per block, far less than the history the cumulative sequence must outweigh.

Plain numpy, no torch: the server's worker, predict-dataset's actors and the benchmark replays run this
same code. Hand-written (forty lines): the one package of confidence sequences, ``confseq`` (0.0.11, 2023),
ships only a source distribution with a C++ extension to build.
"""
from __future__ import annotations

import math
import random
import threading

import numpy as np

from .guarantee import Guarantee

# candidate rates: steps of 1e-4 up to 10% (budgets are small), 1e-3 above
GRID = np.unique(np.concatenate([np.linspace(0.0, 0.1, 1001), np.linspace(0.1, 1.0, 901)]))
STATES = ("holds", "inconclusive", "exceeded", "unwatched")


class BettingCS:
    """Anytime-valid (1 - alpha) confidence sequence for the mean of [0, 1] observations (here bits).

    For every candidate m of the grid two wealth processes bet on "the mean is above m" and "below m":
    K+(m) = prod(1 + l+_i (x_i - m)), K-(m) = prod(1 - l-_i (x_i - m)), with the predictable plug-in bet
    l_i = sqrt(2 log(2/alpha) / (var_{i-1} i log(1 + i))) capped at c/m (c/(1 - m)). Under "the mean is m"
    both are nonnegative martingales, so by Ville's inequality the hedged max(K+, K-)/2 ever reaching
    1/alpha has probability <= alpha: the m where it has not form the sequence (an interval)."""

    def __init__(self, alpha: float, grid: np.ndarray = GRID, c: float = 0.5):
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.alpha, self.m, self.c = float(alpha), np.asarray(grid, dtype=np.float64), c
        self.log_plus = np.zeros_like(self.m)
        self.log_minus = np.zeros_like(self.m)
        self.cap_plus = c / np.maximum(self.m, 1e-12)
        self.cap_minus = c / np.maximum(1.0 - self.m, 1e-12)
        self.n, self.total, self._sq, self._var = 0, 0.0, 0.25, 0.25
        self._level = math.log(1.0 / self.alpha) - math.log(0.5)  # hedged: max(K+, K-) / 2 >= 1/alpha

    def update(self, x: float) -> None:
        """One observation in [0, 1]."""
        t = self.n + 1
        lam = math.sqrt(2 * math.log(2 / self.alpha) / (self._var * t * math.log(1 + t)))
        d = float(x) - self.m
        self.log_plus += np.log1p(np.minimum(lam, self.cap_plus) * d)
        self.log_minus += np.log1p(-np.minimum(lam, self.cap_minus) * d)
        self.n, self.total = t, self.total + float(x)
        mean = (0.5 + self.total) / (t + 1)
        self._sq += (float(x) - mean) ** 2
        self._var = self._sq / (t + 1)

    def bounds(self) -> tuple:
        """(lower, upper) at this time. Grid points are widened by one step outward so that the bounds are
        valid for any rate between them."""
        keep = np.maximum(self.log_plus, self.log_minus) < self._level
        if not keep.any():  # the sequence fell between two grid points: the closest ones around the least capital
            j = int(np.argmin(np.maximum(self.log_plus, self.log_minus)))
            return float(self.m[max(j - 1, 0)]), float(self.m[min(j + 1, len(self.m) - 1)])
        idx = np.flatnonzero(keep)
        return float(self.m[max(idx[0] - 1, 0)]), float(self.m[min(idx[-1] + 1, len(self.m) - 1)])


def kl_upper_bound(k: int, n: int, delta: float) -> float:
    """The (1 - delta) Chernoff upper bound of a Bernoulli rate after ``k`` ones in ``n``: the largest p >= k/n
    with n KL(k/n || p) <= log(1/delta) (bisection)."""
    if n <= 0:
        return 1.0
    q, target = k / n, math.log(1 / delta) / n
    if q >= 1:
        return 1.0

    def kl(p: float) -> float:
        a = q * math.log(q / p) if q > 0 else 0.0
        return a + (1 - q) * math.log((1 - q) / (1 - p))

    lo, hi = q, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if mid < 1 and kl(mid) <= target:
            lo = mid
        else:
            hi = mid
    return hi


def disagrees(exit_logits, final_logits, regression: bool = False, tolerance: float | None = None) -> bool:
    """Did the exit's answer differ from the final layer's (classification: another class; regression: farther
    apart than ``tolerance``)? The loss of a ``disagreement`` guarantee (as :mod:`..analysis.risk` counts it)."""
    a, b = np.asarray(exit_logits, dtype=np.float64), np.asarray(final_logits, dtype=np.float64)
    if regression:
        return bool(abs(a.reshape(-1)[0] - b.reshape(-1)[0]) > (tolerance or 0.0))
    return int(a.argmax()) != int(b.argmax())


class Sampler:
    """Which rows are watched: each independently with probability ``rate`` (seeded, so replays repeat)."""

    def __init__(self, rate: float, seed: int | None = None):
        self.rate, self._rng = float(rate), random.Random(seed)

    def __call__(self) -> bool:
        return self.rate > 0 and (self.rate >= 1 or self._rng.random() < self.rate)


WINDOW = 5000  # watched rows per block of the windowed sequence (benchmarks/bench_watch.py detect chose it)


def block_alpha(alpha: float, k: int) -> float:
    """The level of block ``k`` (1, 2, ...) of the windowed sequence: alpha * 6 / (pi^2 k^2), summing to alpha."""
    return alpha * 6.0 / (math.pi ** 2 * k * k)


class Watch:
    """The running verdict on ``guarantee`` from the sampled bits (thread-safe: the serving worker records,
    the HTTP routes read). ``delta``: the confidence of the test (default: the guarantee's; 0.05 without
    one). ``window``: watched rows per block of the restarted sequence (see the module docstring; 0: the
    cumulative sequence alone, at the test's whole confidence). ``on_change(old, new, snapshot)`` is called
    when the state changes."""

    def __init__(self, guarantee: Guarantee | None, delta: float | None = None, rate: float = 0.0,
                 on_change=None, grid: np.ndarray = GRID, window: int = WINDOW):
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        self.g, self.rate, self.on_change, self.grid = guarantee, float(rate), on_change, grid
        self.delta = float(delta if delta is not None else (guarantee.delta if guarantee is not None else 0.05))
        drift = guarantee is not None and guarantee.risk != "disagreement" and guarantee.disagreement_rate is not None
        spent = self.delta / 2 if drift else self.delta  # drift: the other delta/2 is the calibration bound's
        self.window = int(window)
        self.alpha = spent / 2 if self.window else spent  # the cumulative sequence's level
        self.window_alpha = spent / 2 if self.window else 0.0  # shared by the blocks: block_alpha(., k)
        self.drift_bound = (kl_upper_bound(round(guarantee.disagreement_rate * guarantee.n), guarantee.n, self.delta / 2)
                            if drift else None)
        self.cs = BettingCS(self.alpha, grid)
        self.block, self.win = 0, None  # the windowed sequence: block number, its BettingCS
        self.block_disagreements = 0
        self.disagreements = 0
        self.state = "inconclusive" if guarantee is not None else "unwatched"
        self._lock = threading.Lock()

    @property
    def n(self) -> int:
        return self.cs.n

    def record(self, disagreed: bool) -> str | None:
        """One watched row -> the new state when it changed (None otherwise)."""
        with self._lock:
            x = 1.0 if disagreed else 0.0
            self.cs.update(x)
            self.disagreements += bool(disagreed)
            if self.window:
                if self.win is None or self.win.n >= self.window:
                    self.block += 1
                    self.win, self.block_disagreements = BettingCS(block_alpha(self.window_alpha, self.block), self.grid), 0
                self.win.update(x)
                self.block_disagreements += bool(disagreed)
            old, self.state = self.state, self._state(self.cs.bounds(), self.win.bounds() if self.win else None)
            changed = self.state if self.state != old else None
        if changed and self.on_change is not None:
            self.on_change(old, changed, self.snapshot())
        return changed

    def _state(self, cumulative: tuple, window: tuple | None = None) -> str:
        """From the (lower, upper) bounds of both sequences: ``exceeded`` when a lower bound is over the limit
        (for drift: unless that sequence's upper bound is within epsilon, the disagreement that bounds the drop
        from above), else ``holds`` when the cumulative upper bound is within epsilon."""
        g = self.g
        if g is None:
            return "unwatched"
        limit = g.epsilon if g.risk == "disagreement" else self.drift_bound
        for lower, upper in (cumulative,) + ((window,) if window is not None else ()):
            if limit is not None and lower > limit and upper > g.epsilon:
                return "exceeded"
        return "holds" if cumulative[1] <= g.epsilon else "inconclusive"

    def test(self) -> str:
        """Which test runs, in one line."""
        g = self.g
        cs = f"betting confidence sequences (Waudby-Smith & Ramdas): cumulative at {100 * (1 - self.alpha):g}%"
        if self.window:
            cs += (f", and restarted every {self.window} watched rows, block k at {self.window_alpha:g} * 6/(pi^2 k^2)"
                   f" (these sum to {self.window_alpha:g}: anytime-valid over unbounded time)")
        if g is None:
            return f"no guarantee stored: the disagreement is measured ({cs}) without a verdict"
        eps = f"{g.epsilon:g}"
        if g.risk == "disagreement":
            return f"disagreement guarantee: holds when the cumulative upper bound <= epsilon {eps}; exceeded when a lower bound > {eps} ({cs})"
        what = "accuracy-drop" if g.risk == "accuracy_drop" else "error-increase"
        head = f"{what} guarantee, watched through disagreement (which bounds it from above): holds when the cumulative upper bound <= epsilon {eps}; "
        if self.drift_bound is None:
            return head + f"no drift test: the guarantee stores no calibration disagreement rate (run deebert calibrate) ({cs})"
        return head + (f"exceeded (drift) when a lower bound > {self.drift_bound:.4f}, the {100 * (1 - self.delta / 2):g}% "
                       f"upper bound of the disagreement at calibration ({g.disagreement_rate:.4f} of n={g.n}) ({cs})")

    def advice(self, state: str | None = None) -> str:
        """What to do in this state."""
        state = state or self.state
        if state == "exceeded":
            return ("the traffic no longer looks like the calibration texts: recertify on recent traffic with "
                    "`deebert calibrate --checkpoint CKPT --unlabeled DIR` (DIR: the texts --watch-log keeps), "
                    "or serve a more conservative threshold meanwhile")
        if state == "holds":
            return "nothing: the budget holds on the watched traffic"
        if state == "unwatched":
            return "calibrate the checkpoint (deebert calibrate) to store a guarantee to watch"
        return "wait for more watched rows"

    def snapshot(self) -> dict:
        """rate, n, disagreements, lower, upper, epsilon, state, test, advice, window (for /info and the end
        line); ``window``: the current block's number, rows, disagreements and bounds (None: no window)."""
        with self._lock:
            lower, upper = self.cs.bounds() if self.cs.n else (0.0, 1.0)
            n, k, state = self.cs.n, self.disagreements, self.state
            window = None
            if self.window:
                wl, wu = self.win.bounds() if self.win is not None else (0.0, 1.0)
                window = {"size": self.window, "block": self.block, "n": self.win.n if self.win else 0,
                          "disagreements": self.block_disagreements, "lower": wl, "upper": wu,
                          "alpha": block_alpha(self.window_alpha, max(self.block, 1))}
        g = self.g
        return {"rate": self.rate, "n": n, "disagreements": k, "disagreement": k / n if n else None,
                "lower": lower, "upper": upper, "epsilon": g.epsilon if g is not None else None,
                "risk": g.risk if g is not None else None, "delta": self.delta, "state": state,
                "window": window, "test": self.test(), "advice": self.advice(state)}


def verdict_line(s: dict) -> str:
    """One line for a snapshot: the stored guarantee on this traffic."""
    if s["n"] == 0:
        return "watch: no row was watched (--watch-rate 0, or too few rows)"
    bounds = f"disagreement {s['disagreements']}/{s['n']} = {s['disagreement']:.4f}, bounds [{s['lower']:.4f}, {s['upper']:.4f}]"
    if s["epsilon"] is None:
        return f"watch: {bounds} (no guarantee stored: no verdict)"
    return f"watch: the stored guarantee {s['state']} on these texts: {bounds} against epsilon {s['epsilon']:g}"
