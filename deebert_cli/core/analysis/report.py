"""``deebert analyze``: how a model's layers behave on its evaluation split. One all-exits pass, then the
exact sweeps of :mod:`.sweep` (entropy thresholds, patience values, learned exits), a recommended threshold
for an accuracy budget (optionally searched per layer, and stored for predict), how it holds on a test
split, real timed runs at the chosen thresholds, dead weight, and examples by exit layer."""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import AnalyzeConfig
from ..data.encoding import encode, fit_max_length
from ..data.examples import DataSpec, eval_examples, to_examples
from ..data.readers import load_splits
from ..device import resolve_device
from ..errors import UserError
from ..metrics import accuracy, macro_f1
from ..model.checkpoint import load_checkpoint
from ..model.policies import exit_entropy, first_exit, max_entropy
from ..runtime.rules import ExitRule, per_layer_thresholds
from ..runtime.stream import predict_stream
from .sweep import (DEFAULT_GRID, PatienceRow, SweepRow, dead_weight, layer_metrics, learned_sweep, outcome,
                    patience_sweep, recommend, recommend_patience, regression_patience_sweep, search_per_layer,
                    sweep_from_logits)


@dataclass
class SplitSweep:
    split: str
    n: int
    rows: list


@dataclass
class Analysis:
    checkpoint: str
    model: dict  # family, layers, base model, labels, parameter counts
    dataset: dict  # spec, split, n
    entropy: str
    layers: list  # per exit: {"layer", "accuracy", "macro_f1"}
    sweep: list  # SweepRow on the evaluation split
    max_drop: float
    recommendation: SweepRow | None
    test: dict | None  # how the recommendation holds on a test split
    dead_weight: dict
    examples: dict  # layer -> [{"text", "label", "predicted"}] at ``example_threshold``
    example_threshold: float | None = None
    per_layer: dict | None = None  # thresholds searched per layer for the budget, and how they do
    stored_thresholds: list | None = None  # what was written into the checkpoint (predict's default)
    cls_spread: list = field(default_factory=list)  # per layer: spread of [CLS] states across inputs
    warnings: list = field(default_factory=list)
    timing: dict = field(default_factory=dict)
    patience_sweep: list = field(default_factory=list)  # PatienceRow per patience value
    patience_recommendation: PatienceRow | None = None  # largest saving within max_drop
    task: str = "classification"  # regression: layers hold mse/pearson/spearman, no entropy sweep
    learned_sweep: list = field(default_factory=list)  # learned exits (BERxiT): SweepRow / RegressionSweepRow per threshold
    runtime: dict = field(default_factory=dict)  # --runtime onnx: the export's accuracy beside torch fp32 (exact)
    guarantee: dict | None = None  # the guaranteed recommendation on this split (analysis.risk), beside the point estimate
    stored_guarantee: dict | None = None  # the guarantee the checkpoint carries
    guarantee_check: dict | None = None  # ... and how it fares on this split (holds / exceeded / inconclusive)
    replaced: str | None = None  # --store-thresholds: what it replaced in deebert.json (old -> new)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def wanted_policies(cfg: AnalyzeConfig, ckpt) -> set:
    """The exit policies to compare: ``cfg.exit_policy``, or every one that applies to the checkpoint
    (entropy: classification only; learned: with learned exits). Asking for one that cannot apply, or
    leaving out entropy while asking for entropy-only figures, is a UserError."""
    applies = {"patience"} | ({"entropy"} if ckpt.task != "regression" else set())
    applies |= {"learned"} if ckpt.model.ramp_cfg.learned_exit else set()
    if not cfg.exit_policy:
        return applies
    want = set(cfg.exit_policy)
    if "entropy" in want and ckpt.task == "regression":
        raise UserError("entropy needs class probabilities: a regression checkpoint compares patience (and learned) exits")
    if "learned" in want and "learned" not in applies:
        raise UserError(f"'{cfg.checkpoint}' has no learned exits: run `deebert train-exits --learned-exits` first")
    if "entropy" not in want and (cfg.per_layer or cfg.store_thresholds):
        raise UserError("--per-layer and --store-thresholds are about entropy thresholds: include entropy in --exit-policy")
    return want


def analyze(cfg: AnalyzeConfig, progress=None) -> Analysis:
    """Run every analysis of ``deebert analyze`` on the checkpoint's evaluation split (or ``cfg.split``)."""
    device = resolve_device(cfg.device)
    ckpt = load_checkpoint(cfg.checkpoint)
    if not ckpt.exits_trained:
        raise UserError(f"the off-ramps of '{cfg.checkpoint}' are not trained: run `deebert train-exits` first")
    if cfg.store_thresholds and (cfg.per_layer or (cfg.max_drop == 0 and cfg.max_disagreement is None)):
        _may_replace(cfg, ckpt)  # what it stores is a point estimate: refused before any work
    max_length, warning = fit_max_length(ckpt.meta.get("max_length", 128), ckpt.model.max_tokens, "the checkpoint's max_length")
    ckpt.meta = {**ckpt.meta, "max_length": max_length}  # what the passes below tokenise to
    spec, ex, source, whole_file = _evaluation_split(cfg, ckpt)
    # [L, n, C], [L, n, H], learned exit scores [L-1, n] of the evaluation split (None without learned exits)
    logits, cls_states, scores = _all_exits(cfg, ckpt, device, ex, cls=True)
    lgrid = sorted(set(cfg.learned_thresholds or DEFAULT_GRID))
    want = wanted_policies(cfg, ckpt)
    learned = ckpt.model.ramp_cfg.learned_exit and "learned" in want
    if ckpt.task == "regression":
        a = _analyze_regression(cfg, ckpt, spec, source, ex, logits)
        a.learned_sweep = learned_sweep(logits, ex.labels, scores, lgrid, regression=True) if learned else []
    else:
        lrows = learned_sweep(logits, ex.labels, scores, lgrid) if learned else []
        a = _analyze_classification(cfg, ckpt, device, spec, ex, source, whole_file, want, logits, cls_states, lrows)
    a.warnings = ([warning] if warning else []) + a.warnings
    return a


def _evaluation_split(cfg: AnalyzeConfig, ckpt) -> tuple:
    """The checkpoint's data spec with ``cfg``'s overrides, and the examples analyze evaluates on ->
    (DataSpec, Examples, their description, whether --dataset is one file evaluated whole)."""
    spec = ckpt.data_spec()
    overrides = {k: getattr(cfg, k) for k in ("dataset", "text_column", "text_pair_column", "label_column") if getattr(cfg, k)}
    spec = dataclasses.replace(spec, **overrides)
    # a file given with --dataset is evaluated whole (it is one split; nothing is carved out of it)
    whole_file = bool(cfg.dataset) and Path(cfg.dataset).expanduser().is_file()
    ex, source = eval_examples(spec, ckpt.label_names, cfg.split or ("train" if whole_file else None))
    if whole_file:
        source = f"all of '{cfg.dataset}'" if cfg.split in (None, "train") else source
    return spec, ex, source, whole_file


def _all_exits(cfg: AnalyzeConfig, ckpt, device, examples, cls: bool = False) -> tuple:
    """The all-exits pass over ``examples`` -> (logits [L, n, C], with ``cls`` the first-token states
    [L, n, H] and, for learned exits, their scores [L-1, n]; else None)."""
    from ..runtime.passes import collect, exit_scores

    model, tok = ckpt.model, ckpt.tokenizer
    learned = model.ramp_cfg.learned_exit
    enc = encode(tok, examples.texts, examples.pairs, ckpt.meta.get("max_length", 128))
    got = collect(model.to(device), enc, tok.pad_token_id, cfg.batch_size, device, pooled=learned and cls,
                  all_logits=True, cls=cls)
    scores = exit_scores(model, got["pooled"].to(device)) if cls and learned else None
    return got["logits"], got["cls"] if cls else None, scores


def _analyze_classification(cfg: AnalyzeConfig, ckpt, device, spec: DataSpec, ex, source: str, whole_file: bool,
                            want: set, logits: torch.Tensor, cls_states: torch.Tensor, lrows: list) -> Analysis:
    """analyze for a classification checkpoint from the evaluation split's all-exits pass: per-exit
    accuracy, the sweeps and recommendations, then (in this order) the test split, the timed runs, the
    stored thresholds and the examples. ``lrows``: the learned exits' sweep."""
    model, names, labels = ckpt.model, ckpt.label_names, ex.labels
    L = model.num_layers
    spread, warnings = _cls_spread(cls_states, len(ex), L, model.ramp_cfg.pooling)
    layers = []
    for i in range(L):
        p = logits[i].argmax(-1).tolist()
        layers.append({"layer": i + 1, "accuracy": accuracy(p, labels), "macro_f1": macro_f1(p, labels, len(names))})
    grid = cfg.thresholds or list(DEFAULT_GRID if cfg.entropy == "normalized" else [t * math.log(len(names)) for t in DEFAULT_GRID])
    grid = sorted(set(grid))
    rows = sweep_from_logits(logits, labels, grid, cfg.entropy) if "entropy" in want else []
    rec = recommend(rows, cfg.max_drop)
    prows = patience_sweep(logits, labels, sorted(set(cfg.patience if cfg.patience is not None else range(L)))) if "patience" in want else []
    prec = recommend_patience(prows, cfg.max_drop)
    per_layer = _per_layer(cfg, logits, labels, grid, len(names)) if cfg.per_layer else None
    gua, previous, checked = _guarantees(cfg, ckpt, logits, labels, source) if "entropy" in want else (None, None, None)
    test = None
    if cfg.split is None and not whole_file and cfg.test_split and rows:
        test = _test_split(cfg, ckpt, device, spec, grid, rec, per_layer, gua)
    seconds, runtime, time_spread = _timed(cfg, ckpt, device, ex, layers, rows, rec, per_layer)
    stored, replaced = _stored(cfg, ckpt, per_layer, rec, source, gua)
    examples, ex_thr = _examples_by_layer(cfg, logits, ex, names, rec)
    counts = model.parameter_counts()
    return Analysis(
        checkpoint=str(cfg.checkpoint),
        model={"family": model.family, "layers": L, "base_model": ckpt.meta.get("base_model"), "labels": names,
               "backbone_parameters": counts.backbone, "off_ramp_parameters": counts.ramps, "overhead": counts.overhead,
               "ramp": model.ramp_cfg.to_dict()},
        dataset={**dataclasses.asdict(spec), "evaluated_on": source, "n": len(ex)},
        entropy=cfg.entropy, layers=layers, sweep=rows, max_drop=cfg.max_drop, recommendation=rec, test=test,
        dead_weight=dead_weight(layers, rec, len(ex)), examples=examples, example_threshold=ex_thr,
        per_layer=per_layer, stored_thresholds=stored, cls_spread=spread, warnings=warnings,
        timing={"batch_size": cfg.batch_size, "repeats": cfg.timing_repeats, "device": str(device),
                "runtime": cfg.runtime if cfg.runtime == "torch" else f"onnx ({cfg.onnx_precision})",
                "seconds": {str(k): v for k, v in seconds.items()},
                "spread": {str(k): v for k, v in time_spread.items()}},
        runtime=runtime,
        patience_sweep=prows, patience_recommendation=prec,
        learned_sweep=lrows, guarantee=gua.to_dict() if gua else None,
        stored_guarantee=previous.to_dict() if previous else None, guarantee_check=checked, replaced=replaced,
    )


def _guarantees(cfg: AnalyzeConfig, ckpt, logits: torch.Tensor, labels: list, source: str) -> tuple:
    """The guaranteed recommendation on this split, and the checkpoint's stored guarantee with its check
    here (a drift check when the split is new data) -> (Guarantee, stored Guarantee | None, check | None)."""
    from ..model.guarantee import stored_guarantee
    from .calibrate import check_stored, recommend_guaranteed

    kind = "disagreement" if cfg.max_disagreement is not None else "accuracy_drop"
    eps = cfg.max_disagreement if cfg.max_disagreement is not None else cfg.max_drop / 100
    g = recommend_guaranteed(ckpt, logits.numpy(), labels, source, eps, kind, cfg.delta, cfg.entropy) if eps > 0 else None
    previous = stored_guarantee(ckpt.meta)
    checked = check_stored(previous, logits.numpy(), labels) if previous is not None else None
    return g, previous, checked


def _cls_spread(cls_states: torch.Tensor, n: int, L: int, pooling: str) -> tuple:
    """How much the first-token state varies across inputs, per layer (std over inputs, mean over dims),
    and a warning when [CLS] off-ramps read layers where it barely varies -> (spread, warnings)."""
    spread = cls_states.std(1).mean(-1).tolist() if n > 1 else [float("nan")] * L
    warnings = []
    flat = [i + 1 for i in range(L - 1) if spread[i] < 0.05 * spread[-1]]
    if flat and pooling == "cls":
        warnings.append(
            f"the [CLS] states of layer(s) {', '.join(map(str, flat))} barely vary across the evaluation set "
            f"(spread {min(spread[i - 1] for i in flat):.4f}-{max(spread[i - 1] for i in flat):.4f} vs "
            f"{spread[-1]:.4f} at layer {L}), so their off-ramps cannot tell inputs apart; retrain with "
            "`deebert train-exits --ramp-pooling mean --ramp-norm`")
    return spread, warnings


def _per_layer(cfg: AnalyzeConfig, logits: torch.Tensor, labels: list, grid: list, num_labels: int) -> dict:
    """--per-layer: one threshold per layer searched on a finer grid for the budget, and how they do."""
    fine = sorted(set(grid) | {round(k * 0.025, 3) * (1 if cfg.entropy == "normalized" else math.log(num_labels)) for k in range(41)})
    pl_thr, pl_row = search_per_layer(logits, labels, fine, cfg.entropy, cfg.max_drop)
    per_layer = {"thresholds": pl_thr, **dataclasses.asdict(pl_row)}
    per_layer.pop("threshold")
    return per_layer


def _test_split(cfg: AnalyzeConfig, ckpt, device, spec: DataSpec, grid: list, rec, per_layer: dict | None,
                gua=None) -> dict | None:
    """How the sweep, the recommended and the per-layer thresholds hold on ``cfg.test_split`` (None when the
    data has no such split apart from its training and evaluation splits)."""
    names = ckpt.label_names
    splits = load_splits(spec.dataset)
    if not (cfg.test_split in splits and cfg.test_split not in (spec.train_split, spec.eval_split)):
        return None
    tex, _ = to_examples(splits[cfg.test_split], spec, cfg.test_split, names)
    tlogits = _all_exits(cfg, ckpt, device, tex)[0]
    trows = sweep_from_logits(tlogits, tex.labels, grid, cfg.entropy)
    held = next((r for r in trows if r.threshold == rec.threshold), None) if rec else None
    test = {"split": cfg.test_split, "n": len(tex), "sweep": [dataclasses.asdict(r) for r in trows],
            "at_recommended": dataclasses.asdict(held) if held else None}
    if per_layer is not None:
        prow = dataclasses.asdict(outcome(tlogits, tex.labels, per_layer["thresholds"], cfg.entropy))
        prow.pop("threshold")
        test["at_per_layer"] = prow
    if gua is not None and gua.certified:
        grow = dataclasses.asdict(outcome(tlogits, tex.labels, [gua.value] * (ckpt.model.num_layers - 1), cfg.entropy))
        test["at_guaranteed"] = {**grow, "threshold": gua.value}
    return test


def _timed(cfg: AnalyzeConfig, ckpt, device, ex, layers: list, rows: list, rec, per_layer: dict | None) -> tuple:
    """Wall-clock: real early-exit runs over the evaluation texts at full depth and chosen thresholds,
    interleaved and repeated (fastest run kept) so that load on a shared machine hits them alike. Their
    seconds go into ``rows`` and ``per_layer`` -> (seconds per timed key, :func:`runtime_report`)."""
    L = ckpt.model.num_layers
    timed = {t: [t] * (L - 1) for t in sorted({0.0, *(cfg.timing_thresholds or []), *([rec.threshold] if rec else [])})}
    if per_layer is not None:
        timed["per-layer"] = per_layer["thresholds"]
    lines = [t if p is None else f"{t}\t{p}" for t, p in zip(ex.texts, ex.pairs or [None] * len(ex))]
    seconds, timed_acc, spread = time_runs(cfg, ckpt, device, timed, lines, ex.labels)
    runtime = runtime_report(cfg, timed_acc, layers, rows, rec)
    # saving = 1 - s / s0; each time is known within its spread, so the saving within (s / s0) (spread + spread0)
    noise = {k: 0.0 if k == 0.0 else seconds[k] / seconds[0.0] * (spread[k] + spread[0.0]) for k in seconds}
    for r in rows:
        if r.threshold in seconds:
            r.measured_seconds = seconds[r.threshold]
            r.wall_saving = 1 - seconds[r.threshold] / seconds[0.0]
            r.wall_saving_noise = noise[r.threshold]
    if per_layer is not None:
        per_layer["measured_seconds"] = seconds["per-layer"]
        per_layer["wall_saving"] = 1 - seconds["per-layer"] / seconds[0.0]
        per_layer["wall_saving_noise"] = noise["per-layer"]
    return seconds, runtime, spread


def _may_replace(cfg: AnalyzeConfig, ckpt) -> None:
    """A point estimate may replace a certified entropy threshold (and drop its guarantee) only with
    --replace-guarantee."""
    from ..model.guarantee import stored_guarantee

    g = stored_guarantee(ckpt.meta)
    if g is not None and g.certified and g.policy == "entropy" and not cfg.replace_guarantee:
        raise UserError(f"'{ckpt.path}' stores a certified {g.setting()} ({g.describe()}); --store-thresholds "
                        "would replace it with a point estimate and drop the guarantee: add --replace-guarantee to "
                        "do so, or certify anew with `deebert calibrate`")


def _stored(cfg: AnalyzeConfig, ckpt, per_layer: dict | None, rec, source: str, gua=None) -> tuple:
    """--store-thresholds: the per-layer thresholds, else the guaranteed threshold (with its guarantee) when
    it saves layers, else the recommended one, written into the checkpoint for predict -> (what was stored,
    the line saying what it replaced) ((None, None) without the option). A point estimate replaces a
    stored entropy guarantee only with --replace-guarantee (the guarantee no longer applies)."""
    if not cfg.store_thresholds:
        return None, None
    if per_layer is None and gua is not None and gua.certified and gua.layer_saving > 0:
        from .calibrate import store_guarantee

        replaced = store_guarantee(ckpt.path, gua, ckpt.model.num_layers)
        return [gua.value] * (ckpt.model.num_layers - 1), replaced
    _may_replace(cfg, ckpt)
    if per_layer is not None:
        stored = per_layer["thresholds"]
    elif rec is not None:
        stored = [rec.threshold] * (ckpt.model.num_layers - 1)
    else:
        raise UserError(f"no threshold keeps the accuracy drop within {cfg.max_drop:g} points: nothing stored")
    replaced = store_thresholds(ckpt.path, {"entropy": cfg.entropy, "values": stored, "max_drop": cfg.max_drop,
                                            "search": "per-layer" if per_layer is not None else "global",
                                            "chosen_on": source, "by": "analyze"}, ckpt.meta)
    return stored, replaced


def _examples_by_layer(cfg: AnalyzeConfig, logits: torch.Tensor, ex, names: list, rec) -> tuple:
    """Up to ``cfg.examples`` evaluation texts per exit layer at ``cfg.example_threshold`` (default: the
    recommended one) -> ({layer: [{"text", "label", "predicted"}]}, the threshold)."""
    L, labels = logits.shape[0], ex.labels
    examples = {}
    ex_thr = cfg.example_threshold if cfg.example_threshold is not None else (rec.threshold if rec else None)
    if ex_thr is not None and cfg.examples:
        ent = exit_entropy(logits, cfg.entropy)
        top = max_entropy(len(names), cfg.entropy)
        thr = torch.full((L,), math.inf if ex_thr >= top else ex_thr)
        layer = first_exit(ent, thr)
        for i in range(L):
            idx = (layer == i).nonzero().flatten().tolist()[: cfg.examples]
            examples[str(i + 1)] = [{"text": ex.texts[j], "label": names[labels[j]],
                                     "predicted": names[int(logits[i, j].argmax())]} for j in idx]
    return examples, ex_thr


def time_runs(cfg: AnalyzeConfig, ckpt, device, timed: dict, lines: list, labels: list) -> tuple:
    """Real early-exit runs over ``lines`` on ``cfg.runtime`` at every entry of ``timed`` (key -> L-1
    thresholds), interleaved and repeated (fastest kept) so that load on a shared machine hits them alike,
    until the repeats agree (bounded: see TIMING_AGREE below) -> (seconds per key, accuracy per key of the
    runtime's own predictions, spread per key: :func:`timing_spread`)."""
    run_ckpt, run_device = ckpt, device
    if cfg.runtime == "onnx":
        from ..runtime.stream import load_for_inference

        run_ckpt, run_device = load_for_inference(cfg.checkpoint, "onnx", precision=cfg.onnx_precision), None
    L = ckpt.model.num_layers
    runs, acc = {k: [] for k in timed}, {}
    start_all = time.perf_counter()
    while True:
        for key, vals in timed.items():
            start = time.perf_counter()
            got = [r.label for r in predict_stream(run_ckpt, lines, ExitRule(per_layer_thresholds(vals, L), cfg.entropy), run_device,
                                                   batch_size=cfg.batch_size)]
            runs[key].append(time.perf_counter() - start)
            acc[key] = accuracy(got, labels)
        spread = {k: timing_spread(v) for k, v in runs.items()}
        rounds = len(runs[0.0])
        if rounds >= cfg.timing_repeats and (max(spread.values()) <= TIMING_AGREE or rounds >= TIMING_MAX_ROUNDS
                                             or time.perf_counter() - start_all > TIMING_MAX_SECONDS):
            break
    assert L == run_ckpt.model.num_layers
    return {k: min(v) for k, v in runs.items()}, acc, spread


# timed runs repeat (interleaved) until the two fastest runs of every setting agree within TIMING_AGREE of each
# other, for at least --timing-repeats rounds and at most TIMING_MAX_ROUNDS rounds or TIMING_MAX_SECONDS; a
# saving less certain than TIMING_NOISY (of full-depth time) is reported as a noisy measurement, not a figure
TIMING_AGREE, TIMING_MAX_ROUNDS, TIMING_MAX_SECONDS, TIMING_NOISY = 0.03, 10, 60.0, 0.05


def timing_spread(runs: list) -> float:
    """How far apart the two fastest of ``runs`` (seconds) are, relative to the fastest; one run: unknown (inf)."""
    if len(runs) < 2:
        return math.inf
    a, b = sorted(runs)[:2]
    return (b - a) / a if a > 0 else math.inf


def runtime_report(cfg: AnalyzeConfig, timed_acc: dict, layers: list, rows: list, rec) -> dict:
    """On --runtime onnx: the accuracy of the export's own predictions (fp32 or int8) at full depth and at
    the recommended threshold, beside the exact torch fp32 figures of the same thresholds."""
    if cfg.runtime != "onnx":
        return {}
    out = {"runtime": "onnx", "precision": cfg.onnx_precision, "full_depth_accuracy": timed_acc[0.0],
           "torch_fp32_full_depth_accuracy": layers[-1]["accuracy"]}
    if rec is not None:
        out["at_recommended"] = {"threshold": rec.threshold, "accuracy": timed_acc[rec.threshold],
                                 "torch_fp32_accuracy": rec.accuracy}
    return out


def _analyze_regression(cfg: AnalyzeConfig, ckpt, spec: DataSpec, source: str, ex, values: torch.Tensor) -> Analysis:
    """analyze for a regression checkpoint from all-exits outputs [L, n, 1]: per-layer MSE and Pearson /
    Spearman correlation, and the patience sweep at ``cfg.tolerance`` (entropy does not apply)."""
    if cfg.store_thresholds or cfg.per_layer:
        raise UserError("--store-thresholds and --per-layer are about entropy thresholds, which do not apply to a regression checkpoint")
    model = ckpt.model
    L = model.num_layers
    layers = [layer_metrics(i, values[i], ex.labels, "regression", 1) for i in range(L)]
    prows = regression_patience_sweep(values, ex.labels, sorted(set(cfg.patience if cfg.patience is not None else range(L))),
                                      cfg.tolerance) if "patience" in wanted_policies(cfg, ckpt) else []
    counts = model.parameter_counts()
    return Analysis(
        checkpoint=str(cfg.checkpoint),
        model={"family": model.family, "layers": L, "base_model": ckpt.meta.get("base_model"), "labels": ckpt.label_names,
               "backbone_parameters": counts.backbone, "off_ramp_parameters": counts.ramps, "overhead": counts.overhead,
               "ramp": model.ramp_cfg.to_dict()},
        dataset={**dataclasses.asdict(spec), "evaluated_on": source, "n": len(ex)},
        entropy="n/a", layers=layers, sweep=[], max_drop=cfg.max_drop, recommendation=None, test=None,
        dead_weight={}, examples={}, patience_sweep=prows, task="regression",
    )


def store_thresholds(path, thresholds: dict, meta: dict) -> str | None:
    """Write ``thresholds`` into the checkpoint's deebert.json (atomically: temp file, then rename);
    predict uses them when no threshold is given -> the line saying what they replaced (None: nothing).
    An entropy guarantee in ``meta`` (the checkpoint's metadata as read) is dropped: it certified the
    setting these replace. One for another policy is kept."""
    from ..model.checkpoint import update_meta
    from ..model.guarantee import stored_guarantee

    g = stored_guarantee(meta)
    return update_meta(path, {"thresholds": thresholds}, drop=("guarantee",) if g and g.policy == "entropy" else ())[1]

