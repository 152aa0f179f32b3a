"""Activation memory per token: the bytes one decoder block saves for its backward pass, per variant and path.

    python3 benchmarks/saved_activations.py --out DIR                   # CPU is fine: no timing involved
    python3 benchmarks/saved_activations.py --device cuda --out DIR     # the same on a GPU

Peak training memory is the weights, gradients and optimiser state (fixed) plus what the forward pass
saves for the backward pass (per token and layer). This measures the second directly: one block of the
``--size`` preset runs forward under bf16 autocast, eager or compiled, with a saved-tensor hook that sums
the storages it is handed (each counted once). Two sequence lengths are run and the difference divided
by the difference in tokens, so the weights' bf16 copies, which the block saves too, cancel out. What is
saved depends on the graph, not on the device, so the CPU answers for the GPU as well (Inductor's
partitioner decides the same on both, save for kernels one device lacks).

Each row runs in its own process, since the simulation path is chosen through environment variables read
when a graph is traced. Writes ``saved_activations.json`` and ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# row name -> (attention, environment)
ROWS = {
    "mha": ("mha", {}),
    "sas": ("sas", {}),
    "sas-banded": ("sas", {"SASFORMER_SIMULATE": "banded"}),
    "sas-banded-recompute": ("sas", {"SASFORMER_SIMULATE": "banded", "SASFORMER_BANDED_RECOMPUTE": "1"}),
    "sas-blocked": ("sas", {"SASFORMER_SIMULATE": "blocked"}),
    "sas-blocked-recompute": ("sas", {"SASFORMER_SIMULATE": "blocked", "SASFORMER_BANDED_RECOMPUTE": "1"}),
}


def saved_bytes(attention: str, size: str, seq_len: int, compiled: bool, device: str) -> int:
    """Bytes of the distinct storages one block's forward saves for backward, at batch 1 and ``seq_len``."""
    import torch

    sys.path.insert(0, str(REPO))
    from sasformer.layers.base import AttentionContext
    from sasformer.models.decoder import DecoderLM
    from sasformer.models.presets import preset

    torch.manual_seed(0)
    config = preset(size, attention, n_layers=1, max_seq_len=seq_len)
    model = DecoderLM(config).to(device)
    block = model.blocks[0]
    positions = torch.arange(seq_len, device=device)[None]
    ctx = AttentionContext(model.rotary.tables(positions, seq_len, 0), None, None, positions)
    x = torch.randn(1, seq_len, config.d_model, device=device, requires_grad=True)
    seen: set[tuple[int, torch.dtype]] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    run = torch.compile(block) if compiled else block
    with torch.autocast(device, dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run(x, ctx)
    return total


def measure_row(args: argparse.Namespace, name: str, compiled: bool) -> dict:
    attention, env = ROWS[name]
    lengths = sorted(args.seq_lens)
    cmd = [sys.executable, __file__, "--one", attention, "--size", args.size, "--device", args.device,
           "--seq-lens", *map(str, lengths)] + (["--compiled"] if compiled else [])
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=args.timeout_s)
    if proc.returncode != 0:
        return {"row": name, "compiled": compiled, "error": proc.stderr.strip().splitlines()[-1][:200]}
    sizes = json.loads(proc.stdout.strip().splitlines()[-1])
    per_token = (sizes[-1] - sizes[0]) / (lengths[-1] - lengths[0])
    return {"row": name, "attention": attention, "environment": env, "compiled": compiled,
            "seq_lens": lengths, "saved_bytes": sizes, "bytes_per_token_per_layer": per_token}


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    base = {r["compiled"]: r.get("bytes_per_token_per_layer") for r in rows if r["row"] == "mha"}
    lines = [f"# Saved activations per token and layer ({args.size}, bf16 autocast, {args.device})", "",
             f"`python3 benchmarks/saved_activations.py {' '.join(sys.argv[1:])}`", "",
             "| row | environment | mode | KiB per token per layer | vs MHA |", "|---|---|---|---:|---:|"]
    for r in rows:
        mode = "compiled" if r["compiled"] else "eager"
        env = " ".join(f"{k}={v}" for k, v in ROWS[r["row"]][1].items()) or "-"
        if "error" in r:
            lines.append(f"| {r['row']} | {env} | {mode} | {r['error']} | |")
            continue
        per = r["bytes_per_token_per_layer"]
        ratio = f"{per / base[r['compiled']]:.2f}x" if base.get(r["compiled"]) else "-"
        lines.append(f"| {r['row']} | {env} | {mode} | {per / 1024:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for saved_activations.json and .md")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--size", default="small")
    parser.add_argument("--device", default="cpu")
    # long enough for the SAS layer to fold its projections as in training (from 1,536 tokens a call at small)
    parser.add_argument("--seq-lens", type=int, nargs=2, default=[2048, 4096],
                        help="two sequence lengths; the difference cancels what does not grow with tokens")
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--timeout-s", type=float, default=600)
    parser.add_argument("--one", metavar="ATTENTION", help=argparse.SUPPRESS)  # a row's own process
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.seq_lens[0] == args.seq_lens[1]:
        parser.error("--seq-lens needs two different lengths")
    if args.one:
        sizes = [saved_bytes(args.one, args.size, n, args.compiled, args.device) for n in sorted(args.seq_lens)]
        print(json.dumps(sizes))
        return 0
    rows = []
    for name in args.rows:
        for mode in args.modes:
            rows.append(measure_row(args, name, mode == "compiled"))
            r = rows[-1]
            print(f"{name} {mode}: " + (r.get("error") or f"{r['bytes_per_token_per_layer'] / 1024:.1f} KiB"),
                  flush=True)
    table = markdown(rows, args)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "saved_activations.json").write_text(json.dumps({"size": args.size, "device": args.device,
                                                                      "rows": rows}, indent=2) + "\n")
        (args.out / "saved_activations.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
