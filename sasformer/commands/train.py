"""``sasformer train --config configs/tiny.yaml [--key value ...]``: train one model.

Any config key can follow as an option, dotted for nested keys (``--optim.lr 1e-3``,
``--model.attention sas --model.attention_args.kernel_size 1``); values are read as YAML, and an
unknown key is an error listing the known ones.
Multi-GPU: ``torchrun --nproc-per-node 8 -m sasformer train --config configs/small.yaml``.
"""

from __future__ import annotations

import argparse

from sasformer.commands import accept_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config",
                        help="YAML file (configs/tiny.yaml, small.yaml, medium.yaml); default: built-in defaults")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.epilog = "config overrides: --KEY VALUE for any key of the YAML file, e.g. --optim.lr 1e-3"
    accept_overrides(parser)


def run(args: argparse.Namespace) -> int:
    import yaml

    from sasformer.train.config import load_config, parse_overrides
    from sasformer.train.trainer import train

    config = load_config(args.config, parse_overrides(getattr(args, "overrides", [])))
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    last = train(config)
    if "loss" in last:
        summary = f"step {last['step']}: loss {last['loss']:.4f}"
        if "val_loss" in last:
            summary += f", val loss {last['val_loss']:.4f}"
        print(summary + f"; outputs in {config.out_dir}")
    else:
        print(f"{config.out_dir} is already at step {last['step']} of {config.total_steps()}; nothing to train "
              "(raise max_steps / max_tokens to continue, or start a new run in another out_dir)")
    return 0
