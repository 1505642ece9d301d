"""What a certified exit setting promises, as stored in a checkpoint's ``deebert.json`` (``"guarantee"``).

Plain data (no torch, no numpy): written by ``train-exits`` and ``deebert calibrate`` (computed in
:mod:`..analysis.risk`), read by the exit rules of predict, serve and predict-dataset, which name it beside
the rule they use."""
from __future__ import annotations

from dataclasses import asdict, dataclass


BOUNDS = {"binomial": "exact binomial bound", "betting": "betting bound on the drop itself",
          "exact": "exact test of the drop itself"}


@dataclass
class Guarantee:
    """What a certified setting promises: P(risk <= epsilon) >= 1 - delta on new texts like the ``n``
    calibration texts. ``value`` is None when nothing beyond full depth could be certified."""

    risk: str  # accuracy_drop | disagreement | error_increase
    epsilon: float  # the budget as a fraction (0.005 = half a point of accuracy; 0.02 = 2% disagreement)
    delta: float
    n: int
    policy: str  # entropy | patience | learned
    value: float | None  # the certified threshold (entropy, learned) or patience; None: full depth only
    losses: int  # losses at ``value`` on the calibration texts
    empirical: float  # losses / n
    bound: float  # (1 - delta / family) upper confidence bound of the risk at ``value`` (<= epsilon)
    mean_exit_layer: float  # on the calibration texts, at ``value``
    layer_saving: float  # 1 - mean exit layer / L, the saving to expect
    tested: int  # settings tried in sequence (the certified ones and the first failure)
    family: int = 1  # candidates compared (e.g. off-ramp recipes): each tested at delta / family
    min_n: int | None = 0  # calibration texts needed to certify anything at epsilon, delta / family
    entropy: str = "normalized"  # unit of an entropy threshold
    tolerance: float | None = None  # regression: the tolerance of the losses and of patience
    accuracy_drop: float | None = None  # labelled calibration: the observed drop at ``value`` (fraction)
    calibrated_on: str | None = None  # which texts (e.g. "split 'validation' of movie_snippets")
    by: str | None = None  # train-exits | calibrate | analyze
    method: str = "binomial"  # the bound that certified ``value``: binomial (binary loss) | exact | betting (signed loss)
    level: float | None = None  # the level each test ran at (delta / family); None: old
    selection: str | None = None  # how the recipe was chosen: "union" (each at delta / family) | "split" | None
    disagreement_rate: float | None = None  # disagreement with the final layer at ``value`` on the calibration texts

    @property
    def certified(self) -> bool:
        return self.value is not None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Guarantee":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def describe(self) -> str:
        """One line: what is guaranteed, at what confidence, from how many texts."""
        eps = f"{100 * self.epsilon:g}"
        if self.risk == "accuracy_drop":
            what = f"accuracy drop <= {eps} points"
        elif self.risk == "disagreement":
            what = f"disagreement with the final layer <= {eps}%"
        else:
            what = f"share of texts whose error grows by more than {self.tolerance or 0:g} <= {eps}%"
        return (f"{what} with probability >= {100 * (1 - self.delta):g}% (n={self.n} calibration texts, "
                f"{BOUNDS.get(self.method, self.method)})")

    @property
    def test_level(self) -> float:
        """The level each hypothesis was tested at (older guarantees: delta / family)."""
        return self.level if self.level is not None else self.delta / max(1, self.family)


    def setting(self) -> str:
        """The certified setting in words (``patience 2``, ``threshold 0.3 (normalized entropy)``)."""
        if self.value is None:
            return f"{self.policy}: full depth only"
        if self.policy == "patience":
            return f"patience {int(self.value)}"
        if self.policy == "learned":
            return f"learned-exit threshold {self.value:g}"
        return f"threshold {self.value:g} ({self.entropy} entropy)"


def stored_guarantee(meta: dict) -> Guarantee | None:
    """The guarantee a checkpoint's metadata carries (None when it has none). The metadata was checked
    against the schema when read (:func:`.schema.check_meta`); one that does not fit is a UserError here
    too, never dropped without a word."""
    from ..errors import UserError

    d = meta.get("guarantee")
    if d is None:
        return None
    try:
        return Guarantee.from_dict(d)
    except (TypeError, AttributeError):
        raise UserError("the checkpoint's guarantee (deebert.json) is damaged: certify anew with `deebert calibrate`, "
                        "or restore deebert.json from a copy") from None


def _thresholds(thr, g: Guarantee | None = None) -> str:
    if not thr:
        return "no stored thresholds"
    vals = thr.get("values") or []
    shown = f"{vals[0]:g}" if len(set(vals)) == 1 else ",".join(f"{v:g}" for v in vals)
    search = thr.get("search", "stored")
    if search == "guaranteed" and (g is None or g.policy != "entropy"):
        search = "no longer guaranteed"
    return f"thresholds {shown} ({thr.get('entropy', 'normalized')} entropy, {search})"


def stored_setting(meta: dict) -> str:
    """The stored thresholds and guarantee of ``meta`` in words (one side of an old -> new line)."""
    g = stored_guarantee(meta)
    what = "no guarantee" if g is None else f"guarantee for {g.setting()} ({g.describe()})"
    return f"{_thresholds(meta.get('thresholds'), g)}; {what}"


def replacement(old: dict, new: dict) -> str | None:
    """One line saying what a store replaced in deebert.json: old -> new, whether a guarantee is lost,
    and, when the entropy thresholds keep no guarantee beside a guarantee for another policy, what plain
    ``predict`` then uses. None when the stored thresholds and guarantee did not change."""
    if old.get("thresholds") == new.get("thresholds") and old.get("guarantee") == new.get("guarantee"):
        return None
    line = f"replaced {stored_setting(old)} -> {stored_setting(new)}"
    og, ng = stored_guarantee(old), stored_guarantee(new)
    if og is not None and og.certified and (ng is None or ng.policy != og.policy):
        line += f"; the guarantee for {og.setting()} is lost"
    thr = new.get("thresholds")
    if ng is not None and ng.policy != "entropy" and ng.certified and thr:
        line += (f"; plain `predict` keeps the entropy {_thresholds(thr, ng)} without a guarantee: "
                 f"`--exit-policy {ng.policy}` uses the certified {ng.setting()}")
    return line
