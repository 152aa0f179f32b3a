"""Triton kernels of SwiGLU on a fused gate/up projection: ``silu(gate) * up`` forward, and its backward
written straight into the projection's gradient.

The projection's output is one (N, 2 H) buffer, gate in the first H columns, up in the last H. Each
program handles a block of the (N, H) elements and reads the gate and up of each, so the backward writes
both halves of the gradient row from one read of its inputs (compiled, the plain form's backward is one
kernel over the concatenated gradient that loads its inputs again for each half). Arithmetic is fp32;
one rounding to the output dtype.

The plain-PyTorch reference is :func:`sasformer.ops.swiglu.swiglu_reference`.
"""

from __future__ import annotations

import triton
import triton.language as tl

# a program handles BLOCK_ROWS rows x BLOCK_COLS columns of the (N, H) output: a 2-D grid, so no
# per-element division, and 64-bit row offsets
BLOCK_COLS = 1024
BLOCK_ROWS = 2


@triton.jit
def _tile(N, H, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's rows and columns of the (N, H) output, and the mask of the tile."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    return rows[:, None], cols[None, :], (rows < N)[:, None] & (cols < H)[None, :]


@triton.jit
def _swiglu_fwd_kernel(gu_ptr, h_ptr, N, H, stride_gu, stride_h, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    row, col, mask = _tile(N, H, BLOCK_N, BLOCK_H)
    gate = tl.load(gu_ptr + row * stride_gu + col, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_gu + H + col, mask=mask, other=0.0).to(tl.float32)
    h = gate * tl.sigmoid(gate) * up
    tl.store(h_ptr + row * stride_h + col, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(gu_ptr, dh_ptr, dgu_ptr, N, H, stride_gu, stride_dh, stride_dgu,
                       BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    row, col, mask = _tile(N, H, BLOCK_N, BLOCK_H)
    gate = tl.load(gu_ptr + row * stride_gu + col, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_gu + H + col, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + row * stride_dh + col, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    # d silu(g) / dg = sig * (1 + g * (1 - sig))
    dgate = dh * up * sig * (1.0 + gate * (1.0 - sig))
    out = dgu_ptr + row * stride_dgu + col
    tl.store(out, dgate.to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(out + H, (dh * silu).to(dgu_ptr.dtype.element_ty), mask=mask)


def _launch(N: int, H: int) -> tuple[tuple[int, int], dict]:
    cols = min(BLOCK_COLS, triton.next_power_of_2(H))
    rows = max(1, BLOCK_ROWS * BLOCK_COLS // cols)  # narrow rows: more of them per program
    return (triton.cdiv(N, rows), triton.cdiv(H, cols)), {"BLOCK_N": rows, "BLOCK_H": cols}


def swiglu_forward_(gu, h, N: int, H: int) -> None:
    """``h[n, j] = silu(gu[n, j]) * gu[n, H + j]``; rows of ``gu`` (N, 2H) and ``h`` (N, H) unit-strided."""
    grid, blocks = _launch(N, H)
    _swiglu_fwd_kernel[grid](gu, h, N, H, gu.stride(0), h.stride(0), **blocks)


def swiglu_backward_(gu, dh, dgu, N: int, H: int) -> None:
    """The gradient of the fused projection ``dgu`` (N, 2H) from ``dh`` (N, H), rows unit-strided."""
    grid, blocks = _launch(N, H)
    _swiglu_bwd_kernel[grid](gu, dh, dgu, N, H, gu.stride(0), dh.stride(0), dgu.stride(0), **blocks)
