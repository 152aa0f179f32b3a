"""Training-loader throughput on one CPU core: tokens/s of ``TokenLoader.next_batch`` and ``eval_batches``.

    python3 benchmarks/loader_speed.py --out benchmarks/results            # synthetic shards in a temp dir
    python3 benchmarks/loader_speed.py --data DATA_DIR --out DIR           # a prepared folder

Writes ``loader_speed.json`` and ``loader_speed.md`` into ``--out`` and prints the table. The process is pinned
to one core (where the OS allows) and torch to one thread. Shards are read through the page cache; the
synthetic shards were just written, so they are in it (a cold read from disk is bounded by the disk instead).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from sasformer.data.loader import TokenLoader, eval_batches
from sasformer.data.shards import write_shard

CONFIGS = [(1024, 8), (1024, 64), (2048, 32), (4096, 16), (128, 256), (64, 256), (32, 512)]
TARGET = 5e6  # tokens/s the training loader must reach on one core


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def synthetic_data(directory: Path, tokens: int, shards: int, vocab: int) -> Path:
    rng = np.random.default_rng(0)
    (directory / "train").mkdir(parents=True)
    (directory / "val").mkdir()
    fingerprint = "00" * 32
    for i, n in enumerate(np.array_split(np.arange(tokens), shards)):
        write_shard(directory / "train" / f"train_{i:06d}.bin", rng.integers(0, vocab, len(n)), vocab, fingerprint)
    write_shard(directory / "val" / "val_000000.bin", rng.integers(0, vocab, tokens // 10), vocab, fingerprint)
    return directory


def time_loader(data: Path, seq_len: int, batch: int, seconds: float) -> dict:
    loader = TokenLoader(data, "train", seq_len=seq_len, batch_size=batch, seed=0)
    for _ in range(3):
        loader.next_batch()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        loader.next_batch()
        steps += 1
    elapsed = time.perf_counter() - start
    return {"split": "train", "seq_len": seq_len, "batch_size": batch, "batches": steps,
            "tokens_per_s": steps * batch * seq_len / elapsed, "ms_per_batch": 1e3 * elapsed / steps}


def time_eval(data: Path, seq_len: int, batch: int, seconds: float) -> dict:
    steps, tokens, start = 0, 0, time.perf_counter()
    for x, _ in eval_batches(data, "val", seq_len=seq_len, batch_size=batch):
        steps += 1
        tokens += x.numel()
        if time.perf_counter() - start > seconds:
            break
    elapsed = time.perf_counter() - start
    return {"split": "val (eval_batches)", "seq_len": seq_len, "batch_size": batch, "batches": steps,
            "tokens_per_s": tokens / elapsed, "ms_per_batch": 1e3 * elapsed / steps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="a prepared folder (default: synthetic shards in a temp dir)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for loader_speed.json / .md")
    parser.add_argument("--tokens", type=int, default=50_000_000, help="synthetic train tokens (default 5e7)")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per configuration")
    args = parser.parse_args()

    pinned = False
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        pinned = True
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else synthetic_data(Path(tmp), args.tokens, 2, 50257)
        rows = [time_loader(data, s, b, args.seconds) for s, b in CONFIGS]
        rows += [time_eval(data, s, b, args.seconds) for s, b in CONFIGS[:2]]
        num_tokens = TokenLoader(data, "train", seq_len=1, batch_size=1).num_tokens

    machine = {"nproc": os.cpu_count(), "cpu": cpu_model(), "pinned_to_one_core": pinned,
               "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
               "platform": platform.platform()}
    result = {"command": " ".join(["python3"] + sys.argv), "git": git_revision(),
              "data": args.data or f"synthetic: {args.tokens} uniform random tokens, vocab 50257 (uint16), 2 shards",
              "train_tokens": num_tokens, "target_tokens_per_s": TARGET, "machine": machine, "results": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loader_speed.json").write_text(json.dumps(result, indent=2) + "\n")

    lines = [
        "# Loader throughput (one CPU core)",
        "",
        f"- command: `{result['command']}` (git {result['git']})",
        f"- machine: {machine['cpu']}, nproc {machine['nproc']}, pinned to one core: {pinned}; "
        f"python {machine['python']}, torch {machine['torch']}, numpy {machine['numpy']}",
        f"- data: {result['data']}; {num_tokens:,} train tokens, page cache warm",
        f"- target: >= {TARGET / 1e6:g} M tokens/s for `TokenLoader.next_batch`",
        "",
        "| split | seq_len | batch | batches timed | ms / batch | M tokens/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['split']} | {r['seq_len']} | {r['batch_size']} | {r['batches']} | {r['ms_per_batch']:.3f} | "
              f"{r['tokens_per_s'] / 1e6:.1f} |" for r in rows]
    table = "\n".join(lines) + "\n"
    (out / "loader_speed.md").write_text(table)
    print(table)
    slowest = min(r["tokens_per_s"] for r in rows if r["split"] == "train")
    print(f"slowest training configuration: {slowest / 1e6:.1f} M tokens/s "
          f"({'meets' if slowest >= TARGET else 'BELOW'} the {TARGET / 1e6:g} M target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
