"""RoPE on a fused Q/K/V projection: the plain split-and-rotate, or one Triton kernel each way.

Compiled, the plain form's backward (RoPE's transpose, the layout change from the attention's
gradients and their concatenation into the projection's gradient) becomes one Inductor kernel that
moved about 0.5 TB/s on the H200 (`docs/performance.md`, "The training step"). The ``"triton"``
implementation replaces that pair with custom ops (:mod:`sasformer.ops.rope_qkv_kernel`): the forward
writes rotated queries and keys and the values as (B, T, heads, D) tensors, the backward reads the
three gradients in their own strides and writes the projection's gradient in one pass.

Choose with :data:`ROPE_IMPL` or, when that is None, ``SASFORMER_ROPE``: ``auto`` (the default: ``triton``
for CUDA tensors when Triton is installed, ``torch`` otherwise), ``torch`` or ``triton``; ``triton`` needs
Triton and CUDA tensors, or ``TRITON_INTERPRET=1``. On one H200 the Triton form took the compiled MHA
training step of GPT-small at batch 32 x 1024 from 69.5 to 64.9 ms (`docs/performance.md`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sasformer.ops.rope import apply_rope
from sasformer.ops.triton_support import IMPLS, TRITON_AVAILABLE, choose_impl

__all__ = ["ENV_VAR", "IMPLS", "ROPE_IMPL", "resolve_impl", "rope_qkv", "rope_qkv_reference"]
ENV_VAR = "SASFORMER_ROPE"
# None: ENV_VAR, unset = "auto"
ROPE_IMPL: str | None = None


def resolve_impl(x: Tensor) -> str:
    """The implementation (``torch`` or ``triton``) for a projection ``x``; raises ValueError on an unknown or
    unusable choice (:func:`sasformer.ops.triton_support.choose_impl`)."""
    return choose_impl(ROPE_IMPL, "rope_qkv.ROPE_IMPL", ENV_VAR, x, TRITON_AVAILABLE)


def rope_qkv_reference(qkv_BTF: Tensor, cos_BTD: Tensor, sin_BTD: Tensor, n_heads: int, n_kv_heads: int
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """Queries and keys rotated, values as they are: (B, T, heads, D) views or tensors."""
    B, T, F = qkv_BTF.shape
    D = F // (n_heads + 2 * n_kv_heads)
    q, k, v = qkv_BTF.split([n_heads * D, n_kv_heads * D, n_kv_heads * D], dim=-1)
    return (apply_rope(q.view(B, T, n_heads, D), cos_BTD, sin_BTD),
            apply_rope(k.view(B, T, n_kv_heads, D), cos_BTD, sin_BTD), v.view(B, T, n_kv_heads, D))


def _kernels():
    from sasformer.ops import rope_qkv_kernel  # Triton is an optional dependency

    return rope_qkv_kernel


@torch.library.custom_op("sasformer::rope_qkv", mutates_args=())
def rope_qkv_op(qkv_BTF: Tensor, cos_BTD: Tensor, sin_BTD: Tensor, n_heads: int, n_kv_heads: int
                ) -> tuple[Tensor, Tensor, Tensor]:
    B, T, F = qkv_BTF.shape
    D = F // (n_heads + 2 * n_kv_heads)
    x = qkv_BTF.reshape(B * T, F)
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = qkv_BTF.new_empty(B, T, n_heads, D)
    k, v = (qkv_BTF.new_empty(B, T, n_kv_heads, D) for _ in range(2))
    _kernels().rope_qkv_forward_(x, cos_BTD.contiguous(), sin_BTD.contiguous(), q, k, v, T, n_heads, n_kv_heads, D)
    return q, k, v


@rope_qkv_op.register_fake
def _(qkv_BTF, cos_BTD, sin_BTD, n_heads, n_kv_heads):
    B, T, F = qkv_BTF.shape
    D = F // (n_heads + 2 * n_kv_heads)
    return (qkv_BTF.new_empty(B, T, n_heads, D), qkv_BTF.new_empty(B, T, n_kv_heads, D),
            qkv_BTF.new_empty(B, T, n_kv_heads, D))


@torch.library.custom_op("sasformer::rope_qkv_backward", mutates_args=())
def rope_qkv_backward_op(dq: Tensor, dk: Tensor, dv: Tensor, cos_BTD: Tensor, sin_BTD: Tensor) -> Tensor:
    B, T, H, D = dq.shape
    Hkv = dk.shape[2]
    grads = [g if g.stride(-1) == 1 else g.contiguous() for g in (dq, dk, dv)]
    dx = dq.new_empty(B * T, (H + 2 * Hkv) * D)
    _kernels().rope_qkv_backward_(*grads, cos_BTD.contiguous(), sin_BTD.contiguous(), dx, T, H, Hkv, D)
    return dx.view(B, T, -1)


@rope_qkv_backward_op.register_fake
def _(dq, dk, dv, cos_BTD, sin_BTD):
    B, T, H, D = dq.shape
    return dq.new_empty(B, T, (H + 2 * dk.shape[2]) * D)


def _setup_context(ctx, inputs, output) -> None:
    qkv, cos, sin, n_heads, n_kv_heads = inputs
    ctx.save_for_backward(cos, sin)
    ctx.shapes = [out.shape for out in output]


def _backward(ctx, dq, dk, dv):
    cos, sin = ctx.saved_tensors
    like = next(g for g in (dq, dk, dv) if g is not None)
    # an output the loss does not use gets no gradient: zeros of its shape
    grads = [g if g is not None else like.new_zeros(shape) for g, shape in zip((dq, dk, dv), ctx.shapes)]
    return rope_qkv_backward_op(*grads, cos, sin), None, None, None, None


rope_qkv_op.register_autograd(_backward, setup_context=_setup_context)


def rope_qkv(qkv_BTF: Tensor, cos_BTD: Tensor, sin_BTD: Tensor, n_heads: int, n_kv_heads: int
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Split a fused projection (B, T, (H + 2 H_kv) D) into queries (B, T, H, D), keys and values
    (B, T, H_kv, D), queries and keys rotated by the tables (B or 1, T, D); by :func:`resolve_impl`'s
    choice. Gradients flow to the projection (not to the tables)."""
    heads = n_heads + 2 * n_kv_heads
    if qkv_BTF.dim() != 3 or qkv_BTF.shape[-1] % heads or (qkv_BTF.shape[-1] // heads) % 2:
        raise ValueError(f"rope_qkv: a projection (B, T, (H + 2 H_kv) D) with D even, got shape "
                         f"{tuple(qkv_BTF.shape)} for H={n_heads}, H_kv={n_kv_heads}")
    if resolve_impl(qkv_BTF) == "triton":
        return rope_qkv_op(qkv_BTF, cos_BTD, sin_BTD, n_heads, n_kv_heads)
    return rope_qkv_reference(qkv_BTF, cos_BTD, sin_BTD, n_heads, n_kv_heads)
