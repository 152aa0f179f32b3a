"""``sasformer compare --config configs/compare_tiny.yaml [--out DIR] [--KEY VALUE ...]``: train a grid of
attention variants on the same data and budget, then write ``results.json``, ``results.md`` and plots.

Any grid key can follow as an option, dotted for nested keys (``--budget.tokens 2e6``,
``--seeds [0,1,2]``, ``--train.optim.lr 1e-3``); values are read as YAML. Re-running the same command
resumes an interrupted grid: finished runs are kept, an unfinished one continues from its checkpoint.
"""

from __future__ import annotations

import argparse

from sasformer.commands import accept_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="grid YAML file (configs/compare_tiny.yaml, compare_small.yaml)")
    parser.add_argument("--out", help="grid folder (default: the grid's out_dir, else runs/compare/NAME)")
    parser.add_argument("--plan", action="store_true",
                        help="print every run with its token budget and FLOPs/token, then exit without training")
    parser.add_argument("--only", help="comma-separated entry names: run only these entries of the grid (e.g. mha,sas)")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: write results from the finished runs and list the missing ones")
    parser.add_argument("--time-limit", type=float, metavar="SECONDS",
                        help="start a run only if it should end within SECONDS of this command's start (judged by "
                             "the longest run so far; the first always starts), e.g. for a job time limit; re-run "
                             "the command later for the rest")
    parser.add_argument("--gpus", metavar="LIST",
                        help="run the grid's runs side by side, one process per GPU of this comma-separated list of "
                             "CUDA device indices (e.g. 0,1); each run's output goes to its folder's worker.log")
    parser.add_argument("--redo-mqar", action="store_true",
                        help="run the MQAR probe of every finished run again and update its result (after a change "
                             "to the probe); with --report nothing else trains")
    parser.epilog = "grid overrides: --KEY VALUE for any key of the YAML file, e.g. --budget.tokens 2e6"
    accept_overrides(parser)


def parse_overrides(items: list[str]) -> dict:
    """``["--budget.tokens", "2e6", "--seeds=[0,1]"]`` -> ``{"budget.tokens": 2000000.0, "seeds": [0, 1]}``."""
    from sasformer.train.config import parse_value

    out, i = {}, 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--") or len(item) < 3:
            raise ValueError(f"expected --KEY VALUE (a dotted grid key, e.g. --budget.tokens 2e6), got {item!r}")
        key, eq, value = item[2:].partition("=")
        if not eq:
            if i + 1 >= len(items):
                raise ValueError(f"--{key} needs a value")
            i += 1
            value = items[i]
        out[key] = parse_value(value)
        i += 1
    return out


def select_entries(spec, only: str):
    """The grid restricted to the comma-separated entry names in ``only`` (an unknown name is an error)."""
    import dataclasses

    names = [n.strip() for n in only.split(",") if n.strip()]
    known = [v.name for v in spec.variants]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"--only {only!r}: unknown entry name(s) {unknown}; the grid has {known}")
    return dataclasses.replace(spec, variants=[v for v in spec.variants if v.name in names])


def run(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from sasformer.compare.report import diverged_lines, grid_notes, markdown_table
    from sasformer.compare.runner import ensure_data, plan_runs, run_grid
    from sasformer.compare.spec import load_grid
    from sasformer.compare.workers import parse_gpus

    gpus = parse_gpus(args.gpus) if args.gpus else None
    spec = load_grid(args.config, parse_overrides(getattr(args, "overrides", [])))
    if args.only:
        spec = select_entries(spec, args.only)
    grid_dir = Path(args.out or spec.out_dir or Path("runs") / "compare" / spec.name)
    if args.plan:
        data_dir, meta = ensure_data(spec.data, spec.progress)
        print("| run | params | train FLOPs/token | max tokens | max seconds |\n|---|---:|---:|---:|---:|")
        for p in plan_runs(spec, data_dir, int(meta["vocab_size"]), grid_dir):
            seconds = "-" if p.budget.max_time_s is None else f"{p.budget.max_time_s:g}"
            print(f"| {p.id} | {p.params:,} | {p.train_flops_per_token:.4g} | {p.budget.max_tokens:,} | {seconds} |")
        return 0
    command = shlex.join(["sasformer", "compare", "--config", str(args.config)]
                         + (["--out", str(args.out)] if args.out else [])
                         + (["--only", args.only] if args.only else [])
                         + (["--time-limit", f"{args.time_limit:g}"] if args.time_limit else [])
                         + (["--gpus", args.gpus] if args.gpus else [])
                         + (["--redo-mqar"] if args.redo_mqar else [])
                         + list(getattr(args, "overrides", [])))
    results = run_grid(spec, grid_dir, command, report_only=args.report, time_limit_s=args.time_limit,
                       redo_mqar=args.redo_mqar, gpus=gpus)
    if results["missing_runs"]:
        print(f"not run yet (left out of the tables): {', '.join(results['missing_runs'])}")
    for headline, why, listed in grid_notes(results):
        print(f"{headline} ({why})" + (f": {listed}" if listed else ""))
    print(markdown_table(results["aggregates"]))
    for line in diverged_lines(results["aggregates"]):
        print(line)
    print(f"\nresults: {grid_dir / 'results.md'}, {grid_dir / 'results.json'}")
    if results["plots"]:
        print("plots: " + ", ".join(str(grid_dir / p) for p in results["plots"]))
    if results["failed_runs"]:
        print(f"FAILED (see each run's worker.log; re-run the command to resume them): "
              f"{', '.join(results['failed_runs'])}")
        return 1
    return 0
