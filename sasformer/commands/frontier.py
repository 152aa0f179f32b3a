"""``sasformer frontier DIR [DIR ...] --out OUT [--only a,b] [--baseline mha]``: final validation loss against
training FLOPs across grid folders (one per budget, say), each entry compared with the baseline at equal
compute; writes ``frontier.md``, ``frontier.json`` and, with matplotlib, ``frontier.png``.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folders", nargs="*", metavar="DIR",
                        help="grid folders (each with runs/), or folders of run folders; finished runs are read")
    parser.add_argument("--out", required=True, help="folder for frontier.md, frontier.json and frontier.png")
    parser.add_argument("--only", help="comma-separated entry names to include (e.g. mha,sas); default: all")
    parser.add_argument("--baseline", default="mha", help="entry the others are compared with (default: mha)")


def run(args: argparse.Namespace) -> int:
    import shlex

    from sasformer.compare.env import git_revision
    from sasformer.compare.frontier import build_frontier
    from sasformer.compare.frontier_report import comparisons_table, points_table, write_frontier

    if not args.folders:
        raise ValueError("no folder given: name one or more grid folders, e.g. sasformer frontier "
                         "runs/compare/mini runs/compare/mini-flops-2.163e16 --out runs/frontier")
    only = None
    if args.only is not None:
        only = [name.strip() for name in args.only.split(",") if name.strip()]
        if not only:
            raise ValueError(f"--only {args.only!r} names no entry; give comma-separated entry names, e.g. mha,sas")
    frontier = build_frontier(args.folders, only, args.baseline)
    frontier["command"] = shlex.join(["sasformer", "frontier", *map(str, args.folders), "--out", str(args.out)]
                                     + (["--only", args.only] if args.only else [])
                                     + ["--baseline", args.baseline])
    frontier["git_revision"] = git_revision()
    paths = write_frontier(frontier, args.out)
    print(points_table(frontier["points"]))
    if frontier["comparisons"]:
        print()
        print(comparisons_table(frontier["comparisons"], args.baseline))
    for skipped in frontier["skipped"]:
        print(f"skipped {skipped['run_dir']}: {skipped['reason']}")
    for note in frontier["notes"]:
        print(f"note: {note}")
    print("\nwritten: " + ", ".join(str(p) for p in paths))
    return 0
