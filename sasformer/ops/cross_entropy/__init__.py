"""LM-head cross-entropy: a plain reference and two fused, chunked versions behind one function.

- ``naive``: ``F.cross_entropy(h @ W.T)`` with fp32 logits (:mod:`.naive`), the reference.
- ``chunked_torch``: a custom autograd function that computes logits, loss and both gradients chunk
  by chunk of tokens in the forward pass (:mod:`.chunked`); any device, ``torch.compile``-friendly.
- ``chunked_triton``: the same chunks, with a Triton kernel that reads each chunk's logits once for
  the loss and overwrites them with their gradient (:mod:`.fused`, :mod:`.kernel`); CUDA tensors
  with Triton installed (or ``TRITON_INTERPRET=1``).
- ``chunked``: ``chunked_triton`` for CUDA tensors when Triton is installed and ``TRITON_DEFAULT`` is set
  (the default), else ``chunked_torch``.
"""

from __future__ import annotations

import os

from torch import Tensor

from sasformer.ops.cross_entropy.chunked import DEFAULT_CHUNK_SIZE, linear_cross_entropy_chunked
from sasformer.ops.cross_entropy.fused import linear_cross_entropy_fused
from sasformer.ops.cross_entropy.naive import linear_cross_entropy_naive
from sasformer.ops.triton_support import TRITON_AVAILABLE

IMPLS = ("chunked", "chunked_torch", "chunked_triton", "naive")

__all__ = ["DEFAULT_CHUNK_SIZE", "IMPLS", "linear_cross_entropy", "linear_cross_entropy_chunked",
           "linear_cross_entropy_fused", "linear_cross_entropy_naive", "resolve_impl"]


TRITON_DEFAULT = True


def resolve_impl(impl: str, h_ND: Tensor) -> str:
    """The implementation that runs for ``impl`` on ``h``: ``chunked`` becomes ``chunked_triton`` or
    ``chunked_torch``; raises ValueError for an unknown impl or a ``chunked_triton`` that cannot run.

    ``chunked`` takes the Triton kernel when ``TRITON_DEFAULT`` is set (the default): with its launch shape
    tuned, the H200's MHA training step ran 0.3-0.9 ms faster with it than with the PyTorch chunks and
    needed 0.7 GiB less (docs/performance.md, run 18); set it False for the PyTorch chunks everywhere."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not a cross-entropy implementation; choose one of {IMPLS}")
    if impl == "chunked":
        return "chunked_triton" if TRITON_DEFAULT and h_ND.is_cuda and TRITON_AVAILABLE else "chunked_torch"
    if impl == "chunked_triton":
        if not TRITON_AVAILABLE:
            raise ValueError("loss impl 'chunked_triton' needs the triton package; install it or use 'chunked_torch'")
        if not (h_ND.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise ValueError("loss impl 'chunked_triton' needs CUDA tensors (or TRITON_INTERPRET=1); "
                             "use 'chunked_torch'")
    return impl


def linear_cross_entropy(
    h_ND: Tensor,
    weight_VD: Tensor,
    targets_N: Tensor,
    ignore_index: int = -100,
    impl: str = "chunked",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Mean next-token cross-entropy of the LM head ``h @ weight.T``; ``impl`` is one of :data:`IMPLS`."""
    impl = resolve_impl(impl, h_ND)
    if impl == "chunked_triton":
        return linear_cross_entropy_fused(h_ND, weight_VD, targets_N, ignore_index, chunk_size)
    if impl == "chunked_torch":
        return linear_cross_entropy_chunked(h_ND, weight_VD, targets_N, ignore_index, chunk_size)
    return linear_cross_entropy_naive(h_ND, weight_VD, targets_N, ignore_index)
