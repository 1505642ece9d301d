"""Guarantees on real texts: ``deebert calibrate`` (certify a checkpoint's exit setting on new labelled or
unlabelled texts, check the one it carries, store the new one), and the pieces ``deebert analyze`` shares
with it (its guaranteed recommendation beside the point estimate, the drift check, storing).

The statistics are :mod:`.risk`; this module reads texts, runs the all-exits pass and writes
``deebert.json`` (the ``guarantee`` entry, and for the entropy policy the ``thresholds`` predict uses)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import CalibrateConfig
from ..data.examples import DataSpec, Examples, eval_examples, read_unlabeled
from ..device import resolve_device
from ..errors import UserError
from ..model.checkpoint import load_checkpoint, update_meta
from ..model.guarantee import Guarantee, stored_guarantee
from . import risk


@dataclass
class Calibration:
    """What ``deebert calibrate`` found: the setting certified on these texts, how the checkpoint's stored
    guarantee fares on them, and whether the new one was stored."""

    checkpoint: str
    source: str  # which texts
    n: int
    labelled: bool
    guarantee: Guarantee
    check: dict | None  # the stored guarantee on these texts (risk.check), None when it had none
    previous: Guarantee | None
    stored: bool
    advice: dict  # min_n (to certify anything), needed (to certify the next setting) ...
    replaced: str | None = None  # what storing replaced in deebert.json (old -> new), None when nothing

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def calibrate(cfg: CalibrateConfig) -> Calibration:
    """Certify ``cfg.exit_policy`` of the checkpoint on the texts of ``cfg`` and store it (unless
    ``cfg.check``), after checking the guarantee the checkpoint already carries on the same texts."""
    device = resolve_device(cfg.device)
    ckpt = load_checkpoint(cfg.checkpoint)
    if not ckpt.exits_trained:
        raise UserError(f"the off-ramps of '{cfg.checkpoint}' are not trained: run `deebert train-exits` first")
    _check_policy(cfg, ckpt)
    examples, source = _texts(cfg, ckpt)
    labels = None if cfg.unlabeled else examples.labels
    logits, scores = all_exits(ckpt, device, examples, cfg.batch_size, learned=cfg.exit_policy == "learned")
    previous = stored_guarantee(ckpt.meta)
    checked = check_stored(previous, logits, labels, scores) if previous is not None else None
    g = risk.certify(logits, labels, risk=_risk_for(cfg, ckpt), epsilon=cfg.epsilon, delta=cfg.delta,
                     policy=cfg.exit_policy, scores=scores, entropy=cfg.entropy,
                     tolerance=cfg.tolerance if ckpt.task == "regression" else None)
    g.calibrated_on, g.by = source, "calibrate"
    stored, replaced = False, None
    if not cfg.check and g.certified and g.layer_saving > 0:
        replaced = store_guarantee(ckpt.path, g, ckpt.model.num_layers)
        stored = True
    return Calibration(str(cfg.checkpoint), source, len(examples), labels is not None, g, checked, previous, stored,
                       advice(g, logits, labels, scores), replaced)


def _check_policy(cfg: CalibrateConfig, ckpt) -> None:
    if ckpt.task == "regression" and cfg.exit_policy == "entropy":
        raise UserError(f"'{cfg.checkpoint}' is a regression checkpoint: entropy needs class probabilities; "
                        "use --exit-policy patience or learned")
    if cfg.exit_policy == "learned" and not ckpt.model.ramp_cfg.learned_exit:
        raise UserError(f"'{cfg.checkpoint}' has no learned exits: run `deebert train-exits --learned-exits` first")


def _risk_for(cfg: CalibrateConfig, ckpt) -> str:
    if ckpt.task == "regression" and cfg.risk == "accuracy_drop":
        return "error_increase"
    return cfg.risk


def _texts(cfg: CalibrateConfig, ckpt) -> tuple:
    """The calibration texts -> (Examples (labels empty for --unlabeled), description)."""
    spec = DataSpec(**{**ckpt.meta.get("data", {}), "task": ckpt.task})
    overrides = {k: getattr(cfg, k) for k in ("text_column", "text_pair_column", "label_column") if getattr(cfg, k)}
    spec = dataclasses.replace(spec, **overrides)
    if cfg.unlabeled:
        texts, pairs = read_unlabeled(cfg.unlabeled, spec)
        return Examples(texts, pairs, []), f"unlabelled texts of '{cfg.unlabeled}'"
    path = Path(cfg.dataset).expanduser()
    if not path.exists():
        raise UserError(f"--dataset '{cfg.dataset}' does not exist")
    spec = dataclasses.replace(spec, dataset=str(path))
    split = cfg.split or ("train" if path.is_file() else "validation")  # a file is one split: all of it
    try:
        ex, source = eval_examples(spec, ckpt.label_names, split)
    except UserError as e:  # a message about the data names the flag and the file
        raise (e if "--dataset" in str(e) else UserError(f"--dataset '{cfg.dataset}': {e}")) from None
    return ex, (f"all of '{cfg.dataset}'" if path.is_file() and cfg.split is None else f"{source} of '{cfg.dataset}'")


def all_exits(ckpt, device, examples, batch_size: int, learned: bool = False) -> tuple:
    """The all-exits pass over ``examples`` -> (logits [L, n, C] numpy, learned exit scores [L-1, n] or None)."""
    from ..data.encoding import encode
    from ..runtime.passes import collect, exit_scores

    if not len(examples.texts):
        raise UserError("no texts to calibrate on")
    model, tok = ckpt.model, ckpt.tokenizer
    enc = encode(tok, examples.texts, examples.pairs, ckpt.meta.get("max_length", 128))
    got = collect(model.to(device), enc, tok.pad_token_id, batch_size, device, pooled=learned, all_logits=True)
    scores = exit_scores(model, got["pooled"].to(device)).numpy() if learned else None
    return got["logits"].numpy(), scores


def check_stored(g: Guarantee, logits, labels, scores=None) -> dict:
    """The stored guarantee on these texts: its own risk with labels; without, disagreement (which bounds
    an accuracy drop from above, so "holds" still means the drop is within budget)."""
    return risk.check(g, logits, labels, scores, risk=None if labels is not None else "disagreement")


def advice(g: Guarantee, logits, labels, scores=None) -> dict:
    """How many texts would certify more: anything at all (``min_n``), and the next setting of the
    sequence, the first that failed, taking its loss rate here as the truth (``next_n``)."""
    out = {"min_n": g.min_n, "next": None, "next_rate": None, "next_n": None}
    cands = risk.candidates(g.policy, logits.shape[0], logits.shape[-1], g.entropy, logits.shape[-1] == 1)
    nxt = g.tested - 1 if g.tested and g.tested <= len(cands) else None
    if nxt is not None and (g.value is None or cands[nxt] != g.value):
        layer = risk.exit_layers(g.policy, cands[nxt], np.asarray(logits), scores, g.entropy, g.tolerance,
                                 logits.shape[-1] == 1)
        rate = float(risk.losses(g.risk, layer, np.asarray(logits), labels, g.tolerance).mean())
        out.update(next=cands[nxt], next_rate=rate, next_n=risk.needed_size(rate, g.epsilon, g.test_level))
    return out


def store_guarantee(path, g: Guarantee, num_layers: int) -> str | None:
    """Write ``g`` into the checkpoint's deebert.json (atomically), with, for the entropy policy, the
    thresholds predict uses when given none -> the line saying what it replaced (None: nothing). A
    guarantee for patience or learned leaves the entropy thresholds as they are, without a guarantee
    (the line says so): plain ``predict`` keeps them, ``--exit-policy patience|learned`` uses ``g``."""
    fields = {"guarantee": g.to_dict()}
    if g.policy == "entropy":
        fields["thresholds"] = {"entropy": g.entropy, "values": [g.value] * (num_layers - 1), "search": "guaranteed",
                                "chosen_on": g.calibrated_on, "by": g.by}
    return update_meta(path, fields)[1]


def recommend_guaranteed(ckpt, logits, labels, source: str, epsilon: float, risk_kind: str, delta: float,
                         entropy: str = "normalized") -> Guarantee:
    """``deebert analyze``'s guaranteed recommendation on the split it analyzes. On the split stage 2
    chose its off-ramp recipe on, that choice is paid for as it was there: with the split selection, the
    certification uses only the texts the recipe was not chosen on (the same seeded part, of the share
    the checkpoint stores); with the union
    bound (older checkpoints), each of the recipes compared counts (delta / their number)."""
    chosen_on = (ckpt.meta.get("thresholds") or {}).get("chosen_on")
    search = ckpt.meta.get("recipes") or {}
    chose_here = chosen_on == source and not search.get("given") and len(search.get("candidates", [])) > 1
    logits = np.asarray(logits)
    if chosen_on == source and search.get("selection") == "split":
        pick, rest = risk.selection_parts(logits.shape[1], search.get("select_fraction", 0.3))
        y = None if labels is None else np.asarray(labels)
        g = risk.certify(logits[:, rest], None if y is None else y[rest], risk=risk_kind, epsilon=epsilon,
                         delta=delta, entropy=entropy)
        g.selection = "split"
    else:
        family = len(search.get("candidates", [])) if chose_here else 1
        g = risk.certify(logits, labels, risk=risk_kind, epsilon=epsilon, delta=delta, entropy=entropy,
                         family=max(1, family))
        g.selection = "union" if family > 1 else None
    g.calibrated_on, g.by = source, "analyze"
    return g
