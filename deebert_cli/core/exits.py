"""Off-ramps (DeeBERT's per-layer classifiers, with an optional BERxiT learned exit) and exit policies:
entropy (DeeBERT), patience (PABEE) and learned (BERxiT)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

POOLINGS = ("cls", "mean")
AUTO = "auto"  # a RampConfig pooling the highway model resolves to its family's own (cls, or mean for ModernBERT)


@dataclass
class RampConfig:
    """How an off-ramp reads a layer: which token summary (``cls`` = first token, as in DeeBERT, or
    ``mean`` over non-padding tokens; ``auto``, before the highway model resolves it, is whichever the
    family's own head reads) and whether to LayerNorm it first."""

    pooling: str = "cls"
    norm: bool = False
    dropout: float = 0.1
    learned_exit: bool = False  # BERxiT: a Linear(H, 1) + sigmoid exit predictor on the pooler output

    def __post_init__(self):
        if self.pooling not in POOLINGS + (AUTO,):
            raise ValueError(f"ramp pooling must be one of {POOLINGS + (AUTO,)}, got '{self.pooling}'")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ramp dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Summarise a layer for an off-ramp: [batch, seq, hidden] -> [batch, hidden]."""
    if pooling == "cls":
        return hidden[:, 0]
    # mean over real tokens only, so padding never changes the result
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # [batch, seq, 1]
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


class OffRamp(nn.Module):
    """DeeBERT off-ramp: pooler Linear(H,H) -> tanh -> dropout -> Linear(H,C) on the pooled token."""

    def __init__(self, hidden_size: int, num_labels: int, cfg: RampConfig):
        super().__init__()
        if cfg.pooling not in POOLINGS:  # 'auto' is resolved by the highway model, which knows the family
            raise ValueError(f"an off-ramp needs pooling {POOLINGS}, got '{cfg.pooling}'")
        self.cfg = cfg
        self.norm = nn.LayerNorm(hidden_size) if cfg.norm else nn.Identity()
        self.pooler = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)
        # temperature scaling (``train-exits --calibrate``); 1 = uncalibrated
        self.register_buffer("temperature", torch.ones(()))
        # learned exit (BERxiT, ``train-exits --learned-exits``): reads the pooler output, like the classifier
        self.exit_head = nn.Linear(hidden_size, 1) if cfg.learned_exit else None

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[batch, seq, hidden] -> [batch, hidden]: the part that depends on the frozen backbone only."""
        return pool(hidden, attention_mask, self.cfg.pooling)

    def features(self, pooled: torch.Tensor) -> torch.Tensor:
        """[batch, hidden] -> the pooler output tanh(pooler(norm(pooled))) [batch, hidden]."""
        return torch.tanh(self.pooler(self.norm(pooled)))

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """[batch, hidden] -> logits [batch, classes]."""
        return self.classifier(self.dropout(self.features(pooled))) / self.temperature

    def exit_score(self, pooled: torch.Tensor) -> torch.Tensor:
        """[batch, hidden] -> learned exit score [batch] in (0, 1): the predicted chance that this off-ramp
        is right (classification) or its predicted tanh(|error|) (regression)."""
        if self.exit_head is None:
            raise ValueError("this off-ramp has no learned exit (train-exits --learned-exits)")
        return torch.sigmoid(self.exit_head(self.features(pooled)).float()).squeeze(-1)

    def classify_and_score(self, pooled: torch.Tensor) -> tuple:
        """[batch, hidden] -> (logits [batch, classes], exit score [batch]) with one pooler pass."""
        x = self.features(pooled)
        score = torch.sigmoid(self.exit_head(x).float()).squeeze(-1)
        return self.classifier(self.dropout(x)) / self.temperature, score

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classify(self.pool(hidden, attention_mask))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of softmax(logits): [..., classes] -> [...].

    Computed in float32 from log_softmax so that logits of +-1e4 or bf16/fp16 inputs stay finite
    (p * log p is taken as 0 where p underflows to 0)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
    return (-plogp.sum(-1)).clamp(min=0.0)


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy divided by ln(C), in [0, 1]: [..., classes] -> [...]."""
    c = logits.shape[-1]
    if c < 2:
        raise ValueError("normalized entropy needs at least 2 classes")
    return (entropy(logits) / math.log(c)).clamp(0.0, 1.0)


def exit_entropy(logits: torch.Tensor, kind: str = "normalized") -> torch.Tensor:
    """Entropy of the kind a threshold is expressed in: ``normalized`` (0..1) or ``raw`` (nats)."""
    if kind == "normalized":
        return normalized_entropy(logits)
    if kind == "raw":
        return entropy(logits)
    raise ValueError(f"entropy kind must be 'normalized' or 'raw', got '{kind}'")


def max_entropy(num_labels: int, kind: str) -> float:
    """Largest possible entropy for ``num_labels`` classes in the given unit."""
    return 1.0 if kind == "normalized" else math.log(num_labels)


def first_exit(signal: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Exit layer index (0-based) per sample for the entropy rule.

    signal: [layers, n] entropy at every exit; thresholds: [layers] (the last layer always exits).
    A sample leaves at the first layer whose entropy is strictly below that layer's threshold."""
    layers = signal.shape[0]
    fires = signal < thresholds.view(-1, 1)  # [layers, n]
    fires[-1] = True
    # argmax returns the first True along dim 0
    return fires.int().argmax(0).clamp(max=layers - 1)


# ------------------------------------------------------------------------------------------------
# exit policies: one decision step per layer, with per-row state that travels with the row
# ------------------------------------------------------------------------------------------------
POLICIES = ("entropy", "patience", "learned")


class EntropyPolicy:
    """DeeBERT: leave after layer i if the off-ramp's entropy is strictly below ``thr[i]``. Stateless."""

    def __init__(self, thresholds: torch.Tensor, kind: str = "normalized"):
        self.thr, self.kind = thresholds, kind  # [layers]

    def init_state(self, b: int, device) -> tuple:
        return ()

    needs_score = False

    def step(self, i: int, logits: torch.Tensor, state: tuple, score: torch.Tensor | None = None) -> tuple:
        """logits [b, C] at layer i -> (done [b] bool, new state)."""
        return exit_entropy(logits, self.kind) < self.thr[i], state


class PatiencePolicy:
    """PABEE (Zhou et al. 2020). Each row keeps (last prediction, streak): ``streak`` counts the layers
    in a row, ending at the current one, whose prediction agrees with the layer before. A row leaves after
    layer i (0-based) as soon as ``streak >= patience``, i.e. when the predictions of layers
    i-patience..i all agree (patience + 1 equal predictions). Classification: predictions are the argmax
    class and agree when equal. Regression (``tolerance`` set): the prediction is the single output and
    consecutive values agree when they differ by less than ``tolerance``. ``patience`` 0 exits everyone
    at layer 1; the engine always exits at the last layer."""

    needs_score = False

    def __init__(self, patience: int, tolerance: float | None = None):
        self.patience, self.tolerance = patience, tolerance

    def prediction(self, logits: torch.Tensor) -> torch.Tensor:
        """[b, C] -> [b] float: the argmax class, or the value for regression."""
        return logits[:, 0].float() if self.tolerance is not None else logits.argmax(-1).float()

    def init_state(self, b: int, device) -> tuple:
        """(last prediction [b] float, streak [b] long)."""
        return torch.zeros(b, device=device), torch.zeros(b, dtype=torch.long, device=device)

    def step(self, i: int, logits: torch.Tensor, state: tuple, score: torch.Tensor | None = None) -> tuple:
        """logits [b, C] at layer i, state (last [b], streak [b]) -> (done [b] bool, (pred, streak))."""
        pred = self.prediction(logits)
        last, streak = state
        if i == 0:
            streak = torch.zeros_like(streak)
        else:
            same = (pred - last).abs() < self.tolerance if self.tolerance is not None else pred == last
            streak = torch.where(same, streak + 1, torch.zeros_like(streak))
        return streak >= self.patience, (pred, streak)


class LearnedPolicy:
    """BERxiT (Xin et al. 2021): each off-ramp's learned exit predictor scores its own output. A row leaves
    after layer i when the score crosses ``threshold``: classification, the predicted chance of being
    right is strictly above it; regression, the predicted tanh(|error|) is strictly below it. Stateless;
    the engine always exits at the last layer (which has no predictor)."""

    needs_score = True

    def __init__(self, threshold: float, regression: bool = False):
        self.threshold, self.regression = threshold, regression

    def init_state(self, b: int, device) -> tuple:
        return ()

    def step(self, i: int, logits: torch.Tensor, state: tuple, score: torch.Tensor | None = None) -> tuple:
        """score [b] at layer i -> (done [b] bool, state)."""
        return (score < self.threshold) if self.regression else (score > self.threshold), state


def policy_exit(policy, logits: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Exit layer (0-based) per sample of ``policy`` from all-exits logits [layers, n, C] (and learned exit
    scores [layers - 1, n] for the learned policy) -> [n]; the same steps the engines take, run over every
    layer at once (the last layer always exits)."""
    L, n = logits.shape[:2]
    state = policy.init_state(n, logits.device)
    layer = torch.full((n,), L - 1, dtype=torch.long, device=logits.device)
    open_ = torch.ones(n, dtype=torch.bool, device=logits.device)
    for i in range(L - 1):
        done, state = policy.step(i, logits[i].float(), state, None if scores is None else scores[i].float())
        layer[open_ & done] = i
        open_ &= ~done
    return layer


def patience_exit(logits: torch.Tensor, patience: int, tolerance: float | None = None) -> torch.Tensor:
    """Exit layer (0-based) under the patience rule (see :class:`PatiencePolicy`): [layers, n, C] -> [n]."""
    return policy_exit(PatiencePolicy(patience, tolerance), logits)
