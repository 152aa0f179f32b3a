"""Triton kernels for SAS simulation: read the compact heads once, write the simulated tensor once.

Forward (one kernel). A program handles BLOCK_N tokens. The head convolutions work on rows (token,
feature) x columns (heads), as in :mod:`.matmul`, but instead of materialising padded, shifted
copies the kernel loads the input at shifted feature offsets (masked to zero outside the token);
the values of Y1 at the neighbouring features that the second convolution needs are recomputed
from shifted loads (k^2 tiny dots; H is small). Y2 is permuted in registers to rows (token,
simulated head) x columns (feature) for the feature MLP; for queries and keys with RoPE after the
simulation the rotation is applied before the single write of (N, H', D').

For a few tokens (decode) the split forward kernel spreads the work over a 3-d grid: token blocks x
(groups of simulated heads x blocks of output columns) x stacked tensors. Each program recomputes
Y1 at all heads (cheap: H inputs), keeps the second convolution's columns of its heads, and computes
the feature MLP's output columns of its block in the first half of D' with their RoPE partners in the
second, so the rotation is elementwise. Stacked tensors (queries, keys, values on an MHA base) share
one launch; trailing ones without the feature MLP (values) write a second output.

Backward. Nothing but the compact input is saved. For queries and keys, the forward kernel runs
again without the feature MLP to give Y2 (N, H', D), and the feature MLP's gradients are four GEMMs
over (N*H') rows (tensor-core work cuBLAS does best; Z1 is recomputed, not saved). The head
simulation's backward is one kernel: it recomputes Y1 from the compact input, writes dY1 once to
a small per-program scratch (L2 resident) and reads it back at shifted rows for the transposed
convolution. Its weight gradients are accumulated by a fixed number of persistent programs, each
in its own slice, and summed over programs in PyTorch: deterministic.

Every size is padded to a power of two (at least 16, the smallest ``tl.dot`` tile) by zero-padding
the weights and masking loads and stores; any odd kernel size works. Kernels run with one warp
group (4 warps); see ``NUM_WARPS``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from sasformer.ops.simulate.matmul import conv_weight_matrix
from sasformer.ops.simulate.rotate import rotate_transposed


@triton.jit
def _load_x(x_ptr, n, j, s, N, XS, H: tl.constexpr, D: tl.constexpr, HP: tl.constexpr):
    """X at rows (token n, feature j + s), columns heads; zero outside the token. Token n starts at
    element n * XS (its H x D block contiguous)."""
    c = tl.arange(0, HP)
    js = j + s
    ok = (n < N) & (js >= 0) & (js < D)
    ptrs = x_ptr + n[:, None] * XS + c[None, :] * D + js[:, None]
    return tl.load(ptrs, mask=ok[:, None] & (c[None, :] < H), other=0.0)


@triton.jit
def _y1_at(x_ptr, w1_ptr, b1_ptr, n, j, s, N, XS, H: tl.constexpr, D: tl.constexpr, K: tl.constexpr,
           HP: tl.constexpr, HSP: tl.constexpr, ROWS: tl.constexpr, PREC: tl.constexpr):
    """First convolution output at features j + s (fp32), zero where j + s is outside the token."""
    return _y1_heads(x_ptr, w1_ptr, b1_ptr, n, j, s, 0, N, XS, H, D, K, HP, HSP, HSP, ROWS, PREC)


@triton.jit
def _y1_heads(x_ptr, w1_ptr, b1_ptr, n, j, s, c0, N, XS, H: tl.constexpr, D: tl.constexpr, K: tl.constexpr,
              HP: tl.constexpr, HSP: tl.constexpr, HG: tl.constexpr, ROWS: tl.constexpr, PREC: tl.constexpr):
    """:func:`_y1_at` at the HG simulated heads c0 .. c0 + HG - 1 only (columns)."""
    PAD: tl.constexpr = (K - 1) // 2
    ci = tl.arange(0, HP)
    co = c0 + tl.arange(0, HG)
    acc = tl.zeros((ROWS, HG), dtype=tl.float32)
    for t in tl.static_range(K):
        xs = _load_x(x_ptr, n, j, s + t - PAD, N, XS, H, D, HP)
        w = tl.load(w1_ptr + t * HP * HSP + ci[:, None] * HSP + co[None, :])
        acc = tl.dot(xs, w, acc, input_precision=PREC)
    acc += tl.load(b1_ptr + co)[None, :]
    ok = (j + s >= 0) & (j + s < D)
    return tl.where(ok[:, None], acc, 0.0)


@triton.jit
def _y2(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, n, j, N, XS, H: tl.constexpr, D: tl.constexpr,
        K: tl.constexpr, HP: tl.constexpr, HSP: tl.constexpr, ROWS: tl.constexpr, PREC: tl.constexpr):
    """Head simulation output Y2 (fp32, rows (token, feature)); rows past the token are zero."""
    return _y2_heads(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, n, j, 0, N, XS, H, D, K, HP, HSP, HSP, ROWS, PREC)


@triton.jit
def _y2_heads(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, n, j, c0, N, XS, H: tl.constexpr, D: tl.constexpr,
              K: tl.constexpr, HP: tl.constexpr, HSP: tl.constexpr, HG: tl.constexpr, ROWS: tl.constexpr,
              PREC: tl.constexpr):
    """Y2 at the HG simulated heads c0 .. c0 + HG - 1 only (columns); Y1 is needed at all heads."""
    PAD: tl.constexpr = (K - 1) // 2
    ci = tl.arange(0, HSP)
    co = c0 + tl.arange(0, HG)
    # the residual: Y1 at this program's heads
    y2 = _y1_heads(x_ptr, w1_ptr, b1_ptr, n, j, 0, c0, N, XS, H, D, K, HP, HSP, HG, ROWS, PREC)
    y2 += tl.load(b2_ptr + co)[None, :]
    for t in tl.static_range(K):
        y1s = _y1_at(x_ptr, w1_ptr, b1_ptr, n, j, t - PAD, N, XS, H, D, K, HP, HSP, ROWS, PREC)
        r = tl.maximum(y1s, 0.0).to(x_ptr.dtype.element_ty)
        w = tl.load(w2_ptr + t * HSP * HSP + ci[:, None] * HSP + co[None, :])
        y2 = tl.dot(r, w, y2, input_precision=PREC)
    return tl.where((j < D)[:, None], y2, 0.0)


@triton.jit
def _rope_tables(cos_ptr, sin_ptr, n2, e, N, T, cos_stride_b, DS: tl.constexpr):
    """cos/sin as fp32 for rows (token n2, head) and columns e; tables are (B or 1, T, DS)."""
    row = (n2 // T) * cos_stride_b + (n2 % T) * DS
    ok = (n2 < N)[:, None] & (e < DS)[None, :]
    # tables in any float dtype (a bf16 model's are bf16): converted here, not by a copy kernel per call
    cos = tl.load(cos_ptr + row[:, None] + e[None, :], mask=ok, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + row[:, None] + e[None, :], mask=ok, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def _rows_to_heads(t, BLOCK_N: tl.constexpr, DP: tl.constexpr, HSP: tl.constexpr):
    """(BLOCK_N*DP, HSP) rows (token, feature) -> (BLOCK_N*HSP, DP) rows (token, head)."""
    return tl.reshape(tl.permute(tl.reshape(t, (BLOCK_N, DP, HSP)), (0, 2, 1)), (BLOCK_N * HSP, DP))


@triton.jit
def _heads_to_rows(t, BLOCK_N: tl.constexpr, DP: tl.constexpr, HSP: tl.constexpr):
    """Inverse of :func:`_rows_to_heads`."""
    return tl.reshape(tl.permute(tl.reshape(t, (BLOCK_N, HSP, DP)), (0, 2, 1)), (BLOCK_N * DP, HSP))


@triton.jit
def _simulate_fwd_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, w4_ptr, b4_ptr, out_ptr,
    rot_ptr, cos_ptr, sin_ptr, N, T, cos_stride_b, x_stride,
    H: tl.constexpr, HS: tl.constexpr, D: tl.constexpr, DS: tl.constexpr, K: tl.constexpr,
    HP: tl.constexpr, HSP: tl.constexpr, DP: tl.constexpr, DSP: tl.constexpr,
    BLOCK_N: tl.constexpr, FEATURES: tl.constexpr, ROPE: tl.constexpr, PREC: tl.constexpr,
):
    ROWS: tl.constexpr = BLOCK_N * DP
    r = tl.arange(0, ROWS)
    # int64 token index: offsets n * H' * D' overflow int32 beyond ~700k tokens
    n = (tl.program_id(0) * BLOCK_N + r // DP).to(tl.int64)
    j = r % DP
    y2 = _y2(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, n, j, N, x_stride, H, D, K, HP, HSP, ROWS, PREC)
    dt = x_ptr.dtype.element_ty
    if FEATURES:
        # w3 is stored transposed and padded: (DP, DSP); w4 transposed: (DSP, DSP)
        y2t = _rows_to_heads(y2, BLOCK_N, DP, HSP).to(dt)
        jj = tl.arange(0, DP)
        e = tl.arange(0, DSP)
        z1 = tl.dot(y2t, tl.load(w3_ptr + jj[:, None] * DSP + e[None, :]), input_precision=PREC)
        z1 += tl.load(b3_ptr + e)[None, :]
        a = tl.maximum(z1, 0.0).to(dt)
        z2 = z1 + tl.dot(a, tl.load(w4_ptr + e[:, None] * DSP + e[None, :]), input_precision=PREC)
        z2 += tl.load(b4_ptr + e)[None, :]
        r2 = tl.arange(0, BLOCK_N * HSP)
        n2 = (tl.program_id(0) * BLOCK_N + r2 // HSP).to(tl.int64)
        h2 = r2 % HSP
        if ROPE:
            cos, sin = _rope_tables(cos_ptr, sin_ptr, n2, e, N, T, cos_stride_b, DS)
            # rotate_half as a matmul with a signed permutation: no column shuffle in registers
            rot = tl.dot(z2.to(dt), tl.load(rot_ptr + e[:, None] * DSP + e[None, :]), input_precision=PREC)
            z2 = z2 * cos + rot * sin
        ptrs = out_ptr + n2[:, None] * (HS * DS) + h2[:, None] * DS + e[None, :]
        tl.store(ptrs, z2.to(dt), mask=((n2 < N) & (h2 < HS))[:, None] & (e < DS)[None, :])
    else:
        co = tl.arange(0, HSP)
        ptrs = out_ptr + n[:, None] * (HS * D) + co[None, :] * D + j[:, None]
        tl.store(ptrs, y2.to(dt), mask=((n < N) & (j < D))[:, None] & (co < HS)[None, :])


@triton.jit
def _features_half(y2t, a, w3_ptr, b3_ptr, w4_ptr, b4_ptr, e, ok_e, DP: tl.constexpr, DSP: tl.constexpr,
                   PREC: tl.constexpr):
    """Z2 of the feature MLP at columns ``e`` only: Z1 there from Y2, plus ReLU(Z1) (all columns) @ W4."""
    jj = tl.arange(0, DP)
    ek = tl.arange(0, DSP)
    w3 = tl.load(w3_ptr + jj[:, None] * DSP + e[None, :], mask=ok_e[None, :], other=0.0)
    w4 = tl.load(w4_ptr + ek[:, None] * DSP + e[None, :], mask=ok_e[None, :], other=0.0)
    z = tl.dot(y2t, w3, input_precision=PREC)
    z = tl.dot(a, w4, z, input_precision=PREC)
    bias = tl.load(b3_ptr + e, mask=ok_e, other=0.0).to(tl.float32) + tl.load(b4_ptr + e, mask=ok_e, other=0.0)
    return z + bias[None, :]


@triton.jit
def _split_features(y2, w3_ptr, b3_ptr, w4_ptr, b4_ptr, out_ptr, cos_ptr, sin_ptr, i, c0, eb,
                    N, T, cos_stride_b, HS: tl.constexpr, DS: tl.constexpr, DP: tl.constexpr, DSP: tl.constexpr,
                    BLOCK_N: tl.constexpr, HG: tl.constexpr, BE: tl.constexpr, HALF: tl.constexpr,
                    ROPE: tl.constexpr, PREC: tl.constexpr):
    """Feature MLP (and RoPE) of Y2 (rows (token, feature), HG heads from c0) at the output columns of
    block ``eb`` in both halves of D'; writes them to ``out_ptr`` (N, H', D')."""
    dt = out_ptr.dtype.element_ty
    y2t = _rows_to_heads(y2, BLOCK_N, DP, HG).to(dt)
    ek = tl.arange(0, DSP)
    z1 = tl.dot(y2t, tl.load(w3_ptr + tl.arange(0, DP)[:, None] * DSP + ek[None, :]), input_precision=PREC)
    a = tl.maximum(z1 + tl.load(b3_ptr + ek)[None, :], 0.0).to(dt)
    lo = eb * BE + tl.arange(0, BE)
    hi = HALF + lo
    ok_lo = lo < HALF
    ok_hi = ok_lo & (hi < DS)
    z_lo = _features_half(y2t, a, w3_ptr, b3_ptr, w4_ptr, b4_ptr, lo, ok_lo, DP, DSP, PREC)
    z_hi = _features_half(y2t, a, w3_ptr, b3_ptr, w4_ptr, b4_ptr, hi, ok_hi, DP, DSP, PREC)
    r2 = tl.arange(0, BLOCK_N * HG)
    n2 = (i * BLOCK_N + r2 // HG).to(tl.int64)
    h2 = c0 + r2 % HG
    if ROPE:
        # rotate_half(z) is -z[e + HALF] in the first half and z[e - HALF] in the second
        cos_lo, sin_lo = _rope_tables(cos_ptr, sin_ptr, n2, lo, N, T, cos_stride_b, DS)
        cos_hi, sin_hi = _rope_tables(cos_ptr, sin_ptr, n2, hi, N, T, cos_stride_b, DS)
        z_lo, z_hi = z_lo * cos_lo - z_hi * sin_lo, z_hi * cos_hi + z_lo * sin_hi
    row = n2[:, None] * (HS * DS) + h2[:, None] * DS
    ok = ((n2 < N) & (h2 < HS))[:, None]
    tl.store(out_ptr + row + lo[None, :], z_lo.to(dt), mask=ok & ok_lo[None, :])
    tl.store(out_ptr + row + hi[None, :], z_hi.to(dt), mask=ok & ok_hi[None, :])


@triton.jit
def _split_heads_store(y2, out_ptr, n, j, c0, N, HS: tl.constexpr, D: tl.constexpr, HG: tl.constexpr):
    """Write Y2 (rows (token, feature), HG heads from c0) to ``out_ptr`` (N, H', D)."""
    co = c0 + tl.arange(0, HG)
    ptrs = out_ptr + n[:, None] * (HS * D) + co[None, :] * D + j[:, None]
    tl.store(ptrs, y2.to(out_ptr.dtype.element_ty), mask=((n < N) & (j < D))[:, None] & (co < HS)[None, :])


@triton.jit
def _simulate_split_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, w4_ptr, b4_ptr, out_ptr, tail_ptr,
    cos_ptr, sin_ptr, N, T, cos_stride_b, x_stride, x_tensor_stride,
    H: tl.constexpr, HS: tl.constexpr, D: tl.constexpr, DS: tl.constexpr, K: tl.constexpr,
    HP: tl.constexpr, HSP: tl.constexpr, DP: tl.constexpr, DSP: tl.constexpr, BLOCK_N: tl.constexpr,
    HG: tl.constexpr, BE: tl.constexpr, HALF: tl.constexpr, E_BLOCKS: tl.constexpr,
    N_FEATURES: tl.constexpr, N_TENSORS: tl.constexpr, ROPE: tl.constexpr, PREC: tl.constexpr,
):
    """The forward kernel over a 3-d grid: (token block, head group x column block, tensor).

    Program (i, s, g) simulates tokens of block i at the HG simulated heads of group s // E_BLOCKS
    (Y1 at all heads is recomputed; the second convolution keeps only this group's columns). Tensors
    g < N_FEATURES (queries, keys) then get the feature MLP at the output columns of block
    s % E_BLOCKS: BE columns of the first half of D' and their BE partners HALF further on, so that
    RoPE's rotate_half pairs stay in one program (no rotation matmul: the two halves are separate
    tiles); they are written to ``out_ptr`` (N_FEATURES, N, H', D'). Later tensors (values) are the
    head simulation alone, written by the programs of column block 0 to ``tail_ptr``
    (N_TENSORS - N_FEATURES, N, H', D). Operands of tensor g sit g tensors' sizes on: x at
    ``g * x_tensor_stride``, each weight at g of its sizes.
    """
    ROWS: tl.constexpr = BLOCK_N * DP
    i = tl.program_id(0)
    c0 = (tl.program_id(1) // E_BLOCKS) * HG
    eb = tl.program_id(1) % E_BLOCKS
    g = tl.program_id(2).to(tl.int64)
    x_ptr += g * x_tensor_stride
    w1_ptr += g * (K * HP * HSP)
    b1_ptr += g * HSP
    w2_ptr += g * (K * HSP * HSP)
    b2_ptr += g * HSP
    r = tl.arange(0, ROWS)
    n = (i * BLOCK_N + r // DP).to(tl.int64)
    j = r % DP
    y2 = _y2_heads(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, n, j, c0, N, x_stride, H, D, K, HP, HSP, HG, ROWS, PREC)
    if N_FEATURES == 0:
        _split_heads_store(y2, out_ptr + g * N * (HS * D), n, j, c0, N, HS, D, HG)
    elif g < N_FEATURES:
        _split_features(y2, w3_ptr + g * (DP * DSP), b3_ptr + g * DSP, w4_ptr + g * (DSP * DSP),
                        b4_ptr + g * DSP, out_ptr + g * N * (HS * DS), cos_ptr, sin_ptr, i, c0, eb, N, T,
                        cos_stride_b, HS, DS, DP, DSP, BLOCK_N, HG, BE, HALF, ROPE, PREC)
    elif eb == 0:  # a tensor without the feature MLP (values), once per head group
        _split_heads_store(y2, tail_ptr + (g - N_FEATURES) * N * (HS * D), n, j, c0, N, HS, D, HG)


@triton.jit
def _load_rows(base_ptr, r, n, j, u, N, HS: tl.constexpr, D: tl.constexpr, HSP: tl.constexpr,
               LOCAL: tl.constexpr):
    """A (rows (token, feature + u), heads) fp32 tile, zero outside the token.

    ``LOCAL``: from this program's scratch, where tile row ``r`` is stored at row ``r`` (so feature
    j + u of the same token is row r + u); otherwise from an (N, HS, D) tensor.
    """
    co = tl.arange(0, HSP)
    js = j + u
    ok = (n < N) & (js >= 0) & (js < D)
    if LOCAL:
        ptrs = base_ptr + (r + u)[:, None] * HSP + co[None, :]
        return tl.load(ptrs, mask=ok[:, None], other=0.0)
    else:
        ptrs = base_ptr + n[:, None] * (HS * D) + co[None, :] * D + js[:, None]
        return tl.load(ptrs, mask=ok[:, None] & (co < HS)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _dy1(g_ptr, x_ptr, w1_ptr, b1_ptr, w2_ptr, r, n, j, N,
         H: tl.constexpr, HS: tl.constexpr, D: tl.constexpr, K: tl.constexpr,
         HP: tl.constexpr, HSP: tl.constexpr, ROWS: tl.constexpr, PREC: tl.constexpr):
    """Gradient of Y1 from dY2 (N, H', D): dY2 + (transposed conv2 of dY2) * relu'(Y1)."""
    PAD: tl.constexpr = (K - 1) // 2
    co = tl.arange(0, HSP)
    dt = x_ptr.dtype.element_ty
    dr = tl.zeros((ROWS, HSP), dtype=tl.float32)
    for t in tl.static_range(K):
        dy2 = _load_rows(g_ptr, r, n, j, PAD - t, N, HS, D, HSP, False)
        w2t = tl.load(w2_ptr + t * HSP * HSP + co[None, :] * HSP + co[:, None])
        dr = tl.dot(dy2.to(dt), w2t, dr, input_precision=PREC)
    y1 = _y1_at(x_ptr, w1_ptr, b1_ptr, n, j, 0, N, H * D, H, D, K, HP, HSP, ROWS, PREC)
    dy2c = _load_rows(g_ptr, r, n, j, 0, N, HS, D, HSP, False)
    return dy2c + tl.where(y1 > 0, dr, 0.0)


@triton.jit
def _heads_bwd_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, g_ptr, dx_ptr, scratch_ptr,
    dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, N, n_blocks,
    H: tl.constexpr, HS: tl.constexpr, D: tl.constexpr, K: tl.constexpr,
    HP: tl.constexpr, HSP: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    """Backward of the head simulation: dY2 (N, H', D) -> dX and the conv weight gradients."""
    PAD: tl.constexpr = (K - 1) // 2
    ROWS: tl.constexpr = BLOCK_N * DP
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    dt = x_ptr.dtype.element_ty
    r = tl.arange(0, ROWS)
    j = r % DP
    ci = tl.arange(0, HP)
    co = tl.arange(0, HSP)
    # this program's scratch: dY1 of the current block, rows (local token, feature); written once,
    # then read at shifted rows (block-wide barriers order the writes and the reads)
    dy1_scr = scratch_ptr + pid * ROWS * HSP
    scr_offs = r[:, None] * HSP + co[None, :]

    db1 = tl.zeros((HSP,), dtype=tl.float32)
    db2 = tl.zeros((HSP,), dtype=tl.float32)
    blk = pid
    while blk < n_blocks:
        n = (blk * BLOCK_N + r // DP).to(tl.int64)
        dy2 = _load_rows(g_ptr, r, n, j, 0, N, HS, D, HSP, False)
        dy1 = _dy1(g_ptr, x_ptr, w1_ptr, b1_ptr, w2_ptr, r, n, j, N, H, HS, D, K, HP, HSP, ROWS, PREC)
        db2 += tl.sum(dy2, axis=0)
        db1 += tl.sum(dy1, axis=0)
        tl.debug_barrier()  # the previous block's readers are done with the scratch
        tl.store(dy1_scr + scr_offs, dy1)
        tl.debug_barrier()
        dx = tl.zeros((ROWS, HP), dtype=tl.float32)
        for t in tl.static_range(K):
            # weight gradients of tap t: input rows shifted by t - PAD against the centre gradient
            y1s = _y1_at(x_ptr, w1_ptr, b1_ptr, n, j, t - PAD, N, H * D, H, D, K, HP, HSP, ROWS, PREC)
            rs = tl.maximum(y1s, 0.0).to(dt)
            dw2 = tl.dot(tl.trans(rs), dy2.to(dt), input_precision=PREC)
            tl.atomic_add(dw2_ptr + pid * K * HSP * HSP + t * HSP * HSP + co[:, None] * HSP + co[None, :], dw2)
            xs = _load_x(x_ptr, n, j, t - PAD, N, H * D, H, D, HP)
            dw1 = tl.dot(tl.trans(xs), dy1.to(dt), input_precision=PREC)
            tl.atomic_add(dw1_ptr + pid * K * HP * HSP + t * HP * HSP + ci[:, None] * HSP + co[None, :], dw1)
            # input gradient: dX[i] = sum_t dY1[i - t + PAD] @ W1_t^T
            dy1s = _load_rows(dy1_scr, r, n, j, PAD - t, N, HS, D, HSP, True)
            w1t = tl.load(w1_ptr + t * HP * HSP + ci[None, :] * HSP + co[:, None])
            dx = tl.dot(dy1s.to(dt), w1t, dx, input_precision=PREC)
        ok = ((n < N) & (j < D))[:, None] & (ci < H)[None, :]
        tl.store(dx_ptr + n[:, None] * (H * D) + ci[None, :] * D + j[:, None], dx.to(dt), mask=ok)
        blk += n_prog
    tl.store(db1_ptr + pid * HSP + co, db1)
    tl.store(db2_ptr + pid * HSP + co, db2)


# output allocator; tests swap in a NaN-filled one to catch elements a kernel fails to write
_empty = torch.empty
# rows of (token, feature) per program (None: 128 for the head simulation alone, 64 when the feature
# MLP runs in the forward kernel at D' > 64, the most that fits in registers without spilling) and
# warps per program; module settings so that benchmarks can sweep them
BLOCK_ROWS: int | None = None
BWD_BLOCK_ROWS = 64
# one warp group: with 8 warps Triton 3.6 lets one Hopper warp group reuse shared memory that the
# other group's asynchronous wgmma still reads (triton-lang/triton#11047), which gave NaN and wrong
# query/key gradients on an H200 at D' = 128; a single group waits for its own wgmma reads
NUM_WARPS = 4
# the split forward kernel (launch_forward(..., split=True)): simulated heads per program and output
# columns per half of D' per program (powers of two, at least 16, the smallest tl.dot tile); it splits
# only while the grid stays at most SPLIT_MAX_PROGRAMS programs (None: two per SM on a GPU, no limit in
# the interpreter), since every program recomputes the head convolutions of its tokens
SPLIT_HEADS = 16
SPLIT_COLUMNS = 16
SPLIT_MAX_PROGRAMS: int | None = None


def _launch(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    """Every kernel launch goes through here (tools record the launch settings by replacing it)."""
    kernel[grid](*args, **meta)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _pad_to(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    out = t.new_zeros(shape)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


class _Sizes:
    """Sizes of one launch: true sizes, their power-of-two paddings and the token blocking."""

    def __init__(self, N: int, H: int, D: int, HS: int, K: int, DS: int | None, block_rows: int | None) -> None:
        self.N, self.H, self.D, self.HS, self.K = N, H, D, HS, K
        self.DS = DS if DS is not None else D
        self.HP, self.HSP, self.DP, self.DSP = _pow2(self.H), _pow2(self.HS), _pow2(self.D), _pow2(self.DS)
        if block_rows is None:
            block_rows = 64 if DS is not None and self.DSP > 64 else 128
        self.BLOCK_N = max(1, block_rows // self.DP)
        self.n_blocks = triton.cdiv(self.N, self.BLOCK_N)

    @classmethod
    def of(cls, x: Tensor, w1: Tensor, w3: Tensor | None, block_rows: int | None) -> _Sizes:
        """Sizes of input ``x`` (N, H, D) under conv weight ``w1`` (H', H, k) and optional ``w3`` (D', D)."""
        N, H, D = x.shape
        return cls(N, H, D, w1.shape[0], w1.shape[-1], w3.shape[0] if w3 is not None else None, block_rows)

    def heads(self) -> dict:
        return dict(H=self.H, HS=self.HS, D=self.D, K=self.K, HP=self.HP, HSP=self.HSP, DP=self.DP,
                    BLOCK_N=self.BLOCK_N, num_warps=NUM_WARPS)

    def forward(self, features: bool, rope: bool) -> dict:
        return dict(self.heads(), DS=self.DS, DSP=self.DSP, FEATURES=features, ROPE=rope)


def _precision(dtype: torch.dtype) -> str:
    # half-precision inputs ignore it; fp32 inputs get exact fp32 products, as the reference
    return "tf32" if dtype in (torch.bfloat16, torch.float16) else "ieee"


def _head_weights(s: _Sizes, dt: torch.dtype, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> list[Tensor]:
    """Zero-padded conv taps as (K, C_in, C_out) and biases, in the kernel's dtype."""
    w1m = _pad_to(conv_weight_matrix(w1.to(dt)).view(s.K, s.H, s.HS), (s.K, s.HP, s.HSP))
    w2m = _pad_to(conv_weight_matrix(w2.to(dt)).view(s.K, s.HS, s.HS), (s.K, s.HSP, s.HSP))
    return [w1m, _pad_to(b1.to(dt), (s.HSP,)), w2m, _pad_to(b2.to(dt), (s.HSP,))]


def _feature_weights(s: _Sizes, dt: torch.dtype, w3: Tensor, b3: Tensor, w4: Tensor, b4: Tensor) -> list[Tensor]:
    """Zero-padded w3 (transposed, (DP, DSP)), w4 (transposed, (DSP, DSP)) and biases, in ``dt``."""
    return [
        _pad_to(w3.to(dt).t(), (s.DP, s.DSP)), _pad_to(b3.to(dt), (s.DSP,)),
        _pad_to(w4.to(dt).t(), (s.DSP, s.DSP)), _pad_to(b4.to(dt), (s.DSP,)),
    ]


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _backward_programs(s: _Sizes, device: torch.device) -> int:
    if device.type == "cuda":
        return min(s.n_blocks, 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device()))
    return min(s.n_blocks, 3)  # interpreter: still exercise programs that loop over several blocks


@functools.lru_cache(maxsize=32)
def _rotation(DS: int, DSP: int, dt: torch.dtype, device: torch.device) -> Tensor:
    """(DSP, DSP) signed permutation P with z @ P == rotate_half(z) on the first D' columns (read only)."""
    half = DS // 2
    rot = torch.zeros(DSP, DSP, device=device, dtype=dt)
    idx = torch.arange(half, device=device)
    rot[idx + half, idx] = -1.0
    rot[idx, idx + half] = 1.0
    return rot


def rotation_matrix(DS: int, dt: torch.dtype, device: torch.device) -> Tensor:
    """A new copy of the forward kernel's RoPE operand for D' = ``DS`` (see :func:`_rotation`)."""
    return _rotation(DS, _pow2(DS), dt, device).clone()


def prepare_forward(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor | None, b3: Tensor | None,
                    w4: Tensor | None, b4: Tensor | None, head_dim: int, dtype: torch.dtype) -> list[Tensor]:
    """The forward kernel's weight operands, zero-padded and in ``dtype``: conv taps (K, HP, H'P) and
    biases, then, when the feature MLP is given (``w3``), its transposed weights and biases.

    Made once per weight version, they can be passed to :func:`launch_forward` for every call."""
    DS = w3.shape[0] if w3 is not None else None
    s = _Sizes(0, w1.shape[1], head_dim, w1.shape[0], w1.shape[-1], DS, None)
    weights = _head_weights(s, dtype, w1, b1, w2, b2)
    if w3 is not None:
        weights += _feature_weights(s, dtype, w3, b3, w4, b4)
    return weights


def _split_grid(s: _Sizes, n_tensors: int, features: bool, split: bool, device: torch.device) -> dict:
    """Heads (HG) and columns per half of D' (BE) per program of the split kernel, and the grid."""
    half = (s.DS + 1) // 2
    HG, BE = s.HSP, _pow2(half)
    if split:
        HG, BE = min(_pow2(SPLIT_HEADS), s.HSP), min(_pow2(SPLIT_COLUMNS), BE)
    e_blocks = triton.cdiv(half, BE) if features else 1
    splits = (s.HSP // HG) * e_blocks
    limit = SPLIT_MAX_PROGRAMS
    if limit is None and device.type == "cuda":
        limit = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if split and splits > 1 and limit is not None and s.n_blocks * splits * n_tensors > limit:
        return _split_grid(s, n_tensors, features, False, device)
    return dict(grid=(s.n_blocks, splits, n_tensors), HG=HG, BE=BE, HALF=half, E_BLOCKS=e_blocks)


def launch_forward(x: Tensor, weights: list[Tensor], n_sim_heads: int, sim_dim: int | None, T: int = 1,
                   rot: Tensor | None = None, cos: Tensor | None = None, sin: Tensor | None = None,
                   split: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """One launch of the forward kernel with operands from :func:`prepare_forward`.

    ``x`` (N, H, D) needs each token's H x D block contiguous; tokens may be any stride apart (a slice
    of a fused projection's output is read in place). Returns (N, H', D') with the feature MLP
    (``sim_dim`` = D' and 8 operands), else (N, H', D). RoPE after the feature MLP when ``cos``, ``sin``
    (B or 1, T, D') and ``rot`` (:func:`rotation_matrix`) are given; N = B * T.

    Stacked tensors of equal head shapes (queries, keys, values on an MHA base) in one launch: ``x`` (N, G, H, D)
    (any stride between the G blocks too) and every weight with a leading G axis (:func:`stack_prepared`)
    give (G, N, H', D'). The feature MLP's four operands may have a shorter leading axis F < G: then
    the first F tensors (queries, keys) get it and the rest (values) do not, and the result is the pair
    (F, N, H', D'), (G - F, N, H', D). ``split``: spread the feature MLP and RoPE of few tokens over
    more programs, by groups of simulated heads and blocks of output columns (see :func:`_split_grid`).
    """
    stacked = x.dim() == 4
    N, G, H, D = x.shape if stacked else (x.shape[0], 1, *x.shape[1:])
    features = len(weights) == 8
    K = weights[0].shape[-3] if weights and weights[0].dim() >= 3 else 0
    s = _Sizes(N, H, D, n_sim_heads, K, sim_dim if features else None, BLOCK_ROWS)
    expected = [(s.K, s.HP, s.HSP), (s.HSP,), (s.K, s.HSP, s.HSP), (s.HSP,)]
    if features:
        expected += [(s.DP, s.DSP), (s.DSP,), (s.DSP, s.DSP), (s.DSP,)]
    n_features = (weights[4].shape[0] if stacked and weights[4].dim() == 3 else G) if features else 0
    if stacked:
        expected = [(G if i < 4 else n_features, *shape) for i, shape in enumerate(expected)]
    if not 0 <= n_features <= G:
        raise ValueError(f"{n_features} stacked feature MLPs for {G} stacked inputs: at most one per input")
    if len(weights) not in (4, 8) or [tuple(w.shape) for w in weights] != expected:
        raise ValueError(f"prepared weights {[tuple(w.shape) for w in weights]} do not fit input {tuple(x.shape)} "
                         f"with H'={n_sim_heads}, D'={sim_dim}: expected {expected} (see prepare_forward)")
    if any(w.dtype != x.dtype or w.device != x.device for w in weights):
        raise ValueError(f"prepared weights must have the input's dtype {x.dtype} and device {x.device}")
    rope = cos is not None
    if rope and (not features or rot is None or sin is None or tuple(rot.shape) != (s.DSP, s.DSP)):
        raise ValueError("RoPE in the forward kernel needs the feature MLP, cos, sin and rot (rotation_matrix)")
    if x.stride(-1) != 1 or x.stride(-2) != D:
        x = x.contiguous()
    x_stride = x.stride(0) if N > 1 else H * D
    x_tensor_stride = x.stride(1) if stacked and G > 1 else H * D
    # the weights are read at fixed offsets from the first tensor's
    weights = [w if w.is_contiguous() else w.contiguous() for w in weights]
    # never read by the kernel when the feature MLP or RoPE is off; any pointer will do
    unused = weights[1]
    feats = weights[4:] if features else [unused] * 4
    if rope:
        # in their own float dtype: the kernel converts what it loads
        cos, sin = (t.to(device=x.device).contiguous() for t in (cos, sin))
        rope_ptrs, cos_stride = [rot, cos, sin], (0 if cos.shape[0] == 1 else T * s.DS)
    else:
        rope_ptrs, cos_stride, T = [unused] * 3, 0, max(T, 1)
    tail = None
    if 0 < n_features < G:
        out = _empty(n_features, s.N, s.HS, s.DS, device=x.device, dtype=x.dtype)
        tail = _empty(G - n_features, s.N, s.HS, s.D, device=x.device, dtype=x.dtype)
    else:
        out = _empty(*((G,) if stacked else ()), s.N, s.HS, s.DS, device=x.device, dtype=x.dtype)
    if not (stacked or split):
        _launch(
            _simulate_fwd_kernel, (s.n_blocks,), x, *weights[:4], *feats, out, *rope_ptrs, s.N, T, cos_stride,
            x_stride, PREC=_precision(x.dtype), **s.forward(features, rope),
        )
        return out
    meta = _split_grid(s, G, features, split, x.device)
    grid = meta.pop("grid")
    sizes = s.forward(features, rope)
    del sizes["FEATURES"]
    _launch(
        _simulate_split_kernel, grid, x, *weights[:4], *feats, out, tail if tail is not None else out,
        *rope_ptrs[1:], s.N, T, cos_stride, x_stride, x_tensor_stride, PREC=_precision(x.dtype), **sizes,
        **meta, N_FEATURES=n_features, N_TENSORS=G,
    )
    return out if tail is None else (out, tail)


def stack_prepared(prepared: list[list[Tensor]]) -> list[Tensor]:
    """The operands of several :func:`prepare_forward` calls of equal shapes, stacked along a new first
    axis, for one launch over stacked inputs (:func:`launch_forward` with ``x`` (N, G, H, D)). Those
    with the feature MLP come first; those without it (values) may follow."""
    heads = {tuple(tuple(w.shape) for w in ws[:4]) for ws in prepared}
    with_features = [ws for ws in prepared if len(ws) == 8]
    if len(heads) != 1 or len({tuple(tuple(w.shape) for w in ws[4:]) for ws in with_features}) > 1 or any(
        len(ws) != 8 for ws in prepared[: len(with_features)]
    ):
        raise ValueError("stack_prepared needs operands of equal shapes (tensors with the same H, H', D, D', k), "
                         "those with the feature MLP first")
    stacked = [torch.stack(ws) for ws in zip(*(ws[:4] for ws in prepared))]
    if with_features:
        stacked += [torch.stack(ws) for ws in zip(*(ws[4:] for ws in with_features))]
    return stacked


def _forward(x: Tensor, w1, b1, w2, b2, w3, b3, w4, b4, T: int, rope) -> Tensor:
    """One launch of the forward kernel: (N, H, D) -> (N, H', D') with features, else (N, H', D)."""
    weights = prepare_forward(w1, b1, w2, b2, w3, b3, w4, b4, x.shape[-1], x.dtype)
    DS = w3.shape[0] if w3 is not None else None
    rot = _rotation(DS, _pow2(DS), x.dtype, x.device) if rope is not None else None
    cos, sin = rope if rope is not None else (None, None)
    return launch_forward(x, weights, w1.shape[0], DS, T, rot, cos, sin)


def _heads_backward(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, dy2: Tensor):
    """Gradients of the head simulation given dY2 (N, H', D): dx and the conv weights and biases."""
    s = _Sizes.of(x, w1, None, BWD_BLOCK_ROWS)
    P = _backward_programs(s, x.device)
    f32 = dict(device=x.device, dtype=torch.float32)
    dx = _empty(x.shape, device=x.device, dtype=x.dtype)
    # per-program slices: no contended atomics, and the sum over programs is deterministic
    dw1 = torch.zeros(P, s.K, s.HP, s.HSP, **f32)
    dw2 = torch.zeros(P, s.K, s.HSP, s.HSP, **f32)
    db1, db2 = _empty(P, s.HSP, **f32), _empty(P, s.HSP, **f32)
    w1m, b1p, w2m, _ = _head_weights(s, x.dtype, w1, b1, w2, b2)
    scratch = torch.empty(P, s.BLOCK_N * s.DP, s.HSP, **f32)
    _launch(
        _heads_bwd_kernel, (P,), x, w1m, b1p, w2m, dy2, dx, scratch, dw1, db1, dw2, db2, s.N, s.n_blocks,
        PREC=_precision(x.dtype), **s.heads(),
    )
    # (K, C_in, C_out) taps back to the (C_out, C_in, K) conv layout
    gw1 = dw1.sum(0)[:, : s.H, : s.HS].permute(2, 1, 0).to(w1.dtype).contiguous()
    gw2 = dw2.sum(0)[:, : s.HS, : s.HS].permute(2, 1, 0).to(w2.dtype).contiguous()
    return dx, gw1, db1.sum(0)[: s.HS].to(b1.dtype), gw2, db2.sum(0)[: s.HS].to(b2.dtype)


def _features_backward(y2: Tensor, g: Tensor, w3: Tensor, b3: Tensor, w4: Tensor):
    """Gradients of the feature MLP as GEMMs over (N*H') rows, from Y2 (N, H', D) and dZ2 (N, H', D').

    Returns dY2 (N, H', D) and dW3, db3, dW4, db4 in the input's dtype. Z1 is recomputed here and
    freed before dY2 is made, so at most about 3.5 tensors the size of Q~ are alive at once.
    """
    dt = y2.dtype
    D, DS = w3.shape[1], w3.shape[0]
    y2r, g2 = y2.view(-1, D), g.reshape(-1, DS)
    w3_, w4_ = w3.to(dt), w4.to(dt)
    r1 = torch.addmm(b3.to(dt), y2r, w3_.t()).relu_()
    dw4 = g2.t() @ r1
    # dZ1 = dZ2 + (dZ2 W4) * relu'(Z1), built in the product's buffer (relu(Z1) > 0 iff Z1 > 0)
    dz1 = (g2 @ w4_).masked_fill_(r1 <= 0, 0.0).add_(g2)
    del r1
    dw3 = dz1.t() @ y2r
    dy2 = (dz1 @ w3_).view(y2.shape)
    return dy2, dw3, dz1.sum(0), dw4, g2.sum(0)


# The kernels are custom ops, so that torch.compile keeps a model that uses them in one graph (each op
# is an opaque call there); the fake implementations give the compiler the output shapes.
@torch.library.custom_op("sasformer::simulate_fused", mutates_args=())
def simulate_fused_op(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor | None,
                      b3: Tensor | None, w4: Tensor | None, b4: Tensor | None, T: int, cos: Tensor | None,
                      sin: Tensor | None) -> Tensor:
    """Forward kernel: x (N, H, D) -> (N, H', D') with the feature MLP (``w3`` given), else (N, H', D)."""
    # the kernels index their inputs as contiguous
    return _forward(x.contiguous(), w1, b1, w2, b2, w3, b3, w4, b4, T, (cos, sin) if cos is not None else None)


@simulate_fused_op.register_fake
def _(x, w1, b1, w2, b2, w3, b3, w4, b4, T, cos, sin):
    return x.new_empty(x.shape[0], w1.shape[0], w3.shape[0] if w3 is not None else x.shape[-1])


@torch.library.custom_op("sasformer::simulate_heads_fused_backward", mutates_args=())
def heads_backward_op(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                      dy2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward kernel of the head simulation: dx, dw1, db1, dw2, db2 from dY2 (N, H', D)."""
    return _heads_backward(x.contiguous(), w1, b1, w2, b2, dy2.contiguous())


@heads_backward_op.register_fake
def _(x, w1, b1, w2, b2, dy2):
    # contiguous, as the real op returns them (empty_like would copy the inputs' strides)
    return tuple(t.new_empty(t.shape) for t in (x, w1, b1, w2, b2))


# Backward of the forward op, registered on it (rather than an autograd.Function around it), so that
# autograd and torch.compile both see one differentiable op: the head simulation again (fused kernel,
# Y2 only), the feature MLP's gradients as GEMMs, then the fused head-simulation backward kernel.
def _setup_context(ctx, inputs, output) -> None:
    x, w1, b1, w2, b2, w3, b3, w4, b4, T, cos, sin = inputs
    ctx.save_for_backward(x, w1, b1, w2, b2, w3, b3, w4, b4, cos, sin)
    ctx.T = T


def _backward(ctx, g):
    x, w1, b1, w2, b2, w3, b3, w4, b4, cos, sin = ctx.saved_tensors
    g = g.to(x.dtype).contiguous()
    feat: tuple = (None, None, None, None)
    if w3 is not None:
        if cos is not None:
            g = rotate_transposed(g.view(-1, ctx.T, *g.shape[1:]), cos, sin).view(g.shape)
        y2 = simulate_fused_op(x, w1, b1, w2, b2, None, None, None, None, 1, None, None)
        g, dw3, db3, dw4, db4 = _features_backward(y2, g, w3, b3, w4)
        del y2
        feat = (dw3.to(w3.dtype), db3.to(b3.dtype), dw4.to(w4.dtype), db4.to(b4.dtype))
    head = heads_backward_op(x, w1, b1, w2, b2, g.contiguous())
    return (*head, *feat, None, None, None)


simulate_fused_op.register_autograd(_backward, setup_context=_setup_context)


def _flatten(x_BTHD: Tensor) -> Tensor:
    return x_BTHD.reshape(-1, *x_BTHD.shape[-2:]).contiguous()


def simulate_qk_triton(
    x_BTHD: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    w3: Tensor, b3: Tensor, w4: Tensor, b4: Tensor, rope: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Fused head + feature simulation, (B, T, H, D) -> (B, T, H', D'), then RoPE when ``rope`` =
    (cos, sin) tables of shape (B or 1, T, D') are given."""
    if rope is not None and (x_BTHD.dim() != 4 or rope[0].shape[-2] != x_BTHD.shape[1]):
        raise ValueError(f"rope tables {tuple(rope[0].shape)} do not match input {tuple(x_BTHD.shape)} (B, T, H, D)")
    T = x_BTHD.shape[1] if x_BTHD.dim() == 4 else 1
    cos, sin = rope if rope is not None else (None, None)
    out = simulate_fused_op(_flatten(x_BTHD), w1, b1, w2, b2, w3, b3, w4, b4, T, cos, sin)
    return out.view(*x_BTHD.shape[:-2], w1.shape[0], w3.shape[0])


def simulate_heads_triton(x_BTHD: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """Fused head simulation, (..., H, D) -> (..., H', D)."""
    out = simulate_fused_op(_flatten(x_BTHD), w1, b1, w2, b2, None, None, None, None, 1, None, None)
    return out.view(*x_BTHD.shape[:-2], w1.shape[0], x_BTHD.shape[-1])
