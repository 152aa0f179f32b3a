"""Which host operations launched a kernel: read a profiler timeline and group the matching kernels by the
chain of operations around their launch.

    python3 benchmarks/trace_launchers.py DIR/trace_sas_b16_rank0.json.gz --kernel "Memcpy DtoD"
    python3 benchmarks/trace_launchers.py TRACE --kernel threshold_backward --depth 6 --top 10

The timeline is what ``train_speed.py --profile --trace`` writes (Chrome trace format, gzipped or not). A
profile's kernel table says how long, say, device-to-device copies take; this says which operation asked for
them (``aten::copy_`` inside ``aten::contiguous`` inside ...). A kernel is tied to its host operation by the
profiler's ``External id``, else by the ``correlation`` of the runtime call that launched it; the chain is
every operation on that thread whose time span encloses the launching one, outermost first, of which the
innermost ``--depth`` are shown.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
RUNTIME_CATEGORIES = ("cuda_runtime", "cuda_driver")


@dataclass(frozen=True)
class HostOp:
    thread: tuple[Any, Any]
    start: float
    end: float
    name: str


def load_events(path: Path) -> list[dict]:
    """The timeline's events (``traceEvents``)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


class Timeline:
    """Host operations by thread, and by the ids that tie device work to them."""

    def __init__(self, events: list[dict]) -> None:
        self.by_thread: dict[tuple[Any, Any], list[HostOp]] = defaultdict(list)
        self.by_external_id: dict[Any, HostOp] = {}
        self.runtime_by_correlation: dict[Any, HostOp] = {}
        for e in events:
            if e.get("ph") != "X" or "dur" not in e:
                continue
            op = HostOp((e.get("pid"), e.get("tid")), float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"])
            args = e.get("args", {})
            if e.get("cat") == "cpu_op":
                self.by_thread[op.thread].append(op)
                if "External id" in args:
                    self.by_external_id[args["External id"]] = op
            elif e.get("cat") in RUNTIME_CATEGORIES and "correlation" in args:
                self.runtime_by_correlation[args["correlation"]] = op
        for ops in self.by_thread.values():
            ops.sort(key=lambda o: (o.start, -o.end))
        self.starts = {thread: [o.start for o in ops] for thread, ops in self.by_thread.items()}

    def launcher(self, device_event: dict) -> HostOp | None:
        """The host operation (or, failing that, the runtime call) that launched a device event."""
        args = device_event.get("args", {})
        op = self.by_external_id.get(args.get("External id"))
        return op if op is not None else self.runtime_by_correlation.get(args.get("correlation"))

    def chain(self, op: HostOp) -> list[str]:
        """Names of the host operations on ``op``'s thread whose span encloses it, outermost first (``op``
        itself last when it is one)."""
        ops = self.by_thread.get(op.thread, [])
        last = bisect.bisect_right(self.starts.get(op.thread, []), op.start)
        enclosing = [o for o in ops[:last] if o.end >= op.end]
        names = [o.name for o in enclosing]
        return names if op in enclosing else names + [op.name]


def group_launches(events: list[dict], pattern: str, depth: int) -> list[dict]:
    """Device events whose name contains ``pattern`` (case-insensitive), grouped by the innermost ``depth``
    names of their launch chain; the largest total device time first."""
    timeline = Timeline(events)
    groups: dict[tuple[str, ...], dict] = {}
    for e in events:
        if e.get("cat") not in DEVICE_CATEGORIES or pattern.lower() not in e.get("name", "").lower():
            continue
        op = timeline.launcher(e)
        chain = tuple(timeline.chain(op)[-depth:]) if op is not None else ("(launch not found)",)
        group = groups.setdefault(chain, {"chain": list(chain), "calls": 0, "device_ms": 0.0, "kernels": set()})
        group["calls"] += 1
        group["device_ms"] += float(e.get("dur", 0.0)) / 1000
        group["kernels"].add(e["name"])
    rows = sorted(groups.values(), key=lambda g: -g["device_ms"])
    for row in rows:
        row["kernels"] = sorted(row["kernels"])
    return rows


def markdown(rows: list[dict], pattern: str, top: int) -> str:
    lines = [f"Kernels matching `{pattern}` by the host operations around their launch (innermost last):", "",
             "| calls | device ms | launched from | kernels |", "|---:|---:|---|---|"]
    for row in rows[:top]:
        chain = " > ".join(f"`{name}`" for name in row["chain"])
        kernels = ", ".join(f"`{k[:60]}`" for k in row["kernels"][:3])
        lines.append(f"| {row['calls']} | {row['device_ms']:.3f} | {chain} | {kernels} |")
    if len(rows) > top:
        lines.append(f"| ... | | {len(rows) - top} more chains | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path, help="a profiler timeline (.json or .json.gz)")
    parser.add_argument("--kernel", required=True, help="part of the kernel name, case-insensitive")
    parser.add_argument("--depth", type=int, default=4, help="host operations shown per chain, innermost")
    parser.add_argument("--top", type=int, default=20, help="chains listed")
    args = parser.parse_args(argv)
    if args.depth < 1 or args.top < 1:
        parser.error("--depth and --top must be >= 1")
    rows = group_launches(load_events(args.trace), args.kernel, args.depth)
    if not rows:
        print(f"no device event's name contains {args.kernel!r} in {args.trace}")
        return 1
    print(markdown(rows, args.kernel, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
