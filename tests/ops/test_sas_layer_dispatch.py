"""A whole SAS layer computes the same output and gradients whichever simulation path runs."""

from __future__ import annotations

import pytest
import torch

from sasformer.layers.base import AttentionContext
from sasformer.layers.sas import SASArgs, SimulatedAttention
from sasformer.layers.simulation import set_simulation_impl
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
    [(impl, *c) for impl in ("matmul", "banded", "chunked") for c in CASES]
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
