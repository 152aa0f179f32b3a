"""``linear_split`` gives the outputs and gradients of the separate linear maps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sasformer.ops.linear import drop_concats, fused_groups, keep_concat, linear_split, linear_split_naive


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


def test_kept_concatenation_matches_and_follows_weight_changes():
    layers = [nn.Linear(13, n, bias=True) for n in (11, 5, 5)]
    x = torch.randn(3, 13)
    assert keep_concat(*layers) is True  # new storage
    kept = layers[0].__dict__["_kept_concat"].weight
    with torch.no_grad():
        for got, want in zip(linear_split(x, *layers), linear_split_naive(x, *layers)):
            torch.testing.assert_close(got, want)
        layers[1].weight.mul_(-2.0)  # in place: the next gradient-free call refreshes in place
        for got, want in zip(linear_split(x, *layers), linear_split_naive(x, *layers)):
            torch.testing.assert_close(got, want)
    assert layers[0].__dict__["_kept_concat"].weight is kept
    assert keep_concat(*layers) is False
    layers[2].weight = nn.Parameter(torch.randn(5, 13, dtype=torch.float64))  # another dtype: new storage
    layers[0].to(torch.float64), layers[1].to(torch.float64)
    assert keep_concat(*layers) is True
    drop_concats(nn.ModuleList(layers))
    assert "_kept_concat" not in layers[0].__dict__


def test_kept_concatenation_is_not_used_with_gradients():
    layers = [nn.Linear(6, n, bias=False) for n in (4, 3)]
    keep_concat(*layers)
    layers[0].__dict__["_kept_concat"].weight.zero_()  # a stale value a gradient-free call would refresh
    x = torch.randn(2, 6)
    outs = linear_split(x, *layers)  # gradients on: concatenated now, so gradients reach the parameters
    sum(o.sum() for o in outs).backward()
    assert layers[0].weight.grad is not None and layers[1].weight.grad is not None
    torch.testing.assert_close(outs[0], layers[0](x))


def test_fused_groups_are_what_the_modules_declare():
    from sasformer.models.decoder import DecoderLM
    from sasformer.models.presets import preset

    model = DecoderLM(preset("tiny", "mha"))
    groups = fused_groups(model)
    assert len(groups) == 2 * model.config.n_layers
    block = model.blocks[0]
    assert (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj) in groups
    assert (block.mlp.gate_proj, block.mlp.up_proj) in groups
