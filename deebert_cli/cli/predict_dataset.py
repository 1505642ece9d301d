"""`deebert predict-dataset`: early-exit prediction over many files on Ray Data (extra `[ray]`)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import (ENTROPY_OPT, EXIT_POLICY_OPT, PATIENCE_OPT, THRESHOLD_OPT, THRESHOLDS_OPT, TOLERANCE_OPT,
                     CONFIG_OPT, DEVICE_OPT, ONNX_PRECISION_OPT, PRECISION_OPT, RUNTIME_OPT, err, make_config,
                     quiet_libraries, user_errors)


def predict_dataset(
    ctx: typer.Context,
    input: Optional[List[str]] = typer.Option(None, "--input", help="Required: files, folders or quoted globs ('corpus/*.jsonl'); repeat for more. Text (.txt, one text per line), JSONL (.jsonl/.json), CSV/TSV with a header, Parquet."),
    output: Optional[Path] = typer.Option(None, "--output", help="A new folder for the output shards (never overwritten). Required."),
    checkpoint: Path = typer.Option(Path("deebert-checkpoint"), help="Checkpoint from `deebert train-exits` (a path every Ray node can read)."),
    format: str = typer.Option("parquet", "--format", help="Output shards: parquet or jsonl."),
    input_format: str = typer.Option("auto", help="auto (by file suffix), text, jsonl, csv, tsv or parquet."),
    text_column: str = typer.Option("text", help="Column holding the text (tabular inputs)."),
    text_pair_column: Optional[str] = typer.Option(None, help="Column holding the second text of a sentence-pair checkpoint."),
    id_column: Optional[List[str]] = typer.Option(None, "--id-column", help="Input column(s) carried into the output to identify rows (repeat for more). Default: path (the input file) and row (0-based position in it)."),
    threshold: Optional[float] = THRESHOLD_OPT,
    thresholds: Optional[str] = THRESHOLDS_OPT,
    entropy: str = ENTROPY_OPT,
    exit_policy: str = EXIT_POLICY_OPT,
    patience: int = PATIENCE_OPT,
    tolerance: float = TOLERANCE_OPT,
    batch_size: int = typer.Option(32, help="Rows per model batch inside a worker."),
    engine: str = typer.Option("shrink", help="shrink or refill (as in `deebert predict`)."),
    max_length: Optional[int] = typer.Option(None, help="Maximum tokens per input (default: the checkpoint's)."),
    rows_per_batch: int = typer.Option(1024, help="Rows per Ray Data batch handed to a worker (sorted by length within it)."),
    concurrency: Optional[str] = typer.Option(None, help="Predictor actors: N, or MIN,MAX to autoscale (default: Ray's autoscaling pool)."),
    num_cpus: float = typer.Option(1.0, help="CPUs per predictor actor (also its torch threads)."),
    num_gpus: float = typer.Option(0.0, help="GPUs per predictor actor (e.g. 1, or 0.5 to share one GPU between two)."),
    max_retries: int = typer.Option(3, help="Times Ray restarts a dead worker and retries its batch (reads too) before the run fails."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray instance)."),
    local_cpus: Optional[int] = typer.Option(None, help="CPUs of a local Ray instance (default: all cores); ignored with --address."),
    object_store_mb: Optional[int] = typer.Option(None, help="Object store of a local Ray instance in MB (default: Ray's, 30% of memory); ignored with --address."),
    watch_rate: float = typer.Option(0.0, help="Share of rows also run to the last layer (column watch_disagreed: did the exit disagree); at the end, one line: the stored guarantee on this corpus (holds / inconclusive / exceeded, with anytime-valid bounds). 0: off."),
    watch_delta: Optional[float] = typer.Option(None, help="The watch's bounds hold with probability >= 1 - this (default: the stored guarantee's delta)."),
    watch_window: int = typer.Option(5000, help="Watched rows per block of the restarted confidence sequence that catches a shift in part of the corpus (0: the cumulative sequence alone)."),
    device: str = DEVICE_OPT,
    precision: str = PRECISION_OPT,
    runtime: str = RUNTIME_OPT,
    onnx_precision: str = ONNX_PRECISION_OPT,
    config: Optional[Path] = CONFIG_OPT,
):
    """Predict every row of many files on Ray Data: one output row per input row (empty texts marked
    empty), carrying the row's identifying columns, in Parquet or JSONL shards; then the exit summary."""
    values = dict(locals())
    for k in ("ctx", "config"):
        values.pop(k)
    values.update(checkpoint=str(checkpoint), output=str(output) if output else None)
    quiet_libraries()
    with user_errors("no output was written (shards go to a temporary folder first)"):
        from ..core.ray_data.pipeline import PredictDatasetConfig, predict_dataset as run
        from ..core.ray_data.predictor import require_ray

        cfg = make_config(ctx, PredictDatasetConfig, config, values)
        require_ray()
        summary = run(cfg, log=lambda m: err.print(f"[dim]deebert predict-dataset: {m}[/]"))
    from .predict import render_summary

    err.print(f"wrote {summary.stats.count} row(s) from {summary.files} file(s) to {summary.output}/ ({cfg.format} shards)")
    render_summary(summary.stats)
    if summary.watch is not None:
        from ..core.model.watch import verdict_line

        err.print(verdict_line(summary.watch), markup=False, highlight=False)
