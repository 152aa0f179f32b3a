"""Multi-head latent attention (DeepSeek-V2).

Queries go through a low-rank bottleneck (``q_lora_rank``; 0 = a full-rank projection). Keys and
values are compressed jointly into a ``kv_lora_rank`` latent c_kv, from which per-head "nope" keys and
values are re-expanded; position enters through a decoupled RoPE key of ``qk_rope_head_dim`` that is
shared by all heads. The cache holds only c_kv and the rotated shared key.

    x --q_down--> c_q --norm--q_up--> [q_nope | q_rope] (H heads)       q_rope, k_rope get RoPE
    x --kv_down--> [c_kv | k_rope]  c_kv --norm--kv_up--> [k_nope | v] (H heads)
    k = [k_nope | k_rope (broadcast to H heads)]
"""

from __future__ import annotations

import math
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


@dataclass
class MLAArgs(AttentionArgs):
    n_heads: int = 12
    q_lora_rank: int = 512  # 0: full-rank query projection
    kv_lora_rank: int = 256
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    norm_eps: float = 1e-6

    def validate(self, d_model: int) -> None:
        require(self.n_heads >= 1, f"n_heads={self.n_heads} must be >= 1")
        require(self.q_lora_rank >= 0, f"q_lora_rank={self.q_lora_rank} must be >= 0 (0 = full-rank query)")
        require(self.kv_lora_rank >= 1, f"kv_lora_rank={self.kv_lora_rank} must be >= 1")
        require(self.qk_nope_head_dim >= 0, f"qk_nope_head_dim={self.qk_nope_head_dim} must be >= 0")
        require(
            self.qk_rope_head_dim >= 2 and self.qk_rope_head_dim % 2 == 0,
            f"qk_rope_head_dim={self.qk_rope_head_dim} must be even and >= 2",
        )
        require(self.v_head_dim >= 1, f"v_head_dim={self.v_head_dim} must be >= 1")


class MultiHeadLatentAttention(Attention):
    Args = MLAArgs
    args: MLAArgs

    def __init__(self, d_model: int, args: MLAArgs) -> None:
        super().__init__(d_model, args)
        H, rq, rkv = args.n_heads, args.q_lora_rank, args.kv_lora_rank
        self.n_heads = H
        self.nope, self.rope_dim, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        qk_dim = self.nope + self.rope_dim
        if rq > 0:
            self.q_down = nn.Linear(d_model, rq, bias=False)
            self.q_norm = nn.RMSNorm(rq, eps=args.norm_eps)
            self.q_up = nn.Linear(rq, H * qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(d_model, H * qk_dim, bias=False)
        self.kv_down = nn.Linear(d_model, rkv + self.rope_dim, bias=False)
        self.kv_norm = nn.RMSNorm(rkv, eps=args.norm_eps)
        self.kv_up = nn.Linear(rkv, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, d_model, bias=False)
        self.rope_dims = (self.rope_dim,)

    def forward(self, x_BTd: Tensor, ctx: AttentionContext) -> Tensor:
        B, T, _ = x_BTd.shape
        H = self.n_heads
        q = self.q_up(self.q_norm(self.q_down(x_BTd))) if self.args.q_lora_rank > 0 else self.q_proj(x_BTd)
        q_nope, q_rope = q.view(B, T, H, -1).split([self.nope, self.rope_dim], dim=-1)
        q = torch.cat((q_nope, ctx.rotary.rotate(q_rope)), dim=-1)

        latent, k_rope = self.kv_down(x_BTd).split([self.args.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_norm(latent)
        k_rope = ctx.rotary.rotate(k_rope.unsqueeze(2))  # (B, T, 1, rope): one key shared by all heads
        if ctx.cache is not None:
            full = ctx.cache.append(latent=latent, k_rope=k_rope)
            latent, k_rope = full["latent"], full["k_rope"]
        S = latent.shape[1]
        k_nope, v = self.kv_up(latent).view(B, S, H, -1).split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_rope.expand(B, S, H, self.rope_dim)), dim=-1)
        o = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ctx.mask,
                   scale=1.0 / math.sqrt(self.nope + self.rope_dim))
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * self.v_dim))

    def forward_flops_per_token(self, context_len: float) -> float:
        a, d, H = self.args, self.d_model, self.n_heads
        qk_dim = self.nope + self.rope_dim
        if a.q_lora_rank > 0:
            q = linear_flops(d, a.q_lora_rank) + linear_flops(a.q_lora_rank, H * qk_dim)
        else:
            q = linear_flops(d, H * qk_dim)
        kv = (linear_flops(d, a.kv_lora_rank + self.rope_dim)
              + linear_flops(a.kv_lora_rank, H * (self.nope + self.v_dim)))
        o = linear_flops(H * self.v_dim, d)
        return q + kv + o + attention_core_flops(H, qk_dim, self.v_dim, context_len)

    def cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        return (self.args.kv_lora_rank + self.rope_dim) * dtype.itemsize
