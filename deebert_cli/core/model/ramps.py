"""The off-ramp module (torch): DeeBERT's per-layer classifier with an optional BERxiT learned exit.
Kept apart from :mod:`.policies` so that the exit policies import without torch (the ONNX runtime)."""
from __future__ import annotations

import torch
from torch import nn

from .policies import POOLINGS, RampConfig


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
