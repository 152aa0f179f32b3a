"""``linear_split`` gives the outputs and gradients of the separate linear maps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sasformer.ops.linear import linear_split, linear_split_naive


@pytest.mark.parametrize("T", [1, 7, 63])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_separate_linears(T, bias):
    layers = [nn.Linear(13, n, bias=bias) for n in (11, 5, 5)]
    x = torch.randn(2, T, 13, requires_grad=True)
    params = [x] + [p for layer in layers for p in layer.parameters()]
    upstream = [torch.randn(2, T, layer.out_features) for layer in layers]
    results = []
    for fn in (linear_split, linear_split_naive):
        outs = fn(x, *layers)
        grads = torch.autograd.grad(sum((o * u).sum() for o, u in zip(outs, upstream)), params)
        results.append((outs, grads))
    (got, got_grads), (want, want_grads) = results
    for g, w in zip(got + got_grads, want + want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_matches_separate_linears():
    layers = [nn.Linear(24, n, bias=False) for n in (16, 8)]
    x = torch.randn(7, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = linear_split(x, *layers), linear_split_naive(x, *layers)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.bfloat16
        torch.testing.assert_close(g, w)


def test_one_layer_and_bad_input():
    layer = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    torch.testing.assert_close(linear_split(x, layer)[0], layer(x))
    with pytest.raises(ValueError, match="at least one"):
        linear_split(x)
    with pytest.raises(ValueError, match="all layers with a bias"):
        linear_split(x, layer, nn.Linear(4, 2, bias=False))
