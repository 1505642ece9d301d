"""Exit rules: which policy decides when a row leaves, with its thresholds, as predict, serve and analyze
choose them from options and the checkpoint (:func:`resolve_rule`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError
from ..model.policies import EntropyPolicy, LearnedPolicy, PatiencePolicy, max_entropy


@dataclass
class ExitRule:
    """Entropy rule: a sample leaves after layer i (0-based) if entropy < thresholds[i]; the last layer
    always exits. ``thresholds`` has one value per layer (the last is ignored)."""

    thresholds: list
    entropy: str = "normalized"

    def values(self, num_labels: int) -> list:
        """[layers] thresholds; any at or above the maximum entropy exits everyone (becomes +inf)."""
        top = max_entropy(num_labels, self.entropy)
        return [math.inf if t >= top else float(t) for t in self.thresholds]

    def tensor(self, num_labels: int, device):
        """The thresholds as a float32 torch tensor on ``device``."""
        import torch

        return torch.tensor(self.values(num_labels), dtype=torch.float32, device=device)

    def policy(self, num_labels: int, device=None, xp=None) -> EntropyPolicy:
        """The policy over arrays of namespace ``xp`` (default: torch tensors on ``device``)."""
        from ..model.policies import default_namespace

        xp = default_namespace(xp)
        return EntropyPolicy(xp.asarray(self.values(num_labels), dtype=xp.float32, device=device), self.entropy)

    def describe(self) -> str:
        unit = "normalized entropy (0..1)" if self.entropy == "normalized" else "entropy in nats"
        ts = self.thresholds[:-1]
        val = f"{ts[0]:g}" if len(set(ts)) <= 1 else ",".join(f"{t:g}" for t in ts)
        return f"exit when {unit} < {val}"


@dataclass
class PatienceRule:
    """Patience rule (PABEE): leave once the off-ramps' predictions of ``patience`` + 1 consecutive layers
    agree (see :class:`~..model.policies.PatiencePolicy`); ``tolerance`` is for regression. ``entropy`` is only the
    unit of the entropy reported beside each prediction."""

    patience: int
    tolerance: float | None = None
    entropy: str = "normalized"

    def policy(self, num_labels: int, device=None, xp=None) -> PatiencePolicy:
        return PatiencePolicy(self.patience, self.tolerance)

    def describe(self) -> str:
        if self.tolerance is not None:
            return f"exit when {self.patience + 1} consecutive off-ramps agree within {self.tolerance:g} (patience {self.patience})"
        return f"exit when {self.patience + 1} consecutive off-ramps predict the same class (patience {self.patience})"


@dataclass
class LearnedRule:
    """Learned-exit rule (BERxiT): leave when the off-ramp's exit predictor crosses ``threshold`` (see
    :class:`~..model.policies.LearnedPolicy`). ``entropy`` is only the unit of the entropy reported beside each result."""

    threshold: float
    regression: bool = False
    entropy: str = "normalized"

    def policy(self, num_labels: int, device=None, xp=None) -> LearnedPolicy:
        return LearnedPolicy(self.threshold, self.regression)

    def describe(self) -> str:
        what = "predicted tanh(|error|) < " if self.regression else "predicted chance of being right > "
        return f"exit when the learned exit's {what}{self.threshold:g}"


def resolve_rule(ckpt, threshold: float | None, thresholds: list | None, entropy: str,
                 default: float = 0.3, policy: str = "entropy", patience: int | None = None,
                 tolerance: float = 0.1) -> tuple:
    """Pick the exit rule. Patience policy: a :class:`PatienceRule` at ``patience`` (None: the value the
    checkpoint's guarantee certifies, else 3; thresholds must not be given). Learned: a
    :class:`LearnedRule` at ``threshold`` (None: the certified value, else 0.9; regression 0.1).
    Entropy: per-layer --thresholds > --threshold > thresholds stored in the checkpoint > ``default``.
    A regression checkpoint refuses entropy and uses ``tolerance`` with patience. A setting that the
    checkpoint's stored guarantee certifies says so in the source description.
    Returns (rule, source description)."""
    from ..model.guarantee import stored_guarantee

    L = ckpt.model.num_layers
    regression = ckpt.task == "regression"
    g = stored_guarantee(ckpt.meta)
    certified = g.value if g is not None and g.certified and g.policy == policy else None
    if regression and policy == "entropy":
        raise UserError(f"'{ckpt.path}' is a regression checkpoint: entropy needs class probabilities; "
                        "use --exit-policy patience (with --tolerance) or --exit-policy learned (with --threshold)")
    if policy == "learned":
        if thresholds:
            raise UserError("--thresholds is per-layer entropy; the learned policy takes one --threshold")
        if not ckpt.exits_trained or not ckpt.model.ramp_cfg.learned_exit:
            raise UserError(f"'{ckpt.path}' has no learned exits: run `deebert train-exits --learned-exits` first")
        t = threshold if threshold is not None else (certified if certified is not None else (0.1 if regression else 0.9))
        if not 0.0 <= t <= 1.0:
            raise UserError(f"--threshold {t} is out of range: learned exit scores lie in [0, 1]")
        src = ("--threshold" if threshold is not None else _guaranteed("learned threshold stored in the checkpoint", g)
               if certified is not None else f"default learned threshold {t:g}")
        return LearnedRule(t, regression, entropy), src
    if policy == "patience":
        if threshold is not None or thresholds:
            raise UserError("--threshold/--thresholds apply to --exit-policy entropy; the patience policy takes --patience N")
        if not ckpt.exits_trained:
            raise UserError(f"the off-ramps of '{ckpt.path}' are not trained: run `deebert train-exits` first "
                            "(the patience policy compares their predictions)")
        if patience is None:
            n, src = (int(certified), _guaranteed("patience stored in the checkpoint", g)) if certified is not None \
                else (3, "--exit-policy patience (default patience 3)")
        else:
            n, src = patience, "--exit-policy patience"
        return PatienceRule(n, tolerance if regression else None, entropy), src
    if thresholds:
        vals, src = per_layer_thresholds(thresholds, L), "--thresholds"
    elif threshold is not None:
        vals, src = [threshold] * L, "--threshold"
    elif ckpt.meta.get("thresholds"):
        stored = ckpt.meta["thresholds"]
        if stored.get("entropy", "normalized") != entropy:
            entropy = stored.get("entropy", "normalized")
        vals = per_layer_thresholds(stored["values"], L, f"the thresholds stored in '{ckpt.path}' (deebert.json)")
        src = "thresholds stored in the checkpoint"
        if (certified is not None and stored.get("search") == "guaranteed" and g.entropy == entropy
                and set(stored["values"]) == {certified}):  # the guarantee names only what it certified
            src = _guaranteed(src, g)
    else:
        vals, src = [default] * L, f"default threshold {default}"
    vals[-1] = 0.0
    if not ckpt.exits_trained and any(v > 0 for v in vals[:-1]):
        raise UserError(
            f"the off-ramps of '{ckpt.path}' are not trained: run `deebert train-exits` first, "
            "or pass --threshold 0 to run every input to the last layer"
        )
    return ExitRule(vals, entropy), src


def _guaranteed(source: str, g) -> str:
    """The source of a stored setting, with what its guarantee promises."""
    return f"{source}; guaranteed: {g.describe()}"


def per_layer_thresholds(values: list, num_layers: int, what: str = "--thresholds") -> list:
    """The one rule for per-layer entropy thresholds, wherever they come from (--thresholds of predict,
    serve and predict-dataset, the checkpoint's stored ones, analyze's per-layer search): exactly L-1
    values, for layers 1..L-1. The last layer always exits and takes none: L values are refused rather
    than the last one dropped unseen. -> the engine's L values (0 for the last layer); any other count is
    a UserError naming ``what``."""
    L = num_layers
    if len(values) != L - 1:
        raise UserError(f"{what} needs {L - 1} values (one per layer 1..{L - 1}: the last layer always exits, so it "
                        f"takes none), got {len(values)}")
    return [float(v) for v in values] + [0.0]
