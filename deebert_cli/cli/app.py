"""The ``deebert`` command: a thin Typer layer over ``deebert_cli.core`` (imports torch lazily)."""
from __future__ import annotations

import errno
import os
import sys

import typer

from . import analyze, calibrate, export, finetune, predict, predict_dataset, serve, train_exits

app = typer.Typer(
    name="deebert",
    help="DeeBERT early exits for BERT-family classifiers: fine-tune, train off-ramps, predict with early exit, analyze layers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help text as written: "[onnx]" in a pip command is not a markup tag
    context_settings={"help_option_names": ["-h", "--help"]},
)
# the command list shows one line each; `deebert COMMAND --help` shows the command's whole docstring
app.command("finetune", short_help="Stage 1: fine-tune the backbone and the final classifier.")(finetune.finetune)
app.command("train-exits", short_help="Stage 2: train the off-ramps on the frozen stage-1 model.")(train_exits.train_exits)
app.command("predict", short_help="Classify one text per line with early exit, in input order.")(predict.predict)
app.command("analyze", short_help="Per-layer accuracy, threshold sweep, recommended threshold.")(analyze.analyze)
app.command("calibrate", short_help="Certify a threshold on your texts: a budget that holds on new data.")(calibrate.calibrate)
app.command("export", short_help="Export ONNX graphs for --runtime onnx (fp32, int8).")(export.export)
app.command("serve", short_help="HTTP server (TEI-compatible) batching across requests.")(serve.serve)
app.command("predict-dataset", short_help="Predict many files on Ray Data, a row per input row.")(predict_dataset.predict_dataset)


def main() -> None:
    """Run the command; a standard output that cannot be written (``> /dev/full``, a closed pipe) ends any
    command in one line (exit 2) or quietly (exit 141, a reader that went away), never a traceback."""
    try:
        app()
    except SystemExit:
        _flush_stdout()
        raise
    except OSError as e:
        if not _stdout_broken(e):
            raise
        _stdout_failed(e)
    _flush_stdout()


def _stdout_broken(e: OSError) -> bool:
    """Whether ``e`` is a failed write to standard output: a write error naming no file (the commands write
    their files through core.files, which turns such failures into one-line errors), or a flush that fails."""
    if e.errno in (errno.ENOSPC, errno.EPIPE, errno.EIO, errno.EDQUOT) and e.filename is None:
        return True
    try:
        sys.stdout.flush()
        return False
    except OSError:
        return True


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except OSError as e:
        _stdout_failed(e)


def _stdout_failed(e: OSError) -> None:
    """One line on stderr (or nothing for a closed pipe), stdout pointed at /dev/null so that Python's own
    flush at exit has nothing left to fail on, then exit."""
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), sys.stdout.fileno())
    if e.errno == errno.EPIPE:
        os._exit(141)
    print(f"error: cannot write the results to standard output: {e.strerror or e}", file=sys.stderr)
    os._exit(2)


if __name__ == "__main__":
    main()
