"""Shared CLI plumbing: config precedence, error rendering, rich progress. Typer + rich only here."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import typer
from rich.console import Console, ConsoleDimensions

# the width given to a console that writes to a file or pipe: tables keep whole headers and cells
PIPE_WIDTH = 1000


class _Console(Console):
    """rich's Console, but wide when it does not write to a terminal: a file or pipe has no width, and at
    rich's 80 columns table headers were cut to "thres…" and lines broken mid-sentence. A terminal keeps
    its own width."""

    def _wide_size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        return size if self.is_terminal else ConsoleDimensions(max(size.width, PIPE_WIDTH), size.height)

    size = property(_wide_size, Console.size.fset)


err = _Console(stderr=True, highlight=False, soft_wrap=True)
out = _Console(highlight=False)

DEVICE_OPT = typer.Option("auto", "--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")
CONFIG_OPT = typer.Option(None, "--config", help="YAML file of options (flags given on the command line win).")
PRECISION_OPT = typer.Option("fp32", "--precision", help="fp32, bf16 or fp16: autocast to that precision where the device supports it (bf16: CPU and recent GPUs; fp16: GPUs).")
RUNTIME_OPT = typer.Option("torch", "--runtime", help="torch (any device; autocast with --precision) or onnx (the graphs of `deebert export`, run by ONNX Runtime on the CPU without torch; needs pip install 'deebert-cli[onnx]').")
ONNX_PRECISION_OPT = typer.Option("fp32", "--onnx-precision", help="With --runtime onnx: fp32, or int8 (the graphs of `deebert export --quantize int8`: faster, slightly less accurate).")
# the exit rule, shared by predict, serve and predict-dataset
THRESHOLD_OPT = typer.Option(None, "--threshold", help="Exit when the off-ramp's entropy is below this. Normalized entropy (0..1) by default, nats with --entropy raw. 0 runs every input to the last layer; at or above the maximum exits everyone at layer 1. Default: thresholds stored in the checkpoint, else 0.3. With --exit-policy learned: the learned exit score in [0, 1] (default 0.9; regression 0.1).")
THRESHOLDS_OPT = typer.Option(None, "--thresholds", help="One threshold per layer 1..L-1, comma-separated (overrides --threshold).")
ENTROPY_OPT = typer.Option("normalized", "--entropy", help="Threshold unit: normalized (entropy / ln C, in [0, 1]) or raw (nats, as in the DeeBERT paper).")
EXIT_POLICY_OPT = typer.Option("entropy", "--exit-policy", help="entropy (DeeBERT: exit when the off-ramp's entropy is below the threshold), patience (PABEE: exit once --patience + 1 consecutive off-ramps predict the same class) or learned (BERxiT: exit when the learned exit's score crosses --threshold; needs train-exits --learned-exits).")
PATIENCE_OPT = typer.Option(None, "--patience", help="Patience policy: exit at the first layer whose prediction equals those of the N layers before it (0 exits at layer 1). Default: the patience the checkpoint's guarantee certifies (deebert calibrate --exit-policy patience), else 3.")
TOLERANCE_OPT = typer.Option(0.1, "--tolerance", help="Patience policy on a regression checkpoint: consecutive off-ramp values agree when they differ by less than this.")


def quiet_libraries(transformers: bool = True) -> None:
    """Silence transformers/hub progress bars and warnings: our output is the progress a user reads.
    ``transformers=False`` (the onnx runtime) only sets the environment and imports nothing."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if not transformers:
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # transformers missing or changed: only cosmetics are lost
        pass


def fail(message: str, code: int = 2):
    from ..core.launch import is_launched, process_index

    from rich.markup import escape

    where = f"process {process_index()}: " if is_launched() else ""
    err.print(f"[bold red]error:[/] {escape(where + message)}", soft_wrap=True)  # escape: "[plot]" is no markup
    finish_distributed(code)
    raise typer.Exit(code)


def finish_distributed(code: int = 0) -> None:
    """Under `accelerate launch`: end the process group (after a barrier when the command succeeded) and
    leave at once with ``code``. A model loaded by transformers keeps Gloo's worker threads alive past
    ``destroy_process_group``, and at interpreter teardown they can abort the process ("terminate called
    without an active exception", SIGABRT) after all the work is done; everything is written and flushed
    by now, so skipping that teardown loses nothing. A plain run returns and exits normally."""
    from ..core.launch import is_launched, shutdown

    if not is_launched():
        return
    shutdown(sync=code == 0)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


@contextlib.contextmanager
def user_errors(interrupted_note=""):
    """UserError -> one red line, exit 2; Ctrl-C -> one line, exit 130, with ``interrupted_note`` (a
    string, or a function giving one when it happens: what is left, and what a rerun does). Bugs keep
    their traceback."""
    from ..core.errors import UserError
    from ..core.files import OutputClosed

    try:
        yield
    except OutputClosed:  # the reader of stdout went away (`| head`): end quietly, as a shell tool does
        raise typer.Exit(141)
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        note = interrupted_note() if callable(interrupted_note) else interrupted_note
        err.print(f"interrupted{': ' + note if note else ''}", markup=False)
        raise typer.Exit(130)


def explicit_flags(ctx: typer.Context, values: dict[str, Any], params: dict[str, str] | None = None) -> dict[str, Any]:
    """Only the options the user typed (so that a --config file is not overridden by flag defaults).
    ``params`` maps a config field to its parameter name where they differ."""
    keep = {}
    for name, value in values.items():
        src = ctx.get_parameter_source((params or {}).get(name, name))
        # compare by name: typer may ship its own click, whose enum is not click.core's
        if src is not None and getattr(src, "name", str(src)) not in ("DEFAULT", "DEFAULT_MAP"):
            keep[name] = value
    return keep


def make_config(ctx: typer.Context, cls, config_file, values: dict[str, Any], params: dict[str, str] | None = None):
    """defaults < --config YAML < typed flags -> validated ``cls``."""
    from ..core.config import build_config, read_yaml

    file_values = read_yaml(config_file) if config_file else {}
    return build_config(cls, file_values, explicit_flags(ctx, values, params), f"config file '{config_file}'")


def live_progress() -> bool:
    """Live progress bars only on a terminal: written to a file or pipe, rich repeats the bars of every
    earlier task at each stop. ``DEEBERT_NO_PROGRESS`` silences progress altogether."""
    return err.is_terminal and not os.environ.get("DEEBERT_NO_PROGRESS")


class RichProgress:
    """Progress of core.train.common.Progress: on a terminal a rich bar with loss, examples/s and ETA (a
    fresh one per task, so earlier tasks are not drawn again); to a file or pipe one line when a task
    starts and one when it ends; nothing with ``DEEBERT_NO_PROGRESS``."""

    def __init__(self):
        self._p = self._task = None
        self._line = None  # to a file or pipe: [description, total, done, fields, start time]

    def start(self, description: str, total: int) -> None:
        if live_progress():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._p = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  {task.fields[ex_s]:.0f} ex/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err, transient=False,
            )
            self._p.start()
            self._task = self._p.add_task(description, total=total, loss=float("nan"), ex_s=0.0)
        elif not os.environ.get("DEEBERT_NO_PROGRESS"):
            import time

            self._line = [description, total, 0, {}, time.perf_counter()]
            err.print(f"{description}: {total} steps", markup=False)

    def update(self, advance: int = 1, **fields) -> None:
        if self._p is not None:
            self._p.update(self._task, advance=advance, **fields)
        elif self._line is not None:
            self._line[2] += advance
            self._line[3].update(fields)

    def stop(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None
        elif self._line is not None:
            import time

            description, total, done, fields, t0 = self._line
            figures = [f"loss {fields['loss']:.4f}" if "loss" in fields else "",
                       f"{fields['ex_s']:.0f} ex/s" if "ex_s" in fields else "", f"{time.perf_counter() - t0:.1f} s"]
            err.print(f"{description}: {done}/{total} steps, " + ", ".join(f for f in figures if f), markup=False)
            self._line = None

    def log(self, message: str) -> None:
        err.print(f"[dim]{message}[/]")

    def warn(self, message: str) -> None:
        from rich.markup import escape

        err.print(f"[yellow]warning:[/] {escape(message)}")


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def time_saving(saving: float, noise: float | None = None) -> str:
    """A measured wall-clock saving in words: '36.70% less time', or '49.27% more time' when it was slower;
    'noisy measurement (±40.00%)' when the repeated runs disagree by more than the analysis allows
    (core.analysis.report.TIMING_NOISY): a busy machine, whose figure would be confidently wrong."""
    from ..core.analysis.report import TIMING_NOISY

    if noise is not None and noise > TIMING_NOISY:
        return f"time: noisy measurement (±{pct(noise)}; the timed runs disagree: rerun on an idle machine)"
    return f"{pct(saving)} less time" if saving >= 0 else f"{pct(-saving)} more time"


def stdin_is_tty() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()
