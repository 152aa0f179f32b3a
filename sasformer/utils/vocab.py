"""How many ids a tokenizer's vocabulary needs, shared by data preparation, generation and export."""

from __future__ import annotations

from collections.abc import Iterable


def vocab_extent(ids: Iterable[int], count: int = 0) -> int:
    """The highest id + 1, at least ``count``: a vocabulary whose ids skip numbers (a hand-made WordLevel, say)
    needs more ids than it has tokens, and shards or an embedding sized by the count would be too narrow."""
    return max(count, max(ids, default=-1) + 1)
