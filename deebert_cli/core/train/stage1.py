"""DeeBERT's stage 1 (:func:`finetune`): backbone + final classifier on the last layer's cross-entropy
(regression checkpoints, ``--task regression``: one output, MSE), evaluated after every epoch, the best
epoch kept, resumable (:mod:`.state`), under ``accelerate launch`` too."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import shutil
import time

import torch
from torch import nn

from ..config import FinetuneConfig, to_yaml
from ..data.encoding import encode, fit_max_length, pad_batch
from ..data.examples import fingerprint, prepare_data
from ..errors import UserError
from ..launch import Runtime
from ..files import check_writable
from ..model.checkpoint import STAGE_FINETUNED, Checkpoint, check_checkpoint_output, save_checkpoint
from ..model.highway import HighwayModel
from ..runtime.passes import collect_sharded
from .common import EvalReport, Progress, TrainResult, eval_report, resolve_model_path, seed_everything
from .state import TrainState, config_mismatch, latest_state, load_state, read_state_meta, save_state, state_dir_for

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
    check_checkpoint_output(cfg.output, "--output")  # before any work: hours of training are not lost at the end
    if cfg.report_to != "none":
        check_writable(cfg.logging_dir or f"{cfg.output}.logs", "--logging-dir", inside=True)
    run = _Stage1(cfg, progress)
    run.resume_if_found()
    run.train()
    return run.finish()


class _Stage1:
    """One stage-1 run: data, model, optimizer and schedule, the loop, per-epoch evaluation, state."""

    def __init__(self, cfg: FinetuneConfig, progress: Progress | None):
        from transformers import AutoTokenizer, get_linear_schedule_with_warmup

        from ..model.highway import load_hf
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
        max_length, warning = fit_max_length(cfg.max_length, self.model.max_tokens)
        if warning:
            self.progress.warn(warning)
            cfg = dataclasses.replace(cfg, max_length=max_length)
        self.cfg = cfg
        self.data_fingerprint = fingerprint(self.data.train, self.data.eval, label_names=self.data.label_names)
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
        saved = read_state_meta(path)
        diff = config_mismatch(saved.get("config", {}), dataclasses.asdict(self.cfg), RESUME_MAY_CHANGE)
        if diff:
            flags = ", ".join("--" + d.replace("_", "-") for d in diff)
            raise UserError(f"'{self.state_root}' holds the state of an interrupted run with other options ({flags}); "
                            f"rerun with the same options to resume it, or remove that directory to start afresh")
        if saved.get("data_fingerprint") not in (None, self.data_fingerprint):  # states of older versions have none
            raise UserError(f"'{self.state_root}' holds the state of an interrupted run on other data: the examples of "
                            f"--dataset '{self.cfg.dataset}' (texts or labels) changed since; resume on the data it "
                            f"was trained on, or remove that directory to start afresh")
        self.state, self.best_weights, gen_state = load_state(path, self.rt, self.model.model, self.opt, self.sched)
        self.gen.set_state(gen_state)
        pos = self.state.position
        self.resumed_from = pos.step
        self.progress.log(f"resuming from {path} (step {pos.step} of {self.total}, epoch {pos.epoch + 1})")

    def save(self, epoch_gen_state: torch.Tensor) -> None:
        save_state(self.state_root, self.rt, self.model.model, self.opt, self.sched, self.state, self.best_weights,
                   epoch_gen_state, dataclasses.asdict(self.cfg), self.data_fingerprint)

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

