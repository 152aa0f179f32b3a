"""Thin command modules of the ``sasformer`` CLI, each with ``add_arguments`` and ``run``."""

from __future__ import annotations

import argparse


def accept_overrides(parser: argparse.ArgumentParser) -> None:
    """Collect options the parser does not know into ``args.overrides`` instead of rejecting them.

    Override keys are open-ended (``attention_args`` differ per variant), so the command's ``run``
    validates every key against its schema and names the unknown ones.
    """
    parse_known = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):  # type: ignore[no-untyped-def]
        namespace, extra = parse_known(args, namespace)
        namespace.overrides = list(getattr(namespace, "overrides", None) or []) + list(extra)
        return namespace, []

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]
