"""Does the guarantee hold, and what does it cost? Repeated random calibration/test splits of real labelled
texts the model never saw, the whole of train-exits' choice replayed on each.

    python benchmarks/bench_guarantee.py --checkpoint STAGE1 --pool POOL.jsonl --cache cache.npz --json out.json

STAGE1 is a `deebert finetune` checkpoint; its training data trains every off-ramp recipe once (as
`train-exits` does, on the one frozen-pass cache); POOL.jsonl holds labelled texts used by nothing so far
(neither training, nor stage 1's epoch choice, nor the recipes' calibration). Each recipe's all-exits
logits over the pool are computed once (cached in --cache). Then, for every calibration size and each of
--splits random splits of the pool into a calibration part and a test part (the rest):

* **guaranteed** (what train-exits and `deebert calibrate` do now): for every recipe, the most aggressive
  entropy threshold certified on the calibration part (Learn then Test, fixed sequence, exact binomial
  p-values, each recipe at delta / 8); the recipe with the largest certified saving is kept;
* **point estimate** (what train-exits did before): for every recipe, the threshold of analyze's grid with
  the largest saving whose drop on the calibration part is within the budget; the recipe saving most kept.

The test part then gives each choice's real risk: the accuracy drop (final layer's accuracy minus the
early-exit accuracy, in points) or the disagreement with the final layer (no labels needed: the label-free
guarantee), and its layer saving. A split violates the budget when its test risk exceeds epsilon; the
guarantee promises a violation rate <= delta (the risk is on new data: with a finite test part, a risk
just under epsilon can still read above it). Printed per (risk, epsilon, size): both violation rates
beside delta, the mean and 10th percentile of the test layer saving, and their ratio.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUDGETS = [("accuracy_drop", 0.005), ("accuracy_drop", 0.01), ("accuracy_drop", 0.02),
           ("disagreement", 0.01), ("disagreement", 0.02)]


# ------------------------------------------------------------------------------------------------
# once: every recipe's all-exits logits over the pool
# ------------------------------------------------------------------------------------------------
def recipe_logits(checkpoint: str, pool: str, seed: int = 42) -> dict:
    """Train every candidate recipe on the checkpoint's training split (train-exits' own code and
    defaults), then run the frozen model once over the pool -> {"logits" [K, L, n, C], "labels" [n],
    "recipes" [K]}."""
    import torch

    from deebert_cli.core.config import TrainExitsConfig
    from deebert_cli.core.data.encoding import encode
    from deebert_cli.core.launch import Runtime
    from deebert_cli.core.model.policies import RampConfig
    from deebert_cli.core.runtime.passes import collect
    from deebert_cli.core.train import recipes as rc
    from deebert_cli.core.train.common import Progress
    from deebert_cli.core.train.stage2 import _cache_states, _exit_logits, _stage1_inputs, _try_recipes

    cfg = TrainExitsConfig(checkpoint=checkpoint, device="cpu", seed=seed)
    rt = Runtime("cpu")
    ckpt, spec, data, train = _stage1_inputs(cfg)
    model = ckpt.model
    todo = rc.recipes_for(cfg, ckpt.task, model.adapter.ramp_pooling)
    for p in model.model.parameters():
        p.requires_grad_(False)
    cache = _cache_states(cfg, rt, ckpt, spec, train, data.eval, {r.pooling for r in todo}, Progress())
    ev_y = torch.tensor(data.eval.labels)
    _, kept, *_ = _try_recipes(model, todo, cache, cfg, ckpt.task, ev_y, model.ramp_cfg.dropout, Progress())
    rows = [json.loads(l) for l in Path(pool).read_text().splitlines() if l.strip()]
    names = ckpt.label_names
    enc = encode(ckpt.tokenizer, [r["text"] for r in rows], None, ckpt.meta.get("max_length", 128))
    got = collect(model, enc, ckpt.tokenizer.pad_token_id, 64, "cpu", pooled=False, poolings=("cls", "mean"))
    out = []
    for recipe, (state, _, _) in zip(todo, kept):
        model.build_ramps(RampConfig(recipe.pooling, recipe.norm, model.ramp_cfg.dropout), init_from_pooler=False)
        model.ramps.load_state_dict(state)
        model.ramps.eval()
        out.append(_exit_logits(model, got["pooled_by"][recipe.pooling], got["final"]).numpy())
    return {"logits": np.stack(out), "labels": np.array([names.index(r["label"]) for r in rows]),
            "recipes": np.array([r.name for r in todo])}


# ------------------------------------------------------------------------------------------------
# per recipe and threshold: exit layers and losses over the pool
# ------------------------------------------------------------------------------------------------
def tables(logits: np.ndarray, labels: np.ndarray, grid: list) -> dict:
    """For each recipe [K] and threshold of ``grid`` [m]: exit layer [n], "final right, exit wrong" and
    "final wrong, exit right" and disagreement indicators [n] -> arrays [K, m, n]."""
    from deebert_cli.core.analysis import risk

    K, L, n, _ = logits.shape
    layer = np.empty((K, len(grid), n), dtype=np.int8)
    for k in range(K):
        ent = risk._softmax_entropy(logits[k], "normalized")
        for j, t in enumerate(grid):
            layer[k, j] = risk.exit_layers("entropy", t, logits[k], ent=ent)
    pred = logits.argmax(-1)  # [K, L, n]
    at = np.take_along_axis(pred[:, None], layer[:, :, None, :].astype(np.int64), axis=2)[:, :, 0]  # [K, m, n]
    final = pred[:, -1][:, None]  # [K, 1, n]
    right_final, right_at = final == labels, at == labels
    return {"layer": layer, "bad": right_final & ~right_at, "good": ~right_final & right_at, "dis": at != final}


# ------------------------------------------------------------------------------------------------
# one split, both methods (every figure is a sum over the calibration or test texts: one matrix product)
# ------------------------------------------------------------------------------------------------
def sums(tab: dict, part: np.ndarray) -> dict:
    """Per recipe and threshold [K, m]: the sums over the texts of ``part`` (0/1 float [n]) of exit layer,
    "final right, exit wrong", "final wrong, exit right" and disagreement; and the part's size."""
    K, m, n = tab["layer"].shape
    out = {k: (tab[k + "_f"] @ part).reshape(K, m) for k in ("layer", "bad", "good", "dis")}
    out["n"] = float(part.sum())
    return out


def guaranteed(c: dict, L: int, risk_kind: str, eps: float, delta: float) -> tuple:
    """(recipe, threshold index or -1 for full depth) certified on the calibration sums ``c``: fixed
    sequence per recipe at delta / K, the recipe with the largest certified saving kept."""
    from deebert_cli.core.analysis.risk import max_losses

    K, m = c["bad"].shape
    kmax = max_losses(int(c["n"]), eps, delta / K)
    counts = c["bad"] if risk_kind == "accuracy_drop" else c["dis"]
    best = (-1.0, 0, -1)
    for k in range(K):
        fail = np.nonzero(counts[k] > kmax + 0.5)[0]
        j = (fail[0] if len(fail) else m) - 1
        saving = 0.0 if j < 0 else 1 - (c["layer"][k, j] / c["n"] + 1) / L
        if saving > best[0]:
            best = (saving, k, j)
    return best[1], best[2]


def point_estimate(c: dict, L: int, risk_kind: str, eps: float) -> tuple:
    """(recipe, threshold index) as train-exits chose before: per recipe the largest saving on the
    calibration texts whose drop (or disagreement) there is within eps (ties: more accurate, smaller
    threshold); the recipe saving most."""
    K, m = c["bad"].shape
    risk = (c["bad"] - c["good"]) / c["n"] if risk_kind == "accuracy_drop" else c["dis"] / c["n"]
    saving = 1 - (c["layer"] / c["n"] + 1) / L
    gain = c["good"] - c["bad"]
    best = None
    for k in range(K):
        for j in range(m):
            if risk[k, j] <= eps + 1e-12:
                key = (round(float(saving[k, j]), 12), gain[k, j], -j, -k)
                if best is None or key > best[0]:
                    best = (key, k, j)
    return (best[1], best[2]) if best else (0, 0)


def on_test(t: dict, L: int, k: int, j: int) -> dict:
    """Test-part figures (sums ``t``) of recipe k at threshold j (-1: full depth)."""
    if j < 0:
        return {"drop": 0.0, "dis": 0.0, "saving": 0.0}
    return {"drop": float((t["bad"][k, j] - t["good"][k, j]) / t["n"]), "dis": float(t["dis"][k, j] / t["n"]),
            "saving": float(1 - (t["layer"][k, j] / t["n"] + 1) / L)}


def run(data: dict, sizes: list, splits: int, delta: float, seed: int) -> list:
    from deebert_cli.core.analysis.risk import FINE_GRID
    from deebert_cli.core.analysis.sweep import DEFAULT_GRID

    logits, labels = data["logits"], data["labels"]
    n, L = labels.shape[0], logits.shape[1]
    fine = tables(logits, labels, list(FINE_GRID))
    coarse = tables(logits, labels, [t for t in DEFAULT_GRID])
    for tab in (fine, coarse):
        K, m, _ = tab["layer"].shape
        for key in ("layer", "bad", "good", "dis"):
            tab[key + "_f"] = tab[key].reshape(K * m, n).astype(np.float32)
    rng = np.random.default_rng(seed)
    ones = np.ones(n, dtype=np.float32)
    pop_f, pop_c = sums(fine, ones), sums(coarse, ones)  # the pool as the population of the bootstrap check
    results = []
    for size in sizes:
        if size >= n:
            continue
        got = {b: {"guaranteed": [], "point": [], "guaranteed_pop": [], "point_pop": []} for b in BUDGETS}
        for _ in range(splits):
            cal = np.zeros(n, dtype=np.float32)
            cal[rng.permutation(n)[:size]] = 1.0
            fc, ft, cc, ct = sums(fine, cal), sums(fine, 1 - cal), sums(coarse, cal), sums(coarse, 1 - cal)
            # the bootstrap check: calibration texts drawn with replacement from the pool, whose own risk is
            # then the exact population risk of the chosen setting (no test-sample noise)
            boot = np.bincount(rng.integers(0, n, size), minlength=n).astype(np.float32)
            fb, cb = sums(fine, boot), sums(coarse, boot)
            for b in BUDGETS:
                got[b]["guaranteed"].append(on_test(ft, L, *guaranteed(fc, L, b[0], b[1], delta)))
                got[b]["point"].append(on_test(ct, L, *point_estimate(cc, L, b[0], b[1])))
                got[b]["guaranteed_pop"].append(on_test(pop_f, L, *guaranteed(fb, L, b[0], b[1], delta)))
                got[b]["point_pop"].append(on_test(pop_c, L, *point_estimate(cb, L, b[0], b[1])))
        for (kind, eps), both in got.items():
            row = {"risk": kind, "epsilon": eps, "calibration": size, "test": n - size, "splits": splits, "delta": delta}
            for m, vals in both.items():
                r = np.array([v["drop" if kind == "accuracy_drop" else "dis"] for v in vals])
                s = np.array([v["saving"] for v in vals])
                d = np.array([v["drop"] for v in vals])
                row[m] = {"violations": float((r > eps + 1e-12).mean()), "mean_risk": float(r.mean()),
                          "saving_mean": float(s.mean()), "saving_p10": float(np.percentile(s, 10)),
                          "test_drop_mean": float(d.mean()), "test_drop_p90": float(np.percentile(d, 90))}
            row["saving_ratio"] = row["guaranteed"]["saving_mean"] / max(row["point"]["saving_mean"], 1e-12)
            results.append(row)
    return results


def print_table(name: str, results: list) -> None:
    print(f"\n{name}: violation rate (test risk > epsilon) and test layer saving, guaranteed vs point estimate")
    print("(viol.: share of splits whose test part's risk exceeds epsilon; pop.: the same with calibration texts "
          "drawn with replacement from the pool and the pool's own risk as the truth, free of test-sample noise)")
    print(f"{'risk':<14}{'eps':>6}{'n cal':>7}{'n test':>7} | {'viol. G':>8}{'viol. P':>8}{'pop. G':>8}{'pop. P':>8}"
          f"{'delta':>6} | {'saving G mean/p10':>18}{'saving P mean/p10':>19}{'G/P':>6} | {'drop G mean/p90':>16}")
    for r in results:
        g, p = r["guaranteed"], r["point"]
        eps = f"{100 * r['epsilon']:g}" + ("pt" if r["risk"] == "accuracy_drop" else "%")
        print(f"{r['risk']:<14}{eps:>6}{r['calibration']:>7}{r['test']:>7} | {g['violations']:>8.3f}{p['violations']:>8.3f}"
              f"{r['guaranteed_pop']['violations']:>8.3f}{r['point_pop']['violations']:>8.3f}"
              f"{r['delta']:>6.2f} | {100 * g['saving_mean']:>8.1f}/{100 * g['saving_p10']:<8.1f}"
              f"{100 * p['saving_mean']:>9.1f}/{100 * p['saving_p10']:<8.1f}{r['saving_ratio']:>6.2f} | "
              f"{100 * g['test_drop_mean']:>7.2f}/{100 * g['test_drop_p90']:<7.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a stage-1 checkpoint (deebert finetune)")
    ap.add_argument("--pool", required=True, help="labelled JSONL texts used by nothing so far")
    ap.add_argument("--cache", required=True, help="npz of the recipes' logits over the pool (made when missing)")
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[250, 500, 1000, 1500, 2000, 2500])
    ap.add_argument("--splits", type=int, default=300)
    ap.add_argument("--delta", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    if not Path(args.cache).is_file():
        np.savez_compressed(args.cache, **recipe_logits(args.checkpoint, args.pool))
        print(f"recipes' logits over the pool cached in {args.cache} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    data = dict(np.load(args.cache))
    results = run(data, args.sizes, args.splits, args.delta, args.seed)
    name = args.name or Path(args.pool).stem
    full = data["logits"][:, -1].argmax(-1)[0] == data["labels"]
    print(f"{name}: pool of {len(data['labels'])} labelled texts, {data['logits'].shape[0]} recipes, final-layer "
          f"accuracy {100 * full.mean():.2f}%; {args.splits} splits per size; delta {args.delta}")
    print_table(name, results)
    if args.json:
        Path(args.json).write_text(json.dumps({"name": name, "pool": len(data["labels"]), "recipes": data["recipes"].tolist(),
                                               "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
