"""Properties every attention variant must have, on odd sizes."""

from __future__ import annotations

import pytest
import torch

from sasformer.layers.registry import build_attention
from tests.layers.helpers import D_MODEL, VARIANTS, context

NAMES = list(VARIANTS)


def make(name: str, dtype=torch.float32):
    variant, args = VARIANTS[name]
    return build_attention(variant, D_MODEL, dict(args)).to(dtype)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T", [1, 7, 63])
def test_shape_and_finite(name, T):
    layer = make(name)
    x = torch.randn(2, T, D_MODEL)
    y = layer(x, context(2, T))
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name):
    layer = make(name)
    x = torch.randn(2, 7, D_MODEL, requires_grad=True)
    layer(x, context(2, 7)).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for pname, p in layer.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"


@pytest.mark.parametrize("name", NAMES)
def test_no_information_from_future_tokens(name):
    layer = make(name)
    T, cut = 11, 6
    x = torch.randn(1, T, D_MODEL)
    x2 = x.clone()
    x2[:, cut:] = torch.randn(1, T - cut, D_MODEL)
    y, y2 = layer(x, context(1, T)), layer(x2, context(1, T))
    torch.testing.assert_close(y[:, :cut], y2[:, :cut], rtol=0, atol=1e-6)
    assert not torch.allclose(y[:, cut:], y2[:, cut:])


@pytest.mark.parametrize("name", NAMES)
def test_left_padding_matches_unpadded(name):
    layer = make(name)
    T, pad = 9, 4
    x = torch.randn(1, T, D_MODEL)
    padded = torch.cat((torch.randn(1, pad, D_MODEL), x), dim=1)
    key_padding = torch.cat((torch.zeros(1, pad), torch.ones(1, T)), dim=1)
    y_ref = layer(x, context(1, T))
    y_pad = layer(padded, context(1, T + pad, key_padding))
    torch.testing.assert_close(y_pad[:, pad:], y_ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(y_pad).all()


@pytest.mark.parametrize("name", NAMES)
def test_bf16_close_to_fp32(name):
    layer = make(name)
    x = torch.randn(2, 7, D_MODEL)
    y32 = layer(x, context(2, 7))
    y16 = make(name, torch.bfloat16)
    y16.load_state_dict({k: v.to(torch.bfloat16) for k, v in layer.state_dict().items()})
    out = y16(x.to(torch.bfloat16), context(2, 7))
    assert out.dtype == torch.bfloat16
    rel = (out.float() - y32).norm() / y32.norm()
    assert rel < 3e-2, f"bf16 relative error {rel:.3g}"


@pytest.mark.parametrize("name", NAMES)
def test_cache_bytes_per_token_matches_stored(name):
    from sasformer.layers.base import LayerCache

    layer = make(name)
    ctx = context(2, 5)
    ctx.cache = LayerCache()
    layer(torch.randn(2, 5, D_MODEL), ctx)
    assert ctx.cache.nbytes_per_token() == layer.cache_bytes_per_token(torch.float32)
