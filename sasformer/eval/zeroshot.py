"""Zero-shot evaluation by log-likelihood: multiple choice and lambada.

Tokenisation: context and continuation are encoded separately (choices carry their leading space),
after moving any trailing whitespace of the context to the front of the continuation, so a choice
is always scored as the same tokens whatever precedes it. An empty context is replaced by the
tokenizer's end-of-text token.

Metrics, each with its standard error (sample standard deviation / sqrt(n)):

- ``acc``: the choice with the highest summed log-likelihood is the gold one (ties: first choice).
- ``acc_norm``: the same after dividing each choice's log-likelihood by the UTF-8 byte length of the
  choice without the whitespace that separates it from the context (lm-eval's ``acc_norm`` divides by the
  character count of the choice without its delimiter: the same for ASCII text).
  Not reported for tasks whose choices share one continuation (winogrande), where it equals
  ``acc`` by construction.
- lambada: ``acc`` = greedy decoding reproduces the whole target; ``ppl`` = exp(-mean over items
  of the target's log-likelihood) (lm-eval's convention); ``bits_per_byte`` of the targets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from sasformer.eval.common import Model
from sasformer.eval.loglik import Request, Score, score_requests
from sasformer.eval.tasks import ChoiceItem, ClozeItem, Item


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation, ddof=1, over sqrt(n))."""
    n = len(values)
    if n == 0:
        raise ValueError("cannot average zero values")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


class RequestBuilder:
    """Turns text pairs into token requests, encoding each distinct context once."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[str, tuple[int, ...]] = {}

    def _encode(self, text: str) -> tuple[int, ...]:
        if text not in self._cache:
            self._cache[text] = tuple(self.tokenizer.encode(text))
        return self._cache[text]

    def __call__(self, context: str, continuation: str) -> Request:
        stripped = context.rstrip()
        if len(stripped) != len(context):
            continuation = context[len(stripped):] + continuation
            context = stripped
        if context:
            context_ids = self._encode(context)
        else:
            eot = getattr(self.tokenizer, "eot_id", None)
            if eot is None:
                raise ValueError("an item has an empty context and the tokenizer has no eot_id to condition on")
            context_ids = (int(eot),)
        continuation_ids = tuple(self.tokenizer.encode(continuation))
        if not continuation_ids:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens")
        return Request(context_ids, continuation_ids)


def choice_metrics(items: Sequence[ChoiceItem], logprobs: Sequence[Sequence[float]], normalise: bool) -> dict[str, Any]:
    """Accuracy (and byte-normalised accuracy) from each item's per-choice log-likelihoods."""
    correct, correct_norm = [], []
    for item, lps in zip(items, logprobs):
        correct.append(float(_argmax(lps) == item.gold))
        if normalise:
            nbytes = [max(len(cont.lstrip().encode("utf-8")), 1) for _, cont in item.pairs]
            correct_norm.append(float(_argmax([lp / b for lp, b in zip(lps, nbytes)]) == item.gold))
    out: dict[str, Any] = {"n": len(items)}
    out["acc"], out["acc_stderr"] = mean_and_stderr(correct)
    if normalise:
        out["acc_norm"], out["acc_norm_stderr"] = mean_and_stderr(correct_norm)
    return out


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def cloze_metrics(items: Sequence[ClozeItem], scores: Sequence[Score]) -> dict[str, Any]:
    """Greedy accuracy, perplexity and bits per byte of lambada-style targets."""
    out: dict[str, Any] = {"n": len(items)}
    out["acc"], out["acc_stderr"] = mean_and_stderr([float(s.greedy) for s in scores])
    mean_logprob = sum(s.logprob for s in scores) / len(scores)
    out["ppl"] = math.exp(-mean_logprob)
    nbytes = sum(len(item.target.encode("utf-8")) for item in items)
    out["bits_per_byte"] = -sum(s.logprob for s in scores) / (math.log(2) * nbytes)
    return out


def evaluate_items(
    model: Model,
    tokenizer: Tokenizer,
    items: Sequence[Item],
    max_len: int,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Metrics for the items of one task (all of one shape)."""
    if not items:
        raise ValueError("no items to evaluate")
    build = RequestBuilder(tokenizer)
    if all(isinstance(item, ClozeItem) for item in items):
        requests = [build(item.context, item.target) for item in items]
        scores = score_requests(model, requests, max_len, batch_size, device, show_progress)
        return cloze_metrics(items, scores)  # type: ignore[arg-type]
    if not all(isinstance(item, ChoiceItem) for item in items):
        raise ValueError("a task mixes cloze and multiple-choice items")
    requests = [build(ctx, cont) for item in items for ctx, cont in item.pairs]
    scores = score_requests(model, requests, max_len, batch_size, device, show_progress)
    logprobs, start = [], 0
    for item in items:
        logprobs.append([s.logprob for s in scores[start: start + len(item.pairs)]])
        start += len(item.pairs)
    # choices sharing one continuation have equal byte lengths: acc_norm would repeat acc
    normalise = any(len({cont for _, cont in item.pairs}) > 1 for item in items)
    return choice_metrics(items, logprobs, normalise)  # type: ignore[arg-type]


def evaluate_tasks(
    model: Model,
    tokenizer: Tokenizer,
    tasks: dict[str, Sequence[Item]],
    max_len: int,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    show_progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """``{task: metrics}`` for every task."""
    results = {}
    for name, items in tasks.items():
        if log is not None:
            log(f"{name}: {len(items)} items")
        results[name] = evaluate_items(model, tokenizer, items, max_len, batch_size, device, show_progress)
    return results
