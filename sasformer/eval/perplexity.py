"""Perplexity and bits per byte over non-overlapping windows, at and beyond the trained length.

A token stream ``x_0 .. x_N`` is cut into windows of ``L + 1`` tokens that overlap by one token:
window ``j`` feeds ``x[jL : jL + L]`` and predicts ``x[jL + 1 : jL + L + 1]``, so every token after
the first is predicted exactly once, each with the context that precedes it inside its window.
Evaluating at 2L and 4L (length extrapolation; positions simply continue past the trained length)
uses the same predicted tokens: the stream is cut to the largest multiple of the longest window,
so the lengths differ only in how much context each prediction sees.

Bits per byte = total nats / (ln 2 * bytes of the predicted text). The byte count comes from
``decode`` (UTF-8 length of the decoded predicted tokens, decoded per window; exact for byte-level
tokenizers unless a window boundary splits a multi-byte character) or, without a tokenizer, from a
given ``bytes_per_token`` ratio (e.g. measured when the data was prepared).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sasformer.eval.common import Model, model_device, progress


@dataclass(frozen=True)
class PerplexityResult:
    """Language-modelling metrics over ``n_tokens`` predicted tokens with windows of ``seq_len``."""

    seq_len: int
    n_tokens: int
    loss: float  # mean nats per token
    perplexity: float
    bits_per_byte: float | None
    n_bytes: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def bits_per_byte(total_nats: float, n_bytes: float) -> float:
    """Bits per byte of a text of ``n_bytes`` whose tokens cost ``total_nats`` in total."""
    if n_bytes <= 0:
        raise ValueError(f"n_bytes={n_bytes} must be > 0")
    return total_nats / (math.log(2) * n_bytes)


def windows(tokens: Sequence[int] | np.ndarray | Tensor, seq_len: int, span: int | None = None) -> Tensor:
    """(n_windows, seq_len + 1) windows over the first ``span + 1`` tokens (default: as many as fit)."""
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be one flat sequence, got shape {tuple(tokens.shape)}")
    if span is None:
        span = (len(tokens) - 1) // seq_len * seq_len
    if span % seq_len != 0 or span < seq_len or span + 1 > len(tokens):
        raise ValueError(f"{len(tokens)} tokens cannot give windows of {seq_len} over a span of {span}")
    n = span // seq_len
    starts = torch.arange(n) * seq_len
    return tokens[starts[:, None] + torch.arange(seq_len + 1)]


def window_losses(
    model: Model, windows_NL: Tensor, batch_size: int, device: torch.device, show_progress: bool = False
) -> Tensor:
    """Per-token losses (n_windows, L - 1) of next-token prediction inside each window of L tokens."""
    out = []
    batches = list(torch.split(windows_NL, batch_size))
    for batch in progress(batches, show_progress, f"ppl@{windows_NL.shape[1] - 1}"):
        batch = batch.to(device)
        out.append(token_losses(model, batch[:, :-1], batch[:, 1:]).cpu())
    return torch.cat(out)


def token_losses(model: Model, inputs_BT: Tensor, targets_BT: Tensor) -> Tensor:
    """Float32 next-token cross-entropy per position (B, T); ``targets`` are already shifted."""
    with torch.no_grad():
        logits_BTV = model(inputs_BT)
    losses = F.cross_entropy(logits_BTV.flatten(0, 1).float(), targets_BT.flatten(), reduction="none")
    return losses.view(targets_BT.shape)


def evaluate_perplexity(
    model: Model,
    tokens: Sequence[int] | np.ndarray | Tensor,
    seq_len: int,
    multipliers: Sequence[int] = (1, 2, 4),
    batch_size: int = 8,
    decode: Callable[[list[int]], str] | None = None,
    bytes_per_token: float | None = None,
    device: torch.device | str | None = None,
    show_progress: bool = False,
) -> list[PerplexityResult]:
    """Metrics at ``seq_len * m`` for each multiplier, all over the same predicted tokens."""
    if seq_len < 1 or not multipliers or min(multipliers) < 1:
        raise ValueError(f"seq_len={seq_len} and multipliers={list(multipliers)} must be positive")
    if decode is not None and bytes_per_token is not None:
        raise ValueError("give decode or bytes_per_token, not both")
    longest = seq_len * max(multipliers)
    n_tokens = len(tokens)
    span = (n_tokens - 1) // longest * longest
    if span == 0:
        raise ValueError(
            f"{n_tokens} tokens are fewer than one window of {longest} + 1; give more data or lower multipliers"
        )
    # cut before converting: a memory-mapped corpus is never copied whole
    tokens = torch.as_tensor(np.asarray(tokens[: span + 1], dtype=np.int64))
    device = torch.device(device) if device is not None else model_device(model)
    n_bytes = None
    if decode is not None:
        # decode in windows of the trained length: one window never straddles a bigger one's boundary
        predicted = windows(tokens, seq_len, span)[:, 1:]
        n_bytes = sum(len(decode(w.tolist()).encode("utf-8")) for w in predicted)
    elif bytes_per_token is not None:
        if bytes_per_token <= 0:
            raise ValueError(f"bytes_per_token={bytes_per_token} must be > 0")
        n_bytes = span * bytes_per_token
    results = []
    for m in multipliers:
        length = seq_len * m
        losses = window_losses(model, windows(tokens, length, span), batch_size, device, show_progress)
        total = float(losses.double().sum())
        results.append(PerplexityResult(
            seq_len=length,
            n_tokens=span,
            loss=total / span,
            perplexity=math.exp(total / span),
            bits_per_byte=bits_per_byte(total, n_bytes) if n_bytes is not None else None,
            n_bytes=round(n_bytes) if n_bytes is not None else None,
        ))
    return results


def as_inputs_targets(batch) -> tuple[Tensor, Tensor]:
    """A batch of windows as (inputs, targets): a (B, L + 1) tensor, an (inputs, targets) pair or a
    mapping with ``input_ids`` and ``labels``/``targets`` (targets already shifted)."""
    if isinstance(batch, Tensor):
        return batch[:, :-1], batch[:, 1:]
    if isinstance(batch, dict):
        targets = batch.get("targets", batch.get("labels"))
        if "input_ids" in batch and targets is not None:
            return batch["input_ids"], targets
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(f"cannot read a batch of type {type(batch).__name__}: expected a (B, L + 1) tensor, "
                     "an (inputs, targets) pair or a mapping with input_ids and targets")


def evaluate_window_batches(
    model: Model,
    batches: Iterable,
    seq_len: int,
    decode: Callable[[list[int]], str] | None = None,
    bytes_per_token: float | None = None,
    max_tokens: int | None = None,
    device: torch.device | str | None = None,
    show_progress: bool = False,
) -> PerplexityResult:
    """Metrics over ready-made windows (e.g. from a data loader), stopping after ``max_tokens``.

    Unlike :func:`evaluate_perplexity`, the windows at different lengths come from the loader and
    need not cover the same tokens. Targets equal to -100 are ignored.
    """
    if decode is not None and bytes_per_token is not None:
        raise ValueError("give decode or bytes_per_token, not both")
    device = torch.device(device) if device is not None else model_device(model)
    total, count, n_bytes = 0.0, 0, 0
    for batch in progress(batches, show_progress, f"ppl@{seq_len}"):
        inputs, targets = as_inputs_targets(batch)
        inputs, targets = inputs.to(device), targets.to(device)
        keep = targets != -100
        losses = token_losses(model, inputs, targets.masked_fill(~keep, 0))
        total += float(losses[keep].double().sum())
        count += int(keep.sum())
        if decode is not None:
            n_bytes += sum(len(decode(row[k].tolist()).encode("utf-8")) for row, k in zip(targets.cpu(), keep.cpu()))
        if max_tokens is not None and count >= max_tokens:
            break
    if count == 0:
        raise ValueError("the batches held no tokens to predict")
    if bytes_per_token is not None:
        n_bytes = count * bytes_per_token
    has_bytes = decode is not None or bytes_per_token is not None
    return PerplexityResult(
        seq_len=seq_len,
        n_tokens=count,
        loss=total / count,
        perplexity=math.exp(total / count),
        bits_per_byte=bits_per_byte(total, n_bytes) if has_bytes else None,
        n_bytes=round(n_bytes) if has_bytes else None,
    )
