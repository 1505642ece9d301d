"""How often each test of the accuracy drop certifies a setting, on synthetic draws with known rates.

    python benchmarks/bench_exact_power.py [--draws 200] [--budget 0.01]

Per (n, P(+1), P(-1)): the share of ``--draws`` multinomial draws in which "drop > budget" is rejected at
delta = 0.05 by the exact score test (core/analysis/exact.py), the betting p-value (core/analysis/bounds.py,
the texts in a random order) and the normal approximation (Wald: drop + 1.645 sd <= budget; not a valid
test, only what an approximation would claim); then the exact test's size on the null's boundary (the drop
exactly at the budget: its rejection rate must stay <= delta). The rates are the movie reviews' around the
thresholds certified at 1 point (the pool of docs/BENCHMARKS.md's guarantee benchmark).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RATES = [(0.0077, 0.0057), (0.0097, 0.0088), (0.0142, 0.0114), (0.0217, 0.0134)]  # (P(+1), P(-1))


def main() -> None:
    from deebert_cli.core.analysis import bounds as bd
    from deebert_cli.core.analysis import exact as ex

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--budget", type=float, default=0.01)
    args = ap.parse_args()
    eps, alpha, rng = args.budget, 0.05, np.random.default_rng(0)
    print(f"{'n':>6} {'P(+1)':>7} {'P(-1)':>7} {'drop':>7} | {'exact':>6} {'betting':>8} {'normal':>7}")
    for n in (700, 1750):
        for p, q in RATES:
            counts = rng.multinomial(n, [p, q, 1 - p - q], size=args.draws)
            exact = np.mean([ex.rejects(a, b, n, eps, alpha) for a, b, _ in counts])
            wald = np.mean([(a - b) / n + 1.645 * math.sqrt(max((a + b) / n - ((a - b) / n) ** 2, 1e-12) / n) <= eps
                            for a, b, _ in counts])
            bets = [float(bd.betting_p_value(rng.permutation(np.r_[np.ones(a), -np.ones(b), np.zeros(n - a - b)]),
                                             eps, alpha)) <= alpha for a, b, _ in counts]
            print(f"{n:>6} {p:>7.4f} {q:>7.4f} {p - q:>7.4f} | {exact:>6.2f} {np.mean(bets):>8.2f} {wald:>7.2f}")
    print(f"\nthe exact test's size on the boundary (drop = {eps}), {20 * args.draws} draws each, delta {alpha}:")
    for n, pi in ((300, 0.05), (700, 0.02), (700, 0.2), (1750, 0.03)):
        p, q = (pi + eps) / 2, (pi - eps) / 2
        counts = rng.multinomial(n, [p, q, 1 - p - q], size=20 * args.draws)
        rate = np.mean([ex.rejects(a, b, n, eps, alpha) for a, b, _ in counts])
        print(f"  n={n} discordance {pi}: rejected {rate:.4f} (se {math.sqrt(rate * (1 - rate) / len(counts)):.4f})")


if __name__ == "__main__":
    main()
