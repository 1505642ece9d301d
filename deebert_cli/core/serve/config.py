"""``deebert serve``'s run configuration (a validated dataclass, like the others in :mod:`..config`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import DEFAULT_CHECKPOINT, PredictConfig, _check, _check_types, parse_thresholds


@dataclass
class ServeConfig:
    """`deebert serve`: an HTTP server (TEI-compatible /predict) batching rows across requests."""

    checkpoint: str = DEFAULT_CHECKPOINT
    threshold: float | None = None  # as predict: None = the checkpoint's stored thresholds, else 0.3
    thresholds: list | None = None
    entropy: str = "normalized"
    exit_policy: str = "entropy"
    patience: int | None = None  # None: the certified value, else 3
    tolerance: float = 0.1
    batch_size: int = 32  # rows per layer step
    max_length: int | None = None  # tokens per input (default: the checkpoint's)
    device: str = "auto"
    precision: str = "fp32"
    runtime: str = "torch"  # torch, or onnx (the graphs of `deebert export`)
    onnx_precision: str = "fp32"  # onnx runtime: fp32 or int8
    host: str = "127.0.0.1"
    port: int = 8000
    batching: bool = True  # False: each request runs alone (no rows shared across requests)
    max_batch_tokens: int = 16384  # rows per step are capped at max_batch_tokens // max_length
    max_concurrent_requests: int = 512  # admitted (queued or running) requests; more get 429
    max_wait_ms: float = 0.0  # how long new rows may wait for company before a part-full step
    max_lag: int | None = None  # newer rows that may pass a waiting row before its part-full step runs (None: batch_size)
    max_client_batch_size: int = 32  # inputs per request; more get 413
    max_input_bytes: int = 16384  # UTF-8 bytes per input text; more get 413
    auto_truncate: bool = True  # over-long inputs are truncated as predict does (False: 413)
    access_log: bool = True  # one log line per request (with its id) on stderr
    watch_rate: float = 0.01  # share of requests also run to the last layer to watch the guarantee (0: off)
    watch_delta: float | None = None  # confidence of the watch's bounds (None: the stored guarantee's delta)
    watch_window: int = 5000  # watched rows per block of the restarted sequence that catches drift (0: none)
    watch_log: str | None = None  # a folder for the watched texts (None: none kept)
    watch_log_lines: int = 10000  # texts per watch-log file
    watch_log_files: int = 10  # watch-log files kept (the oldest go)

    def __post_init__(self):
        _check_types(self)
        PredictConfig(checkpoint=self.checkpoint, threshold=self.threshold, thresholds=self.thresholds,
                      entropy=self.entropy, exit_policy=self.exit_policy, patience=self.patience,
                      tolerance=self.tolerance, batch_size=self.batch_size, max_length=self.max_length,
                      precision=self.precision, window=max(1024, self.batch_size), runtime=self.runtime,
                      onnx_precision=self.onnx_precision)  # the options they share
        self.thresholds = parse_thresholds(self.thresholds)
        _check(0 <= self.port <= 65535, f"port must be in 0..65535, got {self.port}")
        _check(bool(self.host.strip()), "host must not be empty")
        _check(not self.host.strip().isdigit(), f"host must be a host name or an IP address, got {self.host!r} (a port goes in --port)")
        _check(self.max_batch_tokens > 0, f"max_batch_tokens must be > 0, got {self.max_batch_tokens}")
        _check(self.max_concurrent_requests > 0, f"max_concurrent_requests must be > 0, got {self.max_concurrent_requests}")
        _check(math.isfinite(self.max_wait_ms) and self.max_wait_ms >= 0, f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        _check(self.max_lag is None or self.max_lag >= 1, f"max_lag must be >= 1, got {self.max_lag}")
        _check(self.max_client_batch_size > 0, f"max_client_batch_size must be > 0, got {self.max_client_batch_size}")
        _check(self.max_input_bytes > 0, f"max_input_bytes must be > 0, got {self.max_input_bytes}")
        _check(math.isfinite(self.watch_rate) and 0 <= self.watch_rate <= 1, f"watch_rate must be in [0, 1], got {self.watch_rate}")
        _check(self.watch_delta is None or 0 < self.watch_delta < 1, f"watch_delta must be in (0, 1), got {self.watch_delta}")
        _check(self.watch_window >= 0, f"watch_window must be >= 0 (0: no window), got {self.watch_window}")
        _check(self.watch_log is None or bool(str(self.watch_log).strip()), "watch_log must be a folder, got an empty name")
        _check(self.watch_log is None or self.watch_rate > 0, "watch_log needs watch_rate > 0 (nothing is watched at 0)")
        _check(self.watch_log_lines >= 1, f"watch_log_lines must be >= 1, got {self.watch_log_lines}")
        _check(self.watch_log_files >= 1, f"watch_log_files must be >= 1, got {self.watch_log_files}")
