"""``frontier.md`` and ``frontier.json``: the points, the comparisons with the baseline and where they came from."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sasformer.compare.report import _pm, _si


def _signed(mean: float | None, se: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:+.4f}" if se is None else f"{mean:+.4f} ± {se:.4f}"


def _epochs(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def points_table(points: list[dict[str, Any]]) -> str:
    lines = ["| entry | training FLOPs | tokens | epochs | seeds | final val loss | from |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for p in points:
        folders = ", ".join(Path(f).name for f in p["folders"])
        lines.append(f"| {p['entry']} | {p['flops']:.3e} | {_si(p['tokens'])} | {_epochs(p['epochs'])} | "
                     f"{p['n']} | {_pm(p['loss'], p['loss_std'], '.4f')} | {folders} |")
    return "\n".join(lines)


def comparisons_table(comparisons: list[dict[str, Any]], baseline: str) -> str:
    header = (f"| entry | training FLOPs | val loss ± std | {baseline} at these FLOPs ± std | difference ± s.e. | "
              f"{baseline} FLOPs for this loss | compute multiplier |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for c in comparisons:
        at = _pm(c["baseline_loss"], c["baseline_loss_std"], ".4f") if c["baseline_loss"] is not None \
            else "not bracketed"
        reach = f"{c['baseline_flops']:.3e}" if c["baseline_flops"] is not None else "not bracketed"
        multiplier = f"{c['multiplier']:.3f}x" if c["multiplier"] is not None else "n/a"
        lines.append(f"| {c['entry']} | {c['flops']:.3e} | {_pm(c['loss'], c['loss_std'], '.4f')} | {at} | "
                     f"{_signed(c['difference'], c['difference_se'])} | {reach} | {multiplier} |")
    return "\n".join(lines)


def markdown_frontier(frontier: dict[str, Any]) -> str:
    """The report: points, comparisons, the folders read, skipped and duplicate runs, notes, provenance."""
    baseline = frontier["baseline"]
    parts = [
        "# Loss against training compute",
        "",
        (f"Entries: {', '.join(frontier['entries'])}; baseline: {baseline}. A point is one entry at one budget: "
         "its final validation loss and training FLOPs (tokens seen x training FLOPs/token), mean ± sample std "
         "over seeds (n/a: one seed). Epochs: tokens seen over the training split's tokens (n/a: unknown). "
         "Training FLOPs count the attention scores densely (all T x T, the convention of MFU figures), which a "
         "causal kernel halves; the variants' FLOP ratios, and so the gaps at equal compute, depend on it."),
        "",
        points_table(frontier["points"]),
        "",
        f"## Against {baseline} at equal compute",
        "",
        (f"`{baseline} at these FLOPs`: {baseline}'s final loss at the entry's FLOPs, linear in log(FLOPs) between "
         f"the two {baseline} points around it; its ± is the sample std over seeds of each seed's own "
         f"interpolated loss (the seeds both points hold; n/a with fewer than two). `difference` = entry − "
         f"{baseline} (negative: the entry reaches a lower loss for the same compute), ± its standard error, "
         f"sqrt(std_entry²/n_entry + std_{baseline}²/n_{baseline}): the uncertainty of the gap between the two means, "
         f"not the spread of one run. `{baseline} FLOPs for this loss`: where {baseline}'s points, "
         f"log(FLOPs) linear in loss, reach the entry's loss; `compute multiplier` = that over the entry's FLOPs "
         f"(above 1: {baseline} needs more compute for the same loss). Nothing is extrapolated: outside "
         f"{baseline}'s points a value is `not bracketed`."),
        "",
    ]
    if frontier["comparisons"]:
        parts.append(comparisons_table(frontier["comparisons"], baseline))
        reasons = sorted({c[k] for c in frontier["comparisons"] for k in ("at_flops", "at_loss")
                          if c[k] != "interpolated"})
        if reasons:
            parts += [""] + [f"- {r}" for r in reasons]
    else:
        parts.append(f"No entry other than {baseline} was selected.")
    parts += ["", "## Folders read", ""]
    for f in frontier["folders"]:
        budget = f.get("budget") or {}
        budget_text = {"tokens": f"iso-tokens: {budget.get('tokens')} tokens per run",
                       "flops": f"iso-FLOPs: {budget.get('flops')} training FLOPs per run",
                       "time": f"iso-time: {budget.get('seconds')} s per run"}.get(budget.get("kind"),
                                                                                    "budget unknown")
        parts.append(f"- `{f['folder']}` ({f['kind']}, {budget_text}): {f['finished']} of {f['runs']} runs finished")
    if frontier["skipped"]:
        parts += ["", "Skipped runs:", ""] + [f"- `{s['run_dir']}`: {s['reason']}" for s in frontier["skipped"]]
    if frontier["duplicates"]:
        parts += ["", "Counted once (the same run, same id and config, in two places):", ""]
        parts += [f"- `{d['run_dir']}` = `{d['same_as']}`" for d in frontier["duplicates"]]
    if frontier["notes"]:
        parts += ["", "Notes:", ""] + [f"- {n}" for n in frontier["notes"]]
    parts += ["", f"Command: `{frontier.get('command', '')}`  ",
              f"Git revision: {frontier.get('git_revision') or 'unknown'}."]
    if frontier.get("plot"):
        parts += ["", (f"Plot: `{frontier['plot']}` (error bars: ± the sample std over seeds of each point, the "
                       "spread of one run; thin faint lines: each run's validation loss at its checkpoints, "
                       "mid-schedule, so not finished runs at those budgets).")]
    return "\n".join(parts) + "\n"


def write_frontier(frontier: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """``frontier.json``, ``frontier.md`` and, with matplotlib, ``frontier.png`` in ``out_dir``."""
    from sasformer.compare.plots import matplotlib_available, plot_frontier

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if matplotlib_available():
        paths.append(plot_frontier(frontier, out_dir / "frontier.png"))
        frontier = {**frontier, "plot": "frontier.png"}
    json_path = out_dir / "frontier.json"
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(frontier, indent=2, default=str))
    os.replace(tmp, json_path)
    md_path = out_dir / "frontier.md"
    md_path.write_text(markdown_frontier(frontier))
    return [md_path, json_path, *paths]
