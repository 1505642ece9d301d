"""`deebert train-exits`: DeeBERT stage 2."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import CONFIG_OPT, DEVICE_OPT, RichProgress, finish_distributed, make_config, quiet_libraries, user_errors
from .finetune import render_result


def train_exits(
    ctx: typer.Context,
    checkpoint: Path = typer.Option(Path("deebert-checkpoint"), help="Stage-1 checkpoint (from `deebert finetune`)."),
    output: Optional[Path] = typer.Option(None, help="Where to write (default: back into --checkpoint, atomically)."),
    epochs: float = typer.Option(3.0, help="Epochs over the cached per-layer states."),
    batch_size: int = typer.Option(32, help="Batch size."),
    lr: float = typer.Option(5e-4, help="AdamW learning rate for the off-ramps."),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay."),
    seed: int = typer.Option(42, help="Random seed (off-ramp init and batch order)."),
    ramp_pooling: str = typer.Option("auto", help="What an off-ramp reads: cls (first token, as DeeBERT), mean (over non-padding tokens), or auto: what the family's own head reads (cls; mean for a ModernBERT with classifier_pooling=mean)."),
    ramp_norm: bool = typer.Option(False, help="LayerNorm the off-ramp input first (helps backbones whose early [CLS] barely varies)."),
    distill: bool = typer.Option(False, help="Self-distillation: train each off-ramp on (1-alpha)*label loss + alpha*KL to the final classifier (FastBERT)."),
    distill_temperature: float = typer.Option(2.0, help="Softening temperature of the distillation targets."),
    distill_alpha: float = typer.Option(0.5, help="Weight of the distillation term in [0, 1]."),
    unlabeled: Optional[str] = typer.Option(None, help="Extra unlabeled texts for --distill: a .txt file (one per line) or a data file/folder with the text column."),
    calibrate: bool = typer.Option(False, help="Fit a temperature per off-ramp on the evaluation split (stored in the checkpoint), so entropy means the same at every layer."),
    learned_exits: bool = typer.Option(False, help="BERxiT: also train a learned exit per off-ramp (Linear(H,1) + sigmoid on its pooler output) predicting whether the off-ramp is right (regression: tanh(|error|)); predict with --exit-policy learned --threshold T."),
    dataset: Optional[str] = typer.Option(None, help="Override the dataset (default: the one the checkpoint was fine-tuned on; same columns)."),
    max_train_samples: Optional[int] = typer.Option(None, help="Use a seeded random subset of the training split."),
    device: str = DEVICE_OPT,
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 or fp16 for the frozen backbone pass that caches the off-ramp inputs (bf16: CPU and recent GPUs; fp16: GPUs); the small off-ramps train in fp32."),
    config: Optional[Path] = CONFIG_OPT,
):
    """Stage 2: freeze backbone and final classifier, train the off-ramps of layers 1..L-1 on the mean of
    their cross-entropy losses. The frozen backbone runs once (eval mode, no dropout) to cache what every
    off-ramp reads, so this stage costs about one inference pass plus cheap epochs."""
    values = dict(locals())
    values.pop("ctx"), values.pop("config")
    values["checkpoint"] = str(checkpoint)
    values["output"] = str(output) if output else None
    quiet_libraries()
    from ..core.distributed import is_main_process

    with user_errors(f"no new checkpoint was written; '{output or checkpoint}' is as it was"):
        from ..core.config import TrainExitsConfig
        from ..core.training import train_exits as run

        cfg = make_config(ctx, TrainExitsConfig, config, values)
        result = run(cfg, RichProgress())
    if is_main_process():  # under accelerate launch, one report
        render_result(result)
    finish_distributed()
