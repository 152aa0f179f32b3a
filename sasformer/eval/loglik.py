"""Batched log-likelihood scoring of (context, continuation) token requests.

A *model* is any callable ``model(input_ids (B, T)) -> logits (B, T, V)`` that is causal. Each
request is the token ids of a context and of a continuation; the result is the sum of the
continuation's token log-probabilities given the context, its length, and whether greedy (argmax)
decoding would have produced exactly the continuation.

Layout of one request in a row (``max_len`` = L, request tokens ``c_1..c_m`` then ``x_1..x_n``):
the row holds ``(c + x)[-(L + 1):-1]``, i.e. the last L tokens before the final one (truncated from
the left when longer), and the logits at its last n positions predict ``x_1..x_n``.

Rows are right-padded. With causal attention a real token never attends to a later (padding)
position, so no attention mask is needed and the model's unmasked fast path is used. Requests are
sorted by length (longest first) so each batch holds similar lengths and an out-of-memory error,
if any, happens in the first batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sasformer.eval.common import Model, model_device, progress


@dataclass(frozen=True)
class Request:
    """Token ids of a context and the continuation to score after it."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass(frozen=True)
class Score:
    """Result for one request.

    ``logprob``: sum of the continuation's token log-probabilities (natural log).
    ``n_tokens``: continuation length in tokens. ``greedy``: every continuation token is the argmax.
    """

    logprob: float
    n_tokens: int
    greedy: bool


def _row(request: Request, max_len: int) -> tuple[list[int], int]:
    """The input row for a request and the number of continuation tokens at its end."""
    n = len(request.continuation)
    if n == 0:
        raise ValueError("a request's continuation is empty; there is nothing to score")
    if len(request.context) == 0:
        raise ValueError("a request's context is empty; give at least one token (e.g. end-of-text) to condition on")
    if n > max_len:
        raise ValueError(f"a continuation of {n} tokens does not fit max_len={max_len}; raise max_len or shorten it")
    full = list(request.context) + list(request.continuation)
    return full[-(max_len + 1):-1], n


def _score_rows(model: Model, requests: list[Request], max_len: int, device: torch.device) -> list[Score]:
    rows = [_row(r, max_len) for r in requests]
    width = max(len(row) for row, _ in rows)
    ids_BT = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (row, _) in enumerate(rows):
        ids_BT[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    # the positions that predict continuation tokens, flattened over the batch (M in all)
    row_M = torch.tensor([i for i, (_, n) in enumerate(rows) for _ in range(n)])
    pos_M = torch.tensor([p for row, n in rows for p in range(len(row) - n, len(row))])
    target_M = torch.tensor([t for r in requests for t in r.continuation])
    with torch.no_grad():
        logits_BTV = model(ids_BT.to(device))
    # only those positions go through a float32 log-softmax: memory M x V, not B x T x V
    logp_MV = torch.log_softmax(logits_BTV[row_M.to(device), pos_M.to(device)].float(), dim=-1)
    target_M = target_M.to(device)
    token_logp_M = logp_MV.gather(-1, target_M[:, None]).squeeze(-1).double()
    miss_M = (logp_MV.argmax(-1) != target_M).double()
    row_M = row_M.to(device)
    logprob_B = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, row_M, token_logp_M)
    misses_B = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, row_M, miss_M)
    return [Score(lp, n, misses == 0) for lp, misses, (_, n) in zip(logprob_B.tolist(), misses_B.tolist(), rows)]


def score_requests(
    model: Model,
    requests: Sequence[Request],
    max_len: int,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    show_progress: bool = False,
) -> list[Score]:
    """Score every request; results are in the order of ``requests``.

    ``max_len`` is the longest row given to the model (its trained context length, or more for a
    model that extrapolates); longer requests lose tokens from the left of their context.
    ``device`` defaults to the device of the model's first parameter (CPU if it has none).
    """
    if max_len < 1:
        raise ValueError(f"max_len={max_len} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if device is None:
        device = model_device(model)
    device = torch.device(device)
    lengths = [min(len(r.context) + len(r.continuation), max_len + 1) for r in requests]
    order = sorted(range(len(requests)), key=lambda i: -lengths[i])
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    results: list[Score | None] = [None] * len(requests)
    for batch in progress(batches, show_progress, "scoring"):
        for i, score in zip(batch, _score_rows(model, [requests[i] for i in batch], max_len, device)):
            results[i] = score
    return results  # type: ignore[return-value]
