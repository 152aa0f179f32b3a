"""Fake models and tokenizers whose scores are known in closed form."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CharTokenizer:
    """One token per character of ``alphabet``; ``|`` is end-of-text."""

    def __init__(self, alphabet: str = "|abcdefghijklmnopqrstuvwxyz .") -> None:
        self.alphabet = alphabet
        self.eot_id = alphabet.index("|")
        self.vocab_size = len(alphabet)

    def encode(self, text: str) -> list[int]:
        return [self.alphabet.index(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.alphabet[i] for i in ids)


class BigramModel(nn.Module):
    """logits[b, t] = log_probs[input[b, t]]: the next token depends on the current one only."""

    def __init__(self, log_probs_VV: Tensor) -> None:
        super().__init__()
        self.register_buffer("log_probs_VV", log_probs_VV)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.log_probs_VV[input_ids]


def bigram(vocab: int, favourites: dict[int, dict[int, float]] | None = None, base: float = 0.0) -> BigramModel:
    """A bigram model with logits ``base`` everywhere except ``favourites[prev][next]``."""
    logits = torch.full((vocab, vocab), base)
    for prev, nexts in (favourites or {}).items():
        for nxt, value in nexts.items():
            logits[prev, nxt] = value
    return BigramModel(torch.log_softmax(logits, dim=-1))


def unigram(probs: dict[int, float], vocab: int) -> BigramModel:
    """The same next-token distribution everywhere: ``probs`` for the named ids, the rest shared equally."""
    rest = (1.0 - sum(probs.values())) / (vocab - len(probs))
    p = torch.full((vocab,), rest, dtype=torch.float64)
    for i, v in probs.items():
        p[i] = v
    return BigramModel(p.log().float().expand(vocab, vocab).clone())
