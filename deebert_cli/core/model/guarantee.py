"""What a certified exit setting promises, as stored in a checkpoint's ``deebert.json`` (``"guarantee"``).

Plain data (no torch, no numpy): written by ``train-exits`` and ``deebert calibrate`` (computed in
:mod:`..analysis.risk`), read by the exit rules of predict, serve and predict-dataset, which name it beside
the rule they use."""
from __future__ import annotations

from dataclasses import asdict, dataclass


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
    method: str = "binomial"  # the bound that certified ``value``: binomial (binary loss) | betting (signed loss)
    level: float | None = None  # the level each test ran at (delta / family, halved when two bounds ran); None: old
    selection: str | None = None  # how the recipe was chosen: "union" (each at delta / family) | "split" | None

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


BOUNDS = {"binomial": "exact binomial bound", "betting": "betting bound on the drop itself"}


def stored_guarantee(meta: dict) -> Guarantee | None:
    """The guarantee a checkpoint's metadata carries (None when it has none, or an unreadable one)."""
    d = meta.get("guarantee")
    if not isinstance(d, dict):
        return None
    try:
        return Guarantee.from_dict(d)
    except TypeError:
        return None
