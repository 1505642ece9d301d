"""Fitting the off-ramps on cached states: the stage-2 loop and its loss (cross-entropy, optionally mixed
with self-distillation; regression: MSE), temperature calibration, and the BERxiT learned-exit heads."""
from __future__ import annotations

import math
import time

import torch

from ..config import TrainExitsConfig
from ..model.highway import HighwayModel
from ..model.ramps import OffRamp
from .common import Progress


def shuffled_batches(n: int, batch_size: int, gen: torch.Generator, device):
    """Row indices [batch_size] on ``device`` in random batches, pass after pass over the n rows (a fresh
    permutation from ``gen`` each pass, the last batch of a pass possibly smaller), without end."""
    while True:
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            yield idx.to(device)


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
    t1, step, seen, batches = time.perf_counter(), 0, 0, shuffled_batches(n_rows, cfg.batch_size, gen, feats.device)
    while step < total:
        idx = next(batches)
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
    step, batches = 0, shuffled_batches(n, cfg.batch_size, gen, y.device)
    while step < total:
        idx = next(batches)
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
