"""A tiny in-memory data source following the ``sasformer.data.loader`` interface, for fast tests."""

from __future__ import annotations

import torch
from torch import Tensor


class FakeLoader:
    """Random windows of a fixed token stream; the global batch is drawn, then rank r takes rows r::world."""

    def __init__(self, tokens: Tensor, vocab_size: int, fingerprint: str, seq_len: int, batch_size: int, seed: int,
                 rank: int, world_size: int, expected_fingerprint: str | None) -> None:
        if expected_fingerprint is not None and expected_fingerprint != fingerprint:
            raise ValueError(f"tokenizer fingerprint {fingerprint} != expected {expected_fingerprint}")
        self.tokens, self.vocab_size, self.tokenizer_fingerprint = tokens, vocab_size, fingerprint
        self.num_tokens = tokens.numel()
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_drawn = 0

    def next_batch(self) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.batches_drawn)
        self.batches_drawn += 1
        starts = torch.randint(0, self.num_tokens - self.seq_len - 1, (self.batch_size,), generator=g)
        starts = starts[self.rank :: self.world_size]
        rows = torch.stack([self.tokens[s : s + self.seq_len + 1] for s in starts.tolist()])
        return rows[:, :-1].long(), rows[:, 1:].long()

    def state_dict(self) -> dict:
        return {"batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        self.batches_drawn = state["batches_drawn"]


class FakeData:
    """A ``DataSource``: a learnable token stream (a noisy repeating pattern) and a validation slice."""

    def __init__(self, vocab_size: int = 48, num_tokens: int = 4000, fingerprint: str = "fake-tok-1",
                 seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        pattern = torch.randint(0, vocab_size, (37,), generator=g)
        stream = pattern.repeat(num_tokens // 37 + 1)[:num_tokens]
        noise = torch.rand(num_tokens, generator=g) < 0.1
        stream[noise] = torch.randint(0, vocab_size, (int(noise.sum()),), generator=g)
        self.train_tokens, self.val_tokens = stream[: num_tokens * 9 // 10], stream[num_tokens * 9 // 10 :]
        self.vocab_size, self.fingerprint = vocab_size, fingerprint

    def train_loader(self, seq_len, batch_size, seed, rank, world_size, expected_fingerprint):
        return FakeLoader(self.train_tokens, self.vocab_size, self.fingerprint, seq_len, batch_size, seed, rank,
                          world_size, expected_fingerprint)

    def eval_batches(self, seq_len, batch_size, max_batches, rank, world_size, expected_fingerprint):
        loader = FakeLoader(self.val_tokens, self.vocab_size, self.fingerprint, seq_len, batch_size, 12345, rank,
                            world_size, expected_fingerprint)
        for _ in range(max_batches):
            yield loader.next_batch()
