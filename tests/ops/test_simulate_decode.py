"""The decode-size simulation ops against the plain reference, at odd sizes in fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sasformer.ops.rope import apply_rope
from sasformer.ops.simulate.decode import (
    conv_operands,
    first_conv,
    fold_projection,
    residual_conv,
    residual_features,
    rope_stacked,
)
from sasformer.ops.simulate.naive import simulate_features_naive, simulate_heads_naive

TOL = dict(atol=1e-5, rtol=1e-5)


def _head_weights(G: int, H: int, Hs: int, k: int) -> list[tuple[torch.Tensor, ...]]:
    return [(torch.randn(Hs, H, k) / (H * k) ** 0.5, torch.randn(Hs), torch.randn(Hs, Hs, k) / (Hs * k) ** 0.5,
             torch.randn(Hs)) for _ in range(G)]


def _feature_weights(G: int, D: int, E: int) -> list[tuple[torch.Tensor, ...]]:
    return [(torch.randn(E, D) / D**0.5, torch.randn(E), torch.randn(E, E) / E**0.5, torch.randn(E))
            for _ in range(G)]


@pytest.mark.parametrize("N", [1, 7, 63])
@pytest.mark.parametrize(("H", "Hs", "D", "E", "k"), [(3, 6, 5, 7, 3), (2, 6, 7, 4, 1), (4, 8, 6, 10, 5)])
def test_stacked_simulation_equals_naive(N: int, H: int, Hs: int, D: int, E: int, k: int) -> None:
    G = 3
    heads = _head_weights(G, H, Hs, k)
    feats = _feature_weights(G, D, E)
    x_GNHD = torch.randn(G, N, H, D)
    ops = [conv_operands(*w, D) for w in heads]
    m1, b1, m2, b2 = (torch.stack(t) for t in zip(*ops))
    y2 = residual_conv(first_conv(x_GNHD.reshape(G, N, H * D), m1, b1), m2, b2)
    w3t, b3, w4t, b4 = (torch.stack([f[0].t() for f in feats]), torch.stack([f[1] for f in feats]),
                        torch.stack([f[2].t() for f in feats]), torch.stack([f[3] for f in feats]))
    z = residual_features(y2.reshape(G, N * Hs, D), w3t, b3, w4t, b4).view(G, N, Hs, E)
    for g in range(G):
        ref_y = simulate_heads_naive(x_GNHD[g].unsqueeze(0), *heads[g])[0]
        torch.testing.assert_close(y2[g].view(N, Hs, D), ref_y, **TOL)
        torch.testing.assert_close(z[g], simulate_features_naive(ref_y, *feats[g]), **TOL)


@pytest.mark.parametrize("N", [1, 7])
def test_folded_projection_and_expanded_input(N: int) -> None:
    d, H, Hs, D = 13, 3, 9, 5
    w_proj = torch.randn(H * D, d) / d**0.5
    w = _head_weights(1, H, Hs, 3)[0]
    m1, b1, m2, b2 = conv_operands(*w, D)
    x = torch.randn(N, d)
    # the same input for two stacked members, read through a stride-0 view
    folded = fold_projection(w_proj, m1)
    y2 = residual_conv(first_conv(x.expand(2, N, d), torch.stack([folded, folded]), torch.stack([b1, b1])),
                       torch.stack([m2, m2]), torch.stack([b2, b2]))
    ref = simulate_heads_naive(F.linear(x, w_proj).view(1, N, H, D), *w)[0]
    torch.testing.assert_close(y2[0].view(N, Hs, D), ref, **TOL)
    # each member read the whole input through the stride-0 view; equal up to rounding, since the batched
    # GEMM may not run its members through the same kernel (a loaded 2-core CPU gave a bit of difference)
    torch.testing.assert_close(y2[1], y2[0], **TOL)


@pytest.mark.parametrize("B", [1, 3])
def test_rope_stacked_equals_apply_rope(B: int) -> None:
    G, T, H, E = 2, 7, 3, 10
    z = torch.randn(G, B, T, H, E)
    cos, sin = torch.randn(B, T, E), torch.randn(B, T, E)
    out = rope_stacked(z, cos, sin)
    for g in range(G):
        torch.testing.assert_close(out[g], apply_rope(z[g], cos, sin), **TOL)


def test_conv_operands_are_exact_copies_in_bf16() -> None:
    w = tuple(t.bfloat16() for t in _head_weights(1, 3, 6, 3)[0])
    m1, b1, m2, b2 = conv_operands(*w, 5)
    assert m1.dtype == torch.bfloat16 and m1.shape == (15, 30) and m2.shape == (30, 30)
    # every nonzero entry is a weight, unchanged
    assert set(m1[m1 != 0].tolist()) <= set(w[0].flatten().tolist())
    assert torch.equal(b2.view(6, 5)[:, 0], w[3])
