"""``sasformer lm-eval ARGS``: lm-evaluation-harness with the sasformer model type registered.

Everything after ``lm-eval`` goes to lm-eval's own command line, unchanged, e.g.
``sasformer lm-eval run --model hf --model_args pretrained=OUT/hf,backend=causal --tasks hellaswag``.
Also runnable as ``python -m sasformer.commands.lm_eval ARGS``.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER,
                        help="arguments for lm-eval (start with its subcommand, e.g. 'run', or with '--')")


def run_lm_eval(argv: list[str]) -> int:
    """Register sasformer with transformers' Auto classes, then run lm-eval's CLI with ``argv``."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as err:
        raise ValueError("lm-eval is not installed: pip install 'sasformer[lm-eval]' (or lm-eval)") from err
    from sasformer.models.hf import register

    if not register():
        raise ValueError("lm-eval with sasformer models needs transformers (pip install 'sasformer[hf]')")
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as stop:
        return int(stop.code or 0) if not isinstance(stop.code, str) else 1
    finally:
        sys.argv = saved
    return 0


def run(args: argparse.Namespace) -> int:
    argv = list(args.lm_eval_args)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    return run_lm_eval(argv)


if __name__ == "__main__":
    sys.exit(run_lm_eval(sys.argv[1:]))
