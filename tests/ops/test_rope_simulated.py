"""The simulation paths' RoPE against the generic ``apply_rope``."""

from __future__ import annotations

import pytest
import torch

from sasformer.ops.rope import RotaryTables, apply_rope
from sasformer.ops.simulate.rotate import rope_simulated


def check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fn=rope_simulated) -> None:
    x = x.detach().requires_grad_()
    ref = apply_rope(x, cos, sin)
    out = fn(x, cos, sin)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    grad = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(ref, x, grad)[0],
                               atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("B,T,H,D,per_batch", [(1, 1, 1, 2, False), (2, 7, 3, 10, True), (3, 63, 5, 18, False)])
def test_rope_simulated_equals_apply_rope(B, T, H, D, per_batch):
    positions = torch.randint(0, 100, (B if per_batch else 1, T))
    cos, sin = (t.double() for t in RotaryTables(positions, 10000.0)(D))
    check(torch.randn(B, T, H, D, dtype=torch.float64), cos, sin)


def test_rope_simulated_arbitrary_tables():
    # tables whose halves differ: the per-half formula must not assume the rotate-half structure
    B, T, H, D = 2, 5, 3, 8
    check(torch.randn(B, T, H, D, dtype=torch.float64), torch.randn(B, T, D, dtype=torch.float64),
          torch.randn(1, T, D, dtype=torch.float64).expand(B, T, D))


def test_rope_simulated_compiles_into_one_graph():
    torch._dynamo.reset()
    positions = torch.arange(7).view(1, -1)
    cos, sin = (t.double() for t in RotaryTables(positions, 10000.0)(6))
    check(torch.randn(2, 7, 3, 6, dtype=torch.float64), cos, sin,
          fn=torch.compile(rope_simulated, backend="aot_eager", fullgraph=True))


def test_rope_simulated_rejects_odd_size():
    with pytest.raises(ValueError, match="even"):
        rope_simulated(torch.randn(1, 2, 3, 5), torch.randn(1, 2, 5), torch.randn(1, 2, 5))
