"""``sasformer prepare``: tokenize documents into train/val token shards (see docs/data.md)."""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+",
                        help="files, folders, globs (.txt/.md/.jsonl/.parquet, optionally .gz/.xz/.bz2/.zst), "
                             "hf:NAME[:CONFIG][@SPLIT], or `default` (the embedded offline corpus)")
    parser.add_argument("--out", "-o", required=True, help="output folder (train/, val/, tokenizer/, meta.json)")
    tok = parser.add_mutually_exclusive_group(required=True)
    tok.add_argument("--vocab-size", type=int, help="train a byte-level BPE with this many ids on the train split")
    tok.add_argument("--tokenizer",
                     help="use a tokenizer: a .tiktoken ranks file, a tokenizers .json, a saved tokenizer folder, "
                          "or hf:NAME (transformers)")
    parser.add_argument("--eot-token", help="end-of-text token separating documents (default <|endoftext|>, or "
                                            "the tokenizer's own end-of-sequence token)")
    parser.add_argument("--val-fraction", type=float, default=0.005,
                        help="share of documents in val, chosen by a hash of each document's id (default 0.005)")
    parser.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default 1e8)")
    parser.add_argument("--bpe-sample-mb", type=float, default=256.0,
                        help="train the BPE on at most this many MB of train-split text (default 256)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="tokenizer processes (default: every core)")
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT is up to date")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from sasformer.data.prepare import PrepareOptions, prepare

    meta = prepare(PrepareOptions(
        inputs=args.inputs, out=args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        eot_token=args.eot_token, val_fraction=args.val_fraction, text_field=args.text_field,
        shard_tokens=args.shard_tokens, bpe_sample_mb=args.bpe_sample_mb, workers=args.workers, force=args.force,
        progress=not args.no_progress,
    ))
    splits = meta["splits"]
    print(f"{args.out}: vocab {meta['vocab_size']} ({meta['dtype']}), "
          f"train {splits['train']['tokens']:,} tokens / {splits['train']['documents']:,} docs, "
          f"val {splits['val']['tokens']:,} tokens / {splits['val']['documents']:,} docs")
    return 0
