"""Training-step throughput of the trainer: tokens/s, TFLOP/s, MFU and peak memory per attention variant.

Runs the real :class:`sasformer.train.trainer.Trainer` step (bf16 autocast, ``torch.compile``, fused
AdamW, gradient clipping) on synthetic tokens, so the numbers are what ``sasformer train`` gets minus
data loading. On one GPU::

    python3 benchmarks/train_speed.py --out benchmarks/results/train_speed            # small: mha, sas
    python3 benchmarks/train_speed.py --all --out benchmarks/results/train_speed      # every variant
    python3 benchmarks/train_speed.py --batch-size 32 64 --profile --out DIR          # + top CUDA kernels
    python3 benchmarks/train_speed.py --loss-impl naive --out DIR                     # full-logits loss
    python3 benchmarks/train_speed.py --attention mha --batch-size 32 --grad-accum 16 --out DIR  # 0.5M-token steps

On several GPUs (``--batch-size`` is then the global batch; rank 0 writes the files)::

    torchrun --nproc-per-node 2 benchmarks/train_speed.py --parallel fsdp --batch-size 32 --profile --out DIR
    torchrun --nproc-per-node 2 benchmarks/train_speed.py --parallel fsdp --breakdown --profile --trace --out DIR

``--breakdown`` times the step's phases (forward, backward, clipping, optimizer, ...) on every rank;
``--trace`` writes each rank's profiled timeline.

FSDP2's own cost without any communication, in one process (rank 0 of a fake world whose collectives move no
data and wait for no one; the batch per process is that of the real run)::

    python3 benchmarks/train_speed.py --parallel fsdp --fake-world 2 --batch-size 32 --out DIR

``host ms`` is the time the host spends in the step calls. Far below the step time, the GPU is the limit.
Near it, either the host is (Python, kernel launches, the parallel wrapper's hooks) or the GPU is and the
host waited for it: CUDA blocks a launch while about a thousand are pending. ``--profile`` tells them apart:
kernel time close to the step time means the GPU is busy throughout.

``graph breaks`` counts what ``torch.compile`` did not capture in one graph during the warm-up and timed
steps (graph breaks, with recompilations and functions run eagerly when any); a nonzero count prints a
warning, lists the reasons under the table, and with ``--fail-on-graph-break`` makes the exit status 1.

Writes ``train_speed.json`` and ``train_speed.md`` into ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.profiling import profile_calls, profile_markdown
from sasformer.layers.registry import variant_names
from sasformer.ops import swiglu as swiglu_module
from sasformer.ops.attention import BACKENDS
from sasformer.ops.attention import ENV_VAR as ATTENTION_ENV
from sasformer.ops.cross_entropy import DEFAULT_CHUNK_SIZE, IMPLS, resolve_impl
from sasformer.ops.rope_qkv import ENV_VAR as ROPE_ENV
from sasformer.ops.swiglu import ENV_VAR as SWIGLU_ENV
from sasformer.ops.triton_support import IMPLS as OP_IMPLS
from sasformer.train import distributed
from sasformer.train.config import COMPILE_MODES, TrainConfig
from sasformer.train.metrics import peak_memory_gib, throughput
from sasformer.train.trainer import Trainer
from sasformer.utils import graph_breaks


class SyntheticLoader:
    """Uniform random tokens; a few batches made up front and cycled, so the host does no work per step."""

    tokenizer_fingerprint = "synthetic"

    def __init__(self, vocab_size: int, seq_len: int, batch_size: int, n_batches: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.vocab_size = vocab_size
        self.batches = [torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=g)
                        for _ in range(n_batches)]
        self.step = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.batches[self.step % len(self.batches)]
        self.step += 1
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


class SyntheticData:
    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def train_loader(self, seq_len, batch_size, seed, rank, world_size, expected_fingerprint):
        return SyntheticLoader(self.vocab_size, seq_len, batch_size // world_size)

    def eval_batches(self, *args, **kwargs):
        return iter(())


def init_fake_world(world_size: int) -> None:
    """Make this process rank 0 of ``world_size`` ranks whose collectives move no data and wait for no one.

    The step then costs its own host and device work only: FSDP2's hooks, copies and per-parameter work
    without the latency of the wire or of the other ranks. The values gathered are garbage (the loss
    means nothing), so use it for timing only.
    """
    import torch.distributed as dist
    import torch.testing._internal.distributed.fake_pg  # noqa: F401  (registers the backend on older torch)

    dist.init_process_group("fake", store=dist.HashStore(), rank=0, world_size=world_size)


def compile_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--compile-option``, the value read as YAML (true, 4, a string)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return key.strip(), yaml.safe_load(value)


def parallel_label(args: argparse.Namespace) -> str:
    """``ddp``, or ``fsdp`` with its settings where they are not the defaults."""
    if args.parallel == "ddp":
        return "ddp"
    notes = ([f"fake world of {args.fake_world}, no communication"] if args.fake_world else []) + \
        ([] if args.fsdp_reshard_after_forward else ["no reshard"]) + \
        ([] if args.fsdp_forward_prefetch else ["no forward prefetch"]) + \
        ([f"{args.fsdp_blocks_per_unit or 'all'} blocks per unit"] if args.fsdp_blocks_per_unit != 1 else []) + \
        (["bf16 parameters"] if args.fsdp_param_dtype == "compute" else [])
    return ", ".join(["fsdp", *notes])


def bench_one(args: argparse.Namespace, attention: str, batch_size: int, out_dir: Path) -> dict:
    """Time ``args.steps`` trainer steps of one (variant, batch size) after ``args.warmup`` untimed ones.

    With ``--grad-accum N`` a step is N micro-batches of ``batch_size`` sequences (the trainer's own
    accumulation: one optimiser step, clipping and zero_grad per N forward/backward passes).
    """
    micro_batch_size = args.micro_batch_size
    if args.grad_accum > 1:
        micro_batch_size, batch_size = batch_size, batch_size * args.grad_accum
    total_steps = args.warmup + args.steps * (1 + args.breakdown) + args.profile_steps
    config = TrainConfig.from_dict({
        "model": {"size": args.size, "attention": attention,
                  **({"d_model": args.d_model} if args.d_model else {}),
                  **({"attention_args": {"n_heads": args.n_heads}} if args.n_heads else {})},
        "data_dir": "synthetic",
        "seq_len": args.seq_len,
        "batch_size": batch_size,
        "micro_batch_size": micro_batch_size,
        "max_steps": total_steps,
        "dtype": "bfloat16" if args.device == "cuda" else "float32",
        "compile": not args.no_compile,
        "compile_mode": args.compile_mode,
        "compile_options": dict(args.compile_option),
        "compile_scope": args.compile_scope,
        "loss_impl": args.loss_impl,
        "loss_chunk_size": args.loss_chunk_size,
        "residual_dtype": args.residual_dtype,
        "device": args.device,
        "eval_interval": 0,
        "checkpoint_interval": 0,
        "log_interval": total_steps,  # no logging inside the timed steps
        "out_dir": str(out_dir / f"run_{attention}_b{batch_size}"),
        "resume": "none",
        "tensorboard": False,
        "progress": False,
        "mfu_peak_tflops": args.peak_tflops,
        "parallel": args.parallel,
        "fsdp_reshard_after_forward": args.fsdp_reshard_after_forward,
        "fsdp_blocks_per_unit": args.fsdp_blocks_per_unit,
        "fsdp_param_dtype": args.fsdp_param_dtype,
    })
    trainer = Trainer(config, SyntheticData(args.vocab_size))
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    # Dynamo compiles in the first steps: a graph break or recompilation there slows every timed step
    with graph_breaks.watch_graph_breaks() as breaks:
        began = time.perf_counter()
        for _ in range(args.warmup):  # compilation and allocator warm-up
            trainer.train_step()
        sync()
        if trainer.dist.is_main:
            print(f"  warm-up ({args.warmup} steps, compilation included) took {time.perf_counter() - began:.0f} s",
                  flush=True)
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        start = time.perf_counter()
        host_seconds = 0.0
        for _ in range(args.steps):
            called = time.perf_counter()
            trainer.train_step()
            host_seconds += time.perf_counter() - called
        sync()
    seconds = time.perf_counter() - start
    if not args.fake_world:  # a fake world's collectives return garbage: its loss means nothing
        trainer.check_finite()  # a diverged step would make the timing meaningless
    tokens = args.steps * config.batch_size * config.seq_len
    row = {
        "attention": attention,
        "size": args.size,
        "parameters": trainer.num_parameters,
        "train_flops_per_token": trainer.flops_per_token,
        "batch_size": config.batch_size,
        "micro_batch_size": trainer.micro,
        "grad_accum": trainer.accum,
        "seq_len": config.seq_len,
        "loss_impl": resolve_impl(config.loss_impl, torch.empty(0, device=trainer.device)),
        "world_size": trainer.dist.world_size,
        "parallel": parallel_label(args) if trainer.dist.enabled else None,
        "compile_scope": trainer.compile_scope if config.compile else None,  # auto resolved
        "step_ms": 1000 * seconds / args.steps,
        "host_ms": 1000 * host_seconds / args.steps,
        **throughput(tokens, seconds, trainer.flops_per_token, trainer.dist.world_size, trainer.peak),
        "peak_mem_gib": peak_memory_gib(trainer.device),
        "peak_tflops": trainer.peak,
        "graph_breaks": breaks.to_dict() if config.compile else None,
    }
    if args.breakdown:
        row["breakdown"] = breakdown_steps(trainer, args.steps, sync)
        if trainer.dist.enabled and not args.fake_world:  # every rank's phases: a slower rank shows here
            per_rank: list = [None] * trainer.dist.world_size
            torch.distributed.all_gather_object(per_rank, row["breakdown"]["ms_per_step"])
            row["breakdown"]["per_rank"] = per_rank
    if args.profile:
        trace = (out_dir / f"trace_{attention}_b{batch_size}_rank{trainer.dist.rank}.json.gz") if args.trace else None
        cuda = trainer.device.type == "cuda"
        row["profile"] = profile_calls(trainer.train_step, args.profile_steps, sync, cuda, trace, top=args.profile_top)
    del trainer
    gc.collect()
    torch._dynamo.reset()  # the next configuration compiles with static shapes of its own
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def breakdown_steps(trainer: Trainer, steps: int, sync) -> dict:
    """Milliseconds per step in each phase of the trainer's step (``Trainer.train_step``'s ``mark``s), over
    ``steps`` more steps. The device is synchronised at every mark, so on a GPU a phase's time is its host
    time and its kernels' together, and nothing overlaps across phases: the total exceeds the step time."""
    seconds: dict[str, float] = {}
    clock = [0.0]

    def mark(phase: str) -> None:
        sync()
        now = time.perf_counter()
        seconds[phase] = seconds.get(phase, 0.0) + now - clock[0]
        clock[0] = now

    for _ in range(steps):
        sync()
        clock[0] = time.perf_counter()
        trainer.train_step(mark)
    phases = {phase: 1000 * s / steps for phase, s in seconds.items()}
    return {"steps": steps, "ms_per_step": phases, "total_ms": sum(phases.values())}


def row_label(row: dict) -> str:
    return f"{row['attention']}, batch {row['batch_size']}"


def markdown(rows: list[dict], meta: dict) -> str:
    options = "".join(f", {key}={value}" for key, value in meta.get("compile_options", {}).items())
    lines = [
        f"# Training step throughput ({meta['device']}, {meta['dtype']}, compile={meta['compile']})",
        "",
        f"Command: `{' '.join(f'{k}={v}' for k, v in meta.get('environment', {}).items())}"
        f"{' ' if meta.get('environment') else ''}{meta['command']}`  ",
        (f"Git revision: `{meta['git_revision']}`, torch {meta['torch']}, peak {meta['peak_tflops']} TFLOP/s, "
         f"compile mode {meta['compile_mode']}{options}, compile scope {meta.get('compile_scope', 'auto')}, "
         f"loss {meta['loss_impl']} (chunk {meta['loss_chunk_size']}), "
         f"residual stream {dict(compute='bf16 (compute)').get(meta.get('residual_dtype'), 'float32')}, "
         f"attention backend {meta['attention_backend']}, RoPE {meta.get('rope_impl', 'torch')}, "
         f"SwiGLU {meta.get('swiglu_impl', 'torch')}"),
        "",
        "| attention | params (M) | processes | micro-batch x T x accum | loss | step (ms) | host ms | tokens/s "
        "| TFLOP/s per GPU | MFU | peak mem (GiB) | graph breaks |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
        world = r.get("world_size", 1)
        processes = f"{world} ({r['parallel']})" if world > 1 else "1"
        host = f"{r['host_ms']:.1f}" if "host_ms" in r else "n/a"
        lines.append(
            f"| {r['attention']} | {r['parameters'] / 1e6:.1f} | {processes} | {r['micro_batch_size']}x{r['seq_len']}"
            f"x{r['grad_accum']} | {r['loss_impl']} | {r['step_ms']:.1f} | {host} | {r['tokens_per_s']:,.0f} | "
            f"{r['tflops']:.1f} | {mfu} | {mem} | {graph_breaks.cell(r.get('graph_breaks'))} |"
        )
    lines += graph_breaks.markdown_notes([(row_label(r), r.get("graph_breaks")) for r in rows])
    breakdowns = [r for r in rows if r.get("breakdown")]
    if breakdowns:
        phases = list(breakdowns[0]["breakdown"]["ms_per_step"])
        lines += ["", f"## Step phases (ms per step, device synchronised at each phase's end, "
                  f"{breakdowns[0]['breakdown']['steps']} steps)", "",
                  "| attention | processes | " + " | ".join(phases) + " | total |",
                  "|---|---|" + "---:|" * (len(phases) + 1)]
        for r in breakdowns:
            world = r.get("world_size", 1)
            processes = f"{world} ({r['parallel']})" if world > 1 else "1"
            for rank, ms in enumerate(r["breakdown"].get("per_rank") or [r["breakdown"]["ms_per_step"]]):
                label = f"{processes}, rank {rank}" if world > 1 else processes
                lines.append(f"| {r['attention']} | {label} | " + " | ".join(f"{ms.get(p, 0.0):.2f}" for p in phases)
                             + f" | {sum(ms.values()):.1f} |")
    for r in rows:
        if r.get("profile"):
            lines += profile_markdown(row_label(r), r["profile"])
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder for train_speed.json / .md")
    parser.add_argument("--attention", nargs="+", default=["mha", "sas"], help="variants (default: mha sas)")
    parser.add_argument("--all", action="store_true", help="every registered variant")
    parser.add_argument("--size", default="small")
    parser.add_argument("--d-model", type=int, default=None,
                        help="override the preset's width (e.g. a narrow model to measure host overhead)")
    parser.add_argument("--n-heads", type=int, default=None, help="override the preset's heads")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[32],
                        help="sequences per optimiser step (per micro-batch with --grad-accum); several values "
                             "are benchmarked in turn")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="default: the whole batch at once")
    parser.add_argument("--grad-accum", type=int, default=1,
                        help="micro-batches of --batch-size sequences per optimiser step (global batch N x batch)")
    parser.add_argument("--vocab-size", type=int, default=50304)
    parser.add_argument("--warmup", type=int, default=15, help="untimed steps (compilation)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--fail-on-graph-break", action="store_true",
                        help="exit with status 1 (after writing the results) when a compiled run broke its graph "
                             "or its graph breaks cannot be counted; default: report them only")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    parser.add_argument("--compile-scope", default="auto", choices=["auto", "model", "block"],
                        help="what one torch.compile covers (the trainer's compile_scope)")
    parser.add_argument("--compile-option", action="append", default=[], type=compile_option, metavar="KEY=VALUE",
                        help="an Inductor option for torch.compile (the trainer's compile_options; YAML value), "
                             "e.g. coordinate_descent_tuning=true; repeatable; not with --compile-mode")
    parser.add_argument("--loss-impl", default="chunked", choices=IMPLS,
                        help="LM head + cross-entropy: fused chunks (the library's choice, or forced "
                             "chunked_triton / chunked_torch), or full logits (naive)")
    parser.add_argument("--loss-chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--residual-dtype", choices=["float32", "compute"], default="float32",
                        help="the trainer's residual_dtype: the residual stream in fp32, or in the autocast dtype")
    parser.add_argument("--attention-backend", default=None, choices=BACKENDS,
                        help=f"force an SDPA backend (sets {ATTENTION_ENV}); default: the library's choice")
    parser.add_argument("--rope-impl", default=None, choices=OP_IMPLS,
                        help=f"RoPE of the fused Q/K/V projection (sets {ROPE_ENV}); default: the library's choice")
    parser.add_argument("--swiglu-impl", default=None, choices=OP_IMPLS,
                        help=f"SwiGLU gating of the fused gate/up projection (sets {SWIGLU_ENV}); default: the "
                             "library's choice")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, profile a few steps and add the top CUDA kernels (--profile-top) "
                             "to the Markdown")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--profile-top", type=int, default=20, help="CUDA kernels listed per profiled run")
    parser.add_argument("--trace", action="store_true",
                        help="with --profile, also write each rank's timeline (trace_*_rank*.json.gz, Chrome format)")
    parser.add_argument("--breakdown", action="store_true",
                        help="after timing, time --steps more steps phase by phase (forward, backward, clip, "
                             "optimizer, ...), synchronising the device between phases")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"],
                        help="data parallelism when launched with torchrun on several processes")
    parser.add_argument("--fsdp-reshard-after-forward", action=argparse.BooleanOptionalAction, default=True,
                        help="FSDP2: gather each block's parameters again for its backward (default), or keep them")
    parser.add_argument("--fsdp-forward-prefetch", action=argparse.BooleanOptionalAction, default=True,
                        help="FSDP2: each unit prefetches the next one's parameters in forward (the library's "
                             "default, sasformer.train.distributed.FORWARD_PREFETCH), or FSDP2's own order")
    parser.add_argument("--fsdp-blocks-per-unit", type=int, default=1,
                        help="FSDP2: consecutive blocks per sharded unit (0: the whole model one unit)")
    parser.add_argument("--fsdp-param-dtype", choices=["float32", "compute"], default="float32",
                        help="FSDP2 under bf16: gather the fp32 parameters (the trainer's default) or bf16 ones")
    parser.add_argument("--fake-world", type=int, default=0, metavar="N",
                        help="FSDP2 in this one process as rank 0 of N whose collectives do nothing: the step's "
                             "own host and device work without communication (timing only; launch with python)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the per-GPU bf16 peak")
    args = parser.parse_args()
    if args.fake_world:
        if args.fake_world < 2 or args.parallel != "fsdp":
            parser.error(f"--fake-world {args.fake_world}: give N >= 2 with --parallel fsdp (DDP cannot run on a "
                         "process group that does no communication)")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            parser.error("--fake-world runs in one process: launch with python, not torchrun")
        init_fake_world(args.fake_world)
    if not args.profile:
        args.profile_steps = 0
    if args.grad_accum < 1:
        parser.error(f"--grad-accum {args.grad_accum} must be >= 1")
    if args.grad_accum > 1 and args.micro_batch_size is not None:
        parser.error("give --grad-accum or --micro-batch-size, not both (--grad-accum N makes --batch-size the "
                     "micro-batch)")
    distributed.FORWARD_PREFETCH = args.fsdp_forward_prefetch
    if args.attention_backend is not None:
        os.environ[ATTENTION_ENV] = args.attention_backend
    if args.rope_impl is not None:
        os.environ[ROPE_ENV] = args.rope_impl
    if args.swiglu_impl is not None:
        os.environ[SWIGLU_ENV] = args.swiglu_impl
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = variant_names() if args.all else args.attention
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 reports
    rows = []
    for attention in variants:
        for batch_size in args.batch_size:
            if main_process:
                print(f"benchmarking {attention}, batch {batch_size} ...", flush=True)
            rows.append(bench_one(args, attention, batch_size, out))
            r = rows[-1]
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            if main_process:
                print(f"  {r['step_ms']:.1f} ms/step (host {r['host_ms']:.1f}), {r['tokens_per_s']:,.0f} tokens/s, "
                      f"MFU {mfu}", flush=True)
                warning = graph_breaks.warning_line(row_label(r), r["graph_breaks"])
                if warning:
                    print(f"  {warning}", flush=True)
    distributed.shutdown()
    if not main_process:
        return 0
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO,
                             check=False).stdout.strip()
    except OSError:
        rev = None
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    meta = {
        "command": "python3 " + " ".join(shlex.quote(a) for a in sys.argv),
        "git_revision": rev,
        "torch": torch.__version__,
        "device": device,
        "dtype": "bfloat16" if args.device == "cuda" else "float32",
        "compile": not args.no_compile,
        "compile_mode": args.compile_mode,
        "compile_options": dict(args.compile_option),
        "compile_scope": args.compile_scope,
        "loss_impl": args.loss_impl,
        "loss_chunk_size": args.loss_chunk_size,
        "residual_dtype": args.residual_dtype,
        "attention_backend": args.attention_backend or "auto",
        "rope_impl": args.rope_impl or os.environ.get(ROPE_ENV) or "auto",
        "swiglu_impl": args.swiglu_impl or os.environ.get(SWIGLU_ENV) or swiglu_module.DEFAULT,
        "grad_accum": args.grad_accum,
        "peak_tflops": rows[0]["peak_tflops"] if rows else None,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        # the switches the command line does not show (SASFORMER_SIMULATE=blocked, say)
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("SASFORMER_") and v},
    }
    (out / "train_speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = markdown(rows, meta)
    (out / "train_speed.md").write_text(table)
    print(table)
    return 1 if args.fail_on_graph_break and failed_on_graph_breaks(rows) else 0


def failed_on_graph_breaks(rows: list[dict]) -> bool:
    """Print why each compiled row fails ``--fail-on-graph-break``; True if any does."""
    messages = graph_breaks.failures([(row_label(r), r.get("graph_breaks")) for r in rows])
    for message in messages:
        print(f"--fail-on-graph-break: {message}", file=sys.stderr)
    return bool(messages)


if __name__ == "__main__":
    sys.exit(main())
