"""Off-ramps (DeeBERT's per-layer classifiers) and exit signals (entropy)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

POOLINGS = ("cls", "mean")


@dataclass
class RampConfig:
    """How an off-ramp reads a layer: which token summary (``cls`` = first token, as in DeeBERT, or
    ``mean`` over non-padding tokens) and whether to LayerNorm it first."""

    pooling: str = "cls"
    norm: bool = False
    dropout: float = 0.1

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"ramp pooling must be one of {POOLINGS}, got '{self.pooling}'")
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
        self.cfg = cfg
        self.norm = nn.LayerNorm(hidden_size) if cfg.norm else nn.Identity()
        self.pooler = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)
        # temperature scaling (``train-exits --calibrate``); 1 = uncalibrated
        self.register_buffer("temperature", torch.ones(()))

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[batch, seq, hidden] -> [batch, hidden]: the part that depends on the frozen backbone only."""
        return pool(hidden, attention_mask, self.cfg.pooling)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """[batch, hidden] -> logits [batch, classes]."""
        x = torch.tanh(self.pooler(self.norm(pooled)))
        return self.classifier(self.dropout(x)) / self.temperature

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
