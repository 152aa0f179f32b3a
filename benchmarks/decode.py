"""Decode benchmark: tokens/s and KV-cache bytes per token for every attention variant.

    python3 benchmarks/decode.py --out runs/decode --compile  # GPU: small preset, bf16, batch 1 and 32, context 2048
    python3 benchmarks/decode.py --bytes-only                 # CPU: the cache-size table only (no timing)
    python3 benchmarks/decode.py --out DIR --variants mha,sas --batch-sizes 1 --profile 20   # + kernels per step

For each variant, batch size and mode: random weights (speed does not depend on them), a prefill of
``--context`` random tokens into a preallocated cache, then ``--new-tokens`` greedy decode steps fed
back on the device (no host sync inside the loop). Modes: ``eager`` (growing views of the cache, one
launch per op), ``graph`` (``StaticDecoder``: static shapes, one CUDA graph per step) and ``compile``
(the same step compiled with ``torch.compile`` first, then captured; ``--compile`` adds it).

Before timing, the logits of the prefill and of the first ``--check-steps`` decode steps are compared
with the model's plain forward pass over the same tokens; a variant that differs by more than
``--check-tol`` (relative to the largest logit) is reported as an error, not timed. Reported:
decode tokens/s (all sequences), milliseconds per step, the ratio to MHA in the same mode and batch,
prefill time, peak memory, the check's error, the SAS decode kernel that ran, and cache bytes per
token per layer as declared by the layer (``cache_bytes_per_token``) and as measured in the filled
cache. Writes ``decode.json`` and ``decode.md`` (with the command, git revision, versions and device)
after every row, so a run cut short keeps what it measured.

SAS rows: ``sas`` is the library's default (the decode path with its automatic kernel: the fused
Triton kernel on a GPU with Triton, else dense GEMMs), ``sas-decode-dense`` forces the dense kernel
(the default before "auto") and ``sas-ordinary`` turns the decode path off; the other ``sas-*`` rows
change one setting of ``sas`` (``ROW_ENVIRONMENT``).

Peak memory is counted from the start of each row, after a garbage collection, so nothing a finished
row left to Python's cyclic collector counts in the next row's peak (run 11's peaks did include earlier
rows' decoders, then reference cycles). ``mem_at_start_gib`` in the JSON is what was still allocated
when a row began.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch._dynamo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from profiling import profile_calls, profile_markdown  # benchmarks/profiling.py, beside this script

from sasformer.generation import StaticDecoder
from sasformer.layers.sas_decode import KERNEL_ENV_VAR, LAUNCH_ENV_VAR, sas_layers, set_decode_path
from sasformer.models.decoder import DecoderLM
from sasformer.models.presets import preset

# name -> (attention, extra attention_args over the preset's matched ones)
VARIANTS: dict[str, tuple[str, dict]] = {
    "mha": ("mha", {}),
    "gqa": ("gqa", {}),
    "mqa": ("mqa", {}),
    "mla": ("mla", {}),
    "tpa": ("tpa", {}),
    # the default: decode path (sasformer.layers.sas_decode) with its automatic kernel choice
    "sas": ("sas", {"cache_mode": "simulated"}),
    "sas-compact": ("sas", {"cache_mode": "compact"}),
    # SAS simulated without its decode path: the number before there was one
    "sas-ordinary": ("sas", {"cache_mode": "simulated"}),
}
DECODE_PATH_OFF = {"sas-ordinary"}
# SAS simulated under environment settings, set for the whole row (the rest as in "sas"):
# - its attention on a named SDPA backend (sasformer.ops.attention.BACKENDS) instead of the automatic
#   choice, which for one query row over cached keys of size 128 and values of 64 is PyTorch's default
#   (the memory-efficient kernel); padded flash can split the keys across the GPU;
# - the new token simulated by the training path's fused Triton kernels, whose weights are padded on
#   every call (a forced implementation turns the decode path off);
# - the decode path with its "dense" kernel forced (stacked GEMMs against banded matrices), the default
#   before "auto" chose the prepared Triton kernel on the GPU; the row fails if another kernel ran.
#   (No row forces "triton": where it can run, "sas" runs it, and the kernel column says which ran.)
# - the Triton decode kernel launched differently (sasformer.layers.sas_decode.decode_launch): "stack",
#   the default, simulates queries, keys and values in one launch (12 launches per step instead of 36 at
#   12 layers; "off": one launch per tensor), "split" spreads a launch's few tokens over groups of heads
#   and output columns (24 programs per launch at batch 1 instead of 3; at batch 32 the grid would exceed
#   two programs per SM, so it does not split there).
ROW_ENVIRONMENT = {
    "sas-flash-pad": {"SASFORMER_ATTENTION": "flash_pad"},
    "sas-cudnn": {"SASFORMER_ATTENTION": "cudnn"},
    "sas-triton": {"SASFORMER_SIMULATE": "triton"},
    "sas-decode-dense": {KERNEL_ENV_VAR: "dense"},
    "sas-decode-unstacked": {LAUNCH_ENV_VAR: "off"},
    "sas-decode-split": {LAUNCH_ENV_VAR: "split"},
    "sas-decode-stack-split": {LAUNCH_ENV_VAR: "stack,split"},
}
VARIANTS.update({name: ("sas", {"cache_mode": "simulated"}) for name in ROW_ENVIRONMENT})
MODES = ("eager", "graph", "compile")
# rows of the batch compared with the plain forward pass (the check needs only a few)
CHECK_ROWS = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="directory for decode.json / decode.md")
    p.add_argument("--size", default="small")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--context", type=int, default=2048, help="prompt tokens prefilled before decoding")
    p.add_argument("--new-tokens", type=int, default=128, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=8, help="untimed decode steps first")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default=None, help="default: cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default="graph",
                   help="comma-separated from " + ",".join(MODES) + ": eager: growing-view cache, one launch per "
                        "op; graph: static shapes over the whole preallocated cache, one CUDA graph per step "
                        "(sasformer.generation.StaticDecoder); compile: that step compiled, then captured")
    p.add_argument("--compile", action="store_true", help="add the 'compile' mode (torch.compile + CUDA graph)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for the compile mode, e.g. max-autotune-no-cudagraphs "
                        "(default: inductor's)")
    p.add_argument("--check-steps", type=int, default=4,
                   help="decode steps (after the prefill) compared with the plain forward pass before timing")
    p.add_argument("--check-tol", type=float, default=None,
                   help="largest allowed |static - forward| / max|forward| of the logits "
                        "(default 0.05 for 16-bit dtypes, 1e-3 for float32)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, profile this many decode steps per row and add their kernels to decode.md")
    p.add_argument("--bytes-only", action="store_true", help="only the cache-size table (CPU, meta tensors)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    modes = [m for m in args.modes.split(",") if m]
    bad_modes = sorted(set(modes) - set(MODES))
    if bad_modes:
        p.error(f"unknown modes {bad_modes}; choose from {list(MODES)}")
    if args.compile and "compile" not in modes:
        modes.append("compile")
    args.modes = ",".join(modes)
    if not 0 <= args.check_steps <= args.warmup:
        p.error(f"--check-steps={args.check_steps} must be between 0 and --warmup={args.warmup}")
    if args.check_tol is None:
        args.check_tol = 1e-3 if args.dtype == "float32" else 0.05
    return args


def config_for(size: str, name: str, max_seq_len: int | None = None):
    attention, extra = VARIANTS[name]
    base = preset(size, attention)
    overrides = {"attention_args": {**base.attention_args, **extra}}
    if max_seq_len:
        overrides["max_seq_len"] = max_seq_len
    return preset(size, attention, **overrides)


def cache_bytes_rows(size: str, names: list[str], dtype: torch.dtype) -> list[dict]:
    """Declared cache bytes per token per layer, from meta-device models (no memory, no device)."""
    rows = []
    for name in names:
        config = config_for(size, name)
        with torch.device("meta"):
            model = DecoderLM(config)
        attn = model.blocks[0].attn
        per_layer = attn.cache_bytes_per_token(dtype)
        rows.append({"variant": name, "attention_args": attn.args.to_dict(), "bytes_per_token_per_layer": per_layer,
                     "bytes_per_token_model": per_layer * config.n_layers})
    mha = next((r["bytes_per_token_per_layer"] for r in rows if r["variant"] == "mha"), None)
    for r in rows:
        r["vs_mha"] = r["bytes_per_token_per_layer"] / mha if mha else None
    return rows


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plan_label(plan) -> str:
    """A decode plan's kernel, with its launch options: "triton+stack+split" for both."""
    options = ["stack"] * any(name in plan.fused for name in ("qk", "qkv")) + ["split"] * plan.split
    return "+".join([plan.kernel, *options])


def decode_kernels(model: DecoderLM) -> list[str]:
    """The kernels (with launch options) of the SAS layers' decode plans (empty where no layer took the
    decode path)."""
    plans = [layer.__dict__.get("_decode_plan") for layer in sas_layers(model)]
    return sorted({plan_label(plan) for plan in plans if plan is not None})


class CheckFailed(RuntimeError):
    """The static decode's logits differ from the plain forward pass."""


def check_against_forward(model: DecoderLM, fed: list[torch.Tensor], got: list[torch.Tensor], tol: float) -> dict:
    """Compare the logits returned by prefill + decode steps (``got``: (B, V) each) with one forward
    pass over the tokens fed (``fed``: the prompt, then one (B, 1) token per step)."""
    rows = min(CHECK_ROWS, fed[0].shape[0])
    ids = torch.cat(fed, dim=1)[:rows]
    n = len(got)
    reference = model(ids)[:, -n:].float()
    static = torch.stack(got, dim=1)[:rows].float()
    err = ((static - reference).abs().max() / reference.abs().max()).item()
    agree = (static.argmax(-1) == reference.argmax(-1)).float().mean().item()
    if not err <= tol:
        raise CheckFailed(f"static decode differs from the plain forward: max rel err {err:.3g} > {tol:g}")
    return {"check_rel_err": err, "check_top1_agreement": agree, "check_positions": n, "check_rows": rows}


def bench_one(name: str, mode: str, args: argparse.Namespace, batch: int, device: torch.device,
              dtype: torch.dtype) -> dict:
    # read when the step is traced or captured and by the check's plain forward, so set for the whole row
    with mock.patch.dict(os.environ, ROW_ENVIRONMENT.get(name, {})):
        return _bench_one(name, mode, args, batch, device, dtype)


@torch.inference_mode()
def _bench_one(name: str, mode: str, args: argparse.Namespace, batch: int, device: torch.device,
               dtype: torch.dtype) -> dict:
    capacity = args.context + args.warmup + args.new_tokens + args.profile
    config = config_for(args.size, name, max_seq_len=capacity)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = DecoderLM(config)
    model = model.to(dtype).eval()
    if name in DECODE_PATH_OFF:
        set_decode_path(model, "off")
    elif {KERNEL_ENV_VAR, LAUNCH_ENV_VAR} & set(ROW_ENVIRONMENT.get(name, {})):
        set_decode_path(model, "on")  # what "auto" does on CUDA; on a CPU too, so the forced kernel runs there
    mem_at_start = None
    if device.type == "cuda":
        # whatever earlier rows left to the cyclic collector: free it now, not inside this row's peak
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        mem_at_start = torch.cuda.memory_allocated(device) / 2**30
    prompt = torch.randint(0, config.vocab_size, (batch, args.context), device=device)

    if mode in ("graph", "compile"):
        if mode == "compile":
            # each compiled decoder adds guards to the same code object; start clean so no limit is hit
            torch._dynamo.reset()
        decoder = StaticDecoder(model, batch, capacity, cuda_graph=device.type == "cuda",
                                compile=mode == "compile",
                                compile_mode=args.compile_mode if mode == "compile" else None)
        cache, prefill, step = decoder.cache, decoder.prefill, decoder.step
    else:
        cache = model.new_cache(capacity)

        def prefill(ids: torch.Tensor) -> torch.Tensor:
            return model(ids, cache=cache)[:, -1]

        def step(token: torch.Tensor) -> torch.Tensor:
            return model(token, cache=cache)[:, -1]

    sync(device)
    t0 = time.perf_counter()
    logits = prefill(prompt)
    sync(device)
    prefill_s = time.perf_counter() - t0

    # warm-up (includes compilation and graph capture); its first steps are checked
    fed, got = [prompt], [logits.clone()]
    token = logits.argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for i in range(args.warmup):
        logits = step(token)
        if i < args.check_steps:
            fed.append(token)
            got.append(logits.clone())  # a CUDA graph's output buffer is overwritten by the next step
        token = logits.argmax(-1, keepdim=True)
    sync(device)
    warmup_s = time.perf_counter() - t0
    check = check_against_forward(model, fed, got, args.check_tol)
    kernels = decode_kernels(model)
    row_env = ROW_ENVIRONMENT.get(name, {})
    wanted = row_env.get(KERNEL_ENV_VAR)
    if LAUNCH_ENV_VAR in row_env:  # the launch options apply to the Triton kernel only
        options = [o.strip() for o in row_env[LAUNCH_ENV_VAR].split(",") if o.strip() != "off"]
        wanted = "+".join(["triton", *options])
    if wanted and kernels != [wanted]:
        raise RuntimeError(f"{name}: the SAS layers decoded with kernels {kernels}, not {wanted!r}")

    t0 = time.perf_counter()
    for _ in range(args.new_tokens):
        token = step(token).argmax(-1, keepdim=True)
    sync(device)
    decode_s = time.perf_counter() - t0
    profiled = None
    if args.profile:
        state = {"token": token}

        def profiled_step() -> None:
            state["token"] = step(state["token"]).argmax(-1, keepdim=True)

        profiled = profile_calls(profiled_step, args.profile, lambda: sync(device), device.type == "cuda", top=15)

    measured = [layer.nbytes_per_token() for layer in cache.layers]
    declared = model.blocks[0].attn.cache_bytes_per_token(dtype)
    if any(m != declared for m in measured):
        raise RuntimeError(f"{name}: cache holds {measured[0]} bytes/token/layer but the layer declares {declared}")
    return {
        "variant": name,
        "mode": mode,
        "batch": batch,
        "context": args.context,
        "new_tokens": args.new_tokens,
        "decode_tokens_per_s": batch * args.new_tokens / decode_s,
        "ms_per_step": 1e3 * decode_s / args.new_tokens,
        "prefill_s": prefill_s,
        "warmup_s": warmup_s,
        **check,
        "decode_kernels": kernels,
        "cache_bytes_per_token_per_layer": declared,
        "cache_bytes_per_token_per_layer_measured": measured[0],
        "cache_gib_at_end": sum(measured) * batch * cache.seq_len / 2**30,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "mem_at_start_gib": mem_at_start,
        "params": model.num_parameters(),
        **({"profile": profiled} if profiled else {}),
    }


def environment(args: argparse.Namespace, device: torch.device) -> dict:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                                    check=False).stdout)
        rev += "-dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        rev = "unknown"
    return {
        "command": " ".join(["python3", "benchmarks/decode.py", *sys.argv[1:]]),
        "git": rev,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": args.dtype,
        "size": args.size,
        "seed": args.seed,
        "compile_mode": args.compile_mode,
        "check_tol": args.check_tol,
    }


def bytes_markdown(rows: list[dict], size: str, dtype: str) -> str:
    lines = [f"| variant | cache bytes/token/layer ({dtype}) | whole model ({size}) | vs MHA |", "|---|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['vs_mha']:.2f}x" if r["vs_mha"] is not None else "-"
        lines.append(f"| {r['variant']} | {r['bytes_per_token_per_layer']:,} | {r['bytes_per_token_model']:,} | "
                     f"{ratio} |")
    return "\n".join(lines)


def speed_markdown(rows: list[dict]) -> str:
    lines = [("| variant | batch | mode | decode kernel | decode tok/s | ms/step | vs MHA | check rel err | "
              "prefill s | cache B/tok/layer | peak GiB |"),
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    mha = {(r["batch"], r["mode"]): r.get("decode_tokens_per_s") for r in rows if r["variant"] == "mha"}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['batch']} | {r['mode']} | | {r['error']} | | | | | | |")
            continue
        base = mha.get((r["batch"], r["mode"]))
        ratio = f"{r['decode_tokens_per_s'] / base:.2f}x" if base else "-"
        peak = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-"
        kernels = ",".join(r["decode_kernels"]) or "-"
        lines.append(f"| {r['variant']} | {r['batch']} | {r['mode']} | {kernels} | {r['decode_tokens_per_s']:,.0f} | "
                     f"{r['ms_per_step']:.2f} | {ratio} | {r['check_rel_err']:.1e} | {r['prefill_s']:.3f} | "
                     f"{r['cache_bytes_per_token_per_layer']:,} | {peak} |")
    return "\n".join(lines)


def write_results(out: Path, env: dict, args: argparse.Namespace, byte_rows: list[dict], rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result = {"environment": env, "context": args.context, "new_tokens": args.new_tokens,
              "cache_bytes": byte_rows, "decode": rows}
    (out / "decode.json").write_text(json.dumps(result, indent=2) + "\n")
    header = (f"# Decode benchmark\n\n`{env['command']}` at git {env['git']}, torch {env['torch']}, "
              f"{env['device']}, {args.dtype}, {args.size} preset, context {args.context}, "
              f"{args.new_tokens} timed steps after {args.warmup} warm-up steps; modes: {args.modes}; "
              f"decoded logits checked against the plain forward (prefill + {args.check_steps} steps, "
              f"tolerance {args.check_tol:g} of the largest logit). ms/step is the time per generated token of "
              f"each sequence; vs MHA compares tokens/s in the same mode and batch; decode kernel is the SAS decode "
              "path's kernel (- where it was not taken); peak GiB counts from each row's start, after a garbage "
              "collection.\n\n")
    byte_table = bytes_markdown(byte_rows, args.size, args.dtype)
    profiles = [line for r in rows if r.get("profile")
                for line in profile_markdown(f"{r['variant']}, batch {r['batch']}, {r['mode']}", r["profile"], "us")]
    (out / "decode.md").write_text(header + speed_markdown(rows) + "\n\n" + byte_table + "\n"
                                   + "\n".join(profiles) + ("\n" if profiles else ""))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.variants.split(",")
    dtype = getattr(torch, args.dtype)
    byte_rows = cache_bytes_rows(args.size, names, dtype)
    if args.bytes_only:
        print(bytes_markdown(byte_rows, args.size, args.dtype))
        return 0
    device = torch.device(args.device or "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: pass --device cpu (slow) or use --bytes-only")
    env = environment(args, device)
    rows = []
    batches = [int(b) for b in args.batch_sizes.split(",")]
    modes = args.modes.split(",")
    total, done, start = len(names) * len(batches) * len(modes), 0, time.perf_counter()
    for batch in batches:
        for mode in modes:
            for name in names:
                try:
                    rows.append(bench_one(name, mode, args, batch, device, dtype))
                except torch.cuda.OutOfMemoryError:
                    rows.append({"variant": name, "mode": mode, "batch": batch, "error": "out of memory"})
                except RuntimeError as err:  # a failed check or graph capture: keep the other results
                    rows.append({"variant": name, "mode": mode, "batch": batch,
                                 "error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                done += 1
                elapsed = time.perf_counter() - start
                r = rows[-1]
                status = r.get("error") or (f"{r['decode_tokens_per_s']:,.0f} tok/s, {r['ms_per_step']:.2f} ms/step, "
                                            f"check {r['check_rel_err']:.1e}")
                print(f"[{done}/{total}] {name} batch={batch} {mode}: {status}  "
                      f"(eta {elapsed / done * (total - done):.0f}s)", flush=True)
                if args.out:
                    write_results(Path(args.out), env, args, byte_rows, rows)
    print(speed_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
