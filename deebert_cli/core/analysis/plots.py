"""analyze's figure (``--plot``): the speed/accuracy trade-off of every exit policy, each exit's accuracy and
where samples exit; for a regression checkpoint, the speed/error trade-off and each exit's correlation."""
from __future__ import annotations

from ..errors import UserError
from .report import Analysis


def plot_regression(a: Analysis, path: str) -> None:
    """PNG for a regression checkpoint: MSE vs layer saving of the patience sweep, and per-exit correlation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    ax = axes[0]
    ps = a.patience_sweep
    ax.plot([100 * r.layer_saving for r in ps], [r.mse for r in ps], "^-", color="tab:brown",
            label=f"patience policy (tolerance {ps[0].tolerance:g})" if ps else "patience policy")
    for r in ps:
        ax.annotate(f"N={r.patience}", (100 * r.layer_saving, r.mse), fontsize=7, xytext=(0, 6),
                    textcoords="offset points", ha="center")
    if a.learned_sweep:
        ax.plot([100 * r.layer_saving for r in a.learned_sweep], [r.mse for r in a.learned_sweep], "D-",
                color="tab:cyan", label="learned exits")
    ax.axhline(a.layers[-1]["mse"], color="gray", lw=0.8, ls=":", label="full depth")
    ax.set_xlabel("layer saving vs full depth (%)")
    ax.set_ylabel("MSE (lower is better)")
    ax.set_title("Speed/error trade-off")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1]
    ls = [l["layer"] for l in a.layers]
    ax.plot(ls, [l["pearson"] for l in a.layers], "o-", label="Pearson")
    ax.plot(ls, [l["spearman"] for l in a.layers], "s-", label="Spearman")
    ax.set_xticks(ls)
    ax.set_xlabel("exit layer")
    ax.set_ylabel("correlation with the target")
    ax.set_title("Correlation of each exit (no early exit)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)


def plot_analysis(a: Analysis, path: str) -> None:
    """PNG: accuracy vs layer saving (sweep, with measured wall-clock saving), per-exit accuracy, and the
    exit histogram at the recommended threshold."""
    try:
        import matplotlib
        if a.task == "regression":
            return plot_regression(a, path)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'deebert-cli[plot]' (or pip install matplotlib)") from None
    fig, axes = plt.subplots(1, 3, figsize=(16, 5), constrained_layout=True)
    _plot_trade_off(axes[0], a)
    _plot_layer_accuracy(axes[1], a)
    _plot_exit_histogram(axes[2], a)
    fig.suptitle(f"{a.model.get('base_model') or a.checkpoint} on {a.dataset['dataset']} ({a.dataset['evaluated_on']}, n={a.dataset['n']})")
    save_figure(fig, path)
    plt.close(fig)


def _plot_trade_off(ax, a: Analysis) -> None:
    """Accuracy vs saving of every policy's sweep (exact), measured wall-clock savings, per-layer thresholds,
    the budget and the recommendation."""
    full = 100 * a.layers[-1]["accuracy"]
    # focus on the region a user chooses from; thresholds far below the budget are clipped, not hidden
    floor = full - max(5.0, 8 * a.max_drop)
    shown = [r for r in a.sweep if 100 * r.accuracy >= floor]
    clipped = len(a.sweep) - len(shown)
    ax.plot([100 * r.layer_saving for r in shown], [100 * r.accuracy for r in shown], "o-",
            label="entropy policy: layer saving (exact, all-exits pass)")
    pshown = [r for r in a.patience_sweep if 100 * r.accuracy >= floor]
    if pshown:
        ax.plot([100 * r.layer_saving for r in pshown], [100 * r.accuracy for r in pshown], "^-", color="tab:brown",
                label="patience policy (exact; labels = N)")
        for r in pshown:
            ax.annotate(f"N={r.patience}", (100 * r.layer_saving, 100 * r.accuracy), fontsize=7, xytext=(0, -10),
                        textcoords="offset points", ha="center", color="tab:brown")
    lshown = [r for r in a.learned_sweep if 100 * r.accuracy >= floor]
    if lshown:
        ax.plot([100 * r.layer_saving for r in lshown], [100 * r.accuracy for r in lshown], "D-", color="tab:cyan",
                label="learned exits (exact; labels = threshold)")
    timed = [r for r in shown if r.wall_saving is not None]
    if timed:
        ax.plot([100 * r.wall_saving for r in timed], [100 * r.accuracy for r in timed], "s", color="tab:orange",
                markersize=8, label="measured wall-clock saving")
    if a.per_layer is not None:
        pl = a.per_layer
        ax.plot([100 * pl["layer_saving"]], [100 * pl["accuracy"]], "*", color="tab:green", markersize=14,
                label="per-layer thresholds (searched)")
    ax.axhline(full, color="gray", lw=0.8, ls=":", label=f"full depth ({full:.1f}%)")
    ax.axhline(full - a.max_drop, color="tab:red", lw=0.8, ls="--", label=f"budget: -{a.max_drop:g} points")
    if a.recommendation:
        r = a.recommendation
        ax.annotate(f"recommended: {r.threshold:g}", (100 * r.layer_saving, 100 * r.accuracy),
                    textcoords="offset points", xytext=(-45, -45), ha="center", arrowprops={"arrowstyle": "->"})
    last_x = -99.0
    for r in shown:  # label thresholds that are not crowded together
        x = 100 * r.layer_saving
        if x - last_x >= 3:
            ax.annotate(f"{r.threshold:g}", (x, 100 * r.accuracy), fontsize=7, xytext=(0, 6),
                        textcoords="offset points", ha="center", color="tab:blue")
            last_x = x
    ys = [100 * r.accuracy for r in shown + pshown + lshown]
    ax.set_ylim(min(ys + [full - a.max_drop]) - 1, max(ys + [full]) + 1)
    if clipped:
        ax.text(0.99, 0.02, f"{clipped} threshold(s) below {floor:.1f}% not shown", transform=ax.transAxes,
                ha="right", fontsize=8, color="gray")
    ax.set_xlabel("saving vs full depth (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Speed/accuracy trade-off by exit policy ({a.entropy} entropy)")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)


def _plot_layer_accuracy(ax, a: Analysis) -> None:
    """The accuracy of each exit at full depth (no early exit)."""
    ls = [l["layer"] for l in a.layers]
    ax.bar(ls, [100 * l["accuracy"] for l in a.layers], color="tab:green")
    for l in a.layers:
        ax.text(l["layer"], 100 * l["accuracy"] + 0.5, f"{100 * l['accuracy']:.1f}", ha="center", fontsize=8)
    lo = min(100 * l["accuracy"] for l in a.layers)
    ax.set_ylim(max(0, lo - 10), 100)
    ax.set_xticks(ls)
    ax.set_xlabel("exit layer")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy of each exit (no early exit)")
    ax.grid(alpha=0.3, axis="y")


def _plot_exit_histogram(ax, a: Analysis) -> None:
    """The share of samples leaving at each layer under the recommended threshold."""
    ls = [l["layer"] for l in a.layers]
    if a.recommendation:
        h = a.recommendation.histogram
        n = sum(h)
        ax.bar(ls, [100 * c / n for c in h], color="tab:purple", label=f"threshold {a.recommendation.threshold:g}")
        ax.set_title("Where samples exit (recommended threshold)")
        ax.legend(fontsize=8)
    ax.set_xticks(ls)
    ax.set_xlabel("exit layer")
    ax.set_ylabel("share of samples (%)")
    ax.grid(alpha=0.3, axis="y")


def plot_formats() -> set:
    """The suffixes ``--plot`` may end in: matplotlib's own file formats (and none: PNG)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return set(FigureCanvasBase.get_supported_filetypes()) | {""}


def save_figure(fig, path: str) -> None:
    """Write ``fig`` whole or not at all (a temporary sibling renamed when complete), in the format its
    suffix names (PNG without one)."""
    from pathlib import Path

    from ..files import atomic_file

    with atomic_file(path, binary=True) as f:
        fig.savefig(f, dpi=120, format=Path(path).suffix.lstrip(".").lower() or "png")
