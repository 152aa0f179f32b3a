"""RoPE on the simulated queries/keys with fewer memory passes than the generic ``apply_rope``.

``apply_rope`` computes ``x * cos + rotate_half(x) * sin``: in eager mode that is five kernels over
tensors the size of Q~ (multiply, negate, concatenate, multiply, add). Written per half,

    out1 = x1 * cos1 - x2 * sin1        out2 = x2 * cos2 + x1 * sin2

it is four kernels over half-size tensors writing straight into the output, and the backward (the
transposed rotation, same form) needs only the tables, so nothing of Q~'s size is saved. The PyTorch
simulation paths use it for RoPE after the simulation; it equals ``apply_rope`` for any tables.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, sign: float) -> Tensor:
    """``sign=1``: the rotation; ``sign=-1``: its transpose. x (B, T, H, D), tables (B or 1, T, 1, D)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c1, c2, s1, s2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
    if torch.compiler.is_compiling():
        # the compiler fuses the functional form into one kernel; out= into views would break the graph
        if sign > 0:
            return torch.cat((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), dim=-1)
        return torch.cat((x1 * c1 + x2 * s2, x2 * c2 - x1 * s1), dim=-1)
    out = torch.empty_like(x)
    o1, o2 = out[..., :half], out[..., half:]
    if sign > 0:
        torch.mul(x1, c1, out=o1).addcmul_(x2, s1, value=-1.0)
        torch.mul(x2, c2, out=o2).addcmul_(x1, s2)
    else:
        # transpose: d x1 = g1 cos1 + g2 sin2, d x2 = g2 cos2 - g1 sin1
        torch.mul(x1, c1, out=o1).addcmul_(x2, s2)
        torch.mul(x2, c2, out=o2).addcmul_(x1, s1, value=-1.0)
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):  # type: ignore[override]
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        return _rotate(g.contiguous(), cos, sin, -1.0), None, None


def rope_simulated(x_BTHD: Tensor, cos_BTD: Tensor, sin_BTD: Tensor) -> Tensor:
    """RoPE with tables of shape (B or 1, T, D) on ``x`` (B, T, H, D), D even; equals ``apply_rope``.

    Gradients flow to ``x`` only (the tables are constants of the positions)."""
    if x_BTHD.shape[-1] % 2:
        raise ValueError(f"RoPE needs an even feature size, got {x_BTHD.shape[-1]}")
    cos = cos_BTD.detach().unsqueeze(2).to(x_BTHD.dtype)
    sin = sin_BTD.detach().unsqueeze(2).to(x_BTHD.dtype)
    return _Rope.apply(x_BTHD, cos, sin)


def rotate_transposed(g_BTHD: Tensor, cos_BTD: Tensor, sin_BTD: Tensor) -> Tensor:
    """The transposed RoPE rotation (the gradient of :func:`rope_simulated` with respect to its input)."""
    cos = cos_BTD.unsqueeze(2).to(g_BTHD.dtype)
    sin = sin_BTD.unsqueeze(2).to(g_BTHD.dtype)
    return _rotate(g_BTHD.contiguous(), cos, sin, -1.0)
