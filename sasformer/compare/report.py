"""Aggregating runs over seeds, and the Markdown report.

Spread is the sample standard deviation over seeds (ddof=1); with one seed it is unknown (None,
shown as "n/a"), never zero.

An entry with a diverged seed has no mean over its seeds for what measures the model (loss, perplexity,
zero-shot, MQAR): the diverged run has no value, and a mean over the others would favour the entry that
diverges more often. Those cells are n/a; the other seeds' values are kept apart (``survivors``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# what measures the trained model: a diverged run has no value, so these have no mean over every seed
QUALITY_KEYS = ("final_val_loss", "final_val_ppl", "zero_shot_avg", "mqar_accuracy")


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the values that are not None; (None, None) if there are none."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return None, None
    mean = sum(present) / len(present)
    if len(present) == 1:
        return mean, None
    var = sum((v - mean) ** 2 for v in present) / (len(present) - 1)
    return mean, math.sqrt(var)


def aggregate(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per grid entry (in first-seen order) summarising its runs over seeds."""
    order: list[str] = []
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        if run["entry"] not in groups:
            order.append(run["entry"])
            groups[run["entry"]] = []
        groups[run["entry"]].append(run)
    rows = []
    for entry in order:
        group = groups[entry]
        first = group[0]
        row: dict[str, Any] = {
            "entry": entry,
            "attention": first["attention"],
            "size": first.get("size"),
            "seeds": [r["seed"] for r in group],
            "diverged": [r["seed"] for r in group if r.get("diverged")],
            "params": first["params"],
            "train_flops_per_token": first["train_flops_per_token"],
        }
        for key in ("tokens_seen", "train_flops", *QUALITY_KEYS, "tokens_per_s", "mfu", "train_seconds"):
            row[key], row[key + "_std"] = mean_std([r.get(key) for r in group])
        row["survivors"] = None
        if row["diverged"]:
            finished = [r for r in group if not r.get("diverged")]
            row["survivors"] = {"seeds": [r["seed"] for r in finished]}
            for key in QUALITY_KEYS:
                row["survivors"][key], row["survivors"][key + "_std"] = row[key], row[key + "_std"]
                row[key], row[key + "_std"] = None, None
        row["peak_mem_gib"] = max((r["peak_mem_gib"] for r in group if r.get("peak_mem_gib") is not None),
                                  default=None)
        rows.append(row)
    return rows


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _pm(mean: float | None, std: float | None, fmt: str) -> str:
    if mean is None:
        return "n/a"
    return format(mean, fmt) if std is None else f"{format(mean, fmt)} ± {format(std, fmt)}"


def _si(value: float | None) -> str:
    if value is None:
        return "n/a"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _diverged(row: dict[str, Any]) -> str:
    n = len(row.get("diverged") or [])
    return f" ({n} diverged)" if n else ""


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The per-entry table: mean ± std over seeds where seeds vary (n/a for the model's scores of an entry
    with a diverged seed)."""
    lines = [
        ("| variant | seeds | params | train FLOPs/token | tokens seen | val loss | val ppl | zero-shot avg "
         "| MQAR acc | tokens/s | MFU | peak mem GiB |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        lines.append(
            f"| {r['entry']} | {len(r['seeds'])}{_diverged(r)} | {_si(r['params'])} | "
            f"{_si(r['train_flops_per_token'])} | "
            f"{_si(r['tokens_seen'])} | {_pm(r['final_val_loss'], r['final_val_loss_std'], '.4f')} | "
            f"{_pm(r['final_val_ppl'], r['final_val_ppl_std'], '.2f')} | "
            f"{_pm(r['zero_shot_avg'], r['zero_shot_avg_std'], '.3f')} | "
            f"{_pm(r['mqar_accuracy'], r['mqar_accuracy_std'], '.3f')} | {_si(r['tokens_per_s'])} | "
            f"{_num(mfu, '.1f') + ('%' if mfu is not None else '')} | {_num(r['peak_mem_gib'], '.2f')} |"
        )
    return "\n".join(lines)


def _seeds(seeds: Sequence[int]) -> str:
    return ("seeds " if len(seeds) > 1 else "seed ") + ", ".join(map(str, seeds))


def diverged_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """For each entry with a diverged seed: which seeds diverged and what the others reached, kept apart from
    the table (a mean over the seeds that finished is not a mean over the entry's seeds)."""
    lines = []
    for r in rows:
        if not r.get("diverged"):
            continue
        kept = r.get("survivors") or {}
        others = kept.get("seeds") or []
        what = (f"{_seeds(others)} reach{'' if len(others) > 1 else 'es'} val loss "
                f"{_pm(kept.get('final_val_loss'), kept.get('final_val_loss_std'), '.4f')}") if others \
            else "no seed finished"
        lines.append(f"- {r['entry']}: {len(r['diverged'])} of {len(r['seeds'])} seeds diverged "
                     f"({_seeds(r['diverged'])}); {what}")
    return lines


def zero_shot_table(runs: Sequence[dict[str, Any]]) -> str | None:
    """Per-task zero-shot accuracy (mean over seeds, ± their std) with its standard error over the items in
    brackets (mean over seeds) per entry (n/a for an entry with a diverged seed), or None when no run was
    evaluated."""
    tasks = sorted({t for r in runs for t in (r.get("zero_shot") or {})})
    if not tasks:
        return None
    lines = ["| variant | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    entries: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        entries.setdefault(r["entry"], []).append(r)
    for entry, group in entries.items():
        cells = []
        if any(r.get("diverged") for r in group):  # no mean over every seed, as in the main table
            lines.append(f"| {entry} | " + " | ".join("n/a" for _ in tasks) + " |")
            continue
        for task in tasks:
            scores = [(r.get("zero_shot") or {}).get(task, {}) for r in group]
            mean, std = mean_std([score.get("acc") for score in scores])
            stderr, _ = mean_std([score.get("acc_stderr") for score in scores])
            cells.append(_pm(mean, std, ".3f") + ("" if stderr is None else f" ({stderr:.3f})"))
        lines.append(f"| {entry} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def provenance(results: dict[str, Any]) -> list[str]:
    """Where the runs trained: one line when every run shares a revision and device, else one per group
    (a grid resumed across calls or machines mixes them, and the pass writing the report may be another)."""
    def describe(env: dict[str, Any]) -> str:
        return (f"Git revision: {env.get('git_revision') or 'unknown'}; device: {env.get('device')}; "
                f"torch {env.get('torch')}, python {env.get('python')}")

    groups: dict[str, list[str]] = {}
    for run in results["runs"]:
        if run.get("environment"):
            groups.setdefault(describe(run["environment"]), []).append(run["id"])
    if len(groups) <= 1:
        return [describe(results["environment"]) + "."]
    lines = ["The runs trained at several revisions or on several devices (each run's `result.json` has its own):", ""]
    lines += [f"- {where}: {', '.join(ids)}" for where, ids in groups.items()]
    return lines


def _uniform_guess(data: dict[str, Any]) -> str:
    """The loss of a uniform guess over the tokenizer's vocabulary, when the report knows that vocabulary."""
    if data.get("vocab_size"):
        return f"A model that guesses uniformly scores ln({data['vocab_size']}) = {math.log(data['vocab_size']):.3f}."
    return ("The tokenizer's vocabulary is not known to this report (written without the data folder); the models' "
            f"embeddings have {data.get('padded_vocab_size', 'n/a')} rows, padded.")


def grid_notes(results: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """What a reader of the table must know about the runs behind it, as (headline, why, runs listed or None):
    results.md prints them under the table, ``sasformer compare`` on the console."""
    from sasformer.compare.runner import OLD_VALIDATION_RULE, VALIDATION_RULE

    notes: list[tuple[str, str, str | None]] = []
    if results.get("earlier_init_runs"):
        notes.append(("Trained with an earlier initialisation of their attention layer",
                      "in the table; a run of the grid made now would start from the layer's present "
                      "initialisation, see docs/attention.md", ", ".join(results["earlier_init_runs"])))
    if results.get("validation_rule") == OLD_VALIDATION_RULE:
        notes.append(("Every run in the table was validated under the old rule",
                      f"{OLD_VALIDATION_RULE} instead of {VALIDATION_RULE}: they compare with each other, not with "
                      "runs of the present rule", None))
    if old_rule := results.get("old_validation_rule_runs") or []:
        notes.append(("Measured under the old validation rule",
                      f"{OLD_VALIDATION_RULE} instead of {VALIDATION_RULE}: other validation windows, so neither in "
                      "the table nor compared with it; delete a run's folder and re-run the grid to redo it",
                      ", ".join(f"{r['id']} (val loss {_num(r.get('final_val_loss'), '.4f')})" for r in old_rule)))
    return notes


def markdown_report(results: dict[str, Any]) -> str:
    """``results.md``: the table, the budget, and the provenance of the numbers."""
    spec = results["spec"]
    budget = spec["budget"]
    if budget["kind"] == "flops":
        budget_text = f"iso-FLOPs: {budget['flops']:.3g} training FLOPs per run (tokens = budget / FLOPs per token)"
    elif budget["kind"] == "time":
        budget_text = (f"iso-time: {budget['seconds']:g} s of training per run (schedule laid out over "
                       f"{budget['tokens']:,} tokens)")
    else:
        budget_text = f"iso-tokens: {budget['tokens']:,} tokens per run"
    # a report written without the data folder may not know the count
    val = "windows" if results.get("val_tokens") is None else f"{results['val_tokens']:,} tokens"
    parts = [
        f"# Comparison `{spec['name']}`",
        "",
        (f"Budget: {budget_text}. Seeds: {spec['seeds']}. Validation: the same {val} "
         "for every run. Values are mean ± sample std over seeds (n/a: one seed, not measured, or a seed "
         "diverged). "
         + _uniform_guess(results["data"])),
        "",
        markdown_table(results["aggregates"]),
    ]
    diverged = diverged_lines(results["aggregates"])
    if diverged:
        parts += ["", ("**Diverged seeds.** An entry with a diverged seed has n/a for its loss, perplexity, "
                       "zero-shot and MQAR: the diverged run has no value, and a mean over the seeds that finished "
                       "would favour the entry that diverges more often. What those seeds reached, not comparable "
                       "with the means over every seed:"), "", *diverged]
    failed = list(results.get("failed_runs", []))
    not_in = [*(f"{r} (failed; its log says why)" for r in failed),
              *(f"{r} (not run yet)" for r in results.get("missing_runs", []) if r not in failed)]
    if not_in:
        parts += ["", "**Not in the table** (the means above are over the runs that finished): " + ", ".join(not_in)
                  + "."]
    for headline, why, listed in grid_notes(results):
        parts += ["", f"**{headline}** ({why})" + (f": {listed}." if listed else ".")]
    zs = zero_shot_table(results["runs"])
    if zs is not None:
        parts += ["", "Zero-shot accuracy per task (in brackets: its standard error over the items):", "", zs]
    parts += [
        "",
        f"Command: `{results['command']}`  ",
        *provenance(results),
    ]
    if results.get("plots"):
        parts += ["", "Plots: " + ", ".join(f"`{p}`" for p in results["plots"])]
    return "\n".join(parts) + "\n"
