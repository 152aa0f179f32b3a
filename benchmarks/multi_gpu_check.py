"""Multi-GPU training check: does data parallelism over N GPUs (DDP, FSDP2) train like one GPU with the
same global batch, how far does throughput scale, and do checkpoints move between world sizes?

    python3 benchmarks/multi_gpu_check.py --data-dir DIR --out OUT [--attention mha sas] [--steps 200]

Every run is ``sasformer train`` on the ``--size`` preset with global batch ``--micro-batch`` x N, so the
1-GPU run accumulates N micro-batches of the size each of the N processes runs once: per-device work is
the same and throughput ratios are scaling. Per attention variant:

- ``one``: 1 GPU; ``one-repeat`` (``--repeats`` of them, ``one-repeat2``, ...): the same run again, on
  the other GPUs at the same time, the run-to-run noise of bf16 training;
- ``ddp``, ``fsdp``: N processes through torchrun;
- ``ddp>one``, ``fsdp>one``: resumed on 1 GPU from the N-process checkpoint at half the steps;
- ``one>ddp``, ``one>fsdp``: resumed on N processes from the 1-GPU checkpoint at half the steps.

Judged per logged window (the mean loss of ``--log-interval`` steps): the loss of every run from scratch
within ``--rtol`` (relative) of ``one``, or within the largest such gap of the ``one-repeat`` runs where
that is larger (bf16 training is not bitwise repeatable, so a parallel run is held to no tighter a bound
than the same 1-GPU run started again), that of every resumed run within ``--rtol`` of the run it
resumed, and the N-process throughput (median over windows after ``--skip-steps``, compilation
excluded) at least ``--min-scaling`` times the 1-GPU one. ``--report`` judges a saved JSON again. Writes
``multi_gpu_check.json``, ``multi_gpu_check.md``, ``loss_curves.png`` and each run's folder and log;
exits 1 when a check fails. Finished runs are kept: run the same command again into the same ``--out``
to continue after an interruption. ``--device cpu`` runs the same plan on gloo processes (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.checks import MULTICAST_OFF
from sasformer.train.metrics import read_metrics


@dataclass
class Run:
    name: str
    world: int
    parallel: str = "none"
    resume_from: str | None = None  # name of the run whose middle checkpoint this one resumes
    gpu: int = 0  # first GPU, for 1-process runs started side by side
    rc: int | None = None
    seconds: float = 0.0
    losses: dict[int, float] = field(default_factory=dict)
    tokens_per_s: dict[int, float] = field(default_factory=dict)
    peak_mem_gib: float | None = None


def is_repeat(name: str) -> bool:
    return name.startswith("one-repeat")


def plan(world: int, repeats: int = 1, only: list[str] | None = None) -> list[list[Run]]:
    """Stages of runs; the runs of one stage start together (1-process runs on different GPUs). ``only``:
    just the runs of these names (a resumed run's source among them; ``one``, the reference, always)."""
    singles = [Run("one", 1)] + [Run("one-repeat" + (str(i + 1) if i else ""), 1) for i in range(repeats)]
    stages = []
    for first in range(0, len(singles), world):
        stage = singles[first:first + world]
        for gpu, run in enumerate(stage):
            run.gpu = gpu
        stages.append(stage)
    stages += [
        [Run("ddp", world, "ddp")],
        [Run("fsdp", world, "fsdp")],
        [Run("ddp>one", 1, resume_from="ddp", gpu=0), Run("fsdp>one", 1, resume_from="fsdp", gpu=1 % world)],
        [Run("one>ddp", world, "ddp", resume_from="one")],
        [Run("one>fsdp", world, "fsdp", resume_from="one")],
    ]
    if only is None:
        return stages
    known = {run.name for stage in stages for run in stage}
    if unknown := set(only) - known:
        raise ValueError(f"unknown runs {sorted(unknown)}; the plan has {sorted(known)}")
    if "one" not in only:
        raise ValueError("the runs must include 'one', the 1-GPU run every other is judged against")
    for run in (run for stage in stages for run in stage if run.name in only and run.resume_from):
        if run.resume_from not in only:
            raise ValueError(f"run {run.name!r} resumes from {run.resume_from!r}: include that run too")
    return [kept for stage in stages if (kept := [run for run in stage if run.name in only])]


def run_dir(out: Path, attention: str, name: str) -> Path:
    return out / "runs" / f"{attention}-{name.replace('>', '-to-')}"


def train_command(args: argparse.Namespace, attention: str, run: Run, out: Path) -> list[str]:
    launcher = [sys.executable]
    if run.world > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(run.world)]
    overrides = {
        "model.size": args.size, "model.attention": attention, "data_dir": args.data_dir,
        "seq_len": args.seq_len, "batch_size": args.micro_batch * args.world, "micro_batch_size": args.micro_batch,
        "max_steps": args.steps, "max_tokens": "null", "optim.warmup_steps": args.warmup_steps,
        "optim.lr": args.lr, "log_interval": args.log_interval, "eval_interval": 0,
        "checkpoint_interval": args.steps // 2, "keep_last": 3, "compile": str(args.compile).lower(),
        "dtype": args.dtype, "device": args.device, "parallel": run.parallel if run.world > 1 else "ddp",
        "fsdp_blocks_per_unit": args.fsdp_blocks_per_unit, "compile_scope": args.compile_scope,
        **({"fsdp_param_dtype": args.fsdp_param_dtype} if run.parallel == "fsdp" and run.world > 1 else {}),
        "progress": "false", "tensorboard": "false", "out_dir": run_dir(out, attention, run.name),
        "resume": (run_dir(out, attention, run.resume_from) / "checkpoints" / f"step_{args.steps // 2:06d}"
                   if run.resume_from else "none"),
    }
    cmd = launcher + ["-m", "sasformer", "train", "--config", args.config]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def run_identity(args: argparse.Namespace, attention: str, run: Run, out: Path) -> list[list[str]]:
    """The commands a run's result depends on: its own and, for a resumed run, those of the runs it resumed
    from (a source run again with another setting makes the resumed run stale too)."""
    runs = {r.name: r for stage in plan(args.world, args.repeats) for r in stage}
    chain = [train_command(args, attention, run, out)]
    while run.resume_from:
        run = runs[run.resume_from]
        chain.append(train_command(args, attention, run, out))
    return chain


def execute(args: argparse.Namespace, attention: str, run: Run, out: Path) -> None:
    folder = run_dir(out, attention, run.name)
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **MULTICAST_OFF, "PYTHONUNBUFFERED": "1"}
    if args.device != "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(run.gpu + i) for i in range(run.world))
    done_marker = folder / "finished.json"
    identity = run_identity(args, attention, run, out)
    cmd = identity[0]  # the run's own command comes first
    done = json.loads(done_marker.read_text()) if done_marker.exists() else {}
    # a run finished by an earlier, interrupted invocation into the same --out is kept, if its command (and
    # its source's) was this one: a changed setting runs it again
    if done.get("commands") == identity:
        run.rc, run.seconds = done["rc"], done["seconds"]
    else:
        shutil.rmtree(folder)  # a failed or interrupted attempt, or another command: start clean
        folder.mkdir(parents=True)
        start = time.perf_counter()
        with (folder / "train.log").open("w") as log:
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            try:
                run.rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        timeout=args.run_timeout).returncode
            except subprocess.TimeoutExpired:
                run.rc = 124
        run.seconds = time.perf_counter() - start
        if run.rc == 0:
            done_marker.write_text(json.dumps({"rc": run.rc, "seconds": run.seconds, "commands": identity}))
    metrics = folder / "metrics.jsonl"
    records = [r for r in read_metrics(metrics) if r.get("kind") == "train"] if metrics.exists() else []
    run.losses = {r["step"]: r["loss"] for r in records}
    run.tokens_per_s = {r["step"]: r["tokens_per_s"] for r in records}
    mems = [r["peak_mem_gib"] for r in records if r.get("peak_mem_gib") is not None]
    run.peak_mem_gib = max(mems) if mems else None
    print(f"{attention} {run.name}: rc={run.rc} {run.seconds:.0f}s, {len(records)} windows", flush=True)


def median_throughput(run: Run, skip_steps: int) -> float | None:
    values = [v for step, v in run.tokens_per_s.items() if step > skip_steps]
    return statistics.median(values) if values else None


def max_relative_gap(got: dict[int, float], want: dict[int, float]) -> float | None:
    """Largest relative loss difference over the windows ``got`` logged; None if one is missing in ``want``."""
    if not got or any(step not in want for step in got):
        return None
    return max(abs(loss - want[step]) / abs(want[step]) for step, loss in got.items())


def loss_limit(rtol: float, ref: Run, repeats: list[Run]) -> float:
    """The bound on a run's relative loss gap to ``ref``: ``rtol``, or the noise floor where larger (the
    largest gap of a repeated 1-GPU run to ``ref``; a repeat missing windows does not count)."""
    gaps = [gap for run in repeats if (gap := max_relative_gap(run.losses, ref.losses)) is not None]
    return max([rtol, *gaps])


def judge(args: argparse.Namespace, attention: str, runs: dict[str, Run]) -> list[dict]:
    """One row per run: its numbers and whether it passed its checks.

    A run started from scratch is held to ``one``; a resumed run to the run whose checkpoint it
    loaded (it inherits that run's distance from ``one``, which that run's own row judges).
    """
    ref = runs["one"]
    ref_tps = median_throughput(ref, args.skip_steps)
    half = args.steps // 2
    limit = loss_limit(args.rtol, ref, [run for run in runs.values() if is_repeat(run.name)])
    rows = []
    for run in runs.values():
        expected = [s for s in range(args.log_interval, args.steps + 1, args.log_interval)
                    if not run.resume_from or s > half]
        complete = run.rc == 0 and sorted(run.losses) == expected
        gap = None if run is ref else max_relative_gap(run.losses, ref.losses)
        source_gap = max_relative_gap(run.losses, runs[run.resume_from].losses) if run.resume_from else None
        tps = median_throughput(run, args.skip_steps)
        scaling = tps / ref_tps if (tps and ref_tps and run.world > 1 and not run.resume_from) else None
        checks = {"complete": complete}
        if run.resume_from:
            checks["resume"] = source_gap is not None and source_gap <= args.rtol
        elif run is not ref and not is_repeat(run.name):
            checks["loss"] = gap is not None and gap <= limit
        if scaling is not None:
            checks["scaling"] = scaling >= args.min_scaling
        rows.append({
            "attention": attention, "run": run.name, "world": run.world, "parallel": run.parallel,
            "resume_from": run.resume_from,
            "resumed_from": f"{run.resume_from} @ step {half}" if run.resume_from else None,
            "rc": run.rc, "seconds": round(run.seconds, 1), "tokens_per_s": tps, "scaling": scaling,
            "peak_mem_gib": run.peak_mem_gib, "final_loss": run.losses.get(args.steps),
            "max_rel_loss_gap": gap, "max_rel_gap_to_source": source_gap, "loss_limit": limit, "checks": checks,
            "passed": all(checks.values()), "losses": run.losses, "tokens_per_s_windows": run.tokens_per_s,
        })
    return rows


def runs_from_rows(rows: list[dict], attention: str, steps: int) -> dict[str, Run]:
    """The runs of one variant back from a saved report (``--report``), to judge them again."""
    runs = {}
    for row in (r for r in rows if r["attention"] == attention):
        resume_from = row.get("resume_from") or (row["resumed_from"].split(" @ ")[0] if row["resumed_from"] else None)
        # reports without per-window throughput kept its median, which is all the judging reads
        windows = row.get("tokens_per_s_windows") or ({steps: row["tokens_per_s"]} if row["tokens_per_s"] else {})
        runs[row["run"]] = Run(row["run"], row["world"], row["parallel"], resume_from, rc=row["rc"],
                               seconds=row["seconds"], losses={int(k): v for k, v in row["losses"].items()},
                               tokens_per_s={int(k): v for k, v in windows.items()},
                               peak_mem_gib=row["peak_mem_gib"])
    return runs


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Multi-GPU training check", "",
        f"`{meta['command']}`", "",
        f"{meta['device']}, torch {meta['torch']}; preset `{meta['size']}`, seq_len {meta['seq_len']}, "
        f"global batch {meta['global_batch']} = micro-batch {meta['micro_batch']} x {meta['world']} "
        f"({meta['world']} accumulation steps on 1 GPU), {meta['steps']} steps, compile {meta['compile']}, "
        f"dtype {meta.get('dtype', 'auto')}, FSDP2 blocks per unit {meta.get('fsdp_blocks_per_unit', 1)} "
        f"(0: the whole model), FSDP2 parameters gathered in {meta.get('fsdp_param_dtype', 'compute')}, "
        f"compile scope {meta.get('compile_scope', 'auto')}.", "",
        f"Loss: the largest relative difference over the {meta['log_interval']}-step windows: from `one` for runs "
        f"from scratch, judged against {meta['rtol']} or the noise floor where larger (the largest gap of the "
        "`one-repeat*` runs, the same 1-GPU run again, which are not judged themselves); from the run it "
        f"resumed for resumed runs, judged against {meta['rtol']}. Throughput: median "
        f"tokens/s over windows after step {meta['skip_steps']}; scaling is N processes over `one`, judged "
        f"against {meta['min_scaling']}x.", "",
        "| attention | run | processes | resumed from | tokens/s | scaling | peak GiB/GPU | final loss | "
        "max rel. gap to `one` | to the run resumed | result |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        failed = [name for name, ok in r["checks"].items() if not ok]
        result = "pass" if r["passed"] else "FAIL: " + ", ".join(failed)
        lines.append(
            f"| {r['attention']} | {r['run']} | {r['world']} | {r['resumed_from'] or ''} | "
            f"{_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(r['scaling'], '.2f')} | {_fmt(r['peak_mem_gib'], '.1f')} | "
            f"{_fmt(r['final_loss'], '.4f')} | {_fmt(r['max_rel_loss_gap'], '.2e')} | "
            f"{_fmt(r.get('max_rel_gap_to_source'), '.2e')} | {result} |")
    passed = all(r["passed"] for r in rows)
    lines.append("")
    for attention in dict.fromkeys(r["attention"] for r in rows):
        gaps = [r["max_rel_loss_gap"] for r in rows
                if r["attention"] == attention and is_repeat(r["run"]) and r["max_rel_loss_gap"] is not None]
        if gaps:
            limit = next(r["loss_limit"] for r in rows if r["attention"] == attention and "loss_limit" in r)
            lines.append(f"Noise floor, {attention}: the largest gap of {len(gaps)} repeated 1-GPU run(s) to `one` "
                         f"is {max(gaps):.2e}; runs from scratch were held to {limit:.2e}.  ")
    lines += ["", f"**{'All checks passed' if passed else 'Some checks FAILED'}.**", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no loss_curves.png", flush=True)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attentions = sorted({r["attention"] for r in rows})
    fig, axes = plt.subplots(2, len(attentions), figsize=(6 * len(attentions), 7), squeeze=False)
    for col, attention in enumerate(attentions):
        mine = [r for r in rows if r["attention"] == attention]
        ref = next(r["losses"] for r in mine if r["run"] == "one")
        for i, r in enumerate(mine):
            steps = sorted(r["losses"])
            style = {"label": r["run"], "marker": ".", "color": f"C{i % 10}"}  # one colour per run in both panels
            axes[0][col].plot(steps, [r["losses"][s] for s in steps], **style)
            if r["run"] != "one":
                common = [s for s in steps if s in ref]
                axes[1][col].plot(common, [r["losses"][s] - ref[s] for s in common], **style)
        axes[0][col].set(title=f"{attention}: train loss", xlabel="step", ylabel="loss (window mean)")
        axes[1][col].set(title=f"{attention}: loss minus 1-GPU loss", xlabel="step", ylabel="difference")
        axes[1][col].axhline(0.0, color="grey", linewidth=0.8)
        axes[0][col].legend(fontsize=8)
        axes[1][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def device_name(device: str) -> str:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return "CPU (gloo)"


def write_report(out: Path, rows: list[dict], meta: dict) -> None:
    (out / "multi_gpu_check.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / "multi_gpu_check.md").write_text(markdown(rows, meta))
    plot(rows, out / "loss_curves.png")


def report_again(saved: Path, out: Path) -> int:
    data = json.loads(saved.read_text())
    meta, attentions = data["meta"], dict.fromkeys(r["attention"] for r in data["rows"])
    args = argparse.Namespace(**{k: meta[k] for k in ("steps", "log_interval", "skip_steps", "rtol", "min_scaling")})
    rows = [row for a in attentions for row in judge(args, a, runs_from_rows(data["rows"], a, args.steps))]
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, rows, meta)
    print(markdown(rows, meta))
    return 0 if all(r["passed"] for r in rows) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="prepared token data (sasformer prepare)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--attention", nargs="+", default=["mha", "sas"])
    parser.add_argument("--config", default="configs/small.yaml")
    parser.add_argument("--size", default="small")
    parser.add_argument("--world", type=int, default=2, help="processes (GPUs) of the parallel runs")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=16, help="sequences per process per micro-step")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--skip-steps", type=int, default=30, help="windows up to this step are not timed")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                        help="float32 takes bf16 rounding out of the comparison (auto: bf16 on CUDA)")
    parser.add_argument("--fsdp-blocks-per-unit", type=int, default=1,
                        help="FSDP2 runs: consecutive blocks per sharded unit (0: the whole model one unit)")
    parser.add_argument("--fsdp-param-dtype", choices=["float32", "compute"], default="float32",
                        help="FSDP2 runs: gather fp32 parameters (autocast casts per op, as one GPU does) or "
                             "parameters in the compute dtype (FSDP2's mixed precision)")
    parser.add_argument("--compile-scope", choices=["auto", "block"], default="auto",
                        help="block: every run compiles each decoder block on its own, as FSDP2 must, so all runs "
                             "run the same compiled graphs (auto: the whole model on 1 GPU and under DDP)")
    parser.add_argument("--repeats", type=int, default=1, help="1-GPU runs repeated to measure the noise")
    parser.add_argument("--runs", type=lambda text: [name.strip() for name in text.split(",")], default=None,
                        metavar="NAMES", help="only these runs, comma-separated (e.g. one,one-repeat,fsdp,"
                                              "fsdp>one,one>fsdp); default: all")
    parser.add_argument("--rtol", type=float, default=0.01, help="largest relative loss difference from 1 GPU")
    parser.add_argument("--min-scaling", type=float, default=1.8)
    parser.add_argument("--run-timeout", type=float, default=600, help="seconds per training run")
    parser.add_argument("--report", type=Path, metavar="JSON",
                        help="judge a saved multi_gpu_check.json again (its settings) and write the report to --out")
    args = parser.parse_args()
    if args.report:
        return report_again(args.report, args.out)
    if not args.data_dir:
        parser.error("--data-dir is required (unless --report)")
    if args.steps % (2 * args.log_interval):
        parser.error("--steps must be a multiple of twice --log-interval (runs resume from the middle)")
    try:
        plan(args.world, args.repeats, args.runs)
    except ValueError as error:
        parser.error(str(error))

    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for attention in args.attention:
        runs: dict[str, Run] = {}
        for stage in plan(args.world, args.repeats, args.runs):
            with ThreadPoolExecutor(len(stage)) as pool:
                list(pool.map(lambda run, a=attention: execute(args, a, run, args.out), stage))
            runs.update({run.name: run for run in stage})
        rows += judge(args, attention, runs)
        # written after each variant, so a run stopped by a time limit keeps what finished
        meta = {
            "command": shlex.join([Path(sys.executable).name, *sys.argv]), "device": device_name(args.device),
            "torch": __import__("torch").__version__, "size": args.size, "seq_len": args.seq_len,
            "global_batch": args.micro_batch * args.world, "micro_batch": args.micro_batch, "world": args.world,
            "steps": args.steps, "compile": args.compile, "dtype": args.dtype, "log_interval": args.log_interval,
            "rtol": args.rtol, "skip_steps": args.skip_steps, "min_scaling": args.min_scaling,
            "fsdp_blocks_per_unit": args.fsdp_blocks_per_unit, "fsdp_param_dtype": args.fsdp_param_dtype,
            "compile_scope": args.compile_scope,
        }
        write_report(args.out, rows, meta)
    print(markdown(rows, meta))
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
