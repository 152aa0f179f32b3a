"""LM-head cross-entropy: a plain reference and a fused, chunked version behind one function.

- ``naive``: ``F.cross_entropy(h @ W.T)`` with fp32 logits (:mod:`.naive`), the reference.
- ``chunked``: a custom autograd function that computes logits, loss and both gradients chunk by
  chunk of tokens in the forward pass (:mod:`.chunked`); any device, ``torch.compile``-friendly.
"""

from __future__ import annotations

from torch import Tensor

from sasformer.ops.cross_entropy.chunked import DEFAULT_CHUNK_SIZE, linear_cross_entropy_chunked
from sasformer.ops.cross_entropy.naive import linear_cross_entropy_naive

IMPLS = ("naive", "chunked")

__all__ = ["DEFAULT_CHUNK_SIZE", "IMPLS", "linear_cross_entropy", "linear_cross_entropy_chunked",
           "linear_cross_entropy_naive"]


def linear_cross_entropy(
    h_ND: Tensor,
    weight_VD: Tensor,
    targets_N: Tensor,
    ignore_index: int = -100,
    impl: str = "chunked",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Mean next-token cross-entropy of the LM head ``h @ weight.T``; ``impl`` is one of :data:`IMPLS`."""
    if impl == "chunked":
        return linear_cross_entropy_chunked(h_ND, weight_VD, targets_N, ignore_index, chunk_size)
    if impl == "naive":
        return linear_cross_entropy_naive(h_ND, weight_VD, targets_N, ignore_index)
    raise ValueError(f"impl={impl!r} is not a cross-entropy implementation; choose one of {IMPLS}")
