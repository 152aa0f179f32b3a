"""Triton kernel: per-row cross-entropy of a chunk of logits, with the gradient written over the logits.

One program handles one row of V logits (bf16, fp16 or fp32). The first loop reads the row block by
block and keeps an online softmax (running max and rescaled sum of exponentials, fp32), so the
log-sum-exp comes from one read of the row; the target logit is picked up on the way. The second
loop writes ``(softmax - onehot) * scale`` over the logits in their own dtype, the gradient of the
scaled loss. It reads the row a second time (from L2 where the rows in flight fit in it: not measured).

Launch shape: blocks of 4096 logits over 4 warps (32 values a thread), so several programs share an SM. On the
H200 (`benchmarks/loss_speed.py`, 8192 x 50304 bf16 logits) that took 0.64 ms a chunk, 2.6 TB/s counting
one read and one write, against 0.86 ms for one 32-warp program of 16384 a row and 1.00 ms for Inductor's
kernel of the same arithmetic; every shape of 2 to 8 warps came within 5% of it, 16 and 32 warps did not.

Rows whose target is ``ignore_index`` get loss 0 and gradient 0. A target outside [0, V) gives a
NaN loss (the kernel cannot raise; the trainer's finite-loss check then stops the run).

The plain-PyTorch reference is :func:`sasformer.ops.cross_entropy.naive.cross_entropy_rows_naive`.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from torch import Tensor

# 16 values per thread at 32 warps: 43 registers and no spills on sm_90 (ptxas); blocks of 32768 spill
MAX_BLOCK = 16384
# a thread holds block / (32 x warps) values of each loop; far more than the default's 32 spills registers
MAX_VALUES_PER_THREAD = 128
# the fastest shape measured on the H200, several others within 1% (module docstring); smaller rows take
# their power of two
DEFAULT_BLOCK, DEFAULT_WARPS = 4096, 4
# "BLOCKxWARPS" (e.g. 4096x8) overrides the launch shape of every call that names none:
# benchmarks/loss_speed.py times the shapes, train_speed.py runs a whole step with one
TILE_ENV_VAR = "SASFORMER_CE_TILE"


@triton.jit
def _cross_entropy_rows_kernel(logits_ptr, targets_ptr, loss_ptr, scale_ptr, V, stride_row, ignore_index,
                               BLOCK: tl.constexpr, N_BLOCKS: tl.constexpr, WITH_GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    # the block count is a compile-time constant (V is fixed per model); V itself only masks
    target = tl.load(targets_ptr + row).to(tl.int64)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < V)
    cols = tl.arange(0, BLOCK)

    # pass 1: online softmax over the row, one read
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    for i in range(N_BLOCKS):
        offs = i * BLOCK + cols
        x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    target_logit = tl.load(row_ptr + tl.where(in_range, target, 0)).to(tl.float32)
    loss = tl.where(in_range, lse - target_logit, float("nan"))
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))

    # pass 2: the gradient of scale * loss over the logits, one write
    if WITH_GRAD:
        scale = tl.where(valid, tl.load(scale_ptr).to(tl.float32), 0.0)
        for i in range(N_BLOCKS):
            offs = i * BLOCK + cols
            mask = offs < V
            x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            grad = (tl.exp(x - lse) - tl.where(offs == target, 1.0, 0.0)) * scale
            tl.store(row_ptr + offs, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def block_and_warps(vocab: int, block: int | None = None, warps: int | None = None) -> tuple[int, int]:
    """Block width (a power of two) and warps per program for rows of ``vocab`` logits.

    Neither given: both come from ``SASFORMER_CE_TILE`` when it is set. Otherwise the block is the row's
    power of two up to :data:`DEFAULT_BLOCK`, and the warps block // 1024 (32 values a thread), 1 to
    :data:`DEFAULT_WARPS`."""
    if block is None and warps is None:
        block, warps = tile_from_env()
        if block is not None:
            try:
                return block_and_warps(vocab, block, warps)
            except ValueError as err:
                raise ValueError(f"{TILE_ENV_VAR}={block}x{warps}: {err}") from None
    if block is None:
        block = min(DEFAULT_BLOCK, triton.next_power_of_2(vocab))
    if block < 16 or block & (block - 1) or block > MAX_BLOCK:
        raise ValueError(f"block={block} must be a power of two from 16 to {MAX_BLOCK}")
    if warps is None:
        warps = max(1, min(DEFAULT_WARPS, block // 1024))
    if warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"warps={warps} must be one of 1, 2, 4, 8, 16, 32")
    if block > MAX_VALUES_PER_THREAD * 32 * warps:
        raise ValueError(f"block={block} over {warps} warps gives a thread {block // (32 * warps)} values; at most "
                         f"{MAX_VALUES_PER_THREAD} (more spills registers): use more warps or a smaller block")
    return block, warps


def parse_tile(text: str) -> tuple[int, int]:
    """``"4096x8"`` -> (4096, 8); ValueError for text of another form (the numbers are checked by
    :func:`block_and_warps`)."""
    try:
        block, warps = (int(part) for part in text.strip().lower().split("x"))
    except ValueError:
        raise ValueError(f"{text!r} is not BLOCKxWARPS (e.g. 4096x8)") from None
    return block, warps


def tile_from_env() -> tuple[int | None, int | None]:
    """(block, warps) from ``SASFORMER_CE_TILE=BLOCKxWARPS``, or (None, None) when it is unset."""
    value = os.environ.get(TILE_ENV_VAR, "").strip().lower()
    if not value:
        return None, None
    try:
        return parse_tile(value)
    except ValueError:
        raise ValueError(f"{TILE_ENV_VAR}={value!r}: expected BLOCKxWARPS, e.g. 4096x8") from None


def cross_entropy_rows_(logits_CV: Tensor, targets_C: Tensor, loss_C: Tensor, scale: Tensor, ignore_index: int,
                        with_grad: bool, block: int | None = None, warps: int | None = None) -> None:
    """Write each row's loss into ``loss_C`` (fp32) and, if ``with_grad``, overwrite ``logits_CV`` with
    ``(softmax - onehot) * scale`` (``scale`` a one-element fp32 tensor, e.g. 1 / valid tokens).

    ``block`` and ``warps`` set the launch shape (see :func:`block_and_warps`)."""
    C, V = logits_CV.shape
    if logits_CV.stride(1) != 1 or targets_C.shape != (C,) or loss_C.shape != (C,) or scale.numel() != 1:
        raise ValueError(f"expected row-contiguous logits (C, V), targets (C,), loss (C,) and a one-element scale; "
                         f"got {tuple(logits_CV.shape)} stride {logits_CV.stride()}, {tuple(targets_C.shape)}, "
                         f"{tuple(loss_C.shape)}, {tuple(scale.shape)}")
    if C == 0:
        return
    block, warps = block_and_warps(V, block, warps)
    _cross_entropy_rows_kernel[(C,)](logits_CV, targets_C, loss_C, scale, V, logits_CV.stride(0), ignore_index,
                                     BLOCK=block, N_BLOCKS=triton.cdiv(V, block), WITH_GRAD=with_grad, num_warps=warps)
