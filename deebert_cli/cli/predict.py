"""`deebert predict`: early-exit prediction, one result line per input line."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .common import (ENTROPY_OPT, EXIT_POLICY_OPT, PATIENCE_OPT, THRESHOLD_OPT, THRESHOLDS_OPT, TOLERANCE_OPT,
                     CONFIG_OPT, DEVICE_OPT, ONNX_PRECISION_OPT, PRECISION_OPT, RUNTIME_OPT, err, finish_distributed,
                     make_config, quiet_libraries, user_errors)


def predict(
    ctx: typer.Context,
    checkpoint: Path = typer.Option(Path("deebert-checkpoint"), help="Checkpoint from `deebert train-exits`."),
    threshold: Optional[float] = THRESHOLD_OPT,
    thresholds: Optional[str] = THRESHOLDS_OPT,
    entropy: str = ENTROPY_OPT,
    exit_policy: str = EXIT_POLICY_OPT,
    patience: int = PATIENCE_OPT,
    tolerance: float = TOLERANCE_OPT,
    batch_size: int = typer.Option(32, help="Rows per batch; rows that exit leave the batch."),
    engine: str = typer.Option("shrink", help="shrink (exited rows leave the batch), refill (per-layer queues refilled from the input), static (refill with static shapes; CUDA graphs on CUDA) or auto (on CUDA: static, or full depth where the checkpoint's GPU measurement says early exit cannot pay; elsewhere shrink)."),
    window: int = typer.Option(1024, help="Lines read at a time (sorted by length within a window to cut padding)."),
    max_length: Optional[int] = typer.Option(None, help="Maximum tokens per input (default: the checkpoint's); longer lines are truncated."),
    format: str = typer.Option("text", "--format", help="text, jsonl or tsv (tsv starts with one header line)."),
    all_probs: bool = typer.Option(False, help="Add the probability of every class."),
    input: Optional[Path] = typer.Option(None, "--input", help="Read lines from FILE instead of stdin (a tab separates the texts of a pair)."),
    output: Optional[Path] = typer.Option(None, "--output", help="Write results to FILE instead of stdout."),
    summary: bool = typer.Option(True, help="Print a summary on stderr at the end (count, exit histogram, mean exit layer, layer saving, examples/s)."),
    device: str = DEVICE_OPT,
    precision: str = PRECISION_OPT,
    runtime: str = RUNTIME_OPT,
    onnx_precision: str = ONNX_PRECISION_OPT,
    config: Optional[Path] = CONFIG_OPT,
):
    """Read one text per line (stdin or --input), exit early at the first layer whose off-ramp is
    confident enough, write one result per line in input order: label, confidence, exit_layer (1-based)
    and the entropy at that exit. Empty lines give a row marked empty. Under `accelerate launch` (with
    --input FILE) every process predicts a strided share of the lines and the main process writes the
    one ordered output."""
    values = dict(locals())
    for k in ("ctx", "config"):
        values.pop(k)
    values["checkpoint"] = str(checkpoint)
    values["input"] = str(input) if input else None
    values["output"] = str(output) if output else None
    note = f"'{output}' was not written (a file there before is as it was)" if output else \
        "output so far is complete up to the last line written"
    with user_errors(note):
        cfg, rt, ckpt, rule = load_run(ctx, config, values)
        stats = write_results(cfg, rt, ckpt, rule)
    if rt.is_main:  # under accelerate launch only the main process writes and reports
        report(cfg, ckpt, stats)
    finish_distributed()


def load_run(ctx: typer.Context, config: Optional[Path], values: dict) -> tuple:
    """The resolved config, the process (torch or onnx), the checkpoint for inference and its exit rule;
    the main process announces them. -> (cfg, runtime, checkpoint, rule)."""
    from ..core.config import PredictConfig
    from ..core.errors import UserError
    from ..core.data.encoding import fit_max_length
    from ..core.files import check_input_file, check_outputs
    from ..core.runtime.rules import resolve_rule
    from ..core.runtime.stream import load_for_inference

    cfg = make_config(ctx, PredictConfig, config, values)
    onnx = cfg.runtime == "onnx"
    quiet_libraries(transformers=not onnx)
    rt = onnx_process(cfg.device) if onnx else torch_runtime(cfg.device, cfg.precision)
    dev = rt.device
    if cfg.input:
        check_input_file(cfg.input, "input file", "--input")
    check_outputs({"--output": cfg.output}, {"--input": cfg.input}, cfg.checkpoint)
    if rt.distributed and not cfg.input:
        raise UserError("under accelerate launch every process reads the input: pass --input FILE (not stdin)")
    ckpt = load_for_inference(cfg.checkpoint, cfg.runtime, dev, **({"precision": cfg.onnx_precision} if onnx else {}))
    cfg.max_length, warning = fit_max_length(cfg.max_length, ckpt.model.max_tokens)
    if warning and rt.is_main:
        err.print(f"[yellow]warning:[/] {warning}")
    rule, source = resolve_rule(ckpt, cfg.threshold, cfg.thresholds, cfg.entropy, policy=cfg.exit_policy,
                                patience=cfg.patience, tolerance=cfg.tolerance)
    if cfg.engine == "auto" and not onnx:
        rule = _auto_engine(cfg, ckpt, dev, rule)
    if rt.is_main:
        where = f"{rt.world} processes" if rt.distributed else (
            f"onnx runtime ({cfg.onnx_precision}, CPU)" if onnx else f"device {dev}")
        err.print(f"[dim]deebert predict: {rule.describe()} ({source}); {ckpt.model.num_layers} layers; {where}; engine {cfg.engine}[/]")
    return cfg, rt, ckpt, rule


def _auto_engine(cfg, ckpt, device, rule):
    """``--engine auto``: the engine :func:`~..core.runtime.static_engine.plan_engine` picks goes into
    ``cfg``; where early exit cannot pay, one line says so and the rule becomes full depth -> the rule."""
    from ..core.runtime.rules import ExitRule
    from ..core.runtime.static_engine import plan_engine

    plan = plan_engine(ckpt.meta, device, cfg.batch_size, cfg.precision)
    cfg.engine = plan.engine
    if plan.note:
        err.print(f"[yellow]note:[/] {plan.note}")
    return ExitRule([0.0] * ckpt.model.num_layers, rule.entropy) if plan.full_depth else rule


def write_results(cfg, rt, ckpt, rule):
    """Predict every input line and write one result line each, in input order (to a temporary sibling of
    --output, renamed when complete, or to stdout) -> the run's PredictStats."""
    from ..core.errors import UserError
    from ..core.files import atomic_text_file, stdout_sink
    from ..core.runtime.stream import PredictStats, predict_sharded, predict_stream, read_lines

    L, names = ckpt.model.num_layers, ckpt.label_names
    stats = PredictStats(L)
    interactive = cfg.input is None and sys.stdin.isatty()
    bs, win = (1, 1) if interactive else (cfg.batch_size, cfg.window)
    main = rt.is_main  # under accelerate launch only the main process writes and reports
    src = open(cfg.input, "rb") if cfg.input else sys.stdin.buffer
    # --output is written to a temporary sibling and renamed when complete: a file there is never half
    sink = atomic_text_file(cfg.output) if cfg.output and main else contextlib.nullcontext(stdout_sink(sys.stdout))
    try:
        with sink as dst:
            if ckpt.task == "regression" and cfg.all_probs:
                raise UserError("--all-probs needs class probabilities; a regression checkpoint predicts a value")
            fmt = Formatter(cfg.format, names, L, rule.entropy, cfg.all_probs, ckpt.task == "regression")
            if fmt.header and main:
                dst.write(fmt.header + "\n")
            kw = dict(batch_size=bs, window=win, max_length=cfg.max_length, engine=cfg.engine,
                      all_probs=cfg.all_probs, stats=stats, precision=cfg.precision)
            if rt.distributed:
                results = predict_sharded(ckpt, read_lines(src, stats), rule, rt, **kw)
            else:
                results = predict_stream(ckpt, read_lines(src, stats), rule, rt.device, **kw)
            for k, r in enumerate(results, 1):
                dst.write(fmt(r) + "\n")
                if interactive or k % bs == 0:
                    dst.flush()
            dst.flush()
    finally:
        if cfg.input:
            src.close()
    return stats


def report(cfg, ckpt, stats) -> None:
    """The end of a run on stderr: lines with replaced bytes, truncated lines, and the summary."""
    if stats.replaced:
        err.print(f"[yellow]warning:[/] {stats.replaced} line(s) had bytes that are not UTF-8; they were replaced with U+FFFD")
    if stats.truncated:
        err.print(f"[yellow]warning:[/] {stats.truncated} line(s) were longer than {cfg.max_length or ckpt.meta.get('max_length', 128)} tokens and were truncated")
    if cfg.summary:
        render_summary(stats)


def torch_runtime(device: str, precision: str):
    from ..core.launch import Runtime

    return Runtime(device, precision)


def onnx_process(device: str):
    """The onnx runtime's one process on the CPU (no torch: core.launch.Runtime resolves devices with it)."""
    from types import SimpleNamespace

    from ..core.launch import is_launched
    from ..core.errors import UserError

    if is_launched():
        raise UserError("--runtime onnx runs in one process: drop `accelerate launch`, or use --runtime torch")
    if device not in ("auto", "cpu"):
        raise UserError(f"--runtime onnx runs on the CPU: use --device cpu (or auto), or --runtime torch for '{device}'")
    return SimpleNamespace(device=None, distributed=False, is_main=True, world=1)


class Formatter:
    """One Prediction -> one output line in text, jsonl or tsv."""

    def __init__(self, fmt: str, names: list, layers: int, entropy: str, all_probs: bool, regression: bool = False):
        self.fmt, self.names, self.L, self.all_probs, self.regression = fmt, names, layers, all_probs, regression
        self.ent_col = "entropy_normalized" if entropy == "normalized" else "entropy_nats"
        self.header = None
        if fmt == "tsv" and regression:
            self.header = "\t".join(["value", "exit_layer", "empty"])
        elif fmt == "tsv":
            cols = ["label", "confidence", "exit_layer", self.ent_col, "empty"]
            cols += [f"prob_{n}" for n in names] if all_probs else []
            self.header = "\t".join(cols)

    def __call__(self, r) -> str:
        if self.regression:
            return self._value(r)
        if self.fmt == "jsonl":
            d = {"label": None, "confidence": None, "exit_layer": None, "entropy": None, "empty": True}
            if not r.empty:
                d = {"label": self.names[r.label], "confidence": round(r.confidence, 6), "exit_layer": r.exit_layer,
                     "entropy": round(r.entropy, 6), "empty": False}
                if r.probs is not None:
                    d["probs"] = {n: round(p, 6) for n, p in zip(self.names, r.probs)}
            return json.dumps(d, ensure_ascii=False)
        if self.fmt == "tsv":
            if r.empty:
                return "\t".join(["", "", "", "", "1"] + ([""] * len(self.names) if self.all_probs else []))
            cells = [self.names[r.label], f"{r.confidence:.6f}", str(r.exit_layer), f"{r.entropy:.6f}", "0"]
            cells += [f"{p:.6f}" for p in r.probs] if r.probs is not None else []
            return "\t".join(cells)
        if r.empty:
            return "<empty>"
        line = f"{self.names[r.label]}\t{r.confidence:.4f}\texit {r.exit_layer}/{self.L}\tentropy {r.entropy:.4f}"
        if r.probs is not None:
            line += "\t" + " ".join(f"{n}={p:.4f}" for n, p in zip(self.names, r.probs))
        return line


    def _value(self, r) -> str:
        """A regression result: the value and its exit layer."""
        if self.fmt == "jsonl":
            d = {"value": None, "exit_layer": None, "empty": True} if r.empty else \
                {"value": round(r.value, 6), "exit_layer": r.exit_layer, "empty": False}
            return json.dumps(d)
        if self.fmt == "tsv":
            return "\t".join(["", "", "1"] if r.empty else [f"{r.value:.6f}", str(r.exit_layer), "0"])
        return "<empty>" if r.empty else f"{r.value:.4f}\texit {r.exit_layer}/{self.L}"


def render_summary(stats) -> None:
    n = stats.predicted
    err.print(f"[bold]summary:[/] {stats.count} line(s), {n} predicted, {stats.empty} empty; "
              f"{stats.examples_per_second:.1f} examples/s")
    if n:
        hist = "  ".join(f"L{i + 1}:{c}" for i, c in enumerate(stats.histogram))
        err.print(f"exit layers: {hist}")
        err.print(f"mean exit layer {stats.mean_exit_layer:.2f} of {stats.num_layers}; layer saving {100 * stats.layer_saving:.1f}% vs full depth")
