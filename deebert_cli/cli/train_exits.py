"""`deebert train-exits`: DeeBERT stage 2."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import CONFIG_OPT, DEVICE_OPT, RichProgress, finish_distributed, make_config, out, pct, quiet_libraries, user_errors
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
    ramp_pooling: Optional[str] = typer.Option(None, help="What an off-ramp reads: cls (first token, as DeeBERT), mean (over non-padding tokens) or auto (what the family's own head reads: cls; mean for a ModernBERT with classifier_pooling=mean). Giving any of --ramp-pooling, --ramp-norm, --distill, --calibrate trains exactly that one recipe (the others as DeeBERT: the family's pooling (cls but for mean-pooling ModernBERT), no norm, no distillation, no calibration); giving none trains every candidate recipe on the one cache and keeps the best (largest layer saving within --max-drop on the evaluation split)."),
    ramp_norm: bool = typer.Option(False, help="LayerNorm the off-ramp input first (helps backbones whose early [CLS] barely varies). Default: chosen by measurement."),
    distill: bool = typer.Option(False, help="Self-distillation: train each off-ramp on (1-alpha)*label loss + alpha*KL to the final classifier (FastBERT). Default: chosen by measurement."),
    distill_temperature: float = typer.Option(2.0, help="Softening temperature of the distillation targets."),
    distill_alpha: float = typer.Option(0.5, help="Weight of the distillation term in [0, 1]."),
    unlabeled: Optional[str] = typer.Option(None, help="Extra unlabeled texts for --distill: a .txt file (one per line) or a data file/folder with the text column."),
    calibrate: bool = typer.Option(False, help="Fit a temperature per off-ramp on the evaluation split (stored in the checkpoint), so entropy means the same at every layer. Default: chosen by measurement."),
    max_drop: Optional[float] = typer.Option(None, help="Accuracy budget in points (default 0.5). The threshold stored for predict is certified on the evaluation split: with probability >= 1 - delta the accuracy drop on new texts like them stays within it (risk control; the recipe kept is the one whose guaranteed threshold saves the most layers). When the split is too small to certify a saving, the point estimate is stored, and said so."),
    max_disagreement: Optional[float] = typer.Option(None, help="Instead of --max-drop: a budget on how often an exit disagrees with the final layer, as a fraction (0.02 = 2%); needs no labels and bounds the accuracy drop too. Giving both budgets, or --max-disagreement with --no-guarantee, is refused in one line (one budget is certified, as in `calibrate`)."),
    delta: float = typer.Option(0.05, help="The guarantee holds with probability >= 1 - delta over the draw of the evaluation texts (0.05: 95%)."),
    guarantee: bool = typer.Option(True, "--guarantee/--no-guarantee", help="Store the risk-controlled threshold (default), or the point estimate (the threshold whose accuracy drop on the evaluation split itself is within --max-drop, with no guarantee for new data)."),
    learned_exits: bool = typer.Option(False, help="BERxiT: also train a learned exit per off-ramp (Linear(H,1) + sigmoid on its pooler output) predicting whether the off-ramp is right (regression: tanh(|error|)); predict with --exit-policy learned --threshold T."),
    dataset: Optional[str] = typer.Option(None, help="Override the dataset (default: the one the checkpoint was fine-tuned on; same columns)."),
    max_train_samples: Optional[int] = typer.Option(None, help="Use a seeded random subset of the training split."),
    device: str = DEVICE_OPT,
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 or fp16 for the frozen backbone pass that caches the off-ramp inputs (bf16: CPU and recent GPUs; fp16: GPUs); the small off-ramps train in fp32."),
    config: Optional[Path] = CONFIG_OPT,
):
    """Stage 2: freeze backbone and final classifier, train the off-ramps of layers 1..L-1 on the mean of
    their cross-entropy losses. The frozen backbone runs once (eval mode, no dropout) to cache what every
    off-ramp reads, so this stage costs about one inference pass plus cheap epochs. By default several
    off-ramp recipes train on that cache and the best on the evaluation split is kept; the threshold for
    a --max-drop budget is stored, so `deebert predict` needs no --threshold."""
    values = dict(locals())
    values.pop("ctx"), values.pop("config")
    values["checkpoint"] = str(checkpoint)
    values["output"] = str(output) if output else None
    quiet_libraries()
    from ..core.launch import is_main_process

    with user_errors(f"no new checkpoint was written; '{output or checkpoint}' is as it was"):
        from ..core.config import TrainExitsConfig
        from ..core.train.stage2 import train_exits as run

        cfg = make_config(ctx, TrainExitsConfig, config, values)
        result = run(cfg, RichProgress())
    if is_main_process():  # under accelerate launch, one report
        render_result(result)
        render_recipes(result.extra)
    finish_distributed()


def render_recipes(extra: dict) -> None:
    """The candidate recipes side by side (when several were tried), the one kept, and the stored threshold."""
    search = extra.get("recipes")
    if not search:
        return
    rows, chosen = search["candidates"], search["chosen"]
    if len(rows) > 1:
        out.print(f"[bold]off-ramp recipes[/] on the evaluation split: the threshold analyze recommends for a "
                  f"{search['max_drop']:g}-point budget, its accuracy change and layer saving"
                  + (", the guaranteed threshold and its saving" if "guaranteed_threshold" in rows[0] else "")
                  + f" (* = kept: {search['measure']})")
        out.print(_recipe_table(rows, chosen))
    out.print(f"off-ramp recipe: [bold]{chosen}[/]" + (" (as given)" if search["given"] else f" (best of {len(rows)})"))
    thr = extra.get("thresholds")
    if thr:
        out.print(stored_line(thr, next(r for r in rows if r["recipe"] == chosen), extra.get("guarantee"),
                              extra.get("guarantee_advice"), extra.get("guaranteed_on_split")))
    if extra.get("replaced"):
        out.print(extra["replaced"])


def stored_line(thr: dict, row: dict, g, advice: dict | None, whole: dict | None = None) -> str:
    """One line: the stored threshold and the guarantee it carries (epsilon, delta, n), or why it has none;
    the saving to expect is the whole evaluation split's (``whole``) when the guarantee used a part of it."""
    point = (f"point estimate {row['threshold']:g}: {row['accuracy_change']:+.2f} points, {pct(row['layer_saving'])} "
             "fewer layers on the evaluation split itself")
    if thr["search"] == "guaranteed":
        drop = "" if g.accuracy_drop is None else f", {-100 * g.accuracy_drop:+.2f} points"
        expect = f"{pct(g.layer_saving)} fewer layers expected (evaluation split{drop})"
        if whole and whole["n"] != g.n:
            expect = (f"{pct(whole['layer_saving'])} fewer layers expected (evaluation split, n={whole['n']:,}, "
                      f"{whole['accuracy_change']:+.2f} points; {pct(g.layer_saving)} on the {g.n:,} texts that certified it)")
        return (f"stored threshold [bold]{g.value:g}[/] (normalized entropy), guaranteed: {g.describe()}"
                f"{_chosen(g)}; {expect}; {point}, no guarantee")
    if g is None:
        return (f"stored threshold [bold]{thr['values'][0]:g}[/] (normalized entropy, --no-guarantee): {point}; "
                "no guarantee for new data")
    n = advice.get("split_n", g.n)
    why = (f"at least {advice['min_n']:,} texts to certify anything" if advice["min_n"] is None or advice["min_n"] > n
           else "more texts to certify a threshold that saves layers")
    if advice.get("point_n"):
        why += f", about {advice['point_n']:,} to certify the point estimate {advice['point_estimate']:g}"
    return (f"[yellow]no guarantee:[/] the evaluation split (n={n}) is too small to certify "
            f"{g.describe().split(' with probability')[0]} at delta {g.delta:g}"
            f"{_chosen(g)} (needs {why}); stored the {point}")


def _chosen(g) -> str:
    """How the guarantee paid for the choice among recipes."""
    if g.selection == "split":
        from ..core.train.recipes import SELECT_FRACTION

        return f", the recipe chosen on the other {100 * SELECT_FRACTION:g}% of the split"
    return f", {g.family} recipes compared (each at delta / {g.family})" if g.family > 1 else ""


def _recipe_table(rows: list, chosen: str):
    """One row per candidate: its threshold, accuracy change and layer saving at the budget, and every
    off-ramp's accuracy (regression: the off-ramps' mean MSE and each one's)."""
    from rich import box
    from rich.table import Table

    regression = "mean_ramp_mse" in rows[0]
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("recipe", no_wrap=True, min_width=max(len(r["recipe"]) for r in rows) + 2)
    for c in ("mean MSE",) if regression else ("threshold", "Δ points", "saving"):
        t.add_column(c, justify="right", no_wrap=True)
    guaranteed = not regression and "guaranteed_threshold" in rows[0]
    if guaranteed:
        t.add_column("guaranteed", justify="right", no_wrap=True)
        t.add_column("saving", justify="right", no_wrap=True)
    t.add_column("off-ramps 1..L-1" + ("" if regression else " (%)"), no_wrap=True)
    for r in rows:
        name = r["recipe"] + (" *" if r["recipe"] == chosen else "")
        if regression:
            t.add_row(name, f"{r['mean_ramp_mse']:.4f}", "/".join(f"{m:.3f}" for m in r["layer_mse"][:-1]))
        else:
            g = [("-" if r["guaranteed_threshold"] is None else f"{r['guaranteed_threshold']:g}"),
                 "-" if r["guaranteed_saving"] is None else pct(r["guaranteed_saving"])] if guaranteed else []
            t.add_row(name, f"{r['threshold']:g}", f"{r['accuracy_change']:+.2f}", pct(r["layer_saving"]), *g,
                      "/".join(f"{100 * a:.1f}" for a in r["layer_accuracy"][:-1]))
    return t
