"""The fused forward kernel on weights prepared in advance (decode_fused) against the plain reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from sasformer.ops.rope import apply_rope
from sasformer.ops.simulate import fused
from sasformer.ops.simulate.decode_fused import prepare_simulation, simulate_prepared, simulate_prepared_op
from sasformer.ops.simulate.naive import simulate_features_naive, simulate_heads_naive

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {"atol": 1e-5, "rtol": 1e-5}


def weights(H: int, HS: int, k: int, D: int, DS: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(H + 10 * HS + 100 * k + 1000 * D)
    shapes = [(HS, H, k), (HS,), (HS, HS, k), (HS,), (DS, D), (DS,), (DS, DS), (DS,)]
    fans = [H * k, H * k, HS * k, HS * k, D, D, DS, DS]
    return [(torch.randn(s, generator=g) / f**0.5).to(DEVICE) for s, f in zip(shapes, fans)]


def nan_empty(*shape, **kwargs) -> torch.Tensor:
    size = shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape
    return torch.full(size, float("nan"), **kwargs)


def strided_input(B: int, T: int, H: int, D: int) -> torch.Tensor:
    """(B*T, H, D) as the middle slice of a wider row, the way a fused projection's output is read."""
    wide = torch.randn(B * T, 3 * H * D, device=DEVICE)
    return wide[:, H * D : 2 * H * D].view(B * T, H, D)


@pytest.mark.parametrize("B,T", [(1, 1), (2, 3), (1, 7)])
@pytest.mark.parametrize("H,HS,k,D,DS", [(3, 6, 3, 8, 12), (1, 3, 1, 5, 6), (2, 4, 5, 7, 10)])
@pytest.mark.parametrize("table_rows", [1, "B"])
@torch.no_grad()
def test_qk_with_rope_matches_reference(B, T, H, HS, k, D, DS, table_rows, monkeypatch):
    monkeypatch.setattr(fused, "_empty", nan_empty)  # an unwritten element fails the comparison
    w = weights(H, HS, k, D, DS)
    x = strided_input(B, T, H, D)
    rows = B if table_rows == "B" else 1
    cos, sin = torch.randn(rows, T, DS, device=DEVICE), torch.randn(rows, T, DS, device=DEVICE)
    prepared = prepare_simulation(*w, head_dim=D, rope=True)
    got = simulate_prepared(x, prepared, T, (cos, sin)).view(B, T, HS, DS)
    ref = simulate_features_naive(simulate_heads_naive(x.reshape(B, T, H, D), *w[:4]), *w[4:])
    torch.testing.assert_close(got, apply_rope(ref, cos, sin), **TOL)
    # the same operands without the rotation
    torch.testing.assert_close(simulate_prepared(x, prepared).view(B, T, HS, DS), ref, **TOL)


@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float64])
@torch.no_grad()
def test_rope_tables_in_their_own_dtype(table_dtype, monkeypatch):
    # a bf16 model's tables are bf16: the kernel converts what it loads, as apply_rope does
    monkeypatch.setattr(fused, "_empty", nan_empty)
    B, T, H, HS, k, D, DS = 2, 3, 3, 6, 3, 8, 12
    w = weights(H, HS, k, D, DS)
    x = strided_input(B, T, H, D)
    cos, sin = (torch.randn(1, T, DS, device=DEVICE).to(table_dtype) for _ in range(2))
    got = simulate_prepared(x, prepare_simulation(*w, head_dim=D, rope=True), T, (cos, sin)).view(B, T, HS, DS)
    ref = simulate_features_naive(simulate_heads_naive(x.reshape(B, T, H, D), *w[:4]), *w[4:])
    torch.testing.assert_close(got, apply_rope(ref, cos, sin), **TOL)


@pytest.mark.parametrize("N", [1, 7, 63])
@pytest.mark.parametrize("H,HS,k,D", [(3, 6, 3, 8), (2, 6, 1, 7)])
@torch.no_grad()
def test_heads_only_matches_reference(N, H, HS, k, D, monkeypatch):
    monkeypatch.setattr(fused, "_empty", nan_empty)
    w = weights(H, HS, k, D, 4)[:4]
    x = strided_input(1, N, H, D)
    got = simulate_prepared(x, prepare_simulation(*w, head_dim=D))
    torch.testing.assert_close(got, simulate_heads_naive(x.reshape(1, N, H, D), *w).view(N, HS, D), **TOL)


def test_forward_only_and_bad_arguments_are_refused():
    w = weights(3, 6, 3, 8, 12)
    prepared = prepare_simulation(*w, head_dim=8)
    x = torch.randn(2, 3, 8, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="forward only"):
        simulate_prepared(x, prepared)
    with torch.no_grad():
        tables = (torch.ones(1, 2, 12, device=DEVICE), torch.zeros(1, 2, 12, device=DEVICE))
        with pytest.raises(ValueError, match="without rope=True"):
            simulate_prepared(x, prepared, 2, tables)
        with pytest.raises(ValueError, match="for these prepared weights"):
            simulate_prepared(torch.randn(2, 4, 8, device=DEVICE), prepared)  # H = 4, prepared for 3
        with pytest.raises(ValueError, match="do not fit"):  # the launch checks the padded shapes itself
            fused.launch_forward(torch.randn(2, 3, 40, device=DEVICE), prepared.weights, 6, 12)
        with pytest.raises(ValueError, match="dtype"):
            simulate_prepared(torch.randn(2, 3, 8, device=DEVICE, dtype=torch.float16), prepared)
    with pytest.raises(ValueError, match="feature MLP"):
        prepare_simulation(*w[:4], head_dim=8, rope=True)


def test_prepared_op_passes_opcheck():
    # schema, fake implementation (what torch.compile traces) and the real one agree
    w = weights(3, 6, 3, 8, 12)
    prepared = prepare_simulation(*w, head_dim=8, rope=True)
    x = torch.randn(4, 3, 8, device=DEVICE)
    cos, sin = torch.randn(1, 2, 12, device=DEVICE), torch.randn(1, 2, 12, device=DEVICE)
    torch.library.opcheck(simulate_prepared_op, (x, prepared.weights, prepared.rot, cos, sin, 6, 12, 2))
    heads = prepare_simulation(*w[:4], head_dim=8)
    torch.library.opcheck(simulate_prepared_op, (x, heads.weights, None, None, None, 6, None, 1))
