"""``sasformer params``: parameters and FLOPs per token of every variant at every preset."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="tiny,mini,small,medium", help="comma-separated presets")
    parser.add_argument("--variants", default="mha,gqa,mqa,mla,tpa,sas", help="comma-separated attention variants")
    parser.add_argument("--seq-len", type=int, default=None, help="context length for FLOPs (default: the preset's)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")


def parameter_table(sizes: list[str], variants: list[str], seq_len: int | None = None) -> list[dict]:
    """One row per (size, variant): parameters, attention parameters, FLOPs/token, KV cache bytes."""
    from sasformer.models.flops import forward_flops_per_token, meta_model, train_flops_per_token
    from sasformer.models.presets import preset

    rows = []
    for size in sizes:
        base_params = None
        for variant in variants:
            config = preset(size, variant)
            model = meta_model(config)
            T = seq_len or config.max_seq_len
            params = model.num_parameters()
            base_params = base_params or params
            attn = model.blocks[0].attn
            rows.append({
                "size": size,
                "variant": variant,
                "attention_args": attn.args.to_dict(),
                "params": params,
                "params_vs_first": params / base_params - 1.0,
                "attention_params_per_layer": sum(p.numel() for p in attn.parameters()),
                "seq_len": T,
                "forward_flops_per_token": forward_flops_per_token(config, T, model),
                "train_flops_per_token": train_flops_per_token(config, T, model),
                "kv_cache_bytes_per_token_bf16": config.n_layers * attn.cache_bytes_per_token(),
            })
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| size | variant | params | vs first | attn params/layer | T | train GFLOP/token | KV cache B/token (bf16) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['variant']} | {r['params'] / 1e6:.2f}M | {r['params_vs_first']:+.2%} | "
            f"{r['attention_params_per_layer']:,} | {r['seq_len']} | {r['train_flops_per_token'] / 1e9:.3f} | "
            f"{r['kv_cache_bytes_per_token_bf16']:,} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import json

    rows = parameter_table(args.sizes.split(","), args.variants.split(","), args.seq_len)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0
