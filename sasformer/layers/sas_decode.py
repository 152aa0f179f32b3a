"""The decode path of SAS: a few tokens per call through operands precomputed from the weights.

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
PEAA's mean over groups is folded into the output projection. That is the ``"dense"`` kernel. The
``"triton"`` kernel keeps the convolutions' own small weights instead of dense matrices that are k/D
full:

    x (N, d) -> [GEMM: q, k, v projections as one] -> fused forward kernel, one launch per Q, K, V
             (head simulation, feature MLP and RoPE for Q and K; :mod:`sasformer.ops.simulate.decode_fused`)

with the kernel's padded operands prepared once per weight version. How the "triton" kernel launches
is chosen by :data:`DECODE_LAUNCH` or, when that is None, the environment variable
``SASFORMER_DECODE_LAUNCH`` (read when a plan is built; :func:`decode_launch`): a comma-separated
subset of ``stack`` (queries, keys and simulated values by one launch where their head shapes agree,
i.e. on an MHA base: one launch per layer instead of three; on a GQA/MQA base the three stay apart)
and ``split`` (each launch's few tokens spread over
more programs, by groups of simulated heads and blocks of output columns); unset means ``stack``
(:data:`DEFAULT_LAUNCH`: on the H200 it took the kernel time of a batch-1 step of GPT-small from 952 to
800 us, 802 with ``split`` as well; ``benchmarks/results/h200/decode_run13.md``); ``off``: one launch per
tensor, one program per block of tokens. The kernel is chosen per layer
with :func:`set_decode_kernel` or, for layers without a choice, the environment variable
``SASFORMER_DECODE_KERNEL`` (``auto``, ``dense`` or ``triton``; unset means ``auto``), read when a plan
is built. ``"auto"`` (the default) is ``"triton"`` where the kernel can run on the GPU (Triton
installed, weights on CUDA in a dtype of ``KERNEL_DTYPES``) and ``"dense"`` otherwise
(:func:`resolve_decode_kernel`); on the CPU it is ``"dense"`` even with ``TRITON_INTERPRET=1``, since
the interpreter executes the kernel in Python (the tests use it to check the kernel, not for speed).

The operands (a :class:`DecodePlan`) are built from the weights once and rebuilt, in place where the
shapes allow, when a weight's version counter or storage changes; under ``torch.compile`` the plan
must already exist (:func:`prepare_decode`), since building it inside a compiled step would run every
step.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sasformer.layers.base import AttentionContext
from sasformer.ops.attention import attend
from sasformer.ops.linear import concat_linear, version_key
from sasformer.ops.simulate import ENV_VAR, KERNEL_DTYPES, triton_available
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
    from sasformer.ops.simulate.decode_fused import PreparedSimulation

# above this many tokens per call the dense banded GEMMs waste more than the launches they save
DECODE_MAX_TOKENS = 128
# "auto": CUDA tensors only; "on": any device (the CPU tests); "off": never
DECODE_PATH_MODES = ("auto", "on", "off")
# how the decode path simulates: dense GEMMs against banded matrices, or the fused Triton forward kernel;
# "auto" picks "triton" where it can run on the GPU, else "dense"
DECODE_KERNELS = ("auto", "dense", "triton")
KERNEL_ENV_VAR = "SASFORMER_DECODE_KERNEL"
# how the "triton" kernel launches (see the module docstring); None: LAUNCH_ENV_VAR, unset = DEFAULT_LAUNCH
DECODE_LAUNCH: str | None = None
DEFAULT_LAUNCH = "stack"
DECODE_LAUNCH_OPTIONS = ("stack", "split")
LAUNCH_ENV_VAR = "SASFORMER_DECODE_LAUNCH"


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
    """A layer's decode operands for one weight version; ``kernel`` says which of the two sets it holds."""

    key: tuple
    folded: bool  # "dense": base projections folded into the first convolution
    groups: list[HeadGroup]  # "dense": the stacked operands
    o_weight: Tensor | None  # (d, H'D): PEAA "mean" folded into the output projection
    kernel: str = "dense"
    qkv_weight: Tensor | None = None  # "triton": the q, k, v projections concatenated, (H*D + 2*Hkv*D, d)
    qkv_bias: Tensor | None = None
    # "triton": the fused kernel's operands per simulated tensor ("q", "k" and, if simulated, "v"), or
    # "qkv" ("qk" with values unsimulated) stacked when they are launched together
    fused: dict[str, PreparedSimulation] = field(default_factory=dict)
    split: bool = False  # "triton": launch_forward's split (more programs for a few tokens)

    def tensors(self) -> list[Tensor]:
        extra = [t for t in (self.o_weight, self.qkv_weight, self.qkv_bias) if t is not None]
        prepared = [t for name in sorted(self.fused) for t in self.fused[name].tensors()]
        return [t for g in self.groups for t in g.tensors()] + extra + prepared


def _members(attn: SimulatedAttention) -> list[tuple[str, nn.Linear, nn.Module, nn.Module | None]]:
    members = [("q", attn.q_proj, attn.heads_q, attn.features_q), ("k", attn.k_proj, attn.heads_k, attn.features_k)]
    if attn.heads_v is not None:
        members.append(("v", attn.v_proj, attn.heads_v, None))
    return members


def _weights_key(attn: nn.Module) -> tuple:
    return version_key(attn.parameters())


def triton_decode_problem(weight: Tensor, interpreter: bool = True) -> str | None:
    """Why the "triton" decode kernel cannot run on weights like ``weight``, or None if it can.
    ``interpreter``: count a CPU tensor under ``TRITON_INTERPRET=1`` as runnable."""
    if not triton_available():
        return "needs the triton package; install it or use 'dense'"
    interpreted = interpreter and os.environ.get("TRITON_INTERPRET") == "1"
    if not (weight.is_cuda or interpreted):
        return "needs the model on CUDA (or TRITON_INTERPRET=1 on the CPU); use 'dense'"
    if weight.dtype not in KERNEL_DTYPES:
        return f"takes weights in {KERNEL_DTYPES}, got {weight.dtype}; use 'dense'"
    return None


def resolve_decode_kernel(attn: SimulatedAttention) -> str:
    """The decode kernel of ``attn``, "dense" or "triton": its :func:`set_decode_kernel` choice, else
    ``SASFORMER_DECODE_KERNEL``, else "auto", which is "triton" where :func:`triton_decode_problem`
    finds none on CUDA (never the interpreter) and "dense" otherwise. Raises ValueError on an unknown
    name, or for an explicit "triton" that cannot run (no Triton, a CPU model without
    ``TRITON_INTERPRET=1``, a dtype the kernel does not take)."""
    chosen = attn.decode_kernel
    choice = chosen or os.environ.get(KERNEL_ENV_VAR, "").strip().lower() or "auto"
    source = "set_decode_kernel" if chosen else KERNEL_ENV_VAR
    if choice not in DECODE_KERNELS:
        raise ValueError(f"{source}: decode kernel {choice!r} is not one of {DECODE_KERNELS}")
    weight = attn.o_proj.weight
    if choice == "auto":
        return "triton" if triton_decode_problem(weight, interpreter=False) is None else "dense"
    if choice == "triton":
        problem = triton_decode_problem(weight)
        if problem is not None:
            raise ValueError(f"{source}: decode kernel 'triton' {problem}")
    return choice


def decode_launch() -> frozenset[str]:
    """The "triton" kernel's launch options, a subset of :data:`DECODE_LAUNCH_OPTIONS`, from
    :data:`DECODE_LAUNCH` or else ``SASFORMER_DECODE_LAUNCH`` (comma-separated; "" or "off": none;
    unset: :data:`DEFAULT_LAUNCH`)."""
    chosen = DECODE_LAUNCH
    text = chosen if chosen is not None else os.environ.get(LAUNCH_ENV_VAR, DEFAULT_LAUNCH)
    names = {t.strip().lower() for t in text.split(",")} - {"", "off"}
    unknown = names - set(DECODE_LAUNCH_OPTIONS)
    if unknown:
        source = "sas_decode.DECODE_LAUNCH" if chosen is not None else LAUNCH_ENV_VAR
        raise ValueError(f"{source}={text!r}: unknown launch option(s) {sorted(unknown)}; use a comma-separated "
                         f"subset of {DECODE_LAUNCH_OPTIONS}, or 'off'")
    return frozenset(names)


def _fused_ops():
    # imported on first use: Triton is an optional dependency
    from sasformer.ops.simulate import decode_fused

    return decode_fused


def _build_triton_plan(attn: SimulatedAttention, o_weight: Tensor | None) -> DecodePlan:
    """The fused kernel's operands: one concatenated projection and prepared simulation weights per tensor."""
    ops = _fused_ops()
    qkv_weight, qkv_bias = concat_linear(attn.q_proj, attn.k_proj, attn.v_proj)
    launch = decode_launch()
    fused = {}
    for name, _, heads, features in _members(attn):
        feature_weights = (features.w3, features.b3, features.w4, features.b4) if features is not None else ()
        fused[name] = ops.prepare_simulation(heads.w1, heads.b1, heads.w2, heads.b2, *feature_weights,
                                             head_dim=attn.head_dim,
                                             rope=features is not None and attn.args.rope == "after")
    if "stack" in launch and attn.n_kv_heads == attn.n_heads:
        names = [name for name in ("q", "k", "v") if name in fused]
        fused["".join(names)] = ops.stack_simulations([fused.pop(name) for name in names])
    return DecodePlan(_weights_key(attn), False, [], o_weight, "triton", qkv_weight, qkv_bias, fused,
                      "split" in launch)


@torch.no_grad()
def build_plan(attn: SimulatedAttention) -> DecodePlan:
    """Operands of ``attn``'s decode path for its kernel (:func:`resolve_decode_kernel`), in the dtype
    and on the device of its weights."""
    kernel = resolve_decode_kernel(attn)
    o_weight = None
    if attn.args.peaa == "mean":
        w = attn.o_proj.weight
        wide = torch.promote_types(w.dtype, torch.float32)
        o_weight = (w.to(wide).repeat(1, attn.groups) / attn.groups).to(w.dtype)
    if kernel == "triton":
        return _build_triton_plan(attn, o_weight)
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
    return DecodePlan(_weights_key(attn), folded, groups, o_weight)


def _copy_into(old: DecodePlan, new: DecodePlan) -> bool:
    """Refresh ``old`` in place (its tensors keep their storage, so captured CUDA graphs stay valid);
    False when the shapes, dtypes or devices differ."""
    pairs = list(zip(old.tensors(), new.tensors()))
    same_launch = sorted(old.fused) == sorted(new.fused) and old.split == new.split
    if old.kernel != new.kernel or not same_launch or len(old.tensors()) != len(new.tensors()) or any(
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
    is host-side, and whoever runs the compiled step calls :func:`prepare_decode` when the weights may
    have changed (``StaticDecoder`` in ``prefill`` and ``refresh_weights``)."""
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

    ``layers``: the model's :func:`sas_layers`, when the caller has them already (walking the modules
    costs host time)."""
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
    if mode not in DECODE_PATH_MODES:
        raise ValueError(f"decode path mode {mode!r} is not one of {DECODE_PATH_MODES}")
    for module in sas_layers(model):
        module.decode_path = mode


def set_decode_kernel(model: nn.Module, kernel: str | None) -> None:
    """Choose the decode path's kernel for every SAS layer in ``model``: one of :data:`DECODE_KERNELS`,
    or None to follow ``SASFORMER_DECODE_KERNEL`` (default "auto"; see :func:`resolve_decode_kernel`).
    Existing plans are dropped, so the next decode call builds the chosen kernel's operands (and
    checks that it can run)."""
    if kernel is not None and kernel not in DECODE_KERNELS:
        raise ValueError(f"decode kernel {kernel!r} is not one of {DECODE_KERNELS} (or None)")
    if kernel == "triton" and not triton_available():
        raise ValueError("decode kernel 'triton' needs the triton package; install it or use 'dense'")
    for module in sas_layers(model):
        module.decode_kernel = kernel
        module.__dict__.pop("_decode_plan", None)


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


def _simulate_triton(attn: SimulatedAttention, plan: DecodePlan, x_BTd: Tensor, ctx: AttentionContext
                     ) -> dict[str, Tensor]:
    """Q~, K~, V~ (B, T, heads, size) of the new tokens: one projection GEMM, then one kernel launch per
    tensor, or one for all of them (``plan.fused["qkv"]``, or ``["qk"]`` with values unsimulated)."""
    ops = _fused_ops()
    B, T, d = x_BTd.shape
    N, H, Hkv, D = B * T, attn.n_heads, attn.n_kv_heads, attn.head_dim
    qkv = F.linear(x_BTd.reshape(N, d), plan.qkv_weight, plan.qkv_bias)
    # views of the one output: the kernel reads each token's heads at the row stride of qkv
    q, k, v = (t.view(N, h, D) for t, h in zip(qkv.split([H * D, Hkv * D, Hkv * D], dim=-1), (H, Hkv, Hkv)))
    if attn.args.rope == "before":
        q = ctx.rotary.rotate(q.view(B, T, H, D)).view(N, H, D)
        k = ctx.rotary.rotate(k.view(B, T, Hkv, D)).view(N, Hkv, D)
    rope = ctx.rotary(attn.sim_head_dim) if attn.args.rope == "after" else None
    shape = (B, T, -1, attn.sim_head_dim)
    stacked = "qkv" if "qkv" in plan.fused else "qk" if "qk" in plan.fused else None
    if stacked:
        # (N, G, H, D): a view of the projection's output unless RoPE before made new queries and keys
        G = len(stacked)
        x_NGHD = qkv[:, : G * H * D].view(N, G, H, D) if attn.args.rope != "before" else torch.stack(
            [q, k, v][:G], dim=1)
        sim = ops.simulate_prepared(x_NGHD, plan.fused[stacked], T, rope, plan.split)
        qk_sim, v_sim = sim if G == 3 else (sim, None)
        out = {"q": qk_sim[0].view(shape), "k": qk_sim[1].view(shape)}
        if v_sim is not None:
            out["v"] = v_sim[0].view(B, T, attn.n_sim_kv_heads, D)
    else:
        out = {name: ops.simulate_prepared(t, plan.fused[name], T, rope, plan.split).view(shape)
               for name, t in (("q", q), ("k", k))}
    if "v" in plan.fused:
        out["v"] = ops.simulate_prepared(v, plan.fused["v"], split=plan.split).view(B, T, attn.n_sim_kv_heads, D)
    elif "v" not in out:  # unsimulated values: simulated head g*H_kv + h reads value head h
        out["v"] = v.view(B, T, Hkv, D).repeat(1, 1, attn.groups, 1)
    return out


def _simulate_dense(attn: SimulatedAttention, plan: DecodePlan, x_BTd: Tensor, ctx: AttentionContext
                    ) -> dict[str, Tensor]:
    """Q~, K~, V~ (B, T, heads, size) of the new tokens through the dense stacked GEMMs."""
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
    return out


def decode_forward(attn: SimulatedAttention, plan: DecodePlan, x_BTd: Tensor, ctx: AttentionContext) -> Tensor:
    """``attn(x, ctx)`` through ``plan``: appends K~, V~ to ``ctx.cache`` and returns (B, T, d)."""
    B, T, _ = x_BTd.shape
    D, E = attn.head_dim, attn.sim_head_dim
    simulate = _simulate_triton if plan.kernel == "triton" else _simulate_dense
    out = simulate(attn, plan, x_BTd, ctx)
    full = ctx.cache.append(k=out["k"], v=out["v"])
    o = attend(out["q"].transpose(1, 2), full["k"].transpose(1, 2), full["v"].transpose(1, 2), ctx.mask,
               scale=1.0 / math.sqrt(E))
    o = o.transpose(1, 2).reshape(B, T, attn.n_sim_heads * D)
    if plan.o_weight is not None:
        return F.linear(o, plan.o_weight, attn.o_proj.bias)
    return attn.o_proj(o)


__all__ = [
    "DECODE_KERNELS",
    "DECODE_LAUNCH",
    "DECODE_LAUNCH_OPTIONS",
    "DECODE_MAX_TOKENS",
    "DECODE_PATH_MODES",
    "KERNEL_ENV_VAR",
    "LAUNCH_ENV_VAR",
    "DecodePlan",
    "HeadGroup",
    "build_plan",
    "clear_decode_plans",
    "decode_forward",
    "decode_launch",
    "decode_plan",
    "prepare_decode",
    "resolve_decode_kernel",
    "sas_layers",
    "set_decode_kernel",
    "set_decode_path",
    "triton_decode_problem",
    "use_decode_path",
]
