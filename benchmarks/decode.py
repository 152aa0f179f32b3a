"""Decode benchmark: tokens/s and KV-cache bytes per token for every attention variant.

    python3 benchmarks/decode.py --out runs/decode            # GPU: small preset, bf16, batch 1 and 32, context 2048
    python3 benchmarks/decode.py --bytes-only                 # CPU: the cache-size table only (no timing)

For each variant and batch size: random weights (speed does not depend on them), a prefill of
``--context`` random tokens into a preallocated cache, then ``--new-tokens`` greedy decode steps fed
back on the device (no host sync inside the loop). Reported: decode tokens/s (all sequences),
milliseconds per step, prefill time, peak memory, and cache bytes per token per layer as declared
by the layer (``cache_bytes_per_token``) and as measured in the filled cache. Writes
``decode.json`` and ``decode.md`` (with the command, git revision, versions and device).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sasformer.generation import StaticDecoder
from sasformer.models.decoder import DecoderLM
from sasformer.models.presets import preset

# name -> (attention, extra attention_args over the preset's matched ones)
VARIANTS: dict[str, tuple[str, dict]] = {
    "mha": ("mha", {}),
    "gqa": ("gqa", {}),
    "mqa": ("mqa", {}),
    "mla": ("mla", {}),
    "tpa": ("tpa", {}),
    "sas": ("sas", {"cache_mode": "simulated"}),
    "sas-compact": ("sas", {"cache_mode": "compact"}),
}


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
    p.add_argument("--modes", default="eager,graph",
                   help="eager: growing-view cache, one launch per op; graph: static shapes over the whole "
                        "preallocated cache, one CUDA graph per step (sasformer.generation.StaticDecoder)")
    p.add_argument("--bytes-only", action="store_true", help="only the cache-size table (CPU, meta tensors)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    bad_modes = sorted(set(args.modes.split(",")) - {"eager", "graph"})
    if bad_modes:
        p.error(f"unknown modes {bad_modes}; choose from ['eager', 'graph']")
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


@torch.inference_mode()
def bench_one(name: str, mode: str, args: argparse.Namespace, batch: int, device: torch.device,
              dtype: torch.dtype) -> dict:
    config = config_for(args.size, name, max_seq_len=args.context + args.warmup + args.new_tokens)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = DecoderLM(config)
    model = model.to(dtype).eval()
    capacity = args.context + args.warmup + args.new_tokens
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    prompt = torch.randint(0, config.vocab_size, (batch, args.context), device=device)

    graph = mode == "graph"
    if graph:
        decoder = StaticDecoder(model, batch, capacity, cuda_graph=device.type == "cuda")
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

    token = logits.argmax(-1, keepdim=True)
    for _ in range(args.warmup):  # includes the graph capture
        token = step(token).argmax(-1, keepdim=True)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.new_tokens):
        token = step(token).argmax(-1, keepdim=True)
    sync(device)
    decode_s = time.perf_counter() - t0

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
        "cache_bytes_per_token_per_layer": declared,
        "cache_bytes_per_token_per_layer_measured": measured[0],
        "cache_gib_at_end": sum(measured) * batch * cache.seq_len / 2**30,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "params": model.num_parameters(),
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
    }


def bytes_markdown(rows: list[dict], size: str, dtype: str) -> str:
    lines = [f"| variant | cache bytes/token/layer ({dtype}) | whole model ({size}) | vs MHA |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['bytes_per_token_per_layer']:,} | {r['bytes_per_token_model']:,} | "
                     f"{r['vs_mha']:.2f}x |")
    return "\n".join(lines)


def speed_markdown(rows: list[dict]) -> str:
    lines = ["| variant | batch | mode | decode tok/s | ms/step | vs MHA | prefill s | cache B/tok/layer | peak GiB |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    mha = {(r["batch"], r["mode"]): r.get("decode_tokens_per_s") for r in rows if r["variant"] == "mha"}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['batch']} | {r['mode']} | {r['error']} | | | | | |")
            continue
        base = mha.get((r["batch"], r["mode"]))
        ratio = f"{r['decode_tokens_per_s'] / base:.2f}x" if base else "-"
        peak = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-"
        lines.append(f"| {r['variant']} | {r['batch']} | {r['mode']} | {r['decode_tokens_per_s']:,.0f} | "
                     f"{r['ms_per_step']:.2f} | {ratio} | {r['prefill_s']:.3f} | "
                     f"{r['cache_bytes_per_token_per_layer']:,} | {peak} |")
    return "\n".join(lines)


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
                except RuntimeError as err:  # e.g. a graph capture failure: keep the other results
                    rows.append({"variant": name, "mode": mode, "batch": batch,
                                 "error": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                done += 1
                elapsed = time.perf_counter() - start
                r = rows[-1]
                status = r.get("error") or f"{r['decode_tokens_per_s']:,.0f} tok/s"
                print(f"[{done}/{total}] {name} batch={batch} {mode}: {status}  "
                      f"(eta {elapsed / done * (total - done):.0f}s)", flush=True)
    result = {"environment": env, "context": args.context, "new_tokens": args.new_tokens,
              "cache_bytes": byte_rows, "decode": rows}
    table = speed_markdown(rows)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "decode.json").write_text(json.dumps(result, indent=2) + "\n")
        header = (f"# Decode benchmark\n\n`{env['command']}` at git {env['git']}, torch {env['torch']}, "
                  f"{env['device']}, {args.dtype}, {args.size} preset, context {args.context}, "
                  f"{args.new_tokens} timed steps after {args.warmup} warm-up steps; modes: {args.modes}.\n\n")
        byte_table = bytes_markdown(byte_rows, args.size, args.dtype)
        (out / "decode.md").write_text(header + table + "\n\n" + byte_table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
