"""`deebert analyze`: how the layers behave, and which threshold to use."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import (CONFIG_OPT, DEVICE_OPT, ONNX_PRECISION_OPT, RUNTIME_OPT, err, make_config, out, pct, quiet_libraries,
                     time_saving, user_errors)


def analyze(
    ctx: typer.Context,
    checkpoint: Path = typer.Option(Path("deebert-checkpoint"), help="Checkpoint from `deebert train-exits`."),
    layers: bool = typer.Option(True, "--layers/--no-layers", help="Show the accuracy of every off-ramp (table and bar chart)."),
    dataset: Optional[str] = typer.Option(None, help="Evaluation data (default: the checkpoint's)."),
    text_column: Optional[str] = typer.Option(None, help="Text column (default: the checkpoint's)."),
    text_pair_column: Optional[str] = typer.Option(None, help="Second text column (default: the checkpoint's)."),
    label_column: Optional[str] = typer.Option(None, help="Label column (default: the checkpoint's)."),
    split: Optional[str] = typer.Option(None, help="Split to analyze (default: the evaluation split the checkpoint was trained with)."),
    test_split: Optional[str] = typer.Option("test", help="Split on which to check how the recommendation holds (if the dataset has it)."),
    thresholds: Optional[str] = typer.Option(None, help="Thresholds to sweep, comma-separated (default: a grid over [0, 1], or [0, ln C] with --entropy raw)."),
    entropy: str = typer.Option("normalized", help="Threshold unit: normalized (0..1) or raw (nats)."),
    max_drop: float = typer.Option(0.5, help="Accuracy budget in percentage points for the recommended threshold."),
    per_layer: bool = typer.Option(False, help="Also search one threshold per layer for the --max-drop budget (on this split)."),
    store_thresholds: bool = typer.Option(False, help="Store the recommended threshold(s) (per-layer ones with --per-layer) in the checkpoint; predict uses them when given no threshold."),
    replace_guarantee: bool = typer.Option(False, "--replace-guarantee", help="With --store-thresholds: allow a point estimate (no guarantee) to replace a certified entropy threshold and drop its guarantee."),
    timing_thresholds: Optional[str] = typer.Option(None, help="Extra thresholds to time with real early-exit runs (full depth and the recommendation are always timed)."),
    timing_repeats: int = typer.Option(2, help="Timed runs per threshold, at least (interleaved; the fastest is kept); more rounds run, up to 10 or 60 s, until the two fastest runs of every threshold agree within 3%. A saving still less certain than 5% of the full-depth time is shown as a noisy measurement, not a figure."),
    batch_size: int = typer.Option(32, help="Batch size of the passes and timed runs."),
    patience: Optional[str] = typer.Option(None, help="Patience values to sweep for the patience policy (PABEE), comma-separated (default: 0..L-1)."),
    exit_policy: Optional[str] = typer.Option(None, help="Exit policies to compare side by side, comma-separated among entropy, patience, learned (default: every one that applies: entropy for classification, learned with learned exits)."),
    learned_thresholds: Optional[str] = typer.Option(None, help="Learned-exit thresholds to sweep, comma-separated in [0, 1] (checkpoints trained with --learned-exits; default: a grid over [0, 1])."),
    tolerance: float = typer.Option(0.1, help="Regression checkpoints: consecutive off-ramp values agree when they differ by less than this (patience sweep)."),
    examples: int = typer.Option(3, help="Evaluation texts to show per exit layer."),
    example_threshold: Optional[float] = typer.Option(None, help="Threshold for the examples by exit layer (default: the recommended one)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every figure to this JSON file."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw accuracy vs saving and the exit histogram to this PNG (needs matplotlib)."),
    device: str = DEVICE_OPT,
    runtime: str = typer.Option("torch", "--runtime", help="Runtime of the timed runs: torch, or onnx (the graphs of `deebert export`; the export's own accuracy is then reported beside the exact torch fp32 figures)."),
    onnx_precision: str = ONNX_PRECISION_OPT,
    config: Optional[Path] = CONFIG_OPT,
):
    """Per-layer accuracy, an exact threshold sweep from one all-exits pass (accuracy, mean exit layer,
    layer saving, exit histogram), measured wall-clock at chosen thresholds, the threshold recommended for
    an accuracy budget, dead-weight layers, and examples by exit layer."""
    values = dict(locals())
    for k in ("ctx", "config", "layers", "json_path"):
        values.pop(k)
    values["json"] = str(json_path) if json_path else None
    values["checkpoint"] = str(checkpoint)
    values["plot"] = str(plot) if plot else None
    quiet_libraries()
    with user_errors():
        from ..core.analysis.plots import plot_analysis
        from ..core.analysis.report import analyze as run
        from ..core.config import AnalyzeConfig

        cfg = make_config(ctx, AnalyzeConfig, config, values, params={"json": "json_path"})
        if cfg.plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                from ..core.errors import UserError

                raise UserError("--plot needs matplotlib: pip install 'deebert-cli[plot]' (or pip install matplotlib)")
        from ..core.analysis.plots import plot_formats
        from ..core.files import atomic_text_file, check_outputs, check_writable

        check_outputs({"--json": cfg.json, "--plot": cfg.plot}, {"--dataset": cfg.dataset}, cfg.checkpoint,
                      {"--plot": plot_formats()} if cfg.plot else None)
        if cfg.store_thresholds:  # deebert.json is rewritten in the checkpoint folder
            check_writable(Path(cfg.checkpoint) / "deebert.json", "--store-thresholds")
        a = run(cfg)
        if cfg.json:
            with atomic_text_file(cfg.json) as f:
                f.write(json.dumps(a.to_dict(), indent=2) + "\n")
        if cfg.plot:
            plot_analysis(a, cfg.plot)
    render(a, layers)
    if cfg.json:
        err.print(f"figures written to {cfg.json}")
    if cfg.plot:
        err.print(f"plot written to {cfg.plot}")


def render(a, show_layers: bool = True) -> None:
    from rich.table import Table

    m, d = a.model, a.dataset
    out.print(f"[bold]{m.get('base_model') or a.checkpoint}[/] ({m['family']}, {m['layers']} layers) on "
              f"{d['dataset']}, {d['evaluated_on']}, n={d['n']}")
    if a.task == "regression":
        return render_regression(a, show_layers)
    if show_layers:
        out.print("[bold]accuracy of every exit[/] (one all-exits pass)")
        t = Table()
        for c, j in (("layer", "right"), ("accuracy", "right"), ("macro-F1", "right"), ("", "left")):
            t.add_column(c, justify=j)
        lo = min(l["accuracy"] for l in a.layers)
        for l in a.layers:
            frac = (l["accuracy"] - lo + 0.02) / (1 - lo + 0.02)
            t.add_row(str(l["layer"]), pct(l["accuracy"]), pct(l["macro_f1"]), "█" * max(1, round(30 * frac)))
        out.print(t)
    if a.sweep:
        _render_entropy_sweep(a)
    _render_other_policies(a)
    _render_recommendation(a)
    _render_guarantee(a)


ACCURACY_COLS = (("accuracy", lambda r: pct(r.accuracy)), ("Δ points", lambda r: f"{r.accuracy_change:+.2f}"))
ERROR_COLS = (("MSE", lambda r: f"{r.mse:.4f}"), ("Δ MSE", lambda r: f"{r.mse_change:+.4f}"),
              ("Pearson", lambda r: f"{r.pearson:.4f}"), ("Spearman", lambda r: f"{r.spearman:.4f}"))


def _sweep_table(title: str, setting: str, rows: list, label, quality=ACCURACY_COLS, wall: bool = False) -> None:
    """One policy's sweep as a table: ``label(row)`` names the setting (threshold or patience), ``quality``
    lists (header, cell) columns of the task's figures."""
    from rich.table import Table

    from ..core.analysis.report import TIMING_NOISY

    out.print(title)
    t = Table()
    for c in (setting, *(h for h, _ in quality), "mean exit", "layer saving") + (("wall saving",) if wall else ()):
        t.add_column(c, justify="right")
    t.add_column("exits at layers 1..L", justify="left", no_wrap=True)
    for r in rows:
        cells = [label(r), *(cell(r) for _, cell in quality), f"{r.mean_exit_layer:.2f}", pct(r.layer_saving)]
        if wall:
            noisy = (r.wall_saving_noise or 0) > TIMING_NOISY
            cells.append("" if r.wall_saving is None else f"noisy (±{pct(r.wall_saving_noise)})" if noisy else pct(r.wall_saving))
        t.add_row(*cells, "/".join(str(c) for c in r.histogram))
    out.print(t)


def _gist(acc: float, change: float, saving: float, vs: str = "") -> str:
    """'accuracy 81.72% (-0.28 points), 17.71% fewer layers'."""
    return f"accuracy {pct(acc)} ({change:+.2f} points{vs}), {pct(saving)} fewer layers"


def _render_entropy_sweep(a) -> None:
    unit = "normalized entropy" if a.entropy == "normalized" else "entropy (nats)"
    rec = a.recommendation
    _sweep_table(f"[bold]threshold sweep[/] ({unit}; exact, from the all-exits pass; * = recommended)", "threshold",
                 a.sweep, lambda r: f"{r.threshold:g}" + (" *" if rec is not None and r.threshold == rec.threshold else ""),
                 wall=True)


def _render_other_policies(a) -> None:
    if a.patience_sweep:
        prec = a.patience_recommendation
        _sweep_table("[bold]patience sweep[/] (exit once N+1 consecutive off-ramps agree; exact; * = recommended)",
                     "patience", a.patience_sweep,
                     lambda r: f"{r.patience}" + (" *" if prec is not None and r.patience == prec.patience else ""))
        if prec is not None:
            out.print(f"[bold]recommended patience {prec.patience}[/] for a {a.max_drop:g}-point budget: "
                      f"{_gist(prec.accuracy, prec.accuracy_change, prec.layer_saving)} "
                      f"(`deebert predict --exit-policy patience --patience {prec.patience}`)")
    if a.learned_sweep:
        _sweep_table("[bold]learned-exit sweep[/] (exit when the predicted chance of being right > threshold; exact)",
                     "threshold", a.learned_sweep, lambda r: f"{r.threshold:g}")


def _render_runtime(a) -> None:
    """The onnx export's own accuracy (fp32 or int8) beside the exact torch fp32 figures."""
    rt = a.runtime
    if not rt:
        return
    line = (f"[bold]onnx runtime ({rt['precision']})[/]: accuracy {pct(rt['full_depth_accuracy'])} at full depth "
            f"(torch fp32 {pct(rt['torch_fp32_full_depth_accuracy'])})")
    if rt.get("at_recommended"):
        r = rt["at_recommended"]
        line += f", {pct(r['accuracy'])} at threshold {r['threshold']:g} (torch fp32 {pct(r['torch_fp32_accuracy'])})"
    out.print(line)


def _render_recommendation(a) -> None:
    m = a.model
    rec = a.recommendation
    if rec is None and a.sweep:
        out.print(f"[yellow]no threshold keeps the accuracy drop within {a.max_drop:g} points[/]")
    elif rec is not None:
        line = (f"[bold]recommended threshold {rec.threshold:g}[/] for a {a.max_drop:g}-point budget: "
                + _gist(rec.accuracy, rec.accuracy_change, rec.layer_saving))
        if rec.wall_saving is not None:
            line += f", {time_saving(rec.wall_saving, rec.wall_saving_noise)} (measured, batch {a.timing['batch_size']}, {a.timing.get('runtime', 'torch')} runtime)"
        out.print(line)
        if a.test and a.test.get("at_recommended"):
            h = a.test["at_recommended"]
            out.print(f"on split '{a.test['split']}' (n={a.test['n']}): "
                      + _gist(h["accuracy"], h["accuracy_change"], h["layer_saving"], " vs full depth"))
    if a.per_layer is not None:
        pl = a.per_layer
        line = (f"[bold]per-layer thresholds[/] {', '.join(f'{t:g}' for t in pl['thresholds'])} (layers 1..{m['layers'] - 1}): "
                + _gist(pl["accuracy"], pl["accuracy_change"], pl["layer_saving"]))
        if pl.get("wall_saving") is not None:
            line += f", {time_saving(pl['wall_saving'], pl.get('wall_saving_noise'))} (measured)"
        out.print(line)
        if a.test and a.test.get("at_per_layer"):
            h = a.test["at_per_layer"]
            out.print(f"  on split '{a.test['split']}': " + _gist(h["accuracy"], h["accuracy_change"], h["layer_saving"]))
    if a.stored_thresholds is not None:
        out.print(f"stored thresholds {', '.join(f'{t:g}' for t in a.stored_thresholds)} in {a.checkpoint}: "
                  "`deebert predict` uses them when given no threshold")
        if a.replaced:
            out.print(a.replaced)
    for w in a.warnings:
        err.print(f"[yellow]warning:[/] {w}")
    dw = a.dead_weight
    notes = []
    if dw["rarely_exited_layers"]:
        notes.append(f"{_layers(dw['rarely_exited_layers'])} take < {dw['exit_share_below']:.0%} of exits at the recommended threshold")
    if dw["layers_after_saturation"]:
        notes.append(f"accuracy is within 0.5 points of its best by layer {dw['accuracy_saturates_at_layer']}, "
                     f"so later layers ({', '.join(map(str, dw['layers_after_saturation']))}) add little")
    if dw["accuracy_falls_at_layers"]:
        notes.append(f"accuracy falls at {_layers(dw['accuracy_falls_at_layers'])}")
    notes.append(f"off-ramps add {m['off_ramp_parameters'] / 1e6:.2f}M parameters to {m['backbone_parameters'] / 1e6:.2f}M "
                 f"({100 * m['overhead']:.1f}%)")
    out.print("[bold]dead weight:[/] " + "; ".join(notes))
    if a.examples:
        out.print(f"[bold]examples by exit layer[/] (threshold {a.example_threshold:g}):")
        for layer, exs in a.examples.items():
            for e in exs:
                mark = "✓" if e["label"] == e["predicted"] else "✗"
                text = e["text"] if len(e["text"]) <= 90 else e["text"][:87] + "..."
                out.print(f"  L{layer} {mark} [{e['predicted']}] {text}", soft_wrap=True, markup=False)
    _render_runtime(a)


def render_regression(a, show_layers: bool = True) -> None:
    """Per-exit error and correlation, and the patience sweep, of a regression checkpoint."""
    from rich.table import Table

    if show_layers:
        out.print("[bold]error and correlation of every exit[/] (one all-exits pass)")
        t = Table()
        for c in ("layer", "MSE", "Pearson", "Spearman"):
            t.add_column(c, justify="right")
        for l in a.layers:
            t.add_row(str(l["layer"]), f"{l['mse']:.4f}", f"{l['pearson']:.4f}", f"{l['spearman']:.4f}")
        out.print(t)
    if a.patience_sweep:
        tol = a.patience_sweep[0].tolerance
        _sweep_table(f"[bold]patience sweep[/] (exit once N+1 consecutive off-ramps agree within {tol:g}; exact)",
                     "patience", a.patience_sweep, lambda r: str(r.patience), ERROR_COLS)
    if a.learned_sweep:
        _sweep_table("[bold]learned-exit sweep[/] (exit when the predicted tanh(|error|) < threshold; exact)",
                     "threshold", a.learned_sweep, lambda r: f"{r.threshold:g}", ERROR_COLS)
    out.print("entropy exits do not apply to a regression checkpoint: predict with `--exit-policy patience --tolerance T`"
              " (or `--exit-policy learned --threshold T` after `train-exits --learned-exits`)")


def _layers(ls: list) -> str:
    return ("layer " if len(ls) == 1 else "layers ") + ", ".join(map(str, ls))


def _render_guarantee(a) -> None:
    """The guaranteed recommendation beside the point estimate above, and the stored guarantee's check."""
    from ..core.model.guarantee import Guarantee
    from .calibrate import check_line

    if a.guarantee is not None:
        g = Guarantee.from_dict(a.guarantee)
        family = (", certified on the texts of this split the recipe was not chosen on" if g.selection == "split" else
                  f", {g.family} recipes compared on this split" if g.family > 1 else "")
        if g.certified and g.layer_saving > 0:
            line = (f"[bold]guaranteed threshold {g.value:g}[/]: {g.describe()}{family}; "
                    f"{pct(g.layer_saving)} fewer layers (here {-100 * g.accuracy_drop:+.2f} points)")
            h = (a.test or {}).get("at_guaranteed")
            if h:
                line += f"; on split '{a.test['split']}': " + _gist(h["accuracy"], h["accuracy_change"], h["layer_saving"])
            out.print(line + "; the recommendation above is a point estimate, with no guarantee")
        else:
            need = f"at least {g.min_n:,} texts" if g.min_n is not None and g.min_n > g.n else "more texts"
            out.print(f"[yellow]no guaranteed threshold[/]: this split (n={g.n}) cannot certify "
                      f"{g.describe().split(' with probability')[0]} at delta {g.delta:g}{family} (needs {need}); "
                      "the recommendation above is a point estimate, with no guarantee")
    if a.stored_guarantee is not None and a.guarantee_check is not None:
        g = Guarantee.from_dict(a.stored_guarantee)
        line = check_line(g, a.guarantee_check, f"{a.dataset['evaluated_on']} (n={a.dataset['n']})")
        if a.replaced and "is lost" in a.replaced:  # --store-thresholds just removed it
            line = line.replace("stored guarantee", "the guarantee removed by --store-thresholds", 1)
        out.print(line)