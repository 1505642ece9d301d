"""Risk control (core.risk): the exact binomial tail, fixed-sequence testing against cases with a known
answer, its validity on a synthetic population, the candidate orderings, too-small samples, both risks."""
from __future__ import annotations

import math

import numpy as np
import pytest

from deebert_cli.core.analysis import risk as rk


def test_binomial_tail_and_bounds_against_brute_force():
    for n, p in ((10, 0.3), (57, 0.02), (200, 0.5)):
        for k in (0, 1, 3, n // 2, n):
            want = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
            assert rk.binom_cdf(k, n, p) == pytest.approx(want, rel=1e-9, abs=1e-15)
    for k, n, d in ((0, 100, 0.05), (7, 300, 0.1), (40, 1000, 0.05)):
        ub, lb = rk.upper_bound(k, n, d), rk.lower_bound(k, n, d)
        assert lb < k / n < ub or k == 0
        assert rk.binom_cdf(k, n, ub) == pytest.approx(d, rel=1e-6)  # the Clopper-Pearson equation
        if k:
            assert 1 - rk.binom_cdf(k - 1, n, lb) == pytest.approx(d, rel=1e-6)
    # zero losses in n texts certify epsilon once (1 - eps)^n <= delta
    assert rk.min_calibration_size(0.005, 0.05) == 598 and 0.995**598 <= 0.05 < 0.995**597
    assert rk.min_calibration_size(0.02, 0.05) == 149


def test_fixed_sequence_stops_at_the_first_failure():
    n, eps, delta = 1000, 0.02, 0.05
    # loss counts along the sequence: certifiable while P(Bin(1000, 0.02) <= k) <= 0.05, i.e. k <= 12
    assert max(k for k in range(40) if rk.p_value(k, n, eps) <= delta) == 12
    counts = [0, 3, 12, 13, 5, 2]  # the 4th fails: the later, smaller counts must not be looked at
    rejected, pvals = rk.fixed_sequence(counts, n, eps, delta)
    assert rejected == 3 and len(pvals) == 4 and pvals[-1] > delta
    assert rk.fixed_sequence([50], n, eps, delta)[0] == 0


def _synthetic(n, rates, seed):
    """All-exits logits of 2 classes and labels where the candidate entropy thresholds 0.1, 0.2, ... give
    nested loss sets with the population loss rates ``rates`` (every text is right at the last layer)."""
    rng = np.random.default_rng(seed)
    u = rng.random(n)  # text i is a loss at threshold j when u_i < rates[j]
    y = rng.integers(0, 2, n)
    L = 3
    logits = np.zeros((L, n, 2), dtype=np.float32)
    logits[-1, np.arange(n), y] = 10.0  # final: right and confident
    # layer 1: wrong for would-be losses, right otherwise; its confidence sets the threshold at which it
    # exits: entropy e_i just below the threshold of the first candidate at which text i is a loss
    first = np.searchsorted(np.asarray(rates), u, side="right")  # index of the first rate above u_i
    ent_target = 0.1 * (first + 1) - 0.05  # exits from candidate first (0-based) on
    margin = _margin_for_entropy(np.clip(ent_target, 0.01, 0.99))
    wrong = 1 - y
    logits[0, np.arange(n), np.where(first < len(rates), wrong, y)] = margin
    logits[1, np.arange(n), y] = 10.0
    return logits, y


def _margin_for_entropy(target):
    """The logit margin m whose 2-class normalized entropy is ``target`` (bisection, vectorized)."""
    lo, hi = np.zeros_like(target), np.full_like(target, 30.0)
    for _ in range(60):
        m = (lo + hi) / 2
        p = 1 / (1 + np.exp(-m))
        h = -(p * np.log(p) + (1 - p) * np.log(1 - p)) / math.log(2)
        lo, hi = np.where(h > target, m, lo), np.where(h > target, hi, m)
    return (lo + hi) / 2


def test_certify_returns_the_known_threshold():
    rates = [0.0, 0.001, 0.004, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3]  # at thresholds 0.1 .. 0.9
    logits, y = _synthetic(20000, rates, 0)
    grid = [round(0.1 * (j + 1), 2) for j in range(len(rates))]
    g = rk.certify(logits, y, risk="accuracy_drop", epsilon=0.02, delta=0.05, grid=grid)
    counts = [int(rk.losses("accuracy_drop", rk.exit_layers("entropy", t, logits), logits, y).sum()) for t in grid]
    want = rk.fixed_sequence(counts, 20000, 0.02, 0.05)[0]
    assert g.value == grid[want - 1] and g.losses == counts[want - 1]
    assert g.value == 0.4  # rates 0.01 pass, 0.02 = epsilon cannot (its p-value is ~0.5)
    assert g.bound <= 0.02 and g.empirical == pytest.approx(0.01, abs=0.003)
    # the disagreement risk needs no labels and, every loss here being a disagreement, certifies the same
    d = rk.certify(logits, None, risk="disagreement", epsilon=0.02, delta=0.05, grid=grid)
    assert d.value == g.value
    with pytest.raises(ValueError, match="needs labels"):
        rk.certify(logits, None, risk="accuracy_drop", epsilon=0.02)


def test_guarantee_holds_on_a_synthetic_population():
    """Many calibration samples from a population whose risk curve is known: the certified threshold's
    true risk exceeds epsilon in at most delta of them (plus Monte Carlo slack), and the method is not
    trivially conservative (it certifies most of the way to the boundary on average)."""
    rng = np.random.default_rng(1)
    rates = np.linspace(0.0, 0.06, 61)  # candidate j has true risk rates[j]; epsilon 0.02 sits at j = 20
    eps, delta, n, draws = 0.02, 0.1, 800, 500
    violations, chosen = 0, []
    for _ in range(draws):
        u = rng.random(n)
        counts = [(u < r).sum() for r in rates]
        k = rk.fixed_sequence(counts, n, eps, delta)[0]
        risk = rates[k - 1] if k else 0.0
        chosen.append(risk)
        violations += risk > eps
    slack = 3 * math.sqrt(delta * (1 - delta) / draws)
    assert violations / draws <= delta + slack
    assert np.mean(chosen) > 0.5 * eps


def test_candidates_run_from_conservative_to_aggressive():
    """Along each policy's sequence, no text exits later than under the setting before."""
    rng = np.random.default_rng(2)
    L, n, C = 5, 300, 3
    logits = rng.normal(0, 2, (L, n, C)).astype(np.float32)
    scores = rng.random((L - 1, n)).astype(np.float32)
    for policy, kw in (("entropy", {}), ("patience", {}), ("learned", {"scores": scores})):
        layers = [rk.exit_layers(policy, v, logits, **kw) for v in rk.candidates(policy, L, C)]
        assert all((b <= a).all() for a, b in zip(layers, layers[1:])), policy
        assert (layers[0] >= layers[-1]).all() and layers[0].mean() > layers[-1].mean()
    reg = rng.normal(0, 1, (L, n, 1)).astype(np.float32)
    layers = [rk.exit_layers("learned", v, reg, scores=scores, regression=True)
              for v in rk.candidates("learned", L, 1, regression=True)]
    assert all((b <= a).all() for a, b in zip(layers, layers[1:]))


def test_too_small_a_sample_certifies_nothing():
    logits, y = _synthetic(300, [0.0] * 9, 3)  # no losses at all, but 300 < 598 texts for 0.5 points at 0.05
    g = rk.certify(logits, y, epsilon=0.005, delta=0.05, method="binomial")
    assert not g.certified and g.min_n == 598 and g.layer_saving == 0.0
    g = rk.certify(logits, y, epsilon=0.02, delta=0.05, method="binomial")  # 149 texts suffice for 2 points
    assert g.certified and g.layer_saving > 0
    # comparing 8 recipes costs a union bound: each is tested at delta / 8
    assert rk.certify(logits, y, epsilon=0.02, delta=0.05, family=8, method="binomial").min_n == \
        rk.min_calibration_size(0.02, 0.05 / 8)
    g = rk.certify(logits, y, epsilon=0.02, delta=0.05, family=8)  # the exact test needs a few texts more
    assert g.level == 0.05 / 8 and 0 < g.min_n - rk.min_calibration_size(0.02, 0.05 / 8) < 30  # 277 vs 252
    assert rk.needed_size(0.01, 0.02, 0.05) > rk.needed_size(0.005, 0.02, 0.05) > rk.min_calibration_size(0.02, 0.05)
    assert rk.needed_size(0.03, 0.02, 0.05) is None


def test_regression_risks_and_the_check_of_a_stored_guarantee():
    rng = np.random.default_rng(4)
    L, n = 4, 2000
    y = rng.normal(0, 1, n)
    values = np.stack([y + rng.normal(0, s, n) for s in (0.6, 0.3, 0.1, 0.05)])[..., None].astype(np.float32)
    g = rk.certify(values, y, risk="error_increase", epsilon=0.05, policy="patience", tolerance=0.2)
    d = rk.certify(values, None, risk="disagreement", epsilon=0.05, policy="patience", tolerance=0.2)
    assert g.risk == "error_increase" and d.risk == "disagreement"
    with pytest.raises(ValueError, match="entropy needs class probabilities"):
        rk.certify(values, y, risk="error_increase", epsilon=0.05)
    # a classification guarantee checked on new texts of the same kind holds; on shifted ones it fails
    logits, labels = _synthetic(4000, [0.0, 0.001, 0.004, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3], 5)
    grid = [round(0.1 * (j + 1), 2) for j in range(9)]
    g = rk.certify(logits[:, :2000], labels[:2000], epsilon=0.02, grid=grid)
    assert rk.check(g, logits[:, 2000:], labels[2000:])["verdict"] == "holds"
    drifted, dl = _synthetic(2000, [0.05] * 9, 6)
    got = rk.check(g, drifted, dl)
    assert got["verdict"] == "exceeded" and got["lower_bound"] > 0.02
    assert rk.check(g, drifted, None, risk="disagreement")["verdict"] == "exceeded"
    assert rk.Guarantee.from_dict(g.to_dict()) == g


def test_max_losses_is_the_count_where_the_p_value_crosses_delta():
    for n, eps, d in ((1000, 0.02, 0.05), (598, 0.005, 0.05), (100, 0.005, 0.05), (5000, 0.01, 0.1 / 8)):
        k = rk.max_losses(n, eps, d)
        assert (k < 0 or rk.p_value(k, n, eps) <= d) and rk.p_value(k + 1, n, eps) > d
    assert rk.max_losses(1000, 0.02, 0.05) == 12 and rk.max_losses(100, 0.005, 0.05) == -1


# ------------------------------------------------------------------------------------------------
# the signed loss and its betting bound (core.analysis.bounds)
# ------------------------------------------------------------------------------------------------
from deebert_cli.core.analysis import bounds as bd  # noqa: E402


def _reference_log_capital(s, eps, alpha):
    """The betting process written out text by text (RCPS's WSR_mu_plus, capped as in bounds.py)."""
    x, m, n = (np.asarray(s, float) + 1) / 2, (eps + 1) / 2, len(s)
    total, var, mu_sum, sq_sum, best = 0.0, 0.25, 0.0, 0.0, 0.0
    for i, xi in enumerate(x):
        lam = min(math.sqrt(2 * math.log(1 / alpha) / (n * var)), bd.BET_CAP / (1 - m))
        total += math.log(1 - lam * (xi - m))
        best = max(best, total)
        mu_sum += xi
        mu = (mu_sum + 0.5) / (i + 2)
        sq_sum += (xi - mu) ** 2
        var = (sq_sum + 0.25) / (i + 2)
    return best


def test_betting_p_value_against_cases_with_a_known_answer():
    rng = np.random.default_rng(0)
    for n in (1, 7, 300):
        s = rng.choice([-1, 0, 1], p=[0.1, 0.8, 0.1], size=n)
        for eps in (0.0, 0.01, 0.2):
            assert bd.betting_p_value(s, eps, 0.05) == pytest.approx(math.exp(-_reference_log_capital(s, eps, 0.05)))
    # every exit wrong where the final layer is right: the capital only falls, nothing can be certified
    assert bd.betting_p_value(np.ones(500), 0.5, 0.05) == 1.0
    assert bd.betting_upper_bound(np.ones(500), 0.05) == 1.0
    # no discordant text at all: x = 1/2 throughout, the running variance before text i is 1/4 / (i + 1),
    # so the bet is min(sqrt(2 log(1/alpha) 4 (i + 1) / n), cap / (1 - m)) and each factor 1 + bet * eps / 2
    m, n = (0.01 + 1) / 2, 400
    want = sum(math.log1p(min(math.sqrt(2 * math.log(20) * 4 * (i + 1) / n), bd.BET_CAP / (1 - m)) * (m - 0.5))
               for i in range(n))
    assert -math.log(bd.betting_p_value(np.zeros(400), 0.01, 0.05)) == pytest.approx(want, rel=1e-9)
    # vectorized over rows: each row as alone
    rows = rng.choice([-1, 0, 1], p=[0.05, 0.9, 0.05], size=(4, 200))
    assert np.allclose(bd.betting_p_value(rows, 0.02, 0.05), [bd.betting_p_value(r, 0.02, 0.05) for r in rows])


def test_betting_bound_on_bernoulli_losses_against_the_exact_binomial_and_monotone():
    """With no -1 the signed loss is the binary loss: the exact Clopper-Pearson bound is the benchmark; the
    betting bound is valid but pays (it never sees the loss is binary): over random orders of the same
    texts its margin averages 1.1-1.5x the exact one's (one order can land under it: the order is random)."""
    rng = np.random.default_rng(1)
    for n, k in ((1000, 10), (2500, 20), (1000, 30)):
        cp, bets = rk.upper_bound(k, n, 0.05), []
        for _ in range(20):
            s = np.zeros(n)
            s[rng.permutation(n)[:k]] = 1
            bets.append(bd.betting_upper_bound(s, 0.05))
            # a monotonicity: the last text's bet is set before it is read, so a worse last text (-1 < 0 < +1)
            # never lowers the p-value (earlier ones also move later bets through the running variance)
            ends = [np.concatenate([s[:-1], [v]]) for v in (-1, 0, 1)]
            p = [float(bd.betting_p_value(e, 0.02, 0.05)) for e in ends]
            assert p[0] <= p[1] <= p[2]
        assert 1.1 < (np.mean(bets) - k / n) / (cp - k / n) < 1.5
    # the p-value falls as the budget grows (fixed data)
    s = rng.choice([-1, 0, 1], p=[0.03, 0.92, 0.05], size=800)
    p = [float(bd.betting_p_value(s, e, 0.05)) for e in np.linspace(0, 0.1, 41)]
    assert all(b <= a + 1e-12 for a, b in zip(p, p[1:])) and p[0] > 0.05 > p[-1]


def test_betting_and_discordant_bounds_are_valid_on_a_synthetic_population():
    """Drop exactly at epsilon (the boundary of the null): "drop > eps" is rejected in at most alpha of the
    draws (plus Monte Carlo slack); the discordant-pair bound covers the drop likewise."""
    rng = np.random.default_rng(2)
    eps, alpha, n, draws = 0.01, 0.1, 400, 600
    p_plus, p_minus = 0.04 + eps / 2, 0.04 - eps / 2
    s = rng.choice([-1, 0, 1], p=[p_minus, 1 - p_plus - p_minus, p_plus], size=(draws, n))
    rejected = (bd.betting_p_value(s, eps, alpha) <= alpha).mean()
    slack = 3 * math.sqrt(alpha * (1 - alpha) / draws)
    assert rejected <= alpha + slack
    assert rejected > 0.01  # and not trivially conservative at the boundary
    below = [rk.discordant_upper_bound(int((r == 1).sum()), int((r == -1).sum()), n, alpha) < eps for r in s[:300]]
    assert np.mean(below) <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / 300)
    # a setting whose drop is well under budget is certified most of the time
    good = rng.choice([-1, 0, 1], p=[0.03, 0.94, 0.03], size=(200, 2000))
    assert (bd.betting_p_value(good, 0.02, 0.05) <= 0.05).mean() > 0.8


def test_certify_methods_exact_binomial_and_betting():
    """The exact score test is the default for an accuracy drop; it says which bound certified it; where
    exits fix many of the final layer's errors, the tests of the drop itself (exact, betting) go further
    than the binary proxy's binomial bound; results are reproducible; a
    stored guarantee of the drop is checked on the drop."""
    rng = np.random.default_rng(3)
    L, n, C = 4, 1500, 2
    y = rng.integers(0, C, n)
    logits = rng.normal(0, 1, (L, n, C)).astype(np.float32)
    for i in range(L):  # each layer right on a growing share, more confident when right
        right = rng.random(n) < (0.80 + 0.03 * i)
        logits[i, np.arange(n), np.where(right, y, 1 - y)] += 2.0 + i + 2 * right
    got = {m: rk.certify(logits, y, epsilon=0.01, method=m) for m in ("binomial", "betting", "exact")}
    assert rk.certify(logits, y, epsilon=0.01) == got["exact"] and got["exact"].method == "exact"
    assert got["binomial"].method == "binomial" and got["betting"].method == "betting"
    assert got["binomial"].layer_saving < min(got["betting"].layer_saving, got["exact"].layer_saving)
    for g in got.values():
        assert g.bound <= 0.01 and g.accuracy_drop <= g.bound and g.level == 0.05
    assert rk.certify(logits, y, epsilon=0.01, method="betting") == got["betting"]
    g = rk.Guarantee.from_dict(got["exact"].to_dict())
    assert g == got["exact"] and "exact" in g.describe()
    old = {k: v for k, v in got["binomial"].to_dict().items() if k not in ("method", "level", "selection")}
    assert rk.Guarantee.from_dict(old).method == "binomial" and rk.Guarantee.from_dict(old).test_level == 0.05
    for m in ("betting", "exact"):
        with pytest.raises(ValueError, match=f"{m} bound certifies the accuracy drop"):
            rk.certify(logits, None, risk="disagreement", epsilon=0.01, method=m)
        chk = rk.check(got[m], logits, y)  # checked on the drop itself
        assert chk["rate"] == pytest.approx(got[m].accuracy_drop) and chk["verdict"] == "holds"
        assert chk["lower_bound"] < chk["rate"] < chk["upper_bound"]
    # a drop far over budget on new texts: the exact check's lower bound says "exceeded"
    worse = logits.copy()
    worse[1, np.arange(n), y] -= 6.0  # layer 2 now wrong almost everywhere it exits
    assert rk.check(got["exact"], worse, y)["verdict"] == "exceeded"


def test_the_split_selection_parts():
    """The two parts are disjoint, cover the texts, and are the same every run."""
    pick, rest = rk.selection_parts(1000, 0.3)
    assert len(pick) == 300 and len(rest) == 700 and not set(pick) & set(rest)
    assert sorted(set(pick) | set(rest)) == list(range(1000))
    assert all((a == b).all() for a, b in zip(rk.selection_parts(1000, 0.3), (pick, rest)))


# ------------------------------------------------------------------------------------------------
# the exact score test of the drop (core.analysis.exact)
# ------------------------------------------------------------------------------------------------
def _rejection_set(n: int, eps: float, alpha: float) -> np.ndarray:
    """R[a, b]: the exact test rejects "drop > eps" from a (+1) and b (-1) counts of n (a + b <= n)."""
    from deebert_cli.core.analysis import exact as ex

    a, b = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    keep = a + b <= n
    out = np.zeros((n + 1, n + 1), dtype=bool)
    out[keep] = ex.rejects_many(a[keep], b[keep], n, eps, alpha)
    return out


def _prob(region: np.ndarray, n: int, p: float, q: float) -> float:
    """P((A, B) in region) for (A, B, rest) ~ Multinomial(n; p, q, 1 - p - q), summed exactly."""
    lf = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1)))])
    a, b = np.nonzero(region)
    with np.errstate(divide="ignore"):
        logs = (lf[n] - lf[a] - lf[b] - lf[n - a - b] + a * np.log(p) + b * np.log(q)
                + (n - a - b) * np.log1p(-p - q))
    return float(np.exp(logs).sum())


@pytest.mark.parametrize("n,eps", [(60, 0.05), (150, 0.02), (150, -0.02)])
def test_exact_test_is_valid_at_every_point_of_the_null_summed_exactly(n, eps):
    """The size of the test, summed over every outcome (no Monte Carlo): P(reject) <= alpha at points on
    the boundary p - q = eps across the nuisance, and inside the null; and not trivially conservative."""
    alpha = 0.05
    region = _rejection_set(n, eps, alpha)
    sizes = []
    for pi in np.linspace(abs(eps) + 1e-6, 0.9, 60):  # the boundary: p = (pi + eps) / 2, q = (pi - eps) / 2
        sizes.append(_prob(region, n, (pi + eps) / 2, (pi - eps) / 2))
    for p, q in ((0.3, 0.05), (eps + 0.1, 0.02), (max(eps, 0) + 0.01, 0.0)):  # inside: p - q > eps
        if p - q > eps and p + q < 1:
            sizes.append(_prob(region, n, p, max(q, 1e-12)))
    assert max(sizes) <= alpha + 1e-9
    assert max(sizes) > 0.4 * alpha  # it uses its level somewhere on the boundary


def test_exact_test_against_the_binomial_and_the_normal_approximation():
    """With no -1 text the drop is the binary loss: the exact test certifies exactly the counts the exact
    binomial test does (cases measured); each -1 offsets a +1 and more; at a large n its bound is within
    15% of the normal approximation's margin and its power exceeds the betting bound's."""
    from deebert_cli.core.analysis import exact as ex

    for n, eps in ((739, 0.005), (700, 0.01), (1750, 0.01)):
        k = rk.max_losses(n, eps, 0.05)
        assert ex.rejects(k, 0, n, eps, 0.05) and not ex.rejects(k + 1, 0, n, eps, 0.05)
        assert ex.rejects(k + 1, 2, n, eps, 0.05)
    a, b, n = 120, 80, 5000
    drop, sd = (a - b) / n, math.sqrt(((a + b) / n - ((a - b) / n) ** 2) / n)
    assert 1.645 * sd < ex.upper_bound(a, b, n, 0.05) - drop < 1.15 * 1.645 * sd
    assert ex.upper_bound(a, b, n, 0.05) < ex.upper_bound(a, b, n, 0.01)  # monotone in the level
    rng = np.random.default_rng(0)
    counts = rng.multinomial(700, [0.0097, 0.0088, 1 - 0.0185], size=150)
    exact_power = np.mean([ex.rejects(x, y, 700, 0.01, 0.05) for x, y, _ in counts])
    bets = []
    for x, y, _ in counts:
        s = np.r_[np.ones(x), -np.ones(y), np.zeros(700 - x - y)]
        bets.append(float(bd.betting_p_value(rng.permutation(s), 0.01, 0.05)) <= 0.05)
    assert exact_power > np.mean(bets) + 0.05


def test_the_score_statistic_is_the_restricted_likelihoods():
    """Tango's closed form equals the score statistic at the maximum likelihood under p - q = eps found by
    a grid search, for budgets of either sign; the monotone version never decreases in a, never increases
    in b."""
    from deebert_cli.core.analysis import exact as ex

    n = 200
    for a, b, eps in ((10, 4, 0.02), (3, 9, -0.01), (7, 0, 0.05), (20, 25, -0.05)):
        qs = np.linspace(max(-eps, 0) + 1e-9, (1 - eps) / 2 - 1e-9, 200001)
        ll = a * np.log(np.maximum(qs + eps, 1e-300)) + b * np.log(qs) + (n - a - b) * np.log(1 - 2 * qs - eps)
        q = qs[ll.argmax()]
        want = (a - b - n * eps) / math.sqrt(n * (2 * q + eps - eps ** 2))
        assert float(ex.score(a, b, n, eps)) == pytest.approx(want, abs=1e-4)
    g = np.arange(40)
    z = ex._monotone(np.asarray(ex.score(g[:, None], g[None, :], 100, 0.02)))
    assert (np.diff(z, axis=0) >= 0).all() and (np.diff(z, axis=1) <= 0).all()
