"""DeeBERT's stage 2 (:func:`train_exits`): backbone and final classifier frozen; off-ramps 1..L-1 trained
on the mean of their cross-entropies (regression: MSE). Because nothing below an off-ramp's trainable part
changes, stage 2 runs the backbone once (eval mode, no dropout) to cache what every off-ramp reads
(:mod:`..runtime.passes`), then trains on the cache: every candidate recipe (:mod:`.recipes`) when none is
given, the best kept; the fitting itself is :mod:`.ramps_fit`."""
from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path

import torch

from ..analysis.sweep import layer_metrics, sweep_from_logits
from ..config import TrainExitsConfig, to_yaml
from ..data.encoding import encode, fit_max_length
from ..data.examples import DataSpec, prepare_data, read_unlabeled
from ..errors import UserError
from ..launch import Runtime
from ..model.checkpoint import (STAGE_EXITS, STAGE_FINETUNED, Checkpoint, check_checkpoint_output, load_checkpoint,
                                save_checkpoint, META_FILE, is_checkpoint, read_checked)
from ..model.highway import HighwayModel
from ..model.policies import RampConfig
from ..runtime.passes import collect_sharded
from .common import EvalReport, Progress, TrainResult, eval_report, seed_everything
from .ramps_fit import calibrate_ramps, fit_ramps, train_exit_heads


def reset_ramps(model: HighwayModel, ramp_cfg: RampConfig, seed: int) -> None:
    """Fresh off-ramps (seeded), poolers copied from the checkpoint's pooler where the family has one,
    as DeeBERT's ``init_highway_pooler`` does; re-running stage 2 is therefore reproducible."""
    torch.manual_seed(seed)
    model.build_ramps(ramp_cfg)


def train_exits(cfg: TrainExitsConfig, progress: Progress | None = None) -> TrainResult:
    """Stage 2: train off-ramps 1..L-1 of a stage-1 checkpoint; backbone and final head stay bit-for-bit.
    With no recipe option given, every candidate recipe (:mod:`.recipes`) is trained on the one cache and
    the best on the evaluation split kept; the threshold analyze would recommend for ``cfg.max_drop``
    points is stored for predict (classification)."""
    from . import recipes as rc

    # before any work: the folder written at the end (by default the checkpoint itself) can be written
    check_checkpoint_output(cfg.output or cfg.checkpoint, "--output" if cfg.output else "--checkpoint")
    rt = Runtime(cfg.device, cfg.precision)
    device = rt.device
    progress = progress if progress is not None and rt.is_main else Progress()  # only the main process reports
    ckpt, spec, data, train = _stage1_inputs(cfg)
    model, tokenizer, task = ckpt.model, ckpt.tokenizer, ckpt.task
    todo = rc.recipes_for(cfg, task, model.adapter.ramp_pooling)
    dropout = model.ramp_cfg.dropout
    model.to(device)
    for p in model.model.parameters():
        p.requires_grad_(False)

    cache = _cache_states(cfg, rt, ckpt, spec, train, data.eval, {r.pooling for r in todo}, progress)
    labels = data.eval.labels
    ev_y = torch.tensor(labels, dtype=cache["y"].dtype, device=device)
    rows, kept, steps, seen, train_seconds = _try_recipes(model, todo, cache, cfg, task, ev_y, dropout, progress)
    g, picked = (rc.certify_recipes([k[2] for k in kept], labels, cfg, calibrated=any(r.calibrate for r in todo))
                 if task != "regression" and cfg.guarantee else (None, None))
    for i, row in enumerate(rows):
        if g is not None:  # only the recipe certified carries a guarantee
            row["guaranteed_threshold"], row["guaranteed_saving"] = (g.value, g.layer_saving) if i == picked else (None, None)
    choice = picked if g is not None and g.layer_saving > 0 else rc.best(rows, task)
    recipe, (state, calibration, logits) = todo[choice], kept[choice]
    model.build_ramps(RampConfig(recipe.pooling, recipe.norm, dropout, cfg.learned_exits), init_from_pooler=False)
    model.ramps.load_state_dict(state)
    model.to(device).ramps.eval()
    learned = None
    if cfg.learned_exits:  # after calibration: the predictors learn when the final off-ramps are right
        learned = train_exit_heads(model, cache["train"][recipe.pooling], cache["y"], cache["eval"][recipe.pooling],
                                   ev_y, cfg, task, progress)

    layers = [layer_metrics(i, logits[i], labels, task, model.num_labels) for i in range(model.num_layers)]
    report = eval_report(cache["eval_final"], labels, data.eval_source, task, model.num_labels, layers)
    for p in model.model.parameters():
        p.requires_grad_(True)
    extra = {"cache_seconds": cache["seconds"], "train_seconds": train_seconds, "cached_examples": cache["n"],
             "recipes": {"given": cfg.recipe_given, "measure": rc.MEASURE[_measure_name(g, task)],
                         "selection": None if g is None else g.selection, "select_fraction": rc.SELECT_FRACTION,
                         "max_drop": cfg.points,
                         "chosen": recipe.name, "candidates": rows}}
    if task != "regression":
        extra["thresholds"], extra["guarantee"] = stored_rule(rows[choice], g, cfg, data.eval_source, model.num_layers)
        if g is not None and not extra["thresholds"]["search"] == "guaranteed":
            extra["guarantee_advice"] = _advice(g, logits, labels, rows[choice]["threshold"], rc.SELECT_FRACTION)
        elif g is not None:
            extra["guaranteed_on_split"] = _on_split(g.value, logits, labels)
    meta = _exits_meta(ckpt.meta, report, extra, learned, calibration)
    out = cfg.output or cfg.checkpoint
    extra["replaced"] = _replaced(out, cfg.checkpoint, ckpt.meta, meta)
    if rt.is_main:
        save_checkpoint(Checkpoint(model.cpu(), tokenizer, meta), out,
                        extra_files={"train_exits_config.yaml": to_yaml(cfg)}, keep_files_from=cfg.checkpoint)
    rt.wait_for_everyone()
    epochs_done = seen / len(train)  # over every recipe trained
    per_epoch = (cache["seconds"] * len(train) / (len(train) + len(data.eval))) + train_seconds / max(epochs_done, 1e-9)
    return TrainResult(out, STAGE_EXITS, len(train), steps, train_seconds + cache["seconds"], per_epoch,
                       seen / max(train_seconds, 1e-9), report, extra)


def _measure_name(g, task: str) -> str:
    """Which MEASURE chose the recipe kept: the split's when its guarantee saves layers (a single recipe
    certified on the whole split: "guaranteed" too), else the task's own."""
    if g is None:
        return task
    return "guaranteed" if g.selection != "split" or g.layer_saving > 0 else task


def stored_rule(row: dict, g, cfg: TrainExitsConfig, source: str, L: int) -> tuple:
    """What deebert.json stores for predict -> (thresholds, guarantee | None): the guaranteed threshold
    when it saves layers (its Guarantee then stored beside it); else the point estimate of the recipe
    search (as ``analyze`` recommends it), and the guarantee only reported."""
    thr = {"entropy": "normalized", "max_drop": cfg.points, "search": "global", "chosen_on": source,
           "by": "train-exits", "point_estimate": row["threshold"]}
    if g is not None:
        g.calibrated_on, g.by = source, "train-exits"
    if g is not None and g.certified and g.layer_saving > 0:
        thr.update(values=[g.value] * (L - 1), search="guaranteed")
    else:
        thr["values"] = [row["threshold"]] * (L - 1)
    return thr, g


def _replaced(out, checkpoint, old: dict, new: dict) -> str | None:
    """The line saying what writing ``new`` to ``out`` replaces in the stored thresholds and guarantee:
    those of ``old`` (the checkpoint read) when ``out`` is it, else those of the checkpoint at ``out``."""
    from ..model.guarantee import replacement

    if Path(out).resolve() != Path(checkpoint).resolve():
        if not is_checkpoint(Path(out)):
            return None
        try:
            old = read_checked(Path(out) / META_FILE)
        except UserError:  # a damaged checkpoint there is replaced whole
            return f"replaced the checkpoint at '{out}', whose {META_FILE} was damaged"
    line = replacement(old, new)
    return line and line.replace("replaced ", f"replaced in '{out}': ", 1)


def _on_split(value: float, logits: torch.Tensor, labels: list) -> dict:
    """The guaranteed threshold on the whole evaluation split (the certifying part is a share of it): its
    number of texts, layer saving and accuracy change (points) against full depth."""
    row = sweep_from_logits(logits, labels, [value], "normalized")[0]
    return {"n": len(labels), "layer_saving": row.layer_saving, "accuracy_change": row.accuracy_change}


def _advice(g, logits: torch.Tensor, labels: list, point: float, fraction: float) -> dict:
    """How many evaluation texts the budget needs: to certify anything, and to certify ``point`` (its
    loss rate on the evaluation split taken as the truth); with the split selection, the whole split's
    size (the guarantee is certified on 1 - ``fraction`` of it)."""
    from ..analysis import risk

    layer = risk.exit_layers("entropy", point, logits.numpy())
    rate = float(risk.losses(g.risk, layer, logits.numpy(), labels).mean())
    need = risk.needed_size(rate, g.epsilon, g.test_level)
    if g.selection == "split":
        def whole(k):
            return None if k is None else math.ceil(k / (1 - fraction))
        return {"min_n": whole(g.min_n), "point_estimate": point, "point_rate": rate, "point_n": whole(need),
                "split_n": len(labels)}
    return {"min_n": g.min_n, "point_estimate": point, "point_rate": rate, "point_n": need, "split_n": len(labels)}


def _try_recipes(model: HighwayModel, todo: list, cache: dict, cfg: TrainExitsConfig, task: str, ev_y: torch.Tensor,
                 dropout: float, progress: Progress) -> tuple:
    """Train every recipe of ``todo`` on the cache, each from the same seeded start (so a recipe comes out
    as it would alone; recipes differing only in calibration share one training, calibration being fitted
    afterwards on the same weights) and score it on the evaluation split (:func:`.recipes.score`).
    Returns (score rows, per recipe (off-ramp state, calibration, every exit's logits), steps, rows seen,
    training seconds)."""
    from ..analysis.risk import selection_parts
    from .recipes import SELECT_FRACTION, score

    rows, kept, trained, steps, seen, seconds = [], [], {}, 0, 0, 0.0
    labels = ev_y.tolist()
    for recipe in todo:
        if recipe.training not in trained:
            seed_everything(cfg.seed)
            reset_ramps(model, RampConfig(recipe.pooling, recipe.norm, dropout, cfg.learned_exits), cfg.seed)
            model.ramps.to(ev_y.device)
            title = f"stage 2: off-ramps ({dataclasses.replace(recipe, calibrate=False).name})"
            k, m, sec = fit_ramps(model, cache["train"][recipe.pooling], cache["y"], cache["teacher"], cfg, task,
                                  recipe.distill, progress, title)
            steps, seen, seconds = steps + k, seen + m, seconds + sec
            trained[recipe.training] = {n: v.clone() for n, v in model.ramps.state_dict().items()}
        else:
            model.ramps.load_state_dict(trained[recipe.training])
        model.ramps.eval()
        ev_pooled = cache["eval"][recipe.pooling]
        calibration = None
        if recipe.calibrate:  # temperatures fitted on the choosing part only: the rest certifies (certify_recipes)
            pick = torch.as_tensor(selection_parts(len(labels), SELECT_FRACTION)[0], device=ev_y.device)
            calibration = calibrate_ramps(model, ev_pooled[:, pick], ev_y[pick])
        logits = _exit_logits(model, ev_pooled, cache["eval_final"])
        rows.append({"recipe": recipe.name, "pooling": recipe.pooling, "norm": recipe.norm, "distill": recipe.distill,
                     "calibrate": recipe.calibrate, **score(logits, labels, task, cfg.points)})
        kept.append(({n: v.clone() for n, v in model.ramps.state_dict().items()}, calibration, logits))
    return rows, kept, steps, seen, seconds


def _stage1_inputs(cfg: TrainExitsConfig) -> tuple:
    """The stage-1 checkpoint and its data (or ``cfg.dataset`` with the same columns) -> (checkpoint,
    DataSpec, PreparedData, training Examples after ``max_train_samples``); UserErrors for what does not fit."""
    ckpt = load_checkpoint(cfg.checkpoint, ramps=False)  # the off-ramps are trained anew
    if ckpt.stage not in (STAGE_FINETUNED, STAGE_EXITS) or "data" not in ckpt.meta:
        raise UserError(f"'{cfg.checkpoint}' is not a stage-1 checkpoint (run `deebert finetune` first)")
    if ckpt.tokenizer is None:
        raise UserError(f"'{cfg.checkpoint}' has no tokenizer files")
    if ckpt.task == "regression" and (cfg.distill or cfg.calibrate):
        raise UserError("--distill and --calibrate need class probabilities; they do not apply to a regression checkpoint")
    spec = ckpt.data_spec(task=ckpt.task)
    if cfg.dataset:
        spec = dataclasses.replace(spec, dataset=cfg.dataset)
    data = prepare_data(spec)
    if data.label_names != ckpt.label_names:
        raise UserError(f"dataset labels {data.label_names} differ from the checkpoint's {ckpt.label_names}")
    train = data.train
    if cfg.max_train_samples and cfg.max_train_samples < len(train):
        train = train.subset(sorted(random.Random(cfg.seed).sample(range(len(train)), cfg.max_train_samples)))
    return ckpt, spec, data, train


def _cache_states(cfg: TrainExitsConfig, rt: Runtime, ckpt: Checkpoint, spec: DataSpec, train, evals, poolings: set,
                  progress: Progress) -> dict:
    """One frozen pass caching what the off-ramps read, pooled every way in ``poolings``, and the final
    classifier's logits (the teacher of --distill), over the training (+ --unlabeled) and evaluation texts.
    Under a launcher the pass (the expensive part) is sharded over the processes and the cache gathered, in
    input order, on every process; the off-ramps then train on that full cache with the same seed on every
    process: identical updates, no gradient traffic (a few small linear layers on cached states gain nothing
    from DDP), and the main process writes exactly what a single process would.
    Returns {"train": {pooling: [L-1, n, H]}, "teacher" [n, C], "y" [n] (-100: unlabeled), "eval": {...},
    "eval_final" [n_ev, C], "seconds", "n"} on the run's device (eval_final on the CPU)."""
    model, tokenizer, task = ckpt.model, ckpt.tokenizer, ckpt.task
    device, pad, ways = rt.device, ckpt.tokenizer.pad_token_id, tuple(sorted(poolings))
    max_length, warning = fit_max_length(ckpt.meta.get("max_length", 128), model.max_tokens, "the checkpoint's max_length")
    if warning:
        progress.warn(warning)
    t0 = time.perf_counter()
    enc_tr = encode(tokenizer, train.texts, train.pairs, max_length)
    enc_ev = encode(tokenizer, evals.texts, evals.pairs, max_length)
    unlabeled = read_unlabeled(cfg.unlabeled, spec) if cfg.unlabeled else None
    n_un = len(unlabeled[0]) if unlabeled else 0
    progress.log(f"caching per-layer states of {len(train)} + {len(evals)}"
                 f"{f' + {n_un} unlabeled' if n_un else ''} examples (one frozen pass)")
    got_tr = collect_sharded(rt, model, enc_tr, pad, 64, pooled=False, poolings=ways)
    got_ev = collect_sharded(rt, model, enc_ev, pad, 64, pooled=False, poolings=ways)
    feats, teacher = got_tr["pooled_by"], got_tr["final"]
    y = torch.tensor(train.labels, dtype=torch.float32 if task == "regression" else torch.long)
    if n_un:
        got_un = collect_sharded(rt, model, encode(tokenizer, unlabeled[0], unlabeled[1], max_length), pad, 64,
                                 pooled=False, poolings=ways)
        feats = {w: torch.cat([feats[w], got_un["pooled_by"][w]], 1) for w in ways}
        teacher = torch.cat([teacher, got_un["final"]], 0)
        y = torch.cat([y, torch.full((n_un,), -100)])  # -100: no label, distillation only
    return {"train": {w: t.to(device) for w, t in feats.items()}, "teacher": teacher.to(device), "y": y.to(device),
            "eval": {w: t.to(device) for w, t in got_ev["pooled_by"].items()}, "eval_final": got_ev["final"],
            "seconds": time.perf_counter() - t0, "n": len(train) + len(evals) + n_un}



@torch.no_grad()
def _exit_logits(model: HighwayModel, pooled: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """Every exit's logits [L, n, C] from the off-ramps' cached inputs pooled [L-1, n, H] and the final
    classifier's logits final [n, C] (CPU)."""
    return torch.stack([r.classify(pooled[i]).float().cpu() for i, r in enumerate(model.ramps)] + [final.float()])


def _exits_meta(meta: dict, report: EvalReport, extra: dict, learned: list | None, calibration: list | None) -> dict:
    """deebert.json of a stage-2 checkpoint: the stage-1 metadata, the evaluation, timing, the recipe
    search, and the learned exits' and calibration's figures; figures of older off-ramps are dropped."""
    meta = dict(meta)
    meta["stage"] = STAGE_EXITS
    meta.setdefault("metrics", {})["train_exits"] = dataclasses.asdict(report)
    for stale in ("thresholds", "learned_exits", "calibration", "recipes", "guarantee"):
        meta.pop(stale, None)
    meta["timing"] = {"train_exits": {k: extra[k] for k in ("cache_seconds", "train_seconds", "cached_examples")}}
    meta["recipes"] = extra["recipes"]
    if "thresholds" in extra:
        meta["thresholds"] = extra["thresholds"]
        if extra["thresholds"]["search"] == "guaranteed":
            meta["guarantee"] = extra["guarantee"].to_dict()
    if learned is not None:
        meta["learned_exits"] = extra["learned_exits"] = learned
    if calibration is not None:
        meta["calibration"] = extra["calibration"] = calibration
    return meta
