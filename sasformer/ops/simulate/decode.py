"""SAS simulation for a handful of tokens (decoding), in as few kernels as possible.

At decode time N = B*T is tiny and a step is bound by the number of kernel launches, not by FLOPs.
This path trades FLOPs and weight bytes for launches, and runs without autograd:

- each head convolution is one dense GEMM against its banded matrix
  (:func:`~sasformer.ops.simulate.banded.banded_conv_matrix`), built once per weight version by the
  caller rather than per call;
- queries, keys and values of equal shapes are stacked on a leading group axis G and go through
  both convolutions and the feature MLP together as batched GEMMs (one launch for Q, K and V);
- the caller may fold a linear map that precedes the simulation (the base projection) into the first
  convolution's matrix: there is no nonlinearity between them (:func:`fold_projection`).

Shapes: ``a1_GNO`` is the first convolution's output (bias included) for G stacked tensors, N tokens
and O = H'*D columns (head-major); the feature MLP sees the same buffer as (G, N*H', D) rows.
Everything equals :mod:`.naive` up to rounding; the tests hold it to that.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sasformer.ops.simulate.banded import conv_operands
from sasformer.ops.simulate.rotate import _rotate


def fold_projection(w_proj: Tensor, m1: Tensor) -> Tensor:
    """``x @ w_proj.T @ m1`` as one (d, O) matrix, formed in at least fp32: an ``nn.Linear`` weight
    (H*D, d) followed by the first convolution's banded matrix (H*D, O)."""
    wide = torch.promote_types(m1.dtype, torch.float32)
    return (w_proj.to(wide).t() @ m1.to(wide)).to(m1.dtype)


def first_conv(x_GNI: Tensor, m1_GIO: Tensor, b1_GO: Tensor) -> Tensor:
    """Y1 for G stacked inputs: (G, N, I) @ (G, I, O) + b1. ``x_GNI`` may be an expanded view."""
    return torch.baddbmm(b1_GO.unsqueeze(1), x_GNI, m1_GIO)


def residual_conv(a1_GNO: Tensor, m2_GOO: Tensor, b2_GO: Tensor) -> Tensor:
    """Y2 = Y1 + ReLU(Y1) M2 + b2: the residual conv block on stacked rows."""
    return torch.baddbmm(a1_GNO + b2_GO.unsqueeze(1), torch.relu(a1_GNO), m2_GOO)


def residual_features(y_GMD: Tensor, w3t_GDE: Tensor, b3_GE: Tensor, w4t_GEE: Tensor, b4_GE: Tensor) -> Tensor:
    """Z2 = Z1 + ReLU(Z1) W4^T + b4 with Z1 = Y W3^T + b3, on G stacked (M, D) row blocks (M = N*H').

    ``w3t``/``w4t`` are the transposed ``nn.Linear`` weights, (G, D, D') and (G, D', D')."""
    z1 = torch.baddbmm(b3_GE.unsqueeze(1), y_GMD, w3t_GDE)
    return torch.baddbmm(z1 + b4_GE.unsqueeze(1), torch.relu(z1), w4t_GEE)


def rope_stacked(z_GBTHE: Tensor, cos_BTE: Tensor, sin_BTE: Tensor) -> Tensor:
    """RoPE ("rotate half") on stacked (G, B, T, H, E) tensors with tables of shape (B or 1, T, E)."""
    cos = cos_BTE.unsqueeze(2).to(z_GBTHE.dtype)
    sin = sin_BTE.unsqueeze(2).to(z_GBTHE.dtype)
    return _rotate(z_GBTHE, cos, sin, 1.0)


__all__ = [
    "conv_operands",
    "first_conv",
    "fold_projection",
    "residual_conv",
    "residual_features",
    "rope_stacked",
]
