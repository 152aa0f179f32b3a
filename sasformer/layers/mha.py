"""Multi-head attention with grouped key/value heads: MHA, GQA and MQA in one module.

    MHA  n_kv_heads = n_heads     q: h0 h1 h2 h3   kv: h0 h1 h2 h3
    GQA  1 < n_kv_heads < n_heads  q: h0 h1 h2 h3   kv: g0 g0 g1 g1   (groups of n_heads / n_kv_heads)
    MQA  n_kv_heads = 1           q: h0 h1 h2 h3   kv: g0 g0 g0 g0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
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
from sasformer.ops.linear import linear_fused
from sasformer.ops.rope_qkv import rope_qkv


@dataclass
class MHAArgs(AttentionArgs):
    n_heads: int = 12
    n_kv_heads: int | None = None  # None: = n_heads (MHA)
    head_dim: int | None = None  # None: d_model // n_heads

    def validate(self, d_model: int) -> None:
        require(self.n_heads >= 1, f"n_heads={self.n_heads} must be >= 1")
        if self.head_dim is None:
            require(
                d_model % self.n_heads == 0,
                f"d_model={d_model} must be divisible by n_heads={self.n_heads}, or set head_dim",
            )
            self.head_dim = d_model // self.n_heads
        require(self.head_dim >= 2 and self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even (RoPE)")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        require(
            1 <= self.n_kv_heads <= self.n_heads and self.n_heads % self.n_kv_heads == 0,
            f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}",
        )


class MultiHeadAttention(Attention):
    """Causal self-attention with ``n_heads`` query heads sharing ``n_kv_heads`` key/value heads."""

    Args = MHAArgs
    args: MHAArgs

    def __init__(self, d_model: int, args: MHAArgs) -> None:
        super().__init__(d_model, args)
        H, Hkv, D = args.n_heads, args.n_kv_heads, args.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, Hkv, D
        self.q_proj = nn.Linear(d_model, H * D, bias=False)
        self.k_proj = nn.Linear(d_model, Hkv * D, bias=False)
        self.v_proj = nn.Linear(d_model, Hkv * D, bias=False)
        self.o_proj = nn.Linear(H * D, d_model, bias=False)
        self.rope_dims = (D,)

    def fused_linear_groups(self) -> list[tuple[nn.Linear, ...]]:
        """The maps :func:`linear_fused` runs as one (a decoder keeps their concatenation)."""
        return [(self.q_proj, self.k_proj, self.v_proj)]

    def forward(self, x_BTd: Tensor, ctx: AttentionContext) -> Tensor:
        B, T, _ = x_BTd.shape
        qkv = linear_fused(x_BTd, self.q_proj, self.k_proj, self.v_proj)
        cos, sin = ctx.rotary(self.head_dim)
        q, k, v = rope_qkv(qkv, cos, sin, self.n_heads, self.n_kv_heads)
        if ctx.cache is not None:
            full = ctx.cache.append(k=k, v=v)
            k, v = full["k"], full["v"]
        o = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ctx.mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))

    def forward_flops_per_token(self, context_len: float) -> float:
        H, Hkv, D, d = self.n_heads, self.n_kv_heads, self.head_dim, self.d_model
        proj = linear_flops(d, H * D) + 2 * linear_flops(d, Hkv * D) + linear_flops(H * D, d)
        return proj + attention_core_flops(H, D, D, context_len)

    def cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        return 2 * self.n_kv_heads * self.head_dim * dtype.itemsize
