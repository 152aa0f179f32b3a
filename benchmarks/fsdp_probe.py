"""Why FSDP2 does not scale at GPT-small: one GPU, DDP and FSDP2 settings timed back to back on 2 GPUs.

    python3 benchmarks/fsdp_probe.py --out DIR                  # MHA and SAS, about 8 minutes on 2 x H200

Each run is ``benchmarks/train_speed.py`` (the trainer's real step on synthetic tokens, compiled, bf16)
at global batch ``--batch-size`` x 1024 with ``--micro-batch-size`` sequences per forward, so the one-GPU
run accumulates and every GPU does the same work per micro-step; every run times ``--steps`` steps,
then the same number phase by phase (``--breakdown``: forward, backward, clip, optimizer, ... with the
device synchronised between phases, on every rank). The ``fsdp`` runs also profile a few steps
(``--profile``: kernel time by category, the host's own time) and write each rank's timeline
(``--trace``), summarised in the report: how much of the time each GPU computed, communicated or idled,
and whether the two GPUs computed at the same time or took turns. The runs (``--runs``, as
``attention:run``; by default MHA's first, then SAS's):

- ``one``, ``ddp``, ``fsdp`` (the library's defaults: one block per unit, forward prefetch);
- ``fsdp-b64``: FSDP2 at twice the batch per GPU. If the step is bound by the host, its time hardly
  grows with the batch (the GPU work doubles, the host work does not), and tokens/s nearly doubles;
  ``one-b64`` is the 1-GPU run at that global batch, its baseline; ``fsdp-b128`` and ``one-b128``: four times;
- ``fsdp-all``: the whole model one unit; ``fsdp-noprefetch``: FSDP2's own forward order;
- ``fsdp-u6-keep``: two units of six blocks, parameters kept gathered from forward to backward.

Each run is stopped after ``--run-timeout-s`` and none starts after ``--budget-s``; what did not run is
listed. Writes into ``--out``: ``fsdp_probe.md`` (the table, the commands), ``fsdp_probe.json``,
``runs.tgz`` (every run's log, train_speed.json and .md) and ``traces.tgz`` (the timelines; open them in
Perfetto or chrome://tracing), few files so the folder travels whole.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.checks import MULTICAST_OFF  # noqa: E402

# name: (processes, batch multiple, extra train_speed.py arguments)
RUNS = {
    "one": (1, 1, []),
    "one-b64": (1, 2, []),
    "ddp": (2, 1, ["--parallel", "ddp"]),
    "fsdp": (2, 1, ["--parallel", "fsdp", "--profile", "--trace"]),
    "fsdp-b64": (2, 2, ["--parallel", "fsdp"]),
    "one-b128": (1, 4, []),
    "fsdp-b128": (2, 4, ["--parallel", "fsdp"]),
    "fsdp-all": (2, 1, ["--parallel", "fsdp", "--fsdp-blocks-per-unit", "0"]),
    "fsdp-noprefetch": (2, 1, ["--parallel", "fsdp", "--no-fsdp-forward-prefetch"]),
    "fsdp-u6-keep": (2, 1, ["--parallel", "fsdp", "--fsdp-blocks-per-unit", "6", "--no-fsdp-reshard-after-forward"]),
}
# attention:run, most telling first (SAS compiles for over a minute: its secondary runs come last)
PLAN = ("mha:one", "mha:ddp", "mha:fsdp", "sas:one", "sas:ddp", "sas:fsdp", "mha:fsdp-b64", "mha:fsdp-all",
        "sas:fsdp-b64", "mha:fsdp-noprefetch", "mha:fsdp-u6-keep", "sas:fsdp-all")
MAX_ARCHIVE_BYTES = 15 * 2**20  # the GPU machines hand back files of up to 16 MiB


def command(args: argparse.Namespace, attention: str, name: str, out: Path) -> list[str]:
    world, factor, extra = RUNS[name]
    launcher = [sys.executable] if world == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world)]
    return launcher + [
        str(REPO / "benchmarks" / "train_speed.py"), "--attention", attention,
        "--batch-size", str(args.batch_size * factor), "--micro-batch-size", str(args.micro_batch_size * factor),
        "--warmup", str(args.warmup), "--steps", str(args.steps), "--breakdown",
        "--out", str(out / f"{attention}-{name}"), *extra, *shlex.split(args.extra),
    ]


def execute(cmd: list[str], log: Path, timeout_s: float) -> tuple[int | None, float]:
    env = {**os.environ, **MULTICAST_OFF, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    began = time.perf_counter()
    with log.open("w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        process = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                   start_new_session=True)
        try:
            rc: int | None = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            # torchrun's workers run in sessions of their own: SIGTERM lets torchrun stop them first
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            rc = None
    return rc, time.perf_counter() - began


def summarise(attention: str, name: str, run_out: Path) -> dict | None:
    path = run_out / "train_speed.json"
    if not path.exists():
        return None
    r = json.loads(path.read_text())["rows"][0]
    row = {"attention": attention, "run": name, "parallel": r.get("parallel") or "1 GPU",
           "batch": r["batch_size"], "micro_batch": r["micro_batch_size"], "accum": r["grad_accum"],
           "step_ms": r["step_ms"], "host_ms": r["host_ms"], "tokens_per_s": r["tokens_per_s"],
           "peak_mem_gib": r["peak_mem_gib"]}
    breakdown = r.get("breakdown")
    if breakdown:
        row["phases_per_rank"] = breakdown.get("per_rank") or [breakdown["ms_per_step"]]
    profile = r.get("profile")
    if profile:
        row["kernel_ms"] = profile["kernel_ms_per_step"]
        row["kernel_categories"] = profile["categories"]
        row["profiled_host_ms"] = profile.get("host_ms_per_step")
    return row


Spans = list[tuple[float, float]]


def merged(spans: Spans) -> Spans:
    """The union of (start, end) intervals, as sorted disjoint intervals."""
    out: Spans = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def intersection(a: Spans, b: Spans) -> Spans:
    """The intersection of two unions of sorted disjoint intervals."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def total(spans: Spans) -> float:
    return sum(end - start for start, end in spans)


def gpu_activity(trace: Path) -> tuple[Spans, Spans]:
    """When a rank's GPU ran compute (kernels, copies) and communication (NCCL kernels), from its
    profiler timeline, in microseconds on the host clock shared by the ranks."""
    with gzip.open(trace, "rt") as f:
        data = json.load(f)
    base_us = data.get("baseTimeNanoseconds", 0) / 1000
    compute, comm = [], []
    for e in data["traceEvents"]:
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and e.get("dur"):
            span = (e["ts"] + base_us, e["ts"] + base_us + e["dur"])
            (comm if "nccl" in e.get("name", "").lower() else compute).append(span)
    return merged(compute), merged(comm)


def timeline_summary(traces: list[Path]) -> dict | None:
    """Per rank, the share of the profiled window its GPU computed, communicated or idled; for two ranks,
    the share of their common window in which both computed (data parallelism at work), one computed
    while the other did not (the ranks taking turns), or neither."""
    activity = [gpu_activity(t) for t in sorted(traces)]
    if not activity or not all(c for c, _ in activity):
        return None
    ranks = []
    for compute, comm in activity:
        busy = merged(compute + comm)
        window = busy[-1][1] - busy[0][0]
        ranks.append({"window_ms": window / 1000, "compute": total(compute) / window,
                      "communication": total(comm) / window, "idle": 1 - total(busy) / window})
    summary: dict = {"ranks": ranks}
    if len(activity) == 2:
        (c0, _), (c1, _) = activity
        window = [(max(c0[0][0], c1[0][0]), min(c0[-1][1], c1[-1][1]))]
        c0, c1 = intersection(c0, window), intersection(c1, window)
        length = total(window)
        both = total(intersection(c0, c1))
        summary["pair"] = {"both_compute": both / length, "one_computes": (total(c0) + total(c1) - 2 * both) / length,
                           "neither": 1 - total(merged(c0 + c1)) / length}
    return summary


def markdown(rows: list[dict], skipped: list[str], meta: dict) -> str:
    lines = [f"# FSDP2 probe ({meta['gpus']})", "", f"Command: `{meta['command']}`  ",
             f"Git revision `{meta['git_revision']}`, torch {meta['torch']}, global batch {meta['batch_size']} "
             f"sequences (micro-batch {meta['micro_batch_size']}), {meta['steps']} timed steps after "
             f"{meta['warmup']}.", "",
             "| attention | run | parallel | batch | micro x accum | step (ms) | tokens/s | vs 1 GPU | peak GiB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    # scaling is against the 1-GPU run at the same global batch
    one = {(r["attention"], r["batch"]): r["tokens_per_s"] for r in rows if r["parallel"] == "1 GPU"}
    for r in rows:
        base = one.get((r["attention"], r["batch"]))
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "n/a"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
        lines.append(f"| {r['attention']} | {r['run']} | {r['parallel']} | {r['batch']} | "
                     f"{r['micro_batch']}x{r['accum']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {ratio} "
                     f"| {mem} |")
    phased = [r for r in rows if r.get("phases_per_rank")]
    if phased:
        phases = list(phased[0]["phases_per_rank"][0])
        lines += ["", "Phases of the step, ms (device synchronised at each phase's end, so nothing overlaps "
                  "across phases; the total exceeds the step time):", "",
                  "| attention | run | rank | " + " | ".join(phases) + " | total |",
                  "|---|---|---:|" + "---:|" * (len(phases) + 1)]
        for r in phased:
            for rank, ms in enumerate(r["phases_per_rank"]):
                cells = " | ".join(f"{ms.get(p, 0.0):.2f}" for p in phases)
                lines.append(f"| {r['attention']} | {r['run']} | {rank} | {cells} | {sum(ms.values()):.1f} |")
    profiled = [r for r in rows if r.get("kernel_categories")]
    if profiled:
        lines += ["", "Profiled steps (rank 0): kernel time by category and the host's own time (profiler on):", "",
                  "| attention | run | kernels (ms) | host self (ms) | by category (ms) |", "|---|---|---:|---:|---|"]
        for r in profiled:
            cats = ", ".join(f"{k} {v:.1f}" for k, v in r["kernel_categories"].items())
            host = f"{r['profiled_host_ms']:.1f}" if r.get("profiled_host_ms") is not None else "n/a"
            lines.append(f"| {r['attention']} | {r['run']} | {r['kernel_ms']:.1f} | {host} | {cats} |")
    timed = [r for r in rows if r.get("timeline")]
    if timed:
        lines += ["", "GPU timelines of the profiled steps (share of the window; `both compute`: the two GPUs "
                  "computed at the same time; `one computes`: one did while the other did not, the GPUs taking "
                  "turns; from the traces in `traces.tgz`):", "",
                  "| attention | run | rank 0 compute / comm / idle | rank 1 compute / comm / idle | both compute "
                  "| one computes | neither |", "|---|---|---|---|---:|---:|---:|"]
        for r in timed:
            t = r["timeline"]
            per_rank = [f"{x['compute']:.0%} / {x['communication']:.0%} / {x['idle']:.0%}" for x in t["ranks"]]
            pair = t.get("pair") or {}
            lines.append(f"| {r['attention']} | {r['run']} | " + " | ".join((per_rank + ["n/a"])[:2]) + " | "
                         + " | ".join(f"{pair[k]:.0%}" if k in pair else "n/a"
                                      for k in ("both_compute", "one_computes", "neither")) + " |")
    if skipped:
        lines += ["", "Not run or failed: " + ", ".join(skipped)]
    lines += ["", "Commands:", ""] + [f"- `{c}`" for c in meta["commands"]]
    return "\n".join(lines) + "\n"


def pack(out: Path, name: str, paths: list[Path]) -> list[str]:
    """``out/name``, a gzipped tar of ``paths`` (named relative to ``out``), smallest first while their sizes
    add up to less than ``MAX_ARCHIVE_BYTES``; returns the ones left out."""
    left_out, total = [], 0
    with tarfile.open(out / name, "w:gz") as tar:
        for p in sorted(paths, key=lambda p: p.stat().st_size):
            total += p.stat().st_size
            if total > MAX_ARCHIVE_BYTES:
                left_out.append(str(p.relative_to(out)))
                continue
            tar.add(p, arcname=str(p.relative_to(out)))
    return left_out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", nargs="+", default=list(PLAN), metavar="ATTENTION:RUN",
                        help=f"in this order; RUN one of {', '.join(RUNS)} (default: {' '.join(PLAN)})")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--run-timeout-s", type=float, default=100.0)
    parser.add_argument("--extra", default="",
                        help="more train_speed.py arguments for every run, e.g. a CPU smoke test: '--device cpu "
                             "--no-compile --d-model 64 --n-heads 4 --seq-len 8 --vocab-size 256'")
    parser.add_argument("--budget-s", type=float, default=470.0,
                        help="start no run after this many seconds (one started before runs at most 60 s past it)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "runs"
    plan = [tuple(item.split(":", 1)) for item in args.runs]
    bad = [item for item, p in zip(args.runs, plan) if len(p) != 2 or p[1] not in RUNS]
    if bad:
        parser.error(f"--runs {' '.join(bad)}: give ATTENTION:RUN with RUN one of {', '.join(RUNS)}")
    began = time.perf_counter()
    rows, skipped, commands = [], [], []
    for attention, name in plan:
        left = args.budget_s - (time.perf_counter() - began)
        if left <= 0:
            skipped.append(f"{attention}-{name} (budget)")
            continue
        cmd = command(args, attention, name, work)
        commands.append(shlex.join(cmd))
        work.mkdir(parents=True, exist_ok=True)
        rc, seconds = execute(cmd, work / f"{attention}-{name}.log", min(args.run_timeout_s, left + 60))
        row = summarise(attention, name, work / f"{attention}-{name}")
        status = "timed out" if rc is None else f"rc {rc}"
        print(f"{attention}-{name}: {status}, {seconds:.0f} s" +
              (f", {row['step_ms']:.1f} ms/step, {row['tokens_per_s']:,.0f} tokens/s" if row else ""), flush=True)
        if row is None or rc != 0:
            skipped.append(f"{attention}-{name} ({status})")
        if row is not None:
            traces = list((work / f"{attention}-{name}").glob("trace_*.json.gz"))
            try:
                row["timeline"] = timeline_summary(traces) if traces else None
            except (OSError, ValueError, KeyError) as error:  # a broken trace must not cost the other results
                print(f"  could not read the traces of {attention}-{name}: {error}", flush=True)
            rows.append(row)
    import torch

    rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO,
                         check=False).stdout.strip() or None
    gpus = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "cpu"
    meta = {"command": "python3 " + shlex.join(sys.argv), "git_revision": rev, "torch": torch.__version__,
            "gpus": gpus, "batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size,
            "steps": args.steps, "warmup": args.warmup, "commands": commands, "seconds": time.perf_counter() - began}
    (out / "fsdp_probe.json").write_text(json.dumps({"meta": meta, "rows": rows, "skipped": skipped}, indent=2))
    table = markdown(rows, skipped, meta)
    if work.exists():
        files = [p for p in work.rglob("*") if p.is_file()]
        traces = [p for p in files if p.name.startswith("trace_")]
        left_out = pack(out, "runs.tgz", [p for p in files if p not in traces])
        left_out += pack(out, "traces.tgz", traces) if traces else []
        shutil.rmtree(work)
        if left_out:
            table += "\nLeft out of the archives (too large): " + ", ".join(left_out) + "\n"
    (out / "fsdp_probe.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
