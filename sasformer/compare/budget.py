"""Turning a grid budget into each run's training length."""

from __future__ import annotations

from dataclasses import dataclass

from sasformer.compare.spec import BudgetSpec


@dataclass(frozen=True)
class RunBudget:
    """``max_tokens`` for the trainer (rounded up to whole steps there) and an optional time limit."""

    max_tokens: int
    max_time_s: float | None = None


def iso_flops_tokens(flops: float, train_flops_per_token: float) -> int:
    """Tokens a run may train on with ``flops`` of training compute: ``flops / train_flops_per_token``, floored."""
    if train_flops_per_token <= 0:
        raise ValueError(f"train_flops_per_token={train_flops_per_token} must be > 0")
    tokens = int(flops // train_flops_per_token)
    if tokens < 1:
        raise ValueError(f"budget.flops={flops:g} is less than one token of training ({train_flops_per_token:g} "
                         "FLOPs/token); raise it")
    return tokens


def run_budget(budget: BudgetSpec, train_flops_per_token: float) -> RunBudget:
    """The length of one run under ``budget``, given that run's training FLOPs per token."""
    if budget.kind == "tokens":
        return RunBudget(max_tokens=int(budget.tokens))
    if budget.kind == "flops":
        return RunBudget(max_tokens=iso_flops_tokens(float(budget.flops), train_flops_per_token))
    if budget.kind == "time":
        return RunBudget(max_tokens=int(budget.tokens), max_time_s=float(budget.seconds))
    raise ValueError(f"budget.kind={budget.kind!r} is not one of tokens, flops, time")
