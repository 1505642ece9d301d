"""The all-exits pass: the frozen model run once over encoded texts, collecting what every exit reads
(pooled states, every exit's logits, first-token states) in input order, on one process or spread over the
processes of ``accelerate launch`` (:func:`collect_sharded`); and the learned exits' scores from such a
pass. Stage 2 caches it, analyze sweeps it: it is inference, not training."""
from __future__ import annotations

import torch

from ..data.encoding import Encoded, length_sorted_batches, pad_batch
from ..device import autocast
from ..launch import Runtime
from ..model.highway import HighwayModel


@torch.no_grad()
def collect(model: HighwayModel, enc: Encoded, pad_id: int, batch_size: int, device, pooled: bool = True,
            all_logits: bool = False, precision: str = "fp32", cls: bool = False, poolings: tuple = ()) -> dict:
    """Run the frozen model once over ``enc`` (length-sorted batches, eval mode) and return, in input order:
    ``final`` [n, C] logits of the last exit; with ``pooled`` the off-ramp inputs [L-1, n, H];
    with ``all_logits`` the logits of every exit [L, n, C]; with ``cls`` the first-token state of
    every layer [L, n, H]; for each pooling in ``poolings`` (``cls``, ``mean``) the layers' states pooled
    that way, ``pooled_by[pooling]`` [L-1, n, H] (stage 2 caches both in one pass). Outputs are float32
    on the CPU."""
    model.eval()
    n, L = len(enc), model.num_layers
    out = {"final": None}
    ways = tuple(poolings) + (("ramps",) if pooled else ())
    finals, logits_all, clss = [None] * n, [None] * n, [None] * n
    pools = {w: [None] * n for w in ways}
    for idx in length_sorted_batches(enc.lengths(), batch_size):
        b = {k: v.to(device) for k, v in pad_batch(enc, idx, pad_id).items()}
        with autocast(device, precision):
            per_layer_pool, per_layer_logits, per_layer_cls = _collect_batch(model, b, L, ways, all_logits, cls)
        for j, row in enumerate(idx):
            finals[row] = per_layer_logits[-1][j]
            for w in ways:
                pools[w][row] = torch.stack([p[j] for p in per_layer_pool[w]])
            if all_logits:
                logits_all[row] = torch.stack([p[j] for p in per_layer_logits])
            if cls:
                clss[row] = torch.stack([p[j] for p in per_layer_cls])
    out["final"] = torch.stack(finals)
    if cls:
        out["cls"] = torch.stack(clss, dim=1)  # [L, n, H]
    if pooled:
        out["pooled"] = torch.stack(pools["ramps"], dim=1)  # [L-1, n, H]
    if poolings:
        out["pooled_by"] = {w: torch.stack(pools[w], dim=1) for w in poolings}  # each [L-1, n, H]
    if all_logits:
        out["logits"] = torch.stack(logits_all, dim=1)  # [L, n, C]
    return out


def _collect_batch(model: HighwayModel, b: dict, L: int, ways: tuple, all_logits: bool, cls: bool = False) -> tuple:
    """One batch of :func:`collect`: per way of pooling (``ramps``: each off-ramp's own) the pooled states
    of layers 1..L-1, the logits of the exits asked for, the first-token states."""
    from ..model.ramps import pool

    hidden = model.embed(b["input_ids"], b.get("token_type_ids"))
    mask = model.prepare_mask(b["attention_mask"], hidden)
    per_layer_pool, per_layer_logits, per_layer_cls = {w: [] for w in ways}, [], []
    for i in range(L):
        hidden = model.run_layer(i, hidden, mask)
        if cls:
            per_layer_cls.append(hidden[:, 0].float().cpu())
        if i < L - 1:
            for w in ways:
                p = model.ramps[i].pool(hidden, b["attention_mask"]) if w == "ramps" else pool(hidden, b["attention_mask"], w)
                per_layer_pool[w].append(p.float().cpu())
        if all_logits or i == L - 1:
            per_layer_logits.append(model.exit_logits(i, hidden, b["attention_mask"]).float().cpu())
    return per_layer_pool, per_layer_logits, per_layer_cls


def collect_sharded(rt: Runtime, model: HighwayModel, enc: Encoded, pad_id: int, batch_size: int,
                    pooled: bool = True, all_logits: bool = False, poolings: tuple = ()) -> dict:
    """:func:`collect` with the rows spread over the processes of ``rt`` and gathered back in input order on
    every process (each row once), so figures computed from it equal a single-process pass. Without a
    launcher this is exactly :func:`collect`."""
    if not rt.distributed:
        return collect(model, enc, pad_id, batch_size, rt.device, pooled, all_logits, rt.precision, poolings=poolings)
    n, L = len(enc), model.num_layers
    rows = rt.shard(range(n))
    if rows:
        got = collect(model, enc.subset(rows), pad_id, batch_size, rt.device, pooled, all_logits, rt.precision,
                      poolings=poolings)
    else:  # more processes than rows
        got = {"final": torch.zeros(0, model.num_labels)}
        if pooled:
            got["pooled"] = torch.zeros(L - 1, 0, model.hidden_size)
        if all_logits:
            got["logits"] = torch.zeros(L, 0, model.num_labels)
        if poolings:
            got["pooled_by"] = {w: torch.zeros(L - 1, 0, model.hidden_size) for w in poolings}

    def gather(t):  # rows are dim 1
        return rt.gather_rows(t.transpose(0, 1), n).transpose(0, 1).contiguous()

    out = {"final": rt.gather_rows(got["final"], n)}
    for key in ("pooled", "logits"):
        if key in got:
            out[key] = gather(got[key])
    if poolings:
        out["pooled_by"] = {w: gather(t) for w, t in got["pooled_by"].items()}
    return out


@torch.no_grad()
def exit_scores(model, pooled: torch.Tensor) -> torch.Tensor:
    """Learned exit scores of off-ramps 1..L-1 from their cached inputs pooled [L-1, n, H] -> [L-1, n]."""
    return torch.stack([r.exit_score(pooled[i]) for i, r in enumerate(model.ramps)]).float().cpu()
