"""FLOPs a training step executes per token, per attention variant, and the throughput they allow.

    python3 benchmarks/flop_ceiling.py [--size small] [--seq-len 1024] [--sas 24,128,3 ...]

Two counts per variant, both per token of a training step (3x the forward):
- *useful*: the library's count (``sasformer.models.flops``), with the attention core causal (each
  query against (T+1)/2 keys on average, what a causal kernel executes);
- *banded*: the same, with SAS's head convolutions as the ``banded`` simulation path executes them:
  one dense (in_heads*D, out_heads*D) GEMM per convolution, D/k times the useful work.
A path that runs every FLOP at the same rate as MHA's step would reach MHA's tokens/s times the ratio
of the counts: the ceiling for SAS with exact convolutions, and the expectation for ``banded``.
Runs on the CPU in a second (meta-device models); prints a Markdown table.
"""

from __future__ import annotations

import argparse

from sasformer.layers.sas import SimulatedAttention
from sasformer.models.flops import meta_model, train_flops_per_token
from sasformer.models.presets import preset


def banded_extra_flops(attn: SimulatedAttention) -> float:
    """Forward FLOPs per token the banded GEMMs execute beyond the useful convolution FLOPs."""
    D, k = attn.head_dim, attn.args.kernel_size
    pairs = [(attn.n_heads, attn.n_sim_heads), (attn.n_kv_heads, attn.n_sim_kv_heads)]
    if attn.heads_v is not None:
        pairs.append((attn.n_kv_heads, attn.n_sim_kv_heads))
    banded = sum(2.0 * D * D * out_h * (in_h + out_h) for in_h, out_h in pairs)
    useful = sum(2.0 * D * k * out_h * (in_h + out_h) for in_h, out_h in pairs)
    return banded - useful


def rows(size: str, seq_len: int, sas_configs: list[tuple[int, int, int]]) -> list[dict]:
    entries = [("mha", {}), *(("sas", {"n_sim_heads": h, "sim_head_dim": d, "kernel_size": k})
                               for h, d, k in sas_configs)]
    out = []
    for attention, args in entries:
        config = preset(size, attention, attention_args=args, max_seq_len=seq_len)
        model = meta_model(config)
        useful = train_flops_per_token(config, seq_len, model, causal=True)
        extra = 3.0 * sum(banded_extra_flops(b.attn) for b in model.blocks if isinstance(b.attn, SimulatedAttention))
        name = attention if not args else f"sas ({args['n_sim_heads']}, {args['sim_head_dim']}, {args['kernel_size']})"
        out.append({"variant": name, "useful": useful, "banded": useful + extra})
    base = out[0]["useful"]
    for r in out:
        r["ceiling"], r["banded_ratio"] = base / r["useful"], base / r["banded"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--sas", nargs="+", default=["24,128,3", "24,64,3"], help="H',D',k of each SAS row")
    a = p.parse_args()
    configs = [tuple(int(v) for v in s.split(",")) for s in a.sas]
    if any(len(c) != 3 for c in configs):
        p.error("--sas takes H',D',k triples such as 24,128,3")
    print(f"{a.size}, T = {a.seq_len}, training FLOPs per token (attention core causal)\n")
    print("| variant | useful GFLOP | with banded convolutions GFLOP | ceiling vs MHA | banded vs MHA |")
    print("|---|---:|---:|---:|---:|")
    for r in rows(a.size, a.seq_len, configs):
        print(f"| {r['variant']} | {r['useful'] / 1e9:.3f} | {r['banded'] / 1e9:.3f} | "
              f"{r['ceiling']:.2f}x | {r['banded_ratio']:.2f}x |")


if __name__ == "__main__":
    main()
