"""FLOPs a training step executes per token, per attention variant, and the throughput they allow.

    python3 benchmarks/flop_ceiling.py [--size small] [--seq-len 1024] [--sas 24,128,3 ...]

Two counts per variant, both per token of a training step (3x the forward):
- *useful*: the library's count (``sasformer.models.flops``), with the attention core causal (each
  query against (T+1)/2 keys on average, what a causal kernel executes);
- *banded*: the same, with SAS's head convolutions as the ``banded`` simulation path executes them:
  one dense (in_heads*D, out_heads*D) GEMM per convolution, D/k times the useful work; *folded*: with
  the Q/K/V projections folded into the first of them where that saves FLOPs, as ``banded`` runs a
  layer without a cache (one (d, out_heads*D) GEMM for projection and convolution; the per-call product
  that builds its matrix does not grow with the tokens and is left out; the rule is applied at 16 x 1024
  tokens a call);
- *chunked c* (``--chunks``): as the ``chunked`` path executes them, GEMMs over chunks of c features
  with their (k-1)-feature halo, (c+k-1)/k times the useful work.
A path that runs every FLOP at the same rate as MHA's step would reach MHA's tokens/s times the ratio
of the counts: the ceiling for SAS with exact convolutions, and the expectation for ``banded``.
Runs on the CPU in a second (meta-device models); prints a Markdown table.
"""

from __future__ import annotations

import argparse

from sasformer.layers.sas import SimulatedAttention
from sasformer.models.flops import meta_model, train_flops_per_token
from sasformer.models.presets import preset
from sasformer.ops import simulate


def conv_extra_flops(attn: SimulatedAttention, window: int | None = None) -> float:
    """Forward FLOPs per token that head convolutions computing each output from ``window`` input
    features per head (None: all D, the banded GEMMs) execute beyond the useful k."""
    D, k = attn.head_dim, attn.args.kernel_size
    window = D if window is None else min(window, D)
    pairs = [(attn.n_heads, attn.n_sim_heads), (attn.n_kv_heads, attn.n_sim_kv_heads)]
    if attn.heads_v is not None:
        pairs.append((attn.n_kv_heads, attn.n_sim_kv_heads))
    # conv 1 maps in_h heads to out_h, conv 2 out_h to out_h; D outputs per simulated head
    return sum(2.0 * D * (window - k) * out_h * (in_h + out_h) for in_h, out_h in pairs)


# the fold's rule also weighs a per-call cost against the tokens of a call: counted at the benchmarks' batch
FOLD_TOKENS_PER_CALL = 16 * 1024


def fold_saved_flops(attn: SimulatedAttention) -> float:
    """Forward FLOPs per token the folded projections save over projection + banded first convolution."""
    d, D = attn.d_model, attn.head_dim
    blocks = [(attn.q_proj, attn.heads_q), (attn.k_proj, attn.heads_k)]
    if attn.heads_v is not None:
        blocks.append((attn.v_proj, attn.heads_v))
    saved = 0.0
    for proj, heads in blocks:
        if simulate.fold_pays(proj.weight, heads.w1, FOLD_TOKENS_PER_CALL):  # the rule the layer applies
            in_h, out_h = heads.in_heads, heads.out_heads
            saved += 2.0 * (d * in_h * D + in_h * D * out_h * D - d * out_h * D)
    return saved


def executed_flops(useful: float, sas_layers: list[SimulatedAttention], window: int | None,
                   folded: bool = False) -> float:
    """Training FLOPs per token with the head convolutions run over ``window`` features (3x the forward)."""
    extra = sum(conv_extra_flops(attn, window) - (fold_saved_flops(attn) if folded else 0.0) for attn in sas_layers)
    return useful + 3.0 * extra


def rows(size: str, seq_len: int, sas_configs: list[tuple[int, int, int]], chunks: list[int]) -> list[dict]:
    entries = [("mha", {}), *(("sas", {"n_sim_heads": h, "sim_head_dim": d, "kernel_size": k})
                               for h, d, k in sas_configs)]
    out = []
    for attention, args in entries:
        config = preset(size, attention, attention_args=args, max_seq_len=seq_len)
        model = meta_model(config)
        useful = train_flops_per_token(config, seq_len, model, causal=True)
        sas_layers = [b.attn for b in model.blocks if isinstance(b.attn, SimulatedAttention)]
        name = attention if not args else f"sas ({args['n_sim_heads']}, {args['sim_head_dim']}, {args['kernel_size']})"
        k = args.get("kernel_size", 1)
        out.append({"variant": name, "useful": useful, "banded": executed_flops(useful, sas_layers, None),
                    "folded": executed_flops(useful, sas_layers, None, folded=True),
                    "chunked": {c: executed_flops(useful, sas_layers, c + k - 1) for c in chunks}})
    base = out[0]["useful"]
    for r in out:
        r["ceiling"], r["banded_ratio"] = base / r["useful"], base / r["banded"]
        r["folded_ratio"] = base / r["folded"]
        r["chunked_ratio"] = {c: base / flops for c, flops in r["chunked"].items()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--sas", nargs="+", default=["24,128,3", "24,64,3"], help="H',D',k of each SAS row")
    p.add_argument("--chunks", type=int, nargs="*", default=[16, 8], help="chunk sizes of the chunked path")
    a = p.parse_args()
    configs = [tuple(int(v) for v in s.split(",")) for s in a.sas]
    if any(len(c) != 3 for c in configs):
        p.error("--sas takes H',D',k triples such as 24,128,3")
    print(f"{a.size}, T = {a.seq_len}, training FLOPs per token (attention core causal)\n")
    chunk_heads = "".join(f" chunked c={c} vs MHA |" for c in a.chunks)
    print(f"| variant | useful GFLOP | with banded convolutions GFLOP | folded GFLOP | ceiling vs MHA | "
          f"banded vs MHA | folded vs MHA |{chunk_heads}")
    print("|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(a.chunks))
    for r in rows(a.size, a.seq_len, configs, a.chunks):
        chunked = "".join(f" {r['chunked_ratio'][c]:.2f}x |" for c in a.chunks)
        print(f"| {r['variant']} | {r['useful'] / 1e9:.3f} | {r['banded'] / 1e9:.3f} | {r['folded'] / 1e9:.3f} | "
              f"{r['ceiling']:.2f}x | {r['banded_ratio']:.2f}x | {r['folded_ratio']:.2f}x |{chunked}")


if __name__ == "__main__":
    main()
