"""SAS simulation as dense GEMMs with large inner sizes: the head convolution as a banded matrix.

Per token, the first head convolution is a linear map from the flattened (H, D) heads to the
flattened (H', D) simulated heads. Its matrix is banded:

    M1[c*D + i, o*D + j] = w1[o, c, i - j + (k-1)/2]   (zero outside the kernel window)

so the convolution over all N tokens is one GEMM (N, H*D) @ (H*D, H'*D) with inner size H*D = 768
at GPT-small, and the second convolution one GEMM with a (H'*D, H'*D) banded matrix. Most entries
are zero (a fraction k/D is used), but tensor cores run these GEMMs near peak, whereas the exact
formulations (:mod:`.matmul`, cuDNN's conv1d) have an inner size of only k*H = 36 and run far
below it. The feature MLP is a pair of GEMMs over (N*H', D) rows, which needs no reshaping copy:
(N, H'*D) and (N*H', D) are the same buffer.

The banded matrices are built from the conv weights at every call with one small einsum against
constant shift matrices (differentiable, so autograd turns the dense matrix gradient back into
the conv weight gradient). The autograd function saves only the compact input and the weights;
its backward recomputes the intermediates (a few GEMMs) instead of keeping four tensors of
simulated size per call alive until the backward pass.

The first convolution is linear in the compact heads, which are linear in the layer's input, so the
projection folds into it: ``(x W^T) M1 = x (W^T M1)``. The ``*_folded`` forms take the layer input and
the projection weight, and run one (N, d) @ (d, H'*D) GEMM where the unfolded pair runs the projection
and then the first convolution; the compact heads are then never formed, nor kept for the backward.
Building ``W^T M1`` costs d*H*D*H'*D multiply-adds a call, whatever the number of tokens.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.utils.checkpoint
from torch import Tensor


def _build_shifts(k: int, D: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(k, D, D) 0/1 tensor: ``S[t, i, j] = 1`` where input feature i feeds output feature j via tap t."""
    pad = (k - 1) // 2
    i = torch.arange(D, device=device).view(D, 1)
    j = torch.arange(D, device=device).view(1, D)
    return torch.stack([(i == j + t - pad) for t in range(k)]).to(dtype)


_cached_shifts = functools.lru_cache(maxsize=32)(_build_shifts)


def _shifts(k: int, D: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    # eager: build once per shape; under torch.compile the constant is folded into the graph
    if torch.compiler.is_compiling():
        return _build_shifts(k, D, dtype, device)
    return _cached_shifts(k, D, dtype, device)


def banded_conv_matrix(w: Tensor, D: int) -> Tensor:
    """(OUT, C, k) conv weight -> (C*D, OUT*D) matrix of the same-padded convolution over D positions."""
    OUT, C, k = w.shape
    m = torch.einsum("oct,tij->cioj", w, _shifts(k, D, w.dtype, w.device))
    return m.reshape(C * D, OUT * D)


class _BandedSimulate(torch.autograd.Function):
    """x (N, H*D) -> heads (N, H'*D), then optionally features (N*H', D'); all inputs one dtype."""

    @staticmethod
    def forward(ctx, x, m1, b1, m2, b2, w3, b3, w4, b4):  # type: ignore[override]
        out = _banded_traced(x, m1, b1, m2, b2, w3, b3, w4, b4)  # one definition of the function
        ctx.save_for_backward(x, m1, b1, m2, b2, *((w3, b3, w4) if w3 is not None else ()))
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, m1, b1, m2, b2, *fw = ctx.saved_tensors
        g = g.to(x.dtype)
        a1 = torch.addmm(b1, x, m1)
        r1 = torch.relu(a1)
        dw3 = db3 = dw4 = db4 = None
        if fw:
            # only the feature MLP needs Y2 again
            w3, b3, w4 = fw
            u = _second_conv(a1, r1, m2, b2).view(-1, w3.shape[1])
            z1 = torch.addmm(b3, u, w3.t())
            g2 = g.reshape(-1, w4.shape[0])
            dw4 = g2.t() @ torch.relu(z1)
            db4 = g2.sum(0)
            # dz1 = g + (g W4) * relu'(z1), built in place in the product's buffer
            dz1 = (g2 @ w4).masked_fill_(z1 <= 0, 0.0).add_(g2)
            del z1
            dw3 = dz1.t() @ u
            db3 = dz1.sum(0)
            dy2 = (dz1 @ w3).view_as(a1)
            del dz1, u
        else:
            dy2 = g.reshape(a1.shape)
        dm2 = r1.t() @ dy2
        del r1
        db2 = dy2.sum(0)
        # da1 = dy2 + (dy2 M2^T) * relu'(a1)
        da1 = (dy2 @ m2.t()).masked_fill_(a1 <= 0, 0.0).add_(dy2)
        del a1, dy2
        dm1 = x.t() @ da1
        db1 = da1.sum(0)
        dx = da1 @ m1.t()
        return dx, dm1, db1, dm2, db2, dw3, db3, dw4, db4


def _second_conv(a1: Tensor, r1: Tensor, m2: Tensor, b2: Tensor) -> Tensor:
    """Y2 = Y1 + ReLU(Y1) M2 + b2 from Y1 = X M1 + b1 and its ReLU; rows = tokens, columns = (head, feature).

    The residual is added after the product: ``addmm`` with a full matrix to add copies it into the output
    before the GEMM (a device-to-device copy per call on CUDA), while a bias vector rides on the GEMM."""
    return torch.addmm(b2, r1, m2).add_(a1)


def conv_operands(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, D: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Dense GEMM operands of one head block over ``D`` features: (H*D, H'*D), (H'*D,), (H'*D, H'*D), (H'*D,).

    Biases repeat over the D features of each simulated head. Entries are copies of the conv weights
    (no arithmetic), so any dtype is exact."""
    return (banded_conv_matrix(w1, D), b1.repeat_interleave(D), banded_conv_matrix(w2, D), b2.repeat_interleave(D))


def _head_operands(x_BTHD: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> list[Tensor]:
    dt = x_BTHD.dtype
    return list(conv_operands(w1.to(dt), b1.to(dt), w2.to(dt), b2.to(dt), x_BTHD.shape[-1]))


def _rows(x_BTHD: Tensor) -> Tensor:
    return x_BTHD.reshape(-1, x_BTHD.shape[-2] * x_BTHD.shape[-1])


def _banded_traced(x, m1, b1, m2, b2, w3, b3, w4, b4) -> Tensor:
    """The banded simulation in plain differentiable ops: ``_BandedSimulate``'s forward, and under
    ``torch.compile`` the whole op (autograd then derives the backward).

    Traced by Dynamo on the H200 (torch 2.11), ``_BandedSimulate`` returned zero gradients for every
    input, even with the ``eager`` backend, while the forward was right; on CPU it was right. Here
    AOTAutograd derives the backward and its partitioner decides what to recompute.
    """
    a1 = torch.addmm(b1, x, m1)
    out = torch.addmm(b2, torch.relu(a1), m2) + a1  # residuals after the product, as in _second_conv
    return out if w3 is None else residual_feature_mlp(out, w3, b3, w4, b4)


def residual_feature_mlp(heads: Tensor, w3: Tensor, b3: Tensor, w4: Tensor, b4: Tensor) -> Tensor:
    """The feature simulation in plain differentiable ops: Z1 = Y W3^T + b3, Z1 + ReLU(Z1) W4^T + b4 over
    rows of one simulated head's features, (N*H', D'); the residual added after the product, as in
    ``_second_conv``."""
    z1 = torch.addmm(b3, heads.view(-1, w3.shape[1]), w3.t())
    return torch.addmm(b4, torch.relu(z1), w4.t()) + z1


# under torch.compile, "1" recomputes the traced form in the backward (activation checkpointing), as the
# eager Function does, instead of keeping what the partitioner saves: less memory for more GEMMs (``blocked``,
# which shares the first GEMM, reads it too)
RECOMPUTE_ENV_VAR = "SASFORMER_BANDED_RECOMPUTE"


def recompute_when_compiled() -> bool:
    """Whether a compiled simulation is checkpointed (``SASFORMER_BANDED_RECOMPUTE=1``)."""
    return os.environ.get(RECOMPUTE_ENV_VAR, "") == "1"


def _simulate(x: Tensor, *operands: Tensor | None) -> Tensor:
    if torch.compiler.is_compiling():
        if recompute_when_compiled():
            return torch.utils.checkpoint.checkpoint(_banded_traced, x, *operands, use_reentrant=False)
        return _banded_traced(x, *operands)
    return _BandedSimulate.apply(x, *operands)


def simulate_qk_banded(
    x_BTHD: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    w3: Tensor, b3: Tensor, w4: Tensor, b4: Tensor,
) -> Tensor:
    """Head then feature simulation, (..., H, D) -> (..., H', D'); equals the naive pair."""
    dt = x_BTHD.dtype
    heads = _head_operands(x_BTHD, w1, b1, w2, b2)
    features = [w.to(dt) for w in (w3, b3, w4, b4)]
    out = _simulate(_rows(x_BTHD), *heads, *features)
    return out.view(*x_BTHD.shape[:-2], w1.shape[0], w3.shape[0])


def projection_dtype(x: Tensor) -> torch.dtype:
    """The dtype a linear projection of ``x`` computes in: autocast's where it is on (it leaves float64 alone),
    else ``x``'s."""
    device = x.device.type
    # cuda and cpu always have autocast; asking only for other devices keeps the check out of torch 2.11's
    # dynamo, which breaks the graph on `_is_autocast_available`
    available = device in ("cuda", "cpu") or torch.amp.is_autocast_available(device)
    if x.dtype == torch.float64 or not (available and torch.is_autocast_enabled(device)):
        return x.dtype
    return torch.get_autocast_dtype(device)


def _folded_operands(x_BTd: Tensor, weight: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor
                     ) -> tuple[Tensor, list[Tensor]]:
    """The layer input as rows in the dtype its projection would run in, and the head operands with the
    projection ``weight`` (H*D, d) folded into the first matrix: (d, H'*D)."""
    # the folded GEMMs run in the projection's dtype, so the eager Function's backward (which runs outside
    # autocast) sees one dtype
    dt = projection_dtype(x_BTd)
    D = weight.shape[0] // w1.shape[1]
    m1, c1, m2, c2 = conv_operands(w1.to(dt), b1.to(dt), w2.to(dt), b2.to(dt), D)
    return x_BTd.reshape(-1, x_BTd.shape[-1]).to(dt), [weight.to(dt).t() @ m1, c1, m2, c2]


def simulate_qk_banded_folded(
    x_BTd: Tensor, weight: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    w3: Tensor, b3: Tensor, w4: Tensor, b4: Tensor,
) -> Tensor:
    """``simulate_qk_banded(linear(x, weight) as heads, ...)`` with the projection folded into the first
    convolution: (..., d) -> (..., H', D')."""
    rows, heads = _folded_operands(x_BTd, weight, w1, b1, w2, b2)
    features = [w.to(rows.dtype) for w in (w3, b3, w4, b4)]
    out = _simulate(rows, *heads, *features)
    return out.view(*x_BTd.shape[:-1], w1.shape[0], w3.shape[0])


def simulate_heads_banded_folded(x_BTd: Tensor, weight: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor
                                 ) -> Tensor:
    """``simulate_heads_banded(linear(x, weight) as heads, ...)``, folded: (..., d) -> (..., H', D)."""
    rows, heads = _folded_operands(x_BTd, weight, w1, b1, w2, b2)
    out = _simulate(rows, *heads, None, None, None, None)
    return out.view(*x_BTd.shape[:-1], w1.shape[0], weight.shape[0] // w1.shape[1])


def simulate_heads_banded(x_BTHD: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """Head simulation only, (..., H, D) -> (..., H', D)."""
    heads = _head_operands(x_BTHD, w1, b1, w2, b2)
    out = _simulate(_rows(x_BTHD), *heads, None, None, None, None)
    return out.view(*x_BTHD.shape[:-2], w1.shape[0], x_BTHD.shape[-1])
