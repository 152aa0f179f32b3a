"""Where the trainer gets tokens: a small protocol, and its implementation over ``sasformer prepare`` output."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from torch import Tensor


class TrainLoader(Protocol):
    """Resumable stream of (inputs, targets), each (batch_size // world_size, seq_len) int64."""

    vocab_size: int
    tokenizer_fingerprint: str

    def next_batch(self) -> tuple[Tensor, Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class DataSource(Protocol):
    """Builds this process's training loader and validation batches; ``batch_size`` is global."""

    def train_loader(self, seq_len: int, batch_size: int, seed: int, rank: int, world_size: int,
                     expected_fingerprint: str | None) -> TrainLoader: ...

    def eval_batches(self, seq_len: int, batch_size: int, max_batches: int, rank: int, world_size: int,
                     expected_fingerprint: str | None) -> Iterable[tuple[Tensor, Tensor]]: ...


class PreparedData:
    """Token shards written by ``sasformer prepare`` into ``data_dir`` (train/, val/, tokenizer/, meta.json)."""

    def __init__(self, data_dir: str) -> None:
        self.data_dir = data_dir

    def train_loader(self, seq_len: int, batch_size: int, seed: int, rank: int, world_size: int,
                     expected_fingerprint: str | None) -> TrainLoader:
        from sasformer.data.loader import TokenLoader

        return TokenLoader(self.data_dir, split="train", seq_len=seq_len, batch_size=batch_size, seed=seed,
                           rank=rank, world_size=world_size, expected_fingerprint=expected_fingerprint)

    def eval_batches(self, seq_len: int, batch_size: int, max_batches: int, rank: int, world_size: int,
                     expected_fingerprint: str | None) -> Iterable[tuple[Tensor, Tensor]]:
        from sasformer.data.loader import eval_batches

        return eval_batches(self.data_dir, split="val", seq_len=seq_len, batch_size=batch_size,
                            max_batches=max_batches, rank=rank, world_size=world_size,
                            expected_fingerprint=expected_fingerprint)
