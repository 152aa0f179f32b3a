"""A whole SAS layer computes the same output and gradients whichever simulation path runs."""

from __future__ import annotations

import pytest
import torch

from sasformer.layers.base import AttentionContext, LayerCache
from sasformer.layers.sas import SASArgs, SimulatedAttention
from sasformer.layers.simulation import set_simulation_impl
from sasformer.ops import simulate as simulate_ops
from sasformer.ops.rope import RotaryTables


def run_layer(layer: SimulatedAttention, x: torch.Tensor, impl: str):
    set_simulation_impl(layer, impl)
    layer.zero_grad()
    ctx = AttentionContext(RotaryTables(torch.arange(x.shape[1]).view(1, -1), 10000.0))
    out = layer(x, ctx)
    out.pow(2).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}


CASES = [(1, 3, 3, True), (7, 1, 5, True), (63, 3, 1, False)]


# the interpreter is slow: the kernels get the short sequences (the ops tests cover 63 tokens)
@pytest.mark.parametrize(
    "impl,T,n_kv_heads,kernel_size,simulate_v",
    [(impl, *c) for impl in simulate_ops.PYTORCH_FAST_IMPLS for c in CASES]
    + [("triton", *c) for c in CASES[:2]] + [("triton", 5, 3, 1, False)],
)
def test_layer_fast_equals_naive(impl, T, n_kv_heads, kernel_size, simulate_v):
    if impl == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(T)
    args = SASArgs(n_heads=3, n_kv_heads=n_kv_heads, n_sim_heads=6, sim_head_dim=10,
                   kernel_size=kernel_size, simulate_v=simulate_v)
    # the kernels accumulate in fp32, so they are checked in fp32; the PyTorch path in fp64
    dtype = torch.float32 if impl == "triton" else torch.float64
    layer = SimulatedAttention(24, args).to(dtype)
    x = torch.randn(2, T, 24, dtype=dtype)
    ref_out, ref_grads = run_layer(layer, x, "naive")
    out, grads = run_layer(layer, x, impl)
    tol = 1e-4 if impl == "triton" else 1e-10
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=tol, rtol=tol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_set_simulation_impl_rejects_unknown():
    layer = SimulatedAttention(24, SASArgs(n_heads=3))
    with pytest.raises(ValueError, match="impl"):
        set_simulation_impl(layer, "cuda")


@pytest.mark.parametrize("impl", simulate_ops.FOLDING_IMPLS)
@pytest.mark.parametrize(("rope", "cached", "n_kv_heads", "folded"),
                         [("after", False, 3, 3), ("none", False, 3, 3), ("after", False, 1, 1),
                          ("before", False, 3, 0), ("after", True, 3, 0)])
def test_layer_folds_the_projections_only_where_it_can(impl, rope, cached, n_kv_heads, folded, monkeypatch):
    # folding needs the input to reach the first convolution unchanged (no RoPE between) and no cache of
    # the compact K, V, and it is taken where it saves FLOPs (an MQA base: queries only); where it runs,
    # the layer equals the naive one (test above) and the unfolded banded one
    calls = []
    for name in (f"simulate_qk_{impl}_folded", f"simulate_heads_{impl}_folded"):
        original = getattr(simulate_ops, name)
        monkeypatch.setattr(simulate_ops, name, lambda *a, _f=original: (calls.append(1), _f(*a))[1])
    torch.manual_seed(0)
    args = SASArgs(n_heads=3, n_kv_heads=n_kv_heads, n_sim_heads=6, sim_head_dim=10, rope=rope)
    layer = SimulatedAttention(24, args).double()
    set_simulation_impl(layer, impl)
    x = torch.randn(2, 33, 24, dtype=torch.float64)  # 66 tokens: enough for the fold to pay (above 48)
    positions = torch.arange(33).view(1, -1)
    ctx = AttentionContext(RotaryTables(positions, 10000.0), cache=LayerCache() if cached else None,
                           key_positions=positions)
    out = layer(x, ctx)
    assert len(calls) == folded
    monkeypatch.setattr(simulate_ops, "folds_projection", lambda impl, x: False)  # projections run first
    ctx = AttentionContext(RotaryTables(positions, 10000.0), cache=LayerCache() if cached else None,
                           key_positions=positions)
    torch.testing.assert_close(out, layer(x, ctx), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("impl", [None, "banded", "blocked"])
def test_layer_runs_on_the_meta_device(impl):
    # shape-only runs (parameter counting, FLOP counting) build and call models on the meta device, where
    # autocast is not available
    with torch.device("meta"):
        layer = SimulatedAttention(24, SASArgs(n_heads=3))
        set_simulation_impl(layer, impl)
        ctx = AttentionContext(RotaryTables(torch.arange(5).view(1, -1), 10000.0))
        assert layer(torch.zeros(2, 5, 24), ctx).shape == (2, 5, 24)
