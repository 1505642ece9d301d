"""The ``deebert`` command: a thin Typer layer over ``deebert_cli.core`` (imports torch lazily)."""
from __future__ import annotations

import typer

from . import analyze, export, finetune, predict, predict_dataset, serve, train_exits

app = typer.Typer(
    name="deebert",
    help="DeeBERT early exits for BERT-family classifiers: fine-tune, train off-ramps, predict with early exit, analyze layers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("finetune")(finetune.finetune)
app.command("train-exits")(train_exits.train_exits)
app.command("predict")(predict.predict)
app.command("analyze")(analyze.analyze)
app.command("export")(export.export)
app.command("serve")(serve.serve)
app.command("predict-dataset")(predict_dataset.predict_dataset)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
