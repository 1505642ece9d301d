"""`deebert calibrate`: an exit setting with a guarantee, certified on your own texts."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import CONFIG_OPT, DEVICE_OPT, ENTROPY_OPT, TOLERANCE_OPT, make_config, out, pct, quiet_libraries, user_errors


def calibrate(
    ctx: typer.Context,
    checkpoint: Path = typer.Option(Path("deebert-checkpoint"), help="Checkpoint from `deebert train-exits`."),
    dataset: Optional[str] = typer.Option(None, help="Labelled texts to calibrate on: a data file (used whole) or folder (its --split); not texts the checkpoint was trained or tuned on."),
    unlabeled: Optional[str] = typer.Option(None, help="Or texts without labels (a .txt file, one per line, or a data file/folder's text column): calibrates the disagreement with the final layer, which needs no labels."),
    split: Optional[str] = typer.Option(None, help="Split of a --dataset folder (default: validation)."),
    text_column: Optional[str] = typer.Option(None, help="Text column (default: the checkpoint's)."),
    text_pair_column: Optional[str] = typer.Option(None, help="Second text column (default: the checkpoint's)."),
    label_column: Optional[str] = typer.Option(None, help="Label column (default: the checkpoint's)."),
    max_drop: Optional[float] = typer.Option(None, help="Budget in accuracy points (default 0.5 with --dataset): the accuracy drop on new texts stays within it with probability >= 1 - delta."),
    max_disagreement: Optional[float] = typer.Option(None, help="Budget on how often the exit's answer differs from the final layer's, a fraction (default 0.02 with --unlabeled); it bounds the accuracy drop too."),
    delta: float = typer.Option(0.05, help="The guarantee holds with probability >= 1 - delta over the draw of the calibration texts."),
    exit_policy: str = typer.Option("entropy", "--exit-policy", help="The policy to certify: entropy (a threshold), patience (a patience value) or learned (a learned-exit threshold; needs --learned-exits)."),
    entropy: str = ENTROPY_OPT,
    tolerance: float = TOLERANCE_OPT,
    check: bool = typer.Option(False, "--check", help="Only check the stored guarantee on these texts and show what they would certify; store nothing."),
    batch_size: int = typer.Option(32, help="Batch size of the all-exits pass."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the result to this JSON file."),
    device: str = DEVICE_OPT,
    config: Optional[Path] = CONFIG_OPT,
):
    """Certify an exit setting on texts like those it will see: with probability >= 1 - delta, its risk on
    new texts from the same distribution stays within the budget (Learn then Test with fixed-sequence
    testing and exact binomial p-values, as CALM). Labelled texts bound the accuracy drop; unlabelled
    ones the disagreement with the final layer. The guarantee the checkpoint already carries is checked on
    the same texts first (does it still hold here?); the new one is stored in the checkpoint (predict,
    serve and predict-dataset then use it) unless --check."""
    values = dict(locals())
    for k in ("ctx", "config", "json_path"):
        values.pop(k)
    values["json"] = str(json_path) if json_path else None
    values["checkpoint"] = str(checkpoint)
    quiet_libraries()
    with user_errors():
        from ..core.analysis.calibrate import calibrate as run
        from ..core.config import CalibrateConfig
        from ..core.files import atomic_text_file, check_outputs, check_writable

        cfg = make_config(ctx, CalibrateConfig, config, values, params={"json": "json_path"})
        check_outputs({"--json": cfg.json}, {"--dataset": cfg.dataset, "--unlabeled": cfg.unlabeled}, cfg.checkpoint)
        if not cfg.check:  # the guarantee is stored in the checkpoint's deebert.json
            check_writable(Path(cfg.checkpoint) / "deebert.json", "--checkpoint")
        c = run(cfg)
    render(c)
    if cfg.json:  # only once the result is complete and shown (certified or not)
        with user_errors():
            with atomic_text_file(cfg.json) as f:
                f.write(json.dumps(c.to_dict(), indent=2) + "\n")


def render(c) -> None:
    """The stored guarantee on these texts, then what they certify and whether it was stored."""
    where = f"{c.source} (n={c.n})"
    if c.check is not None:
        out.print(check_line(c.previous, c.check, where))
    g = c.guarantee
    if g.certified and g.layer_saving > 0:
        drop = "" if g.accuracy_drop is None else f", accuracy {-100 * g.accuracy_drop:+.2f} points"
        out.print(f"certified on {where}: {g.setting()} — {g.describe()}; {pct(g.layer_saving)} fewer layers expected "
                  f"(here: {100 * g.empirical:.2f}% losses, upper bound {100 * g.bound:.2f}%{drop})")
        use = "" if g.policy == "entropy" else f" with --exit-policy {g.policy}"
        out.print(f"stored in '{c.checkpoint}': predict, serve and predict-dataset use it{use}" if c.stored
                  else "not stored (--check)")
        if c.replaced:
            out.print(c.replaced)
        return
    out.print(f"[yellow]nothing certified[/] on {where}: {found(c)}. Nothing stored.")


def found(c) -> str:
    """What an uncertified calibration found, and how many texts would certify (the exit status stays 0:
    the run did what was asked; docs/commands/calibrate.md)."""
    g, adv = c.guarantee, c.advice
    what = g.describe().split(" with probability")[0]
    if adv["min_n"] is not None and adv["min_n"] > g.n:
        need = f"at least {adv['min_n']:,} texts to certify anything"
    elif adv.get("next_n") and adv.get("next") is not None:
        need = f"about {adv['next_n']:,} texts to certify {g.policy} {adv['next']:g} (its rate here {100 * adv['next_rate']:.2f}%)"
    elif adv.get("next") is not None and adv.get("next_rate") is not None:
        need = f"a setting whose rate ({g.policy} {adv['next']:g}: {100 * adv['next_rate']:.2f}% here) is within the budget"
    else:
        need = "more texts"
    certified = "only full depth (no exit before the last layer) is certified" if g.certified else "nothing is certified"
    return (f"no {g.policy} setting that saves layers keeps {what} at delta {g.delta:g} ({certified}, "
            f"{g.tested} setting(s) tested); it needs {need}")


def check_line(g, chk: dict, where: str) -> str:
    """One line: does the stored guarantee hold on these texts?"""
    verdict = {"holds": "[green]holds[/]", "exceeded": "[red]exceeded[/] (significantly: the data may have drifted)",
               "inconclusive": "[yellow]above budget, within noise[/]"}[chk["verdict"]]
    risk = "disagreement (bounds the drop)" if chk["risk"] == "disagreement" and g.risk != "disagreement" else chk["risk"].replace("_", " ")
    extra = "" if chk.get("accuracy_drop") is None else f", accuracy drop {100 * chk['accuracy_drop']:+.2f} points"
    return (f"stored guarantee ({g.describe().split(' (n=')[0]}) on {where}: {risk} {100 * chk['rate']:.2f}% "
            f"(upper bound {100 * chk['upper_bound']:.2f}%){extra}: {verdict}")
