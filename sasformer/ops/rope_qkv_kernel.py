"""Triton kernels: RoPE on the queries and keys of a fused Q/K/V projection, and its backward written
straight into the projection's gradient.

The projection's output is one (N, (H + 2 H_kv) D) buffer, a row per token. The forward reads it once
and writes rotated queries, rotated keys and a copy of the values as (N, heads, D) tensors; the
backward reads the three gradients in whatever (B, T, heads, D) strides attention returned them and
writes the (N, (H + 2 H_kv) D) gradient of the projection in one pass. A program handles a block of
tokens of one head (grid: token blocks x (H + 2 H_kv)), and loads each row's two halves, so
rotate-half needs no gather. Arithmetic is fp32; one rounding to the output dtype.

The plain-PyTorch reference is :func:`sasformer.ops.rope.apply_rope` on the split projection.
"""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK_TOKENS = 32


@triton.jit
def _token_block(N, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tokens (rows), the columns of a half row, and the mask of both."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    return rows, cols, (rows < N)[:, None] & (cols < HALF)[None, :]


@triton.jit
def _load_tables(cos_ptr, sin_ptr, table, mask, HALF: tl.constexpr):
    """cos and sin of the two halves at ``table`` offsets, in fp32."""
    c1 = tl.load(cos_ptr + table, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + table + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + table, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + table + HALF, mask=mask, other=0.0).to(tl.float32)
    return c1, c2, s1, s2


@triton.jit
def _rope_qkv_fwd_kernel(x_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, N, T, stride_x, stride_cb, stride_ct,
                         H, HKV, D: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    head = tl.program_id(1)
    rows, cols, mask = _token_block(N, HALF, BLOCK_HALF, BLOCK_N)
    src = x_ptr + rows[:, None] * stride_x + head * D + cols[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if head < H + HKV:
        table = (rows // T)[:, None] * stride_cb + (rows % T)[:, None] * stride_ct + cols[None, :]
        c1, c2, s1, s2 = _load_tables(cos_ptr, sin_ptr, table, mask, HALF)
        y1 = x1 * c1 - x2 * s1  # rotate-half: (x1, x2) -> (-x2, x1)
        y2 = x2 * c2 + x1 * s2
        if head < H:
            dst = q_ptr + rows[:, None] * (H * D) + head * D + cols[None, :]
        else:
            dst = k_ptr + rows[:, None] * (HKV * D) + (head - H) * D + cols[None, :]
    else:
        y1 = x1
        y2 = x2
        dst = v_ptr + rows[:, None] * (HKV * D) + (head - H - HKV) * D + cols[None, :]
    tl.store(dst, y1.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, y2.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_qkv_bwd_kernel(dq_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr, dx_ptr, N, T, F,
                         sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, stride_cb, stride_ct,
                         H, HKV, D: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    head = tl.program_id(1)
    rows, cols, mask = _token_block(N, HALF, BLOCK_HALF, BLOCK_N)
    b = (rows // T)[:, None]
    t = (rows % T)[:, None]
    if head < H:
        src = dq_ptr + b * sqb + t * sqt + head * sqh + cols[None, :]
    elif head < H + HKV:
        src = dk_ptr + b * skb + t * skt + (head - H) * skh + cols[None, :]
    else:
        src = dv_ptr + b * svb + t * svt + (head - H - HKV) * svh + cols[None, :]
    g1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    g2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if head < H + HKV:
        table = b * stride_cb + t * stride_ct + cols[None, :]
        c1, c2, s1, s2 = _load_tables(cos_ptr, sin_ptr, table, mask, HALF)
        d1 = g1 * c1 + g2 * s2  # the transpose of the forward's 2 x 2 rotation per feature pair
        d2 = g2 * c2 - g1 * s1
    else:
        d1 = g1
        d2 = g2
    dst = dx_ptr + rows[:, None] * F + head * D + cols[None, :]
    tl.store(dst, d1.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, d2.to(dx_ptr.dtype.element_ty), mask=mask)


def _grid(N: int, heads: int) -> tuple[int, int]:
    return (triton.cdiv(N, BLOCK_TOKENS), heads)


def _table_strides(cos_BTD) -> tuple[int, int]:
    # a table shared by the batch (B = 1) is read at batch stride 0
    return (0 if cos_BTD.shape[0] == 1 else cos_BTD.stride(0)), cos_BTD.stride(1)


def rope_qkv_forward_(x_NF, cos_BTD, sin_BTD, q, k, v, T: int, H: int, HKV: int, D: int) -> None:
    """Fill ``q`` (N, H, D), ``k`` and ``v`` (N, HKV, D) from the projection ``x`` (N, F), rows of unit
    column stride; tables (B or 1, T, D) with unit feature stride, ``sin`` strided as ``cos``."""
    N = x_NF.shape[0]
    stride_cb, stride_ct = _table_strides(cos_BTD)
    _rope_qkv_fwd_kernel[_grid(N, H + 2 * HKV)](
        x_NF, cos_BTD, sin_BTD, q, k, v, N, T, x_NF.stride(0), stride_cb, stride_ct, H, HKV,
        D=D, HALF=D // 2, BLOCK_HALF=triton.next_power_of_2(D // 2), BLOCK_N=BLOCK_TOKENS)


def rope_qkv_backward_(dq, dk, dv, cos_BTD, sin_BTD, dx_NF, T: int, H: int, HKV: int, D: int) -> None:
    """Write the projection's gradient ``dx`` (N, F), contiguous, from gradients (B, T, heads, D) of any
    strides with a unit feature stride."""
    N, F = dx_NF.shape
    stride_cb, stride_ct = _table_strides(cos_BTD)
    _rope_qkv_bwd_kernel[_grid(N, H + 2 * HKV)](
        dq, dk, dv, cos_BTD, sin_BTD, dx_NF, N, T, F,
        dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2), stride_cb, stride_ct, H, HKV,
        D=D, HALF=D // 2, BLOCK_HALF=triton.next_power_of_2(D // 2), BLOCK_N=BLOCK_TOKENS)
