"""The decode path of SAS: a few tokens per call through precomputed dense operands.

Used by :class:`~sasformer.layers.sas.SimulatedAttention` on CUDA (its ``decode_path`` attribute, see
:func:`set_decode_path`: on CPU the dense operands' extra FLOPs cost more than the launches they
save, so "auto" keeps the ordinary path there) when gradients are off, a KV cache that
already holds tokens is given (``cache_mode="simulated"``; the prefill into an empty cache takes the
ordinary path, so a cached forward of a whole prompt stays bit-identical to an uncached one), the
call has at most :data:`DECODE_MAX_TOKENS` tokens and no simulation implementation is forced
(``impl`` None and ``SASFORMER_SIMULATE`` unset). Per layer it replaces the
base projections, both head convolutions and the feature MLP of Q, K and V with:

    x (N, d) -> [GEMM: projection folded into conv 1] -> ReLU -> [GEMM: conv 2] -> (G, N, H'D)
             -> [GEMM: W3] -> ReLU -> [GEMM: W4] -> RoPE           (queries and keys)

where every GEMM is batched over the G tensors of equal shapes (Q, K and V on an MHA base), and
PEAA's mean over groups is folded into the output projection. The operands (a :class:`DecodePlan`)
are built from the weights once and rebuilt, in place where the shapes allow, when a weight's
version counter or storage changes; under ``torch.compile`` the plan must already exist
(:func:`prepare_decode`), since building it inside a compiled step would run every step.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sasformer.layers.base import AttentionContext
from sasformer.ops.attention import attend
from sasformer.ops.simulate import ENV_VAR
from sasformer.ops.simulate.decode import (
    conv_operands,
    first_conv,
    fold_projection,
    residual_conv,
    residual_features,
    rope_stacked,
)

if TYPE_CHECKING:
    from sasformer.layers.sas import SimulatedAttention

# above this many tokens per call the dense banded GEMMs waste more than the launches they save
DECODE_MAX_TOKENS = 128
# "auto": CUDA tensors only; "on": any device (the CPU tests); "off": never
DECODE_PATH_MODES = ("auto", "on", "off")


@dataclass
class HeadGroup:
    """Tensors with the same head counts, simulated together; the first ``n_features`` (queries,
    keys) also get the feature MLP. Stacked operands have the group axis first."""

    names: tuple[str, ...]
    out_heads: int
    n_features: int
    m1: Tensor  # (G, I, H'D); I = d_model when the projection is folded in, else H*D
    b1: Tensor  # (G, H'D)
    m2: Tensor  # (G, H'D, H'D)
    b2: Tensor  # (G, H'D)
    w3t: Tensor | None = None  # (n_features, D, D')
    b3: Tensor | None = None  # (n_features, D')
    w4t: Tensor | None = None  # (n_features, D', D')
    b4: Tensor | None = None  # (n_features, D')

    def tensors(self) -> list[Tensor]:
        return [getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)]


@dataclass
class DecodePlan:
    key: tuple
    folded: bool  # base projections folded into the first convolution
    groups: list[HeadGroup]
    o_weight: Tensor | None  # (d, H'D): PEAA "mean" folded into the output projection

    def tensors(self) -> list[Tensor]:
        extra = [self.o_weight] if self.o_weight is not None else []
        return [t for g in self.groups for t in g.tensors()] + extra


def _members(attn: SimulatedAttention) -> list[tuple[str, nn.Linear, nn.Module, nn.Module | None]]:
    members = [("q", attn.q_proj, attn.heads_q, attn.features_q), ("k", attn.k_proj, attn.heads_k, attn.features_k)]
    if attn.heads_v is not None:
        members.append(("v", attn.v_proj, attn.heads_v, None))
    return members


def _weights_key(attn: nn.Module) -> tuple:
    # inference tensors carry no version counter: their storage is the only thing to compare
    key = []
    for p in attn.parameters():
        key.append((p.data_ptr(), None if p.is_inference() else p._version))
    first = next(attn.parameters())
    return (first.device, first.dtype, *key)


@torch.no_grad()
def build_plan(attn: SimulatedAttention) -> DecodePlan:
    """Dense operands of ``attn``'s decode path, in the dtype and on the device of its weights."""
    D = attn.head_dim
    folded = attn.args.rope != "before"
    by_shape: dict[tuple[int, int], list] = {}
    for member in _members(attn):
        heads = member[2]
        by_shape.setdefault((heads.in_heads, heads.out_heads), []).append(member)
    groups = []
    for (_, out_heads), members in by_shape.items():
        m1s, b1s, m2s, b2s = [], [], [], []
        for _, proj, heads, _ in members:
            m1, b1, m2, b2 = conv_operands(heads.w1, heads.b1, heads.w2, heads.b2, D)
            m1s.append(fold_projection(proj.weight, m1) if folded else m1)
            b1s.append(b1), m2s.append(m2), b2s.append(b2)
        feats = [m[3] for m in members if m[3] is not None]
        group = HeadGroup(tuple(m[0] for m in members), out_heads, len(feats),
                          torch.stack(m1s), torch.stack(b1s), torch.stack(m2s), torch.stack(b2s))
        if feats:
            group.w3t = torch.stack([f.w3.t() for f in feats])
            group.b3 = torch.stack([f.b3 for f in feats])
            group.w4t = torch.stack([f.w4.t() for f in feats])
            group.b4 = torch.stack([f.b4 for f in feats])
        groups.append(group)
    o_weight = None
    if attn.args.peaa == "mean":
        w = attn.o_proj.weight
        wide = torch.promote_types(w.dtype, torch.float32)
        o_weight = (w.to(wide).repeat(1, attn.groups) / attn.groups).to(w.dtype)
    return DecodePlan(_weights_key(attn), folded, groups, o_weight)


def _copy_into(old: DecodePlan, new: DecodePlan) -> bool:
    """Refresh ``old`` in place (its tensors keep their storage, so captured CUDA graphs stay valid);
    False when the shapes, dtypes or devices differ."""
    pairs = list(zip(old.tensors(), new.tensors()))
    if len(old.tensors()) != len(new.tensors()) or any(
        (a.shape, a.dtype, a.device) != (b.shape, b.dtype, b.device) or a.is_inference() for a, b in pairs
    ):
        return False
    with torch.no_grad():
        for a, b in pairs:
            a.copy_(b)
    old.key = new.key
    return True


def decode_plan(attn: SimulatedAttention) -> tuple[DecodePlan | None, bool]:
    """The layer's current plan, rebuilt if its weights changed; and whether new storage was allocated
    (a CUDA graph that read the old plan must then be captured again).

    Under ``torch.compile`` the stored plan is returned unchecked (None if there is none): the check
    is host-side and :func:`prepare_decode` runs it before every compiled step."""
    plan = attn.__dict__.get("_decode_plan")
    if torch.compiler.is_compiling():
        return plan, False
    key = _weights_key(attn)
    if plan is not None and plan.key == key:
        return plan, False
    # normal tensors even under inference mode, so that a later refresh can write into them
    with torch.inference_mode(False):
        fresh = build_plan(attn)
    if plan is not None and _copy_into(plan, fresh):
        return plan, False
    attn.__dict__["_decode_plan"] = fresh
    return fresh, True


def sas_layers(model: nn.Module) -> list[SimulatedAttention]:
    """The SAS attention layers of ``model``."""
    from sasformer.layers.sas import SimulatedAttention

    return [m for m in model.modules() if isinstance(m, SimulatedAttention)]


def prepare_decode(model: nn.Module, layers: list[SimulatedAttention] | None = None) -> bool:
    """Build or refresh the decode plan of every SAS layer in ``model``; True if any plan got new storage.

    ``layers``: the model's :func:`sas_layers`, when a caller that runs this before every step has
    them already (walking the modules each step would cost host time in a launch-bound loop)."""
    reallocated = False
    for module in sas_layers(model) if layers is None else layers:
        if module.args.cache_mode == "simulated":
            mode = module.decode_path
            if mode == "on" or (mode == "auto" and module.o_proj.weight.is_cuda):
                reallocated |= decode_plan(module)[1]
    return reallocated


def clear_decode_plans(model: nn.Module) -> None:
    """Free the decode plans' memory (they are rebuilt on the next decode call)."""
    for module in model.modules():
        module.__dict__.pop("_decode_plan", None)


def set_decode_path(model: nn.Module, mode: str) -> None:
    """Choose when every SAS layer in ``model`` takes the decode path: one of :data:`DECODE_PATH_MODES`.

    Measured on one CPU thread (small preset, batch 1, fp32) the decode path took 87 ms per step
    against 64 ms for the ordinary one, hence "auto" = CUDA only."""
    from sasformer.layers.sas import SimulatedAttention

    if mode not in DECODE_PATH_MODES:
        raise ValueError(f"decode path mode {mode!r} is not one of {DECODE_PATH_MODES}")
    for module in model.modules():
        if isinstance(module, SimulatedAttention):
            module.decode_path = mode


def use_decode_path(attn: SimulatedAttention, x_BTd: Tensor, ctx: AttentionContext) -> bool:
    """Whether this call takes the decode path (see the module docstring)."""
    mode = attn.decode_path
    if mode == "off" or (mode == "auto" and not x_BTd.is_cuda):
        return False
    # a compiled step (StaticDecoder) always follows an eager prefill; reading the host-side length
    # there would make the compiler specialise on it and recompile every step
    return (
        ctx.cache is not None
        and (torch.compiler.is_compiling() or ctx.cache.seq_len > 0)
        and attn.args.cache_mode == "simulated"
        and not torch.is_grad_enabled()
        and x_BTd.shape[0] * x_BTd.shape[1] <= DECODE_MAX_TOKENS
        and attn.heads_q.impl is None
        and not os.environ.get(ENV_VAR, "").strip()
    )


def decode_forward(attn: SimulatedAttention, plan: DecodePlan, x_BTd: Tensor, ctx: AttentionContext) -> Tensor:
    """``attn(x, ctx)`` through ``plan``: appends K~, V~ to ``ctx.cache`` and returns (B, T, d)."""
    B, T, d = x_BTd.shape
    N, D, E = B * T, attn.head_dim, attn.sim_head_dim
    x_Nd = x_BTd.reshape(N, d)
    inputs: dict[str, Tensor] = {}
    if not plan.folded:  # rope "before": rotate the projected heads, then simulate
        for name, proj, heads, _ in _members(attn):
            h = proj(x_BTd).view(B, T, heads.in_heads, D)
            inputs[name] = (ctx.rotary.rotate(h) if name != "v" else h).reshape(N, -1)
    out: dict[str, Tensor] = {}
    for g in plan.groups:
        G, nf, Hs = len(g.names), g.n_features, g.out_heads
        x_GNI = x_Nd.expand(G, N, d) if plan.folded else torch.stack([inputs[n] for n in g.names])
        y2_GNO = residual_conv(first_conv(x_GNI, g.m1, g.b1), g.m2, g.b2)
        if nf:
            z = residual_features(y2_GNO[:nf].reshape(nf, N * Hs, D), g.w3t, g.b3, g.w4t, g.b4)
            z = z.view(nf, B, T, Hs, E)
            if attn.args.rope == "after":
                z = rope_stacked(z, *ctx.rotary(E))
            out.update({g.names[i]: z[i] for i in range(nf)})
        out.update({g.names[i]: y2_GNO[i].view(B, T, Hs, D) for i in range(nf, G)})
    if "v" not in out:  # unsimulated values: simulated head g*H_kv + h reads value head h
        out["v"] = attn.v_proj(x_BTd).view(B, T, attn.n_kv_heads, D).repeat(1, 1, attn.groups, 1)
    full = ctx.cache.append(k=out["k"], v=out["v"])
    o = attend(out["q"].transpose(1, 2), full["k"].transpose(1, 2), full["v"].transpose(1, 2), ctx.mask,
               scale=1.0 / math.sqrt(E))
    o = o.transpose(1, 2).reshape(B, T, attn.n_sim_heads * D)
    if plan.o_weight is not None:
        return F.linear(o, plan.o_weight, attn.o_proj.bias)
    return attn.o_proj(o)


__all__ = [
    "DECODE_MAX_TOKENS",
    "DECODE_PATH_MODES",
    "set_decode_path",
    "DecodePlan",
    "HeadGroup",
    "build_plan",
    "decode_plan",
    "prepare_decode",
    "sas_layers",
    "clear_decode_plans",
    "use_decode_path",
    "decode_forward",
]
