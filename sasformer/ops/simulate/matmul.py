"""SAS simulation as a few large matmuls, with a hand-written backward that keeps no intermediates.

Layout. Head simulation mixes heads (channels) over a window of k neighbouring features. With the
features of each token as rows and heads as columns, ``X`` becomes an (N*D, H) matrix; padding each
token with (k-1)/2 zero rows on both sides (P = D + k - 1 rows per token) makes every shifted view a
contiguous row slice of one flat buffer, so the whole convolution over all tokens is one GEMM:

    unfold(Xp) (L, k*H) @ W1 (k*H, H')          L = N*P - (k - 1)

Output row r belongs to padded row r + (k-1)/2; the rows that land on padding are zeroed, which
is exactly the zero padding the second convolution needs. Feature simulation then contracts the
feature axis of each token, a batched matmul over the transposed (N, H', D) view (no copy).

Memory. The autograd function saves only the compact input and the weights; the backward pass
recomputes the (cheap) forward intermediates, so the simulated Q~/K~ are the only tensors of
simulated size alive between forward and backward (those are saved by attention anyway).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def conv_weight_matrix(w: Tensor) -> Tensor:
    """(O, C, k) conv weight -> (k*C, O) GEMM operand: row t*C + c holds w[:, c, t]."""
    return w.permute(2, 1, 0).reshape(-1, w.shape[0])


def _unfold(ap_NPC: Tensor, k: int) -> Tensor:
    """Padded rows (N, P, C) -> (N*P - k + 1, k*C): row r is the concatenation of rows r .. r+k-1."""
    flat = ap_NPC.reshape(-1, ap_NPC.shape[-1])
    if k == 1:
        return flat
    L = flat.shape[0] - (k - 1)
    return torch.cat([flat[t : t + L] for t in range(k)], dim=1)


def _fold(du: Tensor, n_rows: int, k: int) -> Tensor:
    """Adjoint of :func:`_unfold`: (L, k*C) -> (n_rows, C), summing the k overlapping copies."""
    C = du.shape[1] // k
    if k == 1:
        return du
    out = du.new_zeros(n_rows, C)
    L = du.shape[0]
    for t in range(k):
        out[t : t + L] += du[:, t * C : (t + 1) * C]
    return out


def _valid_rows(D: int, pad: int, device: torch.device) -> Tensor:
    """(P, 1) boolean: which rows of a padded token are real features."""
    r = torch.arange(D + 2 * pad, device=device).view(-1, 1)
    return (r >= pad) & (r < pad + D)


def _place(rows_L: Tensor, N: int, pad: int, valid_P1: Tensor) -> Tensor:
    """GEMM output rows (padded positions pad .. N*P - pad - 1) -> (N, P, O) with padding rows zero."""
    out = F.pad(rows_L, (0, 0, pad, pad)).view(N, valid_P1.shape[0], -1)
    return out.masked_fill(~valid_P1, 0.0)


def _heads_forward(x_NCD: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor):
    """Returns padded (N, P, C) input, Y1 and Y2 in padded rows layout (N, P, H')."""
    N, _, D = x_NCD.shape
    k = w1.shape[-1]
    pad = (k - 1) // 2
    valid = _valid_rows(D, pad, x_NCD.device)
    xp = F.pad(x_NCD.transpose(1, 2), (0, 0, pad, pad))
    y1p = _place(torch.addmm(b1, _unfold(xp, k), conv_weight_matrix(w1)), N, pad, valid)
    conv2 = torch.addmm(b2, _unfold(F.relu(y1p), k), conv_weight_matrix(w2))
    y2p = y1p + _place(conv2, N, pad, valid)
    return xp, y1p, y2p, valid


def _conv_backward(inp_NPC: Tensor, w: Tensor, dout_NPO: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``_place(unfold(inp) @ W + b)`` given a padded output gradient with zero padding rows."""
    N, P, C = inp_NPC.shape
    k = w.shape[-1]
    pad = (k - 1) // 2
    L = N * P - (k - 1)
    g = dout_NPO.reshape(N * P, -1)[pad : pad + L]
    dwm = _unfold(inp_NPC, k).t() @ g
    dw = dwm.view(k, C, -1).permute(2, 1, 0)
    dinp = _fold(g @ conv_weight_matrix(w).t(), N * P, k).view(N, P, C)
    return dinp, dw, g.sum(0)


class _SimulateMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, w3, b3, w4, b4):  # type: ignore[override]
        features = w3 is not None
        weights = [t.to(x.dtype) if t is not None else None for t in (w1, b1, w2, b2, w3, b3, w4, b4)]
        w1_, b1_, w2_, b2_, w3_, b3_, w4_, b4_ = weights
        N, _, D = x.shape
        pad = (w1.shape[-1] - 1) // 2
        _, _, y2p, _ = _heads_forward(x, w1_, b1_, w2_, b2_)
        y2t = y2p[:, pad : pad + D].transpose(1, 2)  # (N, H', D), a view
        if features:
            z1 = torch.matmul(y2t, w3_.t()) + b3_
            out = z1 + F.linear(F.relu(z1), w4_, b4_)
        else:
            out = y2t.contiguous()
        ctx.save_for_backward(x, w1, b1, w2, b2, *(t for t in (w3, b3, w4, b4) if t is not None))
        ctx.features = features
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, w1, b1, w2, b2, *fw = ctx.saved_tensors
        dt = x.dtype
        w1_, b1_, w2_, b2_ = (t.to(dt) for t in (w1, b1, w2, b2))
        N, _, D = x.shape
        pad = (w1.shape[-1] - 1) // 2
        xp, y1p, y2p, valid = _heads_forward(x, w1_, b1_, w2_, b2_)
        y2t = y2p[:, pad : pad + D].transpose(1, 2)
        g = g.to(dt)
        feature_grads: tuple = (None, None, None, None)
        if ctx.features:
            w3, b3, w4, b4 = fw
            w3_, b3_, w4_ = w3.to(dt), b3.to(dt), w4.to(dt)
            z1 = torch.matmul(y2t, w3_.t()) + b3_
            g2 = g.reshape(-1, g.shape[-1])
            z1f = z1.reshape(-1, z1.shape[-1])
            dw4 = g2.t() @ F.relu(z1f)
            dz1 = g2 + (g2 @ w4_) * (z1f > 0)
            dw3 = dz1.t() @ y2t.reshape(-1, D)
            dy2t = (dz1 @ w3_).view(N, -1, D)
            feature_grads = (dw3.to(w3.dtype), dz1.sum(0).to(b3.dtype), dw4.to(w4.dtype), g2.sum(0).to(b4.dtype))
        else:
            dy2t = g
        dy2p = F.pad(dy2t.transpose(1, 2), (0, 0, pad, pad))
        dr, dw2, db2 = _conv_backward(F.relu(y1p), w2_, dy2p)
        # padding rows of y1p are zero, so the relu mask also drops their gradient
        dy1p = dy2p + dr * (y1p > 0)
        dxp, dw1, db1 = _conv_backward(xp, w1_, dy1p)
        dx = dxp[:, pad : pad + D].transpose(1, 2).contiguous()
        head_grads = (dw1.to(w1.dtype), db1.to(b1.dtype), dw2.to(w2.dtype), db2.to(b2.dtype))
        return (dx, *head_grads, *feature_grads)


def _flatten(x_BTHD: Tensor) -> Tensor:
    return x_BTHD.reshape(-1, *x_BTHD.shape[-2:]).contiguous()


def simulate_qk_matmul(
    x_BTHD: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    w3: Tensor, b3: Tensor, w4: Tensor, b4: Tensor,
) -> Tensor:
    """Head then feature simulation, (..., H, D) -> (..., H', D'); equals the naive pair."""
    out = _SimulateMatmul.apply(_flatten(x_BTHD), w1, b1, w2, b2, w3, b3, w4, b4)
    return out.view(*x_BTHD.shape[:-2], w1.shape[0], w3.shape[0])


def simulate_heads_matmul(x_BTHD: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """Head simulation only, (..., H, D) -> (..., H', D)."""
    out = _SimulateMatmul.apply(_flatten(x_BTHD), w1, b1, w2, b2, None, None, None, None)
    return out.view(*x_BTHD.shape[:-2], w1.shape[0], x_BTHD.shape[-1])


def simulate_features_matmul(y_BTHD: Tensor, w3: Tensor, b3: Tensor, w4: Tensor, b4: Tensor) -> Tensor:
    """Feature simulation only; already a pair of GEMMs, so plain autograd ops."""
    z1 = F.linear(y_BTHD, w3, b3)
    return z1 + F.linear(F.relu(z1), w4, b4)
