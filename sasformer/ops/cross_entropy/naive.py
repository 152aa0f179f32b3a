"""Plain-PyTorch reference of the LM-head cross-entropy: full logits, fp32 softmax.

The fused chunked version (:mod:`sasformer.ops.cross_entropy.chunked`) is tested against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def linear_cross_entropy_naive(h_ND: Tensor, weight_VD: Tensor, targets_N: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of ``h @ weight.T`` against ``targets``, skipping ``ignore_index`` rows."""
    logits_NV = h_ND @ weight_VD.T
    return F.cross_entropy(logits_NV.float(), targets_N, ignore_index=ignore_index)


def cross_entropy_rows_naive(
    logits_CV: Tensor, targets_C: Tensor, scale: Tensor, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """Per-row loss (fp32, 0 on ignored rows) and ``(softmax - onehot) * scale`` in the logits' dtype.

    The reference of the Triton kernel :func:`sasformer.ops.cross_entropy.kernel.cross_entropy_rows_`;
    a target outside [0, V) gives a NaN loss, as there.
    """
    x_CV = logits_CV.float()
    V = x_CV.shape[1]
    valid_C = targets_C != ignore_index
    in_range_C = (targets_C >= 0) & (targets_C < V)
    safe_C = torch.where(in_range_C, targets_C, 0)
    lse_C = torch.logsumexp(x_CV, dim=-1)
    loss_C = torch.where(in_range_C, lse_C - x_CV.gather(1, safe_C.unsqueeze(1)).squeeze(1), float("nan"))
    loss_C = torch.where(valid_C, loss_C, 0.0)
    onehot_CV = F.one_hot(safe_C, V).float() * in_range_C.unsqueeze(1)
    row_scale_C = torch.where(valid_C, scale.float().reshape(()), 0.0)
    grad_CV = (torch.softmax(x_CV, dim=-1) - onehot_CV) * row_scale_C.unsqueeze(1)
    return loss_C, grad_CV.to(logits_CV.dtype)
