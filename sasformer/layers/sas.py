"""SAS: Simulated Attention Score (Zheng et al., 2025).

Per token, the base projections give H query heads and H_kv key/value heads of size D. Head
simulation expands them to H' query heads and H'_kv = H' * H_kv / H key/value heads (so a GQA/MQA
base keeps its grouping ratio after simulation, and query head i reads key/value head
i // (H' / H'_kv)); feature simulation expands queries and keys from D to D'. Attention runs on the
simulated heads with scale 1/sqrt(D'). PEAA averages the G = H'/H groups of H heads and applies one
shared d x d output projection (``peaa="mean"``), or projects all H' heads at once (``"full"``).

    x -> q_proj -> (H, D)    -> heads_q -> (H', D)    -> features_q -> (H', D') --\
    x -> k_proj -> (Hkv, D)  -> heads_k -> (H'kv, D)  -> features_k -> (H'kv, D') -- attend -> (H', D)
    x -> v_proj -> (Hkv, D)  -> heads_v -> (H'kv, D) ---------------------------/        |
                                                               mean over G groups -> o_proj -> d

Without a cache, where the simulation implementation is ``banded`` and RoPE is applied after the
simulation (or not at all), the Q/K/V projections fold into the first head convolutions where that takes
fewer FLOPs (:meth:`SimulatedAttention.simulate_from_input`, ``simulate.fold_pays``): those compact heads are
never formed.

Cached decoding of a few tokens without gradients takes a shorter route with the same result
(:mod:`sasformer.layers.sas_decode`): operands precomputed from the weights, simulated by the fused
Triton kernel on CUDA or by dense GEMMs with Q, K and V stacked (its ``decode_kernel``).
"""

from __future__ import annotations

import math
import warnings
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
from sasformer.layers.sas_decode import decode_forward, decode_plan, use_decode_path
from sasformer.layers.simulation import (
    FeatureSimulation,
    HeadSimulation,
    feature_simulation_flops,
    head_simulation_flops,
    simulate_heads_projected,
    simulate_qk,
    simulate_qk_projected,
)
from sasformer.ops import simulate
from sasformer.ops.attention import attend
from sasformer.ops.linear import linear_split
from sasformer.ops.rope import RotaryTables

ROPE_PLACEMENTS = ("after", "before", "none")
PEAA_MODES = ("mean", "full")
CACHE_MODES = ("simulated", "compact")
SIM_INITS = ("default", "identity")


@dataclass
class SASArgs(AttentionArgs):
    n_heads: int = 12
    n_kv_heads: int | None = None  # None: = n_heads (MHA base); fewer for a GQA/MQA base
    n_sim_heads: int | None = None  # H'; None: 2 * n_heads
    sim_head_dim: int | None = None  # D'; None: 2 * head_dim
    kernel_size: int = 3  # odd; 1 is the paper's MLP variant
    simulate_v: bool = True
    rope: str = "after"
    peaa: str = "mean"
    cache_mode: str = "simulated"
    # "identity": simulation starts as a copy, so that with H' = H and D' = D the layer is MHA; a check of that
    # reduction, not a training init: with H' > H every group of heads starts equal, gets equal gradients
    # under PEAA's mean and stays equal (and with rope "none" the D' - D extra features stay zero)
    sim_init: str = "default"

    def validate(self, d_model: int) -> None:
        require(self.n_heads >= 1, f"n_heads={self.n_heads} must be >= 1")
        require(
            d_model % self.n_heads == 0,
            f"d_model={d_model} must be divisible by n_heads={self.n_heads}",
        )
        head_dim = d_model // self.n_heads
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        require(
            1 <= self.n_kv_heads <= self.n_heads and self.n_heads % self.n_kv_heads == 0,
            f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}",
        )
        if self.n_sim_heads is None:
            self.n_sim_heads = 2 * self.n_heads
        require(
            self.n_sim_heads >= self.n_heads and self.n_sim_heads % self.n_heads == 0,
            f"n_sim_heads={self.n_sim_heads} must be a multiple of n_heads={self.n_heads}",
        )
        if self.sim_head_dim is None:
            self.sim_head_dim = 2 * head_dim
        require(self.sim_head_dim >= 1, f"sim_head_dim={self.sim_head_dim} must be >= 1")
        require(
            self.kernel_size >= 1 and self.kernel_size % 2 == 1,
            f"kernel_size={self.kernel_size} must be a positive odd number (1 = MLP variant)",
        )
        require(self.rope in ROPE_PLACEMENTS, f"rope={self.rope!r} must be one of {ROPE_PLACEMENTS}")
        if self.rope == "after":
            require(self.sim_head_dim % 2 == 0, f"sim_head_dim={self.sim_head_dim} must be even for rope='after'")
        if self.rope == "before":
            require(head_dim % 2 == 0, f"head_dim={head_dim} must be even for rope='before'")
        require(self.peaa in PEAA_MODES, f"peaa={self.peaa!r} must be one of {PEAA_MODES}")
        require(self.cache_mode in CACHE_MODES, f"cache_mode={self.cache_mode!r} must be one of {CACHE_MODES}")
        require(self.sim_init in SIM_INITS, f"sim_init={self.sim_init!r} must be one of {SIM_INITS}")


class SimulatedAttention(Attention):
    """Causal self-attention over simulated heads, with PEAA output aggregation."""

    Args = SASArgs
    args: SASArgs

    def __init__(self, d_model: int, args: SASArgs) -> None:
        super().__init__(d_model, args)
        H, Hkv, Hs = args.n_heads, args.n_kv_heads, args.n_sim_heads
        D, Ds = d_model // H, args.sim_head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, Hkv, D
        self.n_sim_heads, self.n_sim_kv_heads, self.sim_head_dim = Hs, Hs * Hkv // H, Ds
        self.groups = Hs // H
        self.q_proj = nn.Linear(d_model, H * D, bias=False)
        self.k_proj = nn.Linear(d_model, Hkv * D, bias=False)
        self.v_proj = nn.Linear(d_model, Hkv * D, bias=False)
        self.heads_q = HeadSimulation(H, Hs, args.kernel_size)
        self.heads_k = HeadSimulation(Hkv, self.n_sim_kv_heads, args.kernel_size)
        self.heads_v = HeadSimulation(Hkv, self.n_sim_kv_heads, args.kernel_size) if args.simulate_v else None
        self.features_q = FeatureSimulation(D, Ds)
        self.features_k = FeatureSimulation(D, Ds)
        o_in = H * D if args.peaa == "mean" else Hs * D
        self.o_proj = nn.Linear(o_in, d_model, bias=True)
        self.rope_dims = {"after": (Ds,), "before": (D,), "none": ()}[args.rope]
        # when cached decoding takes the decode path: "auto" (CUDA), "on", "off" (sas_decode.set_decode_path)
        self.decode_path = "auto"
        # its kernel: "auto", "dense", "triton", or None to follow SASFORMER_DECODE_KERNEL, unset = "auto"
        # (sas_decode.set_decode_kernel, resolve_decode_kernel)
        self.decode_kernel: str | None = None
        if args.sim_init == "identity":
            if (self.n_sim_heads, self.sim_head_dim) != (self.n_heads, self.head_dim):
                warnings.warn(f"sim_init='identity' with H'={self.n_sim_heads} > H={self.n_heads} or D'="
                              f"{self.sim_head_dim} != D={self.head_dim}: the simulated groups start equal and "
                              "training keeps them equal; use it to check the reduction to MHA, not to train",
                              stacklevel=2)
            self.reset_simulation_identity()

    def reset_simulation_identity(self) -> None:
        """Initialise every simulation block as a copy, so that with H'=H, D'=D this layer is MHA."""
        for block in (self.heads_q, self.heads_k, self.heads_v, self.features_q, self.features_k):
            if block is not None:
                block.reset_identity()

    def simulate_q(self, q_BTHD: Tensor, rotary: RotaryTables) -> Tensor:
        if self.args.rope == "before":
            q_BTHD = rotary.rotate(q_BTHD)
        return simulate_qk(self.heads_q, self.features_q, q_BTHD, rotary if self.args.rope == "after" else None)

    def simulate_kv(self, k_BTHD: Tensor, v_BTHD: Tensor, rotary: RotaryTables) -> tuple[Tensor, Tensor]:
        """Compact (rope 'before' already applied) K, V -> simulated K~ (rope 'after' applied), V~."""
        k = simulate_qk(self.heads_k, self.features_k, k_BTHD, rotary if self.args.rope == "after" else None)
        if self.heads_v is not None:
            v = self.heads_v(v_BTHD)
        else:  # unsimulated values: simulated head g*H_kv + h reads value head h
            v = v_BTHD.repeat(1, 1, self.groups, 1)
        return k, v

    def folds_projections(self, x_BTd: Tensor, ctx: AttentionContext) -> bool:
        """Whether this call simulates straight from the input, the Q/K/V projections folded into the first
        head convolutions: without a cache (the compact K, V are not formed), with RoPE after the simulation
        or none, and where the simulation implementation folds (``banded``)."""
        return (ctx.cache is None and self.args.rope != "before"
                and simulate.folds_projection(self.heads_q.impl, x_BTd))

    def simulate_from_input(self, x_BTd: Tensor, rotary: RotaryTables) -> tuple[Tensor, Tensor, Tensor]:
        """Simulated Q~, K~, V~ from the layer input, each projection folded where its block's
        implementation does that (:meth:`folds_projections`)."""
        after = rotary if self.args.rope == "after" else None
        q = simulate_qk_projected(self.heads_q, self.features_q, self.q_proj, x_BTd, after)
        k = simulate_qk_projected(self.heads_k, self.features_k, self.k_proj, x_BTd, after)
        if self.heads_v is not None:
            v = simulate_heads_projected(self.heads_v, self.v_proj, x_BTd)
        else:
            v = self.v_proj(x_BTd).unflatten(-1, (self.n_kv_heads, self.head_dim)).repeat(1, 1, self.groups, 1)
        return q, k, v

    def aggregate(self, o_BTHD: Tensor) -> Tensor:
        """PEAA: mean over the G groups of H heads, then one shared projection (or 'full')."""
        B, T = o_BTHD.shape[:2]
        if self.args.peaa == "mean":
            o = o_BTHD.reshape(B, T, self.groups, self.n_heads * self.head_dim).mean(dim=2)
        else:
            o = o_BTHD.reshape(B, T, self.n_sim_heads * self.head_dim)
        return self.o_proj(o)

    def forward(self, x_BTd: Tensor, ctx: AttentionContext) -> Tensor:
        if use_decode_path(self, x_BTd, ctx):
            plan, _ = decode_plan(self)
            if plan is not None:
                return decode_forward(self, plan, x_BTd, ctx)
        if self.folds_projections(x_BTd, ctx):
            q, k, v = self.simulate_from_input(x_BTd, ctx.rotary)
            return self.attend_and_aggregate(q, k, v, ctx)
        B, T, _ = x_BTd.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = linear_split(x_BTd, self.q_proj, self.k_proj, self.v_proj)
        q = self.simulate_q(q.view(B, T, H, D), ctx.rotary)
        k = k.view(B, T, Hkv, D)
        v = v.view(B, T, Hkv, D)
        if self.args.rope == "before":
            k = ctx.rotary.rotate(k)
        cache = ctx.cache
        if cache is None:
            k, v = self.simulate_kv(k, v, ctx.rotary)
        elif self.args.cache_mode == "simulated":
            k, v = self.simulate_kv(k, v, ctx.rotary)
            full = cache.append(k=k, v=v)
            k, v = full["k"], full["v"]
        else:  # compact: cache the projected K, V and simulate the whole prefix again
            if ctx.key_positions is None:  # checked before the cache grows, so a refused call leaves it as it was
                raise ValueError(
                    "cache_mode='compact' rotates every cached key again, so it needs all keys' positions: with "
                    "explicit position_ids after a cached prefix they are not known; pass the attention_mask "
                    "instead of position_ids, or use cache_mode='simulated'")
            full = cache.append(k=k, v=v)
            key_rotary = RotaryTables(ctx.key_positions, ctx.rotary.theta, ctx.rotary.precomputed)
            k, v = self.simulate_kv(full["k"], full["v"], key_rotary)
        return self.attend_and_aggregate(q, k, v, ctx)

    def attend_and_aggregate(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        """Attention over the simulated (B, T, heads, size) Q~, K~, V~, then PEAA."""
        o = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ctx.mask,
                   scale=1.0 / math.sqrt(self.sim_head_dim))
        return self.aggregate(o.transpose(1, 2))

    def simulation_flops_per_token(self) -> float:
        H, Hkv, Hs, Hskv = self.n_heads, self.n_kv_heads, self.n_sim_heads, self.n_sim_kv_heads
        D, Ds, k = self.head_dim, self.sim_head_dim, self.args.kernel_size
        flops = head_simulation_flops(H, Hs, k, D) + head_simulation_flops(Hkv, Hskv, k, D)
        if self.heads_v is not None:
            flops += head_simulation_flops(Hkv, Hskv, k, D)
        return flops + feature_simulation_flops(Hs, D, Ds) + feature_simulation_flops(Hskv, D, Ds)

    def forward_flops_per_token(self, context_len: float) -> float:
        H, Hkv, D, d = self.n_heads, self.n_kv_heads, self.head_dim, self.d_model
        proj = linear_flops(d, H * D) + 2 * linear_flops(d, Hkv * D) + linear_flops(self.o_proj.in_features, d)
        core = attention_core_flops(self.n_sim_heads, self.sim_head_dim, D, context_len)
        return proj + self.simulation_flops_per_token() + core

    def cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        if self.args.cache_mode == "compact":
            return 2 * self.n_kv_heads * self.head_dim * dtype.itemsize
        return self.n_sim_kv_heads * (self.sim_head_dim + self.head_dim) * dtype.itemsize
