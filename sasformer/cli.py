"""The ``sasformer`` command: ``sasformer <command> [options]``.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their command runs, so ``sasformer --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from sasformer.errors import RunStoppedError

COMMANDS: dict[str, tuple[str, str]] = {
    "params": ("sasformer.commands.params", "parameters and FLOPs/token of every variant at every preset"),
    "prepare": ("sasformer.commands.prepare", "tokenize documents into train/val token shards"),
    "train": ("sasformer.commands.train", "train a model from configs/*.yaml with --key value overrides"),
    "eval": ("sasformer.commands.eval", "perplexity, zero-shot tasks and MQAR for a checkpoint or saved model"),
    "compare": ("sasformer.commands.compare",
                "train a grid of variants x seeds on one budget and report the comparison"),
    "frontier": ("sasformer.commands.frontier",
                 "final loss against training FLOPs across grid folders, "
                 "each entry against a baseline at equal compute"),
    "export": ("sasformer.commands.export", "convert a training checkpoint to a Hugging Face model directory"),
    "generate": ("sasformer.commands.generate", "continue a prompt with a trained model"),
    "lm-eval": ("sasformer.commands.lm_eval", "run lm-evaluation-harness with sasformer models registered"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sasformer",
                                     description="SAS and baseline attention: train, evaluate, compare")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_path, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_path)
        importlib.import_module(module_path).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except ValueError as err:  # invalid input: say what is wrong and what to change, no traceback
        if os.environ.get("SASFORMER_TRACEBACK"):
            raise
        parser.exit(2, f"sasformer {args.command}: error: {err}\n")
    except RunStoppedError as err:  # a run's own check stopped it (its checkpoints are kept): the message is the news
        if os.environ.get("SASFORMER_TRACEBACK"):
            raise
        parser.exit(1, f"sasformer {args.command}: stopped: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
