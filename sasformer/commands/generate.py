"""``sasformer generate``: continue a prompt with a trained model (checkpoint or HF export)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF export directory or training checkpoint directory")
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text; repeat for a left-padded batch")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder or file (default: MODEL/tokenizer, the run's data_dir/tokenizer, "
                             "or MODEL/tokenizer.json)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--stop-at-eot", action=argparse.BooleanOptionalAction, default=True,
                        help="stop a row at the end-of-text token")


def run(args: argparse.Namespace) -> int:
    import torch

    from sasformer.generation import find_tokenizer, generate, load_decoder, load_text_tokenizer

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tok_path = args.tokenizer or find_tokenizer(args.model)
    if tok_path is None:
        raise ValueError(f"no tokenizer found for {args.model}; pass --tokenizer (a saved tokenizer folder or file)")
    tokenizer = load_text_tokenizer(tok_path)
    model = load_decoder(args.model, device=device, dtype=dtype)

    encoded = [tokenizer.encode(p) for p in args.prompt]
    if any(len(ids) == 0 for ids in encoded):
        raise ValueError("--prompt must not be empty")
    longest = max(len(ids) for ids in encoded)
    if longest + args.max_new_tokens > model.config.max_seq_len:
        print(f"note: {longest + args.max_new_tokens} tokens exceed the model's context "
              f"{model.config.max_seq_len} (max_seq_len)")
    pad = tokenizer.eot_id if tokenizer.eot_id is not None else 0
    ids = torch.full((len(encoded), longest), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, toks in enumerate(encoded):  # left padding
        ids[row, longest - len(toks):] = torch.tensor(toks)
        mask[row, longest - len(toks):] = 1
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = generate(model, ids.to(device), args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k or None, attention_mask=mask.to(device),
                   eos_id=tokenizer.eot_id if args.stop_at_eot else None, generator=generator,
                   vocab_limit=tokenizer.vocab_size)
    for row, prompt in enumerate(args.prompt):
        new = out[row, longest:].tolist()
        if args.stop_at_eot and tokenizer.eot_id in new:
            new = new[: new.index(tokenizer.eot_id)]
        if len(args.prompt) > 1:
            print(f"--- [{row}]")
        print(prompt + tokenizer.decode(new))
    return 0
