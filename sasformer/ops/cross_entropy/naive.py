"""Plain-PyTorch reference of the LM-head cross-entropy: full logits, fp32 softmax.

The fused chunked version (:mod:`sasformer.ops.cross_entropy.chunked`) is tested against it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def linear_cross_entropy_naive(h_ND: Tensor, weight_VD: Tensor, targets_N: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of ``h @ weight.T`` against ``targets``, skipping ``ignore_index`` rows."""
    logits_NV = h_ND @ weight_VD.T
    return F.cross_entropy(logits_NV.float(), targets_N, ignore_index=ignore_index)
