"""Parameter-holding modules for SAS head and feature simulation.

Weights are stored in the shapes of ``nn.Conv1d`` / ``nn.Linear`` (so the reference module's state
dict maps onto them one to one) and initialised as those modules initialise themselves; the math
lives in :mod:`sasformer.ops.simulate`. Each block has an ``impl`` attribute (None = automatic, or one
of ``simulate.IMPLS``) that picks the implementation; :func:`simulate_qk` runs a head block and a
feature block as one fused op.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sasformer.ops import simulate
from sasformer.ops.rope import RotaryTables


def _uniform_fan_in_(weight: Tensor, bias: Tensor, fan_in: int) -> None:
    # nn.Conv1d / nn.Linear default: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)
    nn.init.uniform_(bias, -bound, bound)


class HeadSimulation(nn.Module):
    """H heads -> H' simulated heads: a conv over the head axis plus a residual conv block."""

    def __init__(self, in_heads: int, out_heads: int, kernel_size: int) -> None:
        super().__init__()
        self.in_heads, self.out_heads, self.kernel_size = in_heads, out_heads, kernel_size
        self.impl: str | None = None
        self.w1 = nn.Parameter(torch.empty(out_heads, in_heads, kernel_size))
        self.b1 = nn.Parameter(torch.empty(out_heads))
        self.w2 = nn.Parameter(torch.empty(out_heads, out_heads, kernel_size))
        self.b2 = nn.Parameter(torch.empty(out_heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _uniform_fan_in_(self.w1, self.b1, self.in_heads * self.kernel_size)
        _uniform_fan_in_(self.w2, self.b2, self.out_heads * self.kernel_size)

    @torch.no_grad()
    def reset_identity(self) -> None:
        """Make the block copy heads: simulated head g*H + h equals input head h, for every group g."""
        self.w1.zero_(), self.b1.zero_(), self.w2.zero_(), self.b2.zero_()
        center = self.kernel_size // 2
        for o in range(self.out_heads):
            self.w1[o, o % self.in_heads, center] = 1.0

    def forward(self, x_BTHD: Tensor) -> Tensor:
        return simulate.simulate_heads(x_BTHD, self.w1, self.b1, self.w2, self.b2, impl=self.impl)

    def extra_repr(self) -> str:
        return f"{self.in_heads} -> {self.out_heads} heads, kernel_size={self.kernel_size}"


class FeatureSimulation(nn.Module):
    """D features -> D' simulated features: a linear map plus a residual MLP."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.impl: str | None = None
        self.w3 = nn.Parameter(torch.empty(out_dim, in_dim))
        self.b3 = nn.Parameter(torch.empty(out_dim))
        self.w4 = nn.Parameter(torch.empty(out_dim, out_dim))
        self.b4 = nn.Parameter(torch.empty(out_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _uniform_fan_in_(self.w3, self.b3, self.in_dim)
        _uniform_fan_in_(self.w4, self.b4, self.out_dim)

    @torch.no_grad()
    def reset_identity(self) -> None:
        """Copy the D input features into the first D outputs (the rest zero)."""
        self.w3.zero_(), self.b3.zero_(), self.w4.zero_(), self.b4.zero_()
        n = min(self.in_dim, self.out_dim)
        self.w3[:n, :n] = torch.eye(n)

    def forward(self, y_BTHD: Tensor) -> Tensor:
        return simulate.simulate_features(y_BTHD, self.w3, self.b3, self.w4, self.b4, impl=self.impl)

    def extra_repr(self) -> str:
        return f"{self.in_dim} -> {self.out_dim} features"


def simulate_qk(
    heads: HeadSimulation, features: FeatureSimulation, x_BTHD: Tensor, rotary: RotaryTables | None = None
) -> Tensor:
    """``features(heads(x))``, then RoPE with ``rotary`` if given, as one op (fused on the Triton
    path); the head block's ``impl`` decides the implementation."""
    rope = rotary(features.out_dim) if rotary is not None else None
    return simulate.simulate_qk(
        x_BTHD, heads.w1, heads.b1, heads.w2, heads.b2,
        features.w3, features.b3, features.w4, features.b4, impl=heads.impl, rope=rope,
    )


def _bias_free(proj: nn.Linear) -> None:
    if proj.bias is not None:
        raise ValueError("a projection folded into the head simulation must have no bias")


def simulate_qk_projected(
    heads: HeadSimulation, features: FeatureSimulation, proj: nn.Linear, x_BTd: Tensor,
    rotary: RotaryTables | None = None,
) -> Tensor:
    """:func:`simulate_qk` of the heads ``proj(x)``, the projection folded into the first head convolution
    where the implementation does that (:func:`sasformer.ops.simulate.simulate_qk_projected`)."""
    _bias_free(proj)
    rope = rotary(features.out_dim) if rotary is not None else None
    return simulate.simulate_qk_projected(
        x_BTd, proj.weight, heads.w1, heads.b1, heads.w2, heads.b2,
        features.w3, features.b3, features.w4, features.b4, impl=heads.impl, rope=rope,
    )


def simulate_heads_projected(heads: HeadSimulation, proj: nn.Linear, x_BTd: Tensor) -> Tensor:
    """``heads(proj(x))``, folded where the implementation does that."""
    _bias_free(proj)
    return simulate.simulate_heads_projected(x_BTd, proj.weight, heads.w1, heads.b1, heads.w2, heads.b2,
                                             impl=heads.impl)


def set_simulation_impl(module: nn.Module, impl: str | None) -> None:
    """Pick the simulation implementation (None = automatic) for every simulation block in ``module``."""
    if impl is not None and impl not in simulate.IMPLS:
        raise ValueError(f"impl={impl!r} is not a simulation implementation; choose one of {simulate.IMPLS}")
    for block in module.modules():
        if isinstance(block, (HeadSimulation, FeatureSimulation)):
            block.impl = impl


def head_simulation_flops(in_heads: int, out_heads: int, kernel_size: int, dim: int) -> float:
    """Per token: both convolutions over ``dim`` positions (2 FLOPs per multiply-add)."""
    return 2.0 * dim * kernel_size * out_heads * (in_heads + out_heads)


def feature_simulation_flops(heads: int, in_dim: int, out_dim: int) -> float:
    return 2.0 * heads * out_dim * (in_dim + out_dim)
