"""Tensor product attention (Zhang et al., 2025).

Each token's query, key and value are low-rank sums of outer products of a head factor A(x) (H per
rank) and a feature factor B(x) (D per rank), divided by the rank:

    q_t = (1 / R_q) * sum_r  A_q(x_t)[r, :]^T  (x)  B_q(x_t)[r, :]        (H x D)

RoPE is applied to the feature factors of queries and keys (a rotation commutes with the head mix).
The cache holds the factors of keys and values: R_k (H + D) + R_v (H + D) numbers per token.

Initialisation: q is a product of two maps of x, so if both were drawn like MHA's projections its
variance would be the square of MHA's, divided by R. The feature factors B are ordinary projections
(``nn.Linear``, re-drawn by the model's normal(0, init_std) like MHA's q/k/v maps); the head factors
A are :class:`HeadFactor` maps that keep their own initialisation, drawn so that each A(x)[h, r] has
variance R on unit-variance input. Then Var(q) = Var(A) Var(B) / R = Var(B): MHA's at any init_std.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sasformer.layers.base import (
    Attention,
    AttentionArgs,
    AttentionContext,
    attention_core_flops,
    linear_flops,
    require,
)
from sasformer.ops.attention import attend


@dataclass
class TPAArgs(AttentionArgs):
    n_heads: int = 12
    head_dim: int | None = None  # None: d_model // n_heads
    q_rank: int = 6
    k_rank: int = 2
    v_rank: int = 2

    def validate(self, d_model: int) -> None:
        require(self.n_heads >= 1, f"n_heads={self.n_heads} must be >= 1")
        if self.head_dim is None:
            require(
                d_model % self.n_heads == 0,
                f"d_model={d_model} must be divisible by n_heads={self.n_heads}, or set head_dim",
            )
            self.head_dim = d_model // self.n_heads
        require(self.head_dim >= 2 and self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even (RoPE)")
        for name in ("q_rank", "k_rank", "v_rank"):
            require(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")


class HeadFactor(nn.Module):
    """The head factors of one of q, k, v: a bias-free linear map d_model -> H * R, weight (H * R, d_model).

    Not an ``nn.Linear`` on purpose, so that the model's initialisation of projections leaves it alone
    (see the module docstring); the state-dict key (``weight``) is the one an ``nn.Linear`` would have.
    """

    def __init__(self, in_features: int, n_heads: int, rank: int) -> None:
        super().__init__()
        self.in_features, self.n_heads, self.rank = in_features, n_heads, rank
        self.weight = nn.Parameter(torch.empty(n_heads * rank, in_features))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Var(A) = in_features * std^2 = R: the 1/R mean of R products then keeps B's variance
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std())

    def init_std(self) -> float:
        return math.sqrt(self.rank / self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, n_heads={self.n_heads}, rank={self.rank}"


class TensorProductAttention(Attention):
    Args = TPAArgs
    args: TPAArgs
    init_rule = "head factors at MHA's q/k/v variance"  # "standard" before: q, k, v started far smaller

    def __init__(self, d_model: int, args: TPAArgs) -> None:
        super().__init__(d_model, args)
        H, D = args.n_heads, args.head_dim
        self.n_heads, self.head_dim = H, D
        self.ranks = {"q": args.q_rank, "k": args.k_rank, "v": args.v_rank}
        self.head_factors = nn.ModuleDict({n: HeadFactor(d_model, H, r) for n, r in self.ranks.items()})
        self.feature_factors = nn.ModuleDict({n: nn.Linear(d_model, r * D, bias=False) for n, r in self.ranks.items()})
        self.o_proj = nn.Linear(H * D, d_model, bias=False)
        self.rope_dims = (D,)

    def factors(self, name: str, x_BTd: Tensor) -> tuple[Tensor, Tensor]:
        """A (B, T, H, R) and B (B, T, R, D) for one of q, k, v."""
        B, T, _ = x_BTd.shape
        r = self.ranks[name]
        a = self.head_factors[name](x_BTd).view(B, T, self.n_heads, r)
        b = self.feature_factors[name](x_BTd).view(B, T, r, self.head_dim)
        return a, b

    @staticmethod
    def contract(a_BTHR: Tensor, b_BTRD: Tensor) -> Tensor:
        return torch.matmul(a_BTHR, b_BTRD) / a_BTHR.shape[-1]  # (B, T, H, D)

    def forward(self, x_BTd: Tensor, ctx: AttentionContext) -> Tensor:
        B, T, _ = x_BTd.shape
        a_q, b_q = self.factors("q", x_BTd)
        a_k, b_k = self.factors("k", x_BTd)
        a_v, b_v = self.factors("v", x_BTd)
        b_q, b_k = ctx.rotary.rotate(b_q), ctx.rotary.rotate(b_k)
        if ctx.cache is not None:
            full = ctx.cache.append(a_k=a_k, b_k=b_k, a_v=a_v, b_v=b_v)
            a_k, b_k, a_v, b_v = full["a_k"], full["b_k"], full["a_v"], full["b_v"]
        q, k, v = self.contract(a_q, b_q), self.contract(a_k, b_k), self.contract(a_v, b_v)
        o = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ctx.mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))

    def forward_flops_per_token(self, context_len: float) -> float:
        H, D, d = self.n_heads, self.head_dim, self.d_model
        flops = linear_flops(H * D, d) + attention_core_flops(H, D, D, context_len)
        for r in self.ranks.values():
            flops += linear_flops(d, H * r) + linear_flops(d, r * D) + 2.0 * H * r * D
        return flops

    def cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        H, D = self.n_heads, self.head_dim
        return (self.ranks["k"] + self.ranks["v"]) * (H + D) * dtype.itemsize
