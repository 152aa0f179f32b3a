"""``sasformer export``: a training checkpoint -> a Hugging Face model directory."""

from __future__ import annotations

import argparse

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint directory (model.safetensors + config.json with the ModelConfig)")
    parser.add_argument("--out", required=True, help="output directory for the Hugging Face model")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder or file (default: CHECKPOINT/tokenizer or the run's data_dir/tokenizer)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="store the weights in this dtype (default: as in the checkpoint)")


def run(args: argparse.Namespace) -> int:
    import torch

    from sasformer.models.hf.export import export_checkpoint

    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = export_checkpoint(args.checkpoint, args.out, tokenizer=args.tokenizer, dtype=dtype)
    tokenizer_note = "" if (out / "tokenizer.json").is_file() else " (no tokenizer found: pass --tokenizer for lm-eval)"
    print(f"exported {args.checkpoint} -> {out}{tokenizer_note}")
    print(f"load with: import sasformer; AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0
