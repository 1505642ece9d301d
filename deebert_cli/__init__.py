"""deebert: DeeBERT early exits for BERT-family text classifiers.

The public API is imported lazily (torch and transformers load on first use)::

    from deebert_cli import load_checkpoint, HighwayModel, entropy, normalized_entropy
"""
from __future__ import annotations

__version__ = "0.1.0"

_API = {
    "HighwayModel": "deebert_cli.core.model.highway",
    "OffRamp": "deebert_cli.core.model.ramps",
    "RampConfig": "deebert_cli.core.model.policies",
    "entropy": "deebert_cli.core.model.policies",
    "normalized_entropy": "deebert_cli.core.model.policies",
    "Checkpoint": "deebert_cli.core.model.checkpoint",
    "load_checkpoint": "deebert_cli.core.model.checkpoint",
    "save_checkpoint": "deebert_cli.core.model.checkpoint",
    "ExitRule": "deebert_cli.core.runtime.rules",
    "PatienceRule": "deebert_cli.core.runtime.rules",
    "LearnedRule": "deebert_cli.core.runtime.rules",
    "predict_stream": "deebert_cli.core.runtime.stream",
    "resolve_device": "deebert_cli.core.device",
    "finetune": "deebert_cli.core.train.stage1",
    "train_exits": "deebert_cli.core.train.stage2",
    "analyze": "deebert_cli.core.analysis.report",
    "FinetuneConfig": "deebert_cli.core.config",
    "TrainExitsConfig": "deebert_cli.core.config",
    "PredictConfig": "deebert_cli.core.config",
    "AnalyzeConfig": "deebert_cli.core.config",
    "UserError": "deebert_cli.core.errors",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'deebert_cli' has no attribute {name!r}")
