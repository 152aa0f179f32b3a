"""Validation-loss plots of a grid, and loss against compute across grids, as PNG files (needs the optional
``plot`` extra: matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

# x axes: (file stem, key in a curve point, label)
AXES = (
    ("val_loss_vs_tokens", "tokens", "training tokens"),
    ("val_loss_vs_flops", "flops", "training FLOPs"),
    ("val_loss_vs_time", "train_seconds", "training time (s)"),
)


# ten colours, then the same colours again with another line style and marker: entries stay distinct past ten
LINESTYLES = ("-", "--", ":")
MARKERS = ("o", "s", "^")


def entry_styles(entries: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Matplotlib keyword arguments (colour, line style, marker) that tell up to 30 entries apart."""
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    return {e: {"color": cmap(i % 10), "linestyle": LINESTYLES[(i // 10) % 3], "marker": MARKERS[(i // 10) % 3]}
            for i, e in enumerate(entries)}


def place_legend(ax: Any, entries: int) -> None:
    """Inside the axes for a few entries; to the right of them for many, where it would hide the curves."""
    if entries > 6:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    else:
        ax.legend(fontsize=8)


def log_x_axis(ax: Any) -> None:
    """A log-scaled x axis whose minor ticks are labelled at 2x and 5x a power of ten only: matplotlib
    labels more of them on a span of one to two decades, and their labels overlap."""
    import math

    from matplotlib.ticker import LogFormatterSciNotation

    class TwoAndFive(LogFormatterSciNotation):
        def __call__(self, x: float, pos: int | None = None) -> str:
            mantissa = round(x / 10 ** math.floor(math.log10(x)), 6) if x > 0 else 0
            return super().__call__(x, pos) if mantissa in (2, 5) else ""

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(TwoAndFive(labelOnlyBase=False, minor_thresholds=(math.inf, math.inf)))


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_curves(runs: Sequence[dict[str, Any]], out_dir: str | Path, title: str = "") -> list[Path]:
    """One PNG per x axis: each run's validation loss, one colour per grid entry, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = list(dict.fromkeys(r["entry"] for r in runs))
    styles = entry_styles(entries)
    paths = []
    for stem, key, label in AXES:
        fig, ax = plt.subplots(figsize=(9 if len(entries) > 6 else 7, 4.5))
        labelled: set[str] = set()
        for run in runs:
            # the log-scaled FLOPs axis cannot show the step-0 point
            points = [p for p in run["val_curve"] if p.get(key) is not None and (key != "flops" or p[key] > 0)]
            if not points:
                continue
            entry = run["entry"]
            style = {**styles[entry], "marker": "."}
            ax.plot([p[key] for p in points], [p["val_loss"] for p in points], **style,
                    linewidth=1.2, alpha=0.85, label=None if entry in labelled else entry)
            labelled.add(entry)
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (nats/token)")
        if key == "flops":
            log_x_axis(ax)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if labelled:  # a grid with no finished run yet draws empty axes
            place_legend(ax, len(labelled))
        fig.tight_layout()
        path = out_dir / f"{stem}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_frontier(frontier: dict[str, Any], path: str | Path) -> Path:
    """Final validation loss against training FLOPs: one line per entry through its budget points (seed
    std as error bars), over each run's faint validation curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    entries = frontier["entries"]
    styles = entry_styles(entries)
    fig, ax = plt.subplots(figsize=(9.5 if len(entries) > 4 else 7.5, 4.8))
    for run in frontier["runs"]:
        if run["curve"]:
            flops, loss = zip(*run["curve"])
            ax.plot(flops, loss, color=styles[run["entry"]]["color"], linestyle=styles[run["entry"]]["linestyle"],
                    linewidth=0.8, alpha=0.3)
    if any(run["curve"] for run in frontier["runs"]):
        ax.plot([], [], color="grey", linewidth=0.8, alpha=0.5,
                label="validation along each run (mid-schedule checkpoints)")
    for entry in entries:
        points = sorted((p for p in frontier["points"] if p["entry"] == entry), key=lambda p: p["flops"])
        ax.errorbar([p["flops"] for p in points], [p["loss"] for p in points],
                    yerr=[p["loss_std"] or 0.0 for p in points], **styles[entry], linewidth=1.6,
                    capsize=3, label=f"{entry}: final loss per budget (± std over seeds)")
    # the curves start near ln(vocab); keep the axis on the region the budget points occupy
    finals = [p["loss"] for p in frontier["points"]]
    spread = max(finals) - min(finals)
    lowest = min([min(finals)] + [loss for run in frontier["runs"] for _, loss in run["curve"]])
    top = max(finals) + max(0.7, 2 * spread)
    ax.set_ylim(lowest - 0.05 - 0.1 * spread, top)
    log_x_axis(ax)
    shown = [f for run in frontier["runs"] for f, loss in run["curve"] if loss <= top]
    shown += [p["flops"] for p in frontier["points"]]
    ax.set_xlim(min(shown) / 1.15, max(shown) * 1.15)
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"loss against training compute (baseline {frontier['baseline']})")
    ax.grid(True, which="both", alpha=0.3)
    place_legend(ax, len(entries) + 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
