"""Does the guarantee hold, and what does it cost? Repeated random calibration/test splits of real labelled
texts the model never saw, the whole of train-exits' choice replayed on each.

    python benchmarks/bench_guarantee.py --checkpoint STAGE1 --pool POOL.jsonl --cache cache.npz --json out.json

STAGE1 is a `deebert finetune` checkpoint; its training data trains every off-ramp recipe once (as
`train-exits` does, on the one frozen-pass cache); POOL.jsonl holds labelled texts used by nothing so far
(neither training, nor stage 1's epoch choice, nor the recipes' calibration). Each recipe's all-exits
logits over the pool are computed once (cached in --cache). Then, for every calibration size and each of
--splits random splits of the pool into a calibration part and a test part (the rest):

* every **guaranteed** method of METHODS: a bound (``binomial``: exact, on "final right, exit wrong";
  ``betting``: Waudby-Smith & Ramdas on the signed loss, the drop itself; ``exact``: the exact score test
  of the drop, core/analysis/exact.py) and a way to pay for the choice among
  the 8 recipes (``union``: each at delta / 8, the largest certified saving kept; ``split``: the recipe
  chosen on the first SELECT_FRACTION of the calibration texts by its point estimate there, certified on
  the rest). DEFAULT is what train-exits does now, OLD what it did before (binomial/union);
* **point estimate** (what train-exits did before the guarantee): for every recipe, the threshold of
  analyze's grid with the largest saving whose drop on the calibration part is within the budget; the
  recipe saving most kept.

Each draw is made twice: without replacement (the rest of the pool is the test part) and with replacement
(the pool as the population). The truth of a chosen setting is its risk on the whole pool (and, for the
draws without replacement, on the test part too, which adds its sampling noise): the accuracy drop or the
disagreement with the final layer. A draw violates the budget when that risk exceeds epsilon; the
guarantee promises a violation rate <= delta. Printed per (risk, epsilon, size, method): the violation
rates, the test layer saving (mean, 10th percentile) and its share of the point estimate's, the test
accuracy drop (mean, 90th percentile). ``--merge OUT IN...`` joins the JSON of runs over different sizes.
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
# one calibration draw, every method (the binomial figures are sums over the calibration texts: one
# matrix product; the betting ones read the signed losses in the draw's order, threshold by threshold)
# ------------------------------------------------------------------------------------------------
SELECT_FRACTION = 0.15  # the split selection: recipe chosen on this share (train-exits' recipes.SELECT_FRACTION)
CHUNK = 24  # thresholds whose betting p-values are computed at once (the sequence stops at the first failure)


def sums(tab: dict, part: np.ndarray) -> dict:
    """Per recipe and threshold [K, m]: the sums over the texts of ``part`` (weights [n]: 0/1, or counts
    for a draw with replacement) of exit layer, "final right, exit wrong", "final wrong, exit right" and
    disagreement; and the part's size."""
    K, m, n = tab["layer"].shape
    out = {k: (tab[k + "_f"] @ part).reshape(K, m) for k in ("layer", "bad", "good", "dis")}
    out["n"] = float(part.sum())
    return out


def binomial_run(counts: np.ndarray, n: int, eps: float, level: float) -> np.ndarray:
    """Per recipe [K]: how many thresholds fixed-sequence testing certifies (exact binomial p-values)."""
    from deebert_cli.core.analysis.risk import max_losses

    kmax = max_losses(int(n), eps, level)
    fail = counts > kmax + 0.5
    return np.where(fail.any(-1), fail.argmax(-1), counts.shape[-1])


def betting_run(signed: np.ndarray, idx: np.ndarray, eps: float, level: float) -> int:
    """How many thresholds fixed-sequence testing certifies with betting p-values, for one recipe's signed
    losses [m, pool] read at the calibration texts ``idx`` in the draw's order."""
    from deebert_cli.core.analysis.bounds import betting_log_capital

    m, need = signed.shape[0], -np.log(level)
    for j0 in range(0, m, CHUNK):
        x = signed[j0:j0 + CHUNK][:, idx]  # float32, already (s + 1) / 2
        ok = betting_log_capital(x, (eps + 1) / 2, level) >= need
        if not ok.all():
            return j0 + int(ok.argmin())
    return m


def exact_run(bad: np.ndarray, good: np.ndarray, n: int, eps: float, level: float) -> np.ndarray:
    """Per recipe [K]: how many thresholds fixed-sequence testing certifies with the exact score test of
    the drop (counts of +1 ``bad`` and -1 ``good`` [K, m])."""
    from deebert_cli.core.analysis.exact import rejects_many

    out = []
    for bk, gk in zip(bad, good):
        ok = rejects_many(np.rint(bk), np.rint(gk), int(round(n)), eps, level)
        out.append(len(ok) if ok.all() else int(ok.argmin()))
    return np.array(out)


def _saving(c: dict, L: int, k: int, j: int) -> float:
    return 0.0 if j < 0 else float(1 - (c["layer"][k, j] / c["n"] + 1) / L)


def _best(c: dict, L: int, runs) -> tuple:
    """(recipe, threshold index or -1) with the largest certified saving on the calibration sums ``c``
    among per-recipe certified counts ``runs`` [(k, rejected)]."""
    best = (-1.0, 0, -1)
    for k, r in runs:
        s = _saving(c, L, k, r - 1)
        if s > best[0]:
            best = (s, k, r - 1)
    return best[1], best[2]


def certified(tab: dict, c: dict, idx: np.ndarray, L: int, kind: str, eps: float, delta: float,
              bound: str, recipes) -> tuple:
    """(recipe, threshold index or -1) certified on the calibration texts (sums ``c``, indices ``idx`` in
    order) among ``recipes`` each at delta / len(recipes): bound "binomial" (the binary loss), "betting"
    (the signed loss), "exact" (the score test of the signed loss) or two joined by "+" (each at half the
    level, the more aggressive setting kept: what using both bounds costs)."""
    level = delta / len(recipes)
    counts = c["bad"] if kind == "accuracy_drop" else c["dis"]
    runs, parts = [], bound.split("+")  # "exact+binomial": both, each at half the level, the better kept
    level /= len(parts)
    if "binomial" in parts:
        runs += list(zip(recipes, binomial_run(counts[list(recipes)], c["n"], eps, level)))
    if "exact" in parts:
        runs += list(zip(recipes, exact_run(c["bad"][list(recipes)], c["good"][list(recipes)], c["n"], eps, level)))
    if "betting" in parts:
        runs += [(k, betting_run(tab["x"][k], idx, eps, level)) for k in recipes]
    return _best(c, L, runs)


def point_estimate(c: dict, L: int, risk_kind: str, eps: float) -> tuple:
    """(recipe, threshold index) as train-exits chose before: per recipe the largest saving on the
    calibration texts whose drop (or disagreement) there is within eps (ties: more accurate, smaller
    threshold, earlier recipe); the recipe saving most."""
    K, m = c["bad"].shape
    risk = (c["bad"] - c["good"]) / c["n"] if risk_kind == "accuracy_drop" else c["dis"] / c["n"]
    saving = np.round(1 - (c["layer"] / c["n"] + 1) / L, 12)
    ok = (risk <= eps + 1e-12).ravel()
    if not ok.any():
        return 0, 0
    kk, jj = np.divmod(np.arange(K * m), m)
    keys = (-kk, -jj, (c["good"] - c["bad"]).ravel(), saving.ravel())  # np.lexsort: the last key first
    order = np.lexsort(tuple(k[ok] for k in keys))
    best = np.nonzero(ok)[0][order[-1]]
    return int(kk[best]), int(jj[best])


def on_test(t: dict, L: int, k: int, j: int) -> dict:
    """Figures (sums ``t``: a test part or the whole pool) of recipe k at threshold j (-1: full depth)."""
    if j < 0:
        return {"drop": 0.0, "dis": 0.0, "saving": 0.0}
    return {"drop": float((t["bad"][k, j] - t["good"][k, j]) / t["n"]), "dis": float(t["dis"][k, j] / t["n"]),
            "saving": float(1 - (t["layer"][k, j] / t["n"] + 1) / L)}


METHODS = {  # name: (bound, recipe choice); "union": every recipe at delta / K; "split": see SELECT_FRACTION
    "accuracy_drop": [("binomial", "union"), ("betting", "union"), ("exact", "union"), ("binomial", "split"),
                      ("betting", "split"), ("exact", "split"), ("exact+binomial", "split")],
    "disagreement": [("binomial", "union"), ("binomial", "split")],
}
DEFAULT = {"accuracy_drop": "exact/split", "disagreement": "binomial/split"}  # what train-exits does now
OLD = "binomial/union"  # what it did before


def one_draw(fine: dict, coarse: dict, idx: np.ndarray, n: int, L: int, delta: float) -> dict:
    """Every method's choice on the calibration texts ``idx`` (in the draw's order) -> {budget: {method:
    (recipe, threshold index, grid)}}."""
    K = fine["layer"].shape[0]
    w = np.bincount(idx, minlength=n).astype(np.float32)
    cut = int(round(SELECT_FRACTION * len(idx)))
    sel, rest = idx[:cut], idx[cut:]
    fc, cc = sums(fine, w), sums(coarse, w)
    fa, fb = sums(fine, np.bincount(sel, minlength=n).astype(np.float32)), sums(fine, np.bincount(rest, minlength=n).astype(np.float32))
    out = {}
    for b in BUDGETS:
        kind, eps = b
        got = {"point": (*point_estimate(cc, L, kind, eps), "coarse")}
        winner = point_estimate(fa, L, kind, eps)[0]  # the split: recipe chosen on the first part
        for bound, choice in METHODS[kind]:
            if choice == "union":
                k, j = certified(fine, fc, idx, L, kind, eps, delta, bound, range(K))
            else:
                k, j = certified(fine, fb, rest, L, kind, eps, delta, bound, [winner])
            got[f"{bound}/{choice}"] = (k, j, "fine")
        out[b] = got
    return out


def _stats(vals: list, kind: str, eps: float) -> dict:
    r = np.array([v["drop" if kind == "accuracy_drop" else "dis"] for v in vals])
    s, d = np.array([v["saving"] for v in vals]), np.array([v["drop"] for v in vals])
    return {"violations": float((r > eps + 1e-12).mean()), "mean_risk": float(r.mean()),
            "saving_mean": float(s.mean()), "saving_p10": float(np.percentile(s, 10)),
            "test_drop_mean": float(d.mean()), "test_drop_p90": float(np.percentile(d, 90))}


def run(data: dict, sizes: list, splits: int, delta: float, seed: int) -> list:
    """Per size: ``splits`` draws without replacement (calibration part, the rest as the test part) and
    ``splits`` with replacement; every method's choice; its risk on the test part and on the whole pool."""
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
    fine["x"] = ((fine["bad"].astype(np.float32) - fine["good"].astype(np.float32)) + 1) / 2  # [K, m, n]
    rng = np.random.default_rng(seed)
    ones = np.ones(n, dtype=np.float32)
    pop = {"fine": sums(fine, ones), "coarse": sums(coarse, ones)}
    results = []
    for size in sizes:
        if size >= n:
            continue
        t0 = time.perf_counter()
        got = {b: {} for b in BUDGETS}  # budget: {(method, where): [figures]}
        for _ in range(splits):
            perm = rng.permutation(n)
            idx, test = perm[:size], np.ones(n, dtype=np.float32)
            test[idx] = 0.0
            tst = {"fine": sums(fine, test), "coarse": sums(coarse, test)}
            boot = rng.integers(0, n, size)  # with replacement: the pool as the population
            for draw, where in ((idx, "wo"), (boot, "w")):
                for b, chosen in one_draw(fine, coarse, draw, n, L, delta).items():
                    for name, (k, j, grid) in chosen.items():
                        if where == "wo":
                            got[b].setdefault((name, "test"), []).append(on_test(tst[grid], L, k, j))
                        got[b].setdefault((name, where), []).append(on_test(pop[grid], L, k, j))
        for (kind, eps), figs in got.items():
            row = {"risk": kind, "epsilon": eps, "calibration": size, "test": n - size, "splits": splits,
                   "delta": delta, "select_fraction": SELECT_FRACTION, "default": DEFAULT[kind], "old": OLD,
                   "methods": {}}
            for (name, where), vals in figs.items():
                row["methods"].setdefault(name, {})[where] = _stats(vals, kind, eps)
            new, old, point = (row["methods"][m] for m in (DEFAULT[kind], OLD, "point"))
            # the keys headline.py reads: the method train-exits uses now, and the point estimate
            row["guaranteed"], row["point"] = new["test"], point["test"]
            row["guaranteed_pop"], row["point_pop"] = new["w"], point["w"]
            row["saving_ratio"] = new["test"]["saving_mean"] / max(point["test"]["saving_mean"], 1e-12)
            row["old_saving_ratio"] = old["test"]["saving_mean"] / max(point["test"]["saving_mean"], 1e-12)
            results.append(row)
        print(f"size {size}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return results


def print_table(name: str, results: list) -> None:
    print(f"\n{name}: per method, the violation rate (risk of the chosen setting > epsilon; pool: the whole pool's "
          "risk as the truth, calibration drawn with replacement / without; test: the rest of the pool), the test "
          "layer saving (mean/p10), its share of the point estimate's, the test accuracy drop in points (mean/p90)")
    print(f"{'risk':<14}{'eps':>6}{'n cal':>7} {'method':<17}| {'pool w':>7}{'pool wo':>8}{'test':>7}{'se':>6} | "
          f"{'saving mean/p10':>16}{'kept':>6} | {'drop mean/p90':>14}")
    for r in results:
        eps = f"{100 * r['epsilon']:g}" + ("pt" if r["risk"] == "accuracy_drop" else "%")
        point = r["methods"]["point"]["test"]["saving_mean"]
        for m, f in r["methods"].items():
            t, v = f["test"], f["w"]["violations"]
            se = (v * (1 - v) / r["splits"]) ** 0.5
            mark = "*" if m == r["default"] else ("o" if m == r["old"] else " ")
            print(f"{r['risk']:<14}{eps:>6}{r['calibration']:>7} {mark}{m:<16}| {v:>7.3f}{f['wo']['violations']:>8.3f}"
                  f"{t['violations']:>7.3f}{se:>6.3f} | {100 * t['saving_mean']:>7.1f}/{100 * t['saving_p10']:<8.1f}"
                  f"{t['saving_mean'] / max(point, 1e-12):>6.2f} | {100 * t['test_drop_mean']:>6.2f}/{100 * t['test_drop_p90']:<7.2f}")
    print("(* what train-exits does now, o what it did before; se: the binomial standard error of the 'pool w' rate)")


def merge(out: str, parts: list) -> None:
    """``--merge OUT IN...``: one JSON of the results of runs over different sizes (each size run alone,
    e.g. in parallel), by size then budget."""
    ds = [json.loads(Path(p).read_text()) for p in parts]
    rank = {b: i for i, b in enumerate(BUDGETS)}
    m = {**ds[0], "results": sorted((r for d in ds for r in d["results"]),
                                    key=lambda r: (r["calibration"], rank.get((r["risk"], r["epsilon"]), 99)))}
    Path(out).write_text(json.dumps(m, indent=1) + "\n")


def main() -> None:
    if sys.argv[1:2] == ["--merge"]:
        return merge(sys.argv[2], sys.argv[3:])
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
    ap.add_argument("--select-fraction", type=float, default=SELECT_FRACTION, help="the split selection's choosing share")
    ap.add_argument("--budgets", default=None, help="only these, e.g. accuracy_drop:0.01,disagreement:0.02")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if not Path(args.cache).is_file():
        np.savez_compressed(args.cache, **recipe_logits(args.checkpoint, args.pool))
        print(f"recipes' logits over the pool cached in {args.cache} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    data = dict(np.load(args.cache))
    globals()["SELECT_FRACTION"] = args.select_fraction
    if args.budgets:
        BUDGETS[:] = [(k, float(e)) for k, e in (b.split(":") for b in args.budgets.split(","))]
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
