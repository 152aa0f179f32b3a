"""Bandwidth of the collectives data parallelism uses (all-reduce for DDP; all-gather and reduce-scatter
for FSDP2), between the GPUs of one machine:

    torchrun --nproc-per-node 2 benchmarks/collective_bandwidth.py [--sizes-mb 1 16 256] [--out DIR]

Prints, per operation and message size, the time and the bus bandwidth in the convention of NCCL's own
tests (all-reduce moves 2(n-1)/n of the message per GPU, all-gather and reduce-scatter (n-1)/n), so the
numbers compare with the link's rated speed. Rank 0 writes ``collective_bandwidth.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.checks import MULTICAST_OFF

for _name, _value in MULTICAST_OFF.items():
    os.environ.setdefault(_name, _value)


def time_op(op, warmup: int, iters: int, cuda: bool) -> float:
    """Seconds per call after ``warmup`` calls (CUDA events on GPUs, the wall clock on CPU)."""
    for _ in range(warmup):
        op()
    if not cuda:
        start_s = time.perf_counter()
        for _ in range(iters):
            op()
        return (time.perf_counter() - start_s) / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        op()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / iters


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 16, 256])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()  # gloo on CPU, as a smoke test of the script
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    world, rank = dist.get_world_size(), dist.get_rank()
    rows = []
    for size_mb in args.sizes_mb:
        numel = int(size_mb * 2**20) // 4 // world * world  # fp32, divisible by the world size
        full = torch.randn(numel, device=device)
        shard = torch.empty(numel // world, device=device)
        ops = {
            "all_reduce": (lambda f=full: dist.all_reduce(f), 2 * (world - 1) / world),
            "all_gather": (lambda f=full, s=shard: dist.all_gather_into_tensor(f, s), (world - 1) / world),
            "reduce_scatter": (lambda f=full, s=shard: dist.reduce_scatter_tensor(s, f), (world - 1) / world),
        }
        for name, (op, bus_factor) in ops.items():
            seconds = time_op(op, args.warmup, args.iters, cuda)
            algbw = numel * 4 / seconds / 1e9
            rows.append({"op": name, "size_mb": size_mb, "ms": seconds * 1e3, "algbw_gbps": algbw,
                         "busbw_gbps": algbw * bus_factor})
    if rank == 0:
        backend = f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}" if cuda else "gloo"
        name = torch.cuda.get_device_name(device) if cuda else "CPU"
        print(f"{world} x {name}, torch {torch.__version__}, {backend}")
        print(f"{'op':<16}{'MB':>8}{'ms':>10}{'bus GB/s':>10}")
        for r in rows:
            print(f"{r['op']:<16}{r['size_mb']:>8g}{r['ms']:>10.3f}{r['busbw_gbps']:>10.1f}")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "collective_bandwidth.json").write_text(json.dumps({"world": world, "rows": rows}, indent=2))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
