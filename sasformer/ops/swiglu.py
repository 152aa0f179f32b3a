"""SwiGLU's gating, ``silu(gate) * up``, on a fused gate/up projection: the plain form, or one Triton kernel
each way.

Compiled, the plain form's backward is one Inductor kernel over the concatenated (N, 2H) gradient of the
fused projection, which loads gate, up and the incoming gradient again for each half of it. The
``"triton"`` implementation is a pair of custom ops (:mod:`sasformer.ops.swiglu_kernel`) whose backward
reads each input once and writes both halves.

Choose with :data:`SWIGLU_IMPL` or, when that is None, ``SASFORMER_SWIGLU``: ``auto`` (the default: ``triton``
for CUDA tensors that need a gradient when Triton is installed, ``torch`` otherwise), ``torch`` or ``triton``
(:func:`sasformer.ops.triton_support.choose_impl`). ``auto`` leaves forward-only calls (inference, decoding)
to the plain form: the kernel's gain is its backward, and a compiled forward fuses the plain gating into its
neighbours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sasformer.ops.triton_support import IMPLS, TRITON_AVAILABLE, choose_impl

__all__ = ["ENV_VAR", "IMPLS", "SWIGLU_IMPL", "resolve_impl", "swiglu", "swiglu_reference"]

ENV_VAR = "SASFORMER_SWIGLU"
SWIGLU_IMPL: str | None = None  # None: ENV_VAR, unset = DEFAULT
DEFAULT = "auto"


def resolve_impl(x: Tensor) -> str:
    """The implementation (``torch`` or ``triton``) for a projection ``x``; raises ValueError on an unknown or
    unusable choice."""
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    return choose_impl(SWIGLU_IMPL, "swiglu.SWIGLU_IMPL", ENV_VAR, x, TRITON_AVAILABLE, DEFAULT, auto_pays=needs_grad)


def swiglu_reference(gate_up: Tensor) -> Tensor:
    """``silu(gate) * up`` of a (..., 2H) projection, gate first."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _rows(x: Tensor) -> Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _kernels():
    from sasformer.ops import swiglu_kernel  # Triton is an optional dependency

    return swiglu_kernel


@torch.library.custom_op("sasformer::swiglu", mutates_args=())
def swiglu_op(gate_up: Tensor) -> Tensor:
    gu = _rows(gate_up)
    N, H = gu.shape[0], gu.shape[1] // 2
    h = gu.new_empty(N, H)
    _kernels().swiglu_forward_(gu, h, N, H)
    return h.view(*gate_up.shape[:-1], H)


@swiglu_op.register_fake
def _(gate_up):
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


@torch.library.custom_op("sasformer::swiglu_backward", mutates_args=())
def swiglu_backward_op(gate_up: Tensor, grad_h: Tensor) -> Tensor:
    gu, dh = _rows(gate_up), _rows(grad_h)
    N, H = dh.shape
    dgu = gu.new_empty(N, 2 * H)
    _kernels().swiglu_backward_(gu, dh, dgu, N, H)
    return dgu.view(gate_up.shape)


@swiglu_backward_op.register_fake
def _(gate_up, grad_h):
    return gate_up.new_empty(gate_up.shape)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad_h):
    (gate_up,) = ctx.saved_tensors
    return swiglu_backward_op(gate_up, grad_h)


swiglu_op.register_autograd(_backward, setup_context=_setup_context)


def swiglu(gate_up: Tensor) -> Tensor:
    """``silu(gate) * up`` of a fused projection (..., 2H), gate in the first H features, by
    :func:`resolve_impl`'s choice."""
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu: a projection (..., 2H) with gate and up halves, got shape {tuple(gate_up.shape)}")
    if gate_up.numel() and resolve_impl(gate_up) == "triton":  # nothing to launch for an empty tensor
        return swiglu_op(gate_up)
    return swiglu_reference(gate_up)
