"""Plain-PyTorch reference of SAS head and feature simulation (the method spec, sections 1-2).

Head simulation treats the H heads of one token as channels and its D features as a sequence:

    Y1 = Conv1d_{H->H', k}(X) ;  Y2 = Y1 + Conv1d_{H'->H', k}(ReLU(Y1))

Feature simulation maps D -> D' with a residual MLP:

    Z1 = Y2 W3^T + b3 ;  Z2 = Z1 + ReLU(Z1) W4^T + b4

Every fast implementation is tested against these functions.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def simulate_heads_naive(x_BTHD: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """(B, T, H, D) -> (B, T, H', D). ``w1``: (H', H, k), ``w2``: (H', H', k), biases (H',)."""
    B, T, H, D = x_BTHD.shape
    pad = (w1.shape[-1] - 1) // 2
    x = x_BTHD.reshape(B * T, H, D)
    y1 = F.conv1d(x, w1, b1, padding=pad)
    y2 = y1 + F.conv1d(F.relu(y1), w2, b2, padding=pad)
    return y2.view(B, T, w1.shape[0], D)


def simulate_features_naive(y_BTHD: Tensor, w3: Tensor, b3: Tensor, w4: Tensor, b4: Tensor) -> Tensor:
    """(B, T, H', D) -> (B, T, H', D'). ``w3``: (D', D), ``w4``: (D', D'), biases (D',)."""
    z1 = F.linear(y_BTHD, w3, b3)
    return z1 + F.linear(F.relu(z1), w4, b4)
