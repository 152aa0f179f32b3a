"""Several linear maps of one input as one matmul, with the parameters left where they are.

``linear_split(x, q_proj, k_proj, v_proj)`` computes ``x @ cat(W_q, W_k, W_v).T`` and splits the
result: one GEMM with a wide output instead of three narrow ones (and one in each direction of the
backward), while every ``nn.Linear`` keeps its own weight, so parameter names, the state dict,
checkpoints and exports do not change. Concatenating the weights costs one small copy per call
(fused with the autocast cast under ``torch.compile``). The reference is :func:`linear_split_naive`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def concat_linear(*layers: nn.Linear) -> tuple[Tensor, Tensor | None]:
    """The weights (sum of out_features, in_features) and biases of ``layers`` stacked as one linear map."""
    if not layers:
        raise ValueError("concat_linear needs at least one nn.Linear")
    biases = [layer.bias for layer in layers]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        raise ValueError("concatenated linear maps need all layers with a bias or all without one")
    weight = torch.cat([layer.weight for layer in layers])
    return weight, None if biases[0] is None else torch.cat(biases)


def linear_split(x: Tensor, *layers: nn.Linear) -> tuple[Tensor, ...]:
    """``tuple(layer(x) for layer in layers)`` computed as one ``F.linear``; outputs are views of one buffer."""
    if len(layers) == 1:
        return (layers[0](x),)
    weight, bias = concat_linear(*layers)
    return F.linear(x, weight, bias).split([layer.out_features for layer in layers], dim=-1)


def linear_split_naive(x: Tensor, *layers: nn.Linear) -> tuple[Tensor, ...]:
    """Reference of :func:`linear_split`: one matmul per layer."""
    return tuple(layer(x) for layer in layers)
