"""`deebert serve`: a TEI-compatible HTTP server batching early-exit rows across requests."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import (ENTROPY_OPT, EXIT_POLICY_OPT, PATIENCE_OPT, THRESHOLD_OPT, THRESHOLDS_OPT, TOLERANCE_OPT,
                     CONFIG_OPT, DEVICE_OPT, ONNX_PRECISION_OPT, PRECISION_OPT, RUNTIME_OPT, err, make_config,
                     quiet_libraries, user_errors)


def serve(
    ctx: typer.Context,
    checkpoint: Path = typer.Option(Path("deebert-checkpoint"), help="Checkpoint from `deebert train-exits`."),
    threshold: Optional[float] = THRESHOLD_OPT,
    thresholds: Optional[str] = THRESHOLDS_OPT,
    entropy: str = ENTROPY_OPT,
    exit_policy: str = EXIT_POLICY_OPT,
    patience: int = PATIENCE_OPT,
    tolerance: float = TOLERANCE_OPT,
    batch_size: int = typer.Option(32, help="Rows per layer step (rows of different requests share a step)."),
    max_length: Optional[int] = typer.Option(None, help="Maximum tokens per input (default: the checkpoint's)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    batching: bool = typer.Option(True, "--batching/--no-batching", help="Batch rows across requests (refill engine), or run each request alone."),
    max_batch_tokens: int = typer.Option(16384, help="Token budget per layer step: rows per step are capped at this / --max-length."),
    max_concurrent_requests: int = typer.Option(512, help="Requests admitted at once (queued or running); more get 429 with Retry-After."),
    max_wait_ms: float = typer.Option(0.0, help="After new rows arrive, wait up to this long for more before running a part-full step."),
    max_lag: Optional[int] = typer.Option(None, help="A row waiting in a part-full layer queue runs once this many newer rows have passed it (default: --batch-size). Lower: lower p99, a little less throughput."),
    max_client_batch_size: int = typer.Option(32, help="Inputs per request; more get 413."),
    max_input_bytes: int = typer.Option(16384, help="UTF-8 bytes per input text; more get 413."),
    auto_truncate: bool = typer.Option(True, "--auto-truncate/--no-auto-truncate", help="Truncate over-long inputs as predict does when a request does not say (`truncate`); otherwise they get 413."),
    access_log: bool = typer.Option(True, "--access-log/--no-access-log", help="Log one line per request on stderr: its id (X-Request-Id), client, method, path, status and time."),
    watch_rate: float = typer.Option(0.01, help="Share of requests whose rows also run to the last layer after answering, to watch the stored guarantee on live traffic (/info, /metrics, a log line when its state changes); 0 turns it off."),
    watch_delta: Optional[float] = typer.Option(None, help="The watch's bounds hold at every time with probability >= 1 - this (default: the stored guarantee's delta)."),
    watch_window: int = typer.Option(5000, help="Watched rows per block of the restarted confidence sequence that catches drift in a bounded number of rows whatever came before (0: the cumulative sequence alone)."),
    watch_log: Optional[Path] = typer.Option(None, help="Keep the watched texts in this folder (JSON Lines, rotated) for `deebert calibrate --unlabeled DIR`; nothing is kept without it."),
    watch_log_lines: int = typer.Option(10000, help="Texts per --watch-log file."),
    watch_log_files: int = typer.Option(10, help="--watch-log files kept; the oldest are removed."),
    device: str = DEVICE_OPT,
    precision: str = PRECISION_OPT,
    runtime: str = RUNTIME_OPT,
    onnx_precision: str = ONNX_PRECISION_OPT,
    config: Optional[Path] = CONFIG_OPT,
):
    """Serve the checkpoint over HTTP, compatible with text-embeddings-inference: POST /predict
    {"inputs": "text" | ["t1", "t2"] | [["a", "b"]]} answers every label with its score, plus exit_layer
    and entropy; GET / is a page to try it, /health, /info, /metrics (Prometheus). One worker owns the
    model and batches rows across concurrent requests. SIGTERM or Ctrl-C drains: new requests get 503
    with Retry-After while the admitted ones finish, then it stops (SIGTERM: exit status 0)."""
    values = dict(locals())
    for k in ("ctx", "config"):
        values.pop(k)
    values["checkpoint"] = str(checkpoint)
    values["watch_log"] = str(watch_log) if watch_log else None
    quiet_libraries()
    with user_errors("accepted requests were finished"):
        from ..core.serve.config import ServeConfig
        from ..core.serve.batching import check_serve_extra

        cfg = make_config(ctx, ServeConfig, config, values)
        check_serve_extra()
        from ..core.serve.http import serve as run_server

        from .. import __version__

        run_server(cfg, announce=lambda message: err.print(f"[dim]{message}[/]"), version=__version__)
