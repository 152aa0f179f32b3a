"""Batches from prepared token shards: random windows for training, fixed windows for evaluation.

The shards of a split are read as one memory-mapped token stream (shard after shard, in file-name order); a
window of ``seq_len + 1`` tokens gives ``inputs = window[:-1]`` and ``targets = window[1:]``.

Training batch ``k`` is a function of ``(seed, k)`` only: ``batch_size`` (the global batch) window starts drawn
uniformly from the whole stream with a generator seeded by ``(seed, k)``. Rank ``r`` of ``world_size`` takes rows
``r::world_size``, so one process and N processes see the same global data, and resuming needs only the step.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sasformer.data.shards import Shard, ShardError
from sasformer.data.tokenizer import Tokenizer, load_tokenizer


def _check_listed_shards(directory: Path, found: list[Path], listed: list[str], meta_path: Path) -> None:
    missing = sorted(set(listed) - {f.name for f in found})
    stray = sorted({f.name for f in found} - set(listed))
    if missing:
        raise ShardError(f"{directory} lacks shard(s) {missing} that {meta_path} lists; re-run `sasformer prepare`")
    if stray:
        raise ShardError(f"{directory} holds shard(s) {stray} that {meta_path} does not list (another run's?); "
                         "remove them or re-run `sasformer prepare`")


class TokenStream:
    """The shards of one split of a prepared folder, as one read-only token stream."""

    def __init__(self, data_dir: str | os.PathLike, split: str, expected_fingerprint: str | None = None,
                 validate: str = "sample") -> None:
        self.directory = Path(data_dir) / split
        files = sorted(self.directory.glob("*.bin")) if self.directory.is_dir() else []
        if not files:
            raise ValueError(
                f"no token shards in {self.directory}: prepare the data first (sasformer prepare ... --out {data_dir})"
            )
        shards = [Shard(f, expected_fingerprint, validate) for f in files]
        first = shards[0].header
        for shard in shards[1:]:
            if (shard.header.fingerprint, shard.header.vocab_size) != (first.fingerprint, first.vocab_size):
                raise ShardError(
                    f"shard {shard.path} was written with another tokenizer than {shards[0].path}; "
                    "a split must come from one `sasformer prepare` run"
                )
        meta_path = Path(data_dir) / "meta.json"
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
                recorded = meta.get("tokenizer_fingerprint")
                listed = meta.get("splits", {}).get(split, {}).get("shards")
                listed = None if listed is None else [shard["file"] for shard in listed]
            except (ValueError, AttributeError, KeyError, TypeError) as err:
                raise ShardError(f"{meta_path} is corrupt ({err}); re-run `sasformer prepare`") from err
            if recorded not in (None, first.fingerprint):
                raise ShardError(f"shards in {self.directory} do not match the tokenizer recorded in {meta_path}")
            if listed is not None:  # prepare's record: a lost shard would shrink the stream, a stray one join it
                _check_listed_shards(self.directory, files, listed, meta_path)
        self.vocab_size = first.vocab_size
        self.fingerprint = first.fingerprint
        self.paths = files
        # plain ndarray views of the memory maps: slicing them is cheaper than slicing np.memmap objects
        self._arrays = [np.asarray(s.tokens) for s in shards]
        self._ends = np.cumsum([len(a) for a in self._arrays])
        self._starts = self._ends - np.array([len(a) for a in self._arrays])
        self.num_tokens = int(self._ends[-1])

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Tokens ``[start, stop)`` of the stream (crossing shard boundaries as needed), into ``out`` if given."""
        if out is None:
            out = np.empty(stop - start, dtype=np.int64)
        i = int(np.searchsorted(self._ends, start, side="right"))
        pos = 0
        while start < stop:
            arr, base = self._arrays[i], int(self._starts[i])
            take = min(stop, int(self._ends[i])) - start
            out[pos : pos + take] = arr[start - base : start - base + take]
            pos += take
            start += take
            i += 1
        return out

    def read_windows(self, starts: np.ndarray, width: int) -> np.ndarray:
        """Rows ``[start, start + width)`` for each of ``starts``, as one (len(starts), width) int64 array.

        Rows inside one shard are gathered with one fancy index per shard (no Python loop per row, which
        dominates short windows); the few that cross a shard boundary go through :meth:`read`.
        """
        starts = np.asarray(starts, dtype=np.int64)
        out = np.empty((len(starts), width), dtype=np.int64)
        shard = np.searchsorted(self._ends, starts, side="right")
        inside = starts + width <= self._ends[np.minimum(shard, len(self._ends) - 1)]
        offsets = np.arange(width, dtype=np.int64)
        for i in np.unique(shard[inside]):
            rows = np.flatnonzero(inside & (shard == i))
            out[rows] = self._arrays[i][(starts[rows] - self._starts[i])[:, None] + offsets]
        for row in np.flatnonzero(~inside):
            self.read(int(starts[row]), int(starts[row]) + width, out[row])
        return out


def _check_batch(batch_size: int, seq_len: int, rank: int, world_size: int) -> None:
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be positive, got seq_len={seq_len}, batch_size={batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if batch_size % world_size:
        raise ValueError(
            f"batch_size={batch_size} is the global batch and must be a multiple of world_size={world_size}"
        )


def _check_length(stream: TokenStream, seq_len: int, split: str) -> None:
    if stream.num_tokens < seq_len + 1:
        raise ValueError(
            f"split {split!r} in {stream.directory.parent} has {stream.num_tokens} tokens, fewer than "
            f"seq_len + 1 = {seq_len + 1}; use a shorter seq_len or more data"
        )


def _split_windows(windows: np.ndarray) -> tuple[Tensor, Tensor]:
    inputs = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
    targets = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))
    return inputs, targets


class TokenLoader:
    """Random training windows from ``data_dir/split``, deterministic in ``(seed, step)`` and exactly resumable.

    ``batch_size`` is the global batch; each rank gets ``batch_size // world_size`` rows. ``expected_fingerprint``
    (the tokenizer fingerprint of the model being trained) is checked against every shard.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", seq_len: int = 1024, batch_size: int = 8,
                 seed: int = 0, rank: int = 0, world_size: int = 1, expected_fingerprint: str | None = None) -> None:
        _check_batch(batch_size, seq_len, rank, world_size)
        self.data_dir = Path(data_dir)
        self.split = split
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.step = 0
        self._stream = TokenStream(data_dir, split, expected_fingerprint)
        _check_length(self._stream, seq_len, split)
        self.vocab_size = self._stream.vocab_size
        self.tokenizer_fingerprint = self._stream.fingerprint
        self.num_tokens = self._stream.num_tokens
        # number of valid window starts: a window of seq_len + 1 tokens must fit in the stream
        self._num_starts = self.num_tokens - seq_len

    def batch_starts(self, step: int) -> np.ndarray:
        """Window starts of global batch ``step`` (all ranks' rows)."""
        rng = np.random.Generator(np.random.PCG64([self.seed, step]))
        return rng.integers(0, self._num_starts, size=self.batch_size, dtype=np.int64)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """``(inputs, targets)``, int64, shape ``(batch_size // world_size, seq_len)``."""
        starts = self.batch_starts(self.step)[self.rank :: self.world_size]
        self.step += 1
        return _split_windows(self._stream.read_windows(starts, self.seq_len + 1))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "split": self.split, "tokenizer_fingerprint": self.tokenizer_fingerprint, "num_tokens": self.num_tokens}

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly where ``state`` was taken; rank and world size may differ, the global batch may not."""
        for name in ("seq_len", "batch_size"):
            if name in state and state[name] != getattr(self, name):
                raise ValueError(
                    f"loader state has {name}={state[name]} but this loader has {name}={getattr(self, name)}; "
                    "resuming exactly needs the same value"
                )
        fp = state.get("tokenizer_fingerprint")
        if fp is not None and fp != self.tokenizer_fingerprint:
            raise ValueError("loader state comes from data prepared with another tokenizer")
        if state.get("num_tokens", self.num_tokens) != self.num_tokens and self.rank == 0:  # prepared again
            warnings.warn(f"the {self.split} split has {self.num_tokens:,} tokens, the run's checkpoint was taken on "
                          f"{state['num_tokens']:,}: it continues on the new stream, not as it would have on the old "
                          "one", stacklevel=2)
        self.seed = int(state["seed"])
        self.step = int(state["step"])


def eval_batches(data_dir: str | os.PathLike, split: str = "val", seq_len: int = 1024, batch_size: int = 8,
                 max_batches: int | None = None, rank: int = 0, world_size: int = 1,
                 expected_fingerprint: str | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Fixed, non-overlapping windows covering the split, in order.

    Window ``j`` holds tokens ``[j * seq_len, (j + 1) * seq_len]``, so every token after the first is a target
    exactly once (except the last ``< seq_len`` tokens). Windows are grouped into global batches of
    ``batch_size``; rank ``r`` takes rows ``r::world_size``. The last batch may be smaller; it is cut to a multiple
    of ``world_size`` so every rank gets the same number of batches and rows (dropping at most
    ``world_size - 1`` windows).
    """
    _check_batch(batch_size, seq_len, rank, world_size)
    stream = TokenStream(data_dir, split, expected_fingerprint)
    _check_length(stream, seq_len, split)
    n_windows = (stream.num_tokens - 1) // seq_len
    width = seq_len + 1
    emitted = 0
    for first in range(0, n_windows, batch_size):
        if max_batches is not None and emitted >= max_batches:
            return
        count = min(batch_size, n_windows - first)
        count -= count % world_size
        if count == 0:
            return
        rows = range(first + rank, first + count, world_size)
        windows = np.empty((len(rows), width), dtype=np.int64)
        for row, j in enumerate(rows):
            stream.read(j * seq_len, j * seq_len + width, windows[row])
        emitted += 1
        yield _split_windows(windows)


def load_data_tokenizer(data_dir: str | os.PathLike) -> Tokenizer:
    """The tokenizer stored in a prepared folder, checked against the folder's recorded fingerprint."""
    data_dir = Path(data_dir)
    tokenizer = load_tokenizer(data_dir / "tokenizer")
    meta_path = data_dir / "meta.json"
    if meta_path.is_file():
        recorded = json.loads(meta_path.read_text()).get("tokenizer_fingerprint")
        if recorded is not None and recorded != tokenizer.fingerprint:
            raise ValueError(f"tokenizer in {data_dir / 'tokenizer'} does not match {meta_path}; prepare again")
    return tokenizer
