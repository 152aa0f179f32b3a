"""SAS simulation as :mod:`.banded`'s GEMMs with the second head convolution cut into diagonal blocks.

``banded`` runs the second convolution as one (N, H'*D) @ (H'*D, H'*D) GEMM, of which a fraction k/D
of the entries is used (21x the useful FLOPs at GPT-small). Here the first convolution writes its
output feature-major, column ``j*H' + o`` for feature j of simulated head o, so that a chunk of c
consecutive features is a contiguous run of c*H' columns. Within a chunk the convolution is one
(c*H', c*H') block, the same for every chunk, so the bulk of the second convolution is a single GEMM
over (token, chunk) rows read in place:

    Y1 (N*D/c, c*H') @ B (c*H', c*H')        B[i*H' + p, j*H' + o] = w2[o, p, i - j + (k-1)/2]

with c/k times the useful FLOPs (5.3x at c = 16, against 21x). What crosses a chunk border, the
(k-1)/2 edge features of each chunk from the neighbouring chunk's edge, is two more GEMMs over those
edges alone ((k-1)/(2c) of the tensor each). The residual and bias are added in the pass that turns
the result back into head-major rows for the feature MLP and attention, which the compiled graph
fuses with those sums.

The first convolution (and the projection folded into it, as ``banded`` does) is ``banded``'s
matrix with its columns reordered, no more FLOPs. Plain autograd ops throughout: under
``torch.compile`` the partitioner chooses what to keep (``SASFORMER_BANDED_RECOMPUTE=1`` checkpoints
the simulation, as for ``banded``); eager calls run under ``torch.utils.checkpoint`` and keep only
the compact input. Features per chunk: :func:`block_size` (``SASFORMER_BLOCK``, default 16).
"""

from __future__ import annotations

import os

import torch
import torch.utils.checkpoint
from torch import Tensor

from sasformer.ops.simulate.banded import (
    banded_conv_matrix,
    projection_dtype,
    recompute_when_compiled,
    residual_feature_mlp,
)

# features per chunk (``SASFORMER_BLOCK`` overrides it): the second convolution costs c/k times its useful
# FLOPs, in GEMMs of inner size c*H'
BLOCK = 16
BLOCK_ENV_VAR = "SASFORMER_BLOCK"


def block_size(D: int, k: int) -> int:
    """Features per chunk for heads of ``D`` features and kernel ``k``: the smallest divisor of D that is at
    least the setting and at least (k-1)/2 (a border must not reach past the neighbouring chunk)."""
    text = os.environ.get(BLOCK_ENV_VAR, "").strip()
    if text and not text.isdigit():
        raise ValueError(f"{BLOCK_ENV_VAR}={text!r} must be a positive integer (features per chunk)")
    least = max(int(text) if text else BLOCK, (k - 1) // 2, 1)
    return next(c for c in range(least, D + 1) if D % c == 0) if least <= D else D


def feature_major_conv_matrix(w: Tensor, D: int) -> Tensor:
    """``banded_conv_matrix`` with output columns reordered to ``j*OUT + o``: (C*D, D*OUT)."""
    OUT = w.shape[0]
    return banded_conv_matrix(w, D).view(-1, OUT, D).transpose(1, 2).reshape(-1, D * OUT)


def block_matrix(w: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """The part of the convolution ``w`` (OUT, C, k) from input features at positions ``rows`` to output
    features at positions ``cols`` (positions along the feature axis, zero padding implied):
    (len(rows)*C, len(cols)*OUT), row ``a*C + c``, column ``b*OUT + o``."""
    OUT, C, k = w.shape
    taps = torch.arange(k, device=w.device).view(k, 1, 1)
    # input position i feeds output j through tap i - j + (k-1)/2
    shifts = (rows.view(1, -1, 1) - cols.view(1, 1, -1) + (k - 1) // 2 == taps).to(w.dtype)
    return torch.einsum("oct,tab->acbo", w, shifts).reshape(len(rows) * C, len(cols) * OUT)


def second_conv_blocks(w2: Tensor, c: int) -> tuple[Tensor, Tensor, Tensor]:
    """For chunks of ``c`` features: the in-chunk block (c*H', c*H'), the block from the previous chunk's last
    (k-1)/2 features to this chunk's first ones, and from the next chunk's first features to this chunk's last
    ones ((k-1)/2*H' square each)."""
    pad = (w2.shape[-1] - 1) // 2
    dev = w2.device
    inner = torch.arange(c, device=dev)
    edge = torch.arange(pad, device=dev)
    return (block_matrix(w2, inner, inner),
            block_matrix(w2, edge - pad, edge),  # the previous chunk's tail sits just before this chunk
            block_matrix(w2, c + edge, c - pad + edge))  # the next chunk's head just after it


def second_conv_product(r1: Tensor, blocks: tuple[Tensor, Tensor, Tensor], c: int) -> Tensor:
    """ReLU(Y1) M2 (no bias, no residual) for feature-major rows ``r1`` (N, D*H') in chunks of ``c``
    features: (N, D/c, c, H')."""
    inner, from_prev, from_next = blocks
    N, HS = r1.shape[0], inner.shape[1] // c
    G, pad = r1.shape[1] // (c * HS), from_prev.shape[0] // HS
    out = (r1.view(N * G, c * HS) @ inner).view(N, G, c, HS)
    if pad == 0 or G == 1:
        return out
    r4 = r1.view(N, G, c, HS)
    # chunk g's first features from chunk g-1's last ones (chunk 0 has none: the token's zero padding),
    # its last features from chunk g+1's first ones; added in place (the product does not save its output)
    out[:, 1:, :pad] += (r4[:, :-1, c - pad:].reshape(-1, pad * HS) @ from_prev).view(N, G - 1, pad, HS)
    out[:, :-1, c - pad:] += (r4[:, 1:, :pad].reshape(-1, pad * HS) @ from_next).view(N, G - 1, pad, HS)
    return out


def _blocked_traced(x: Tensor, m1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                    w3: Tensor | None, b3: Tensor | None, w4: Tensor | None, b4: Tensor | None, c: int) -> Tensor:
    """x (N, in) rows, ``m1`` (in, D*H') feature-major -> heads (N, H'*D), or with the feature MLP (N*H', D')."""
    N, HS = x.shape[0], w2.shape[0]
    D = m1.shape[1] // HS
    a1 = torch.addmm(b1.repeat(D), x, m1)  # Y1, feature-major: the bias of head o at every column j*H' + o
    conv2 = second_conv_product(torch.relu(a1), second_conv_blocks(w2, c), c)
    # Y2 = Y1 + ReLU(Y1) M2 + b2, turned head-major in the same pass
    y2 = (a1.view(conv2.shape) + conv2 + b2).view(N, D, HS).transpose(1, 2).reshape(N, HS * D)
    return y2 if w3 is None else residual_feature_mlp(y2, w3, b3, w4, b4)


def _simulate(x: Tensor, *operands: Tensor | int | None) -> Tensor:
    """``_blocked_traced``, checkpointed in eager mode (only the compact input is kept) and, when compiling,
    with ``SASFORMER_BANDED_RECOMPUTE=1`` (the switch ``banded`` reads)."""
    recompute = recompute_when_compiled() if torch.compiler.is_compiling() else True
    tensors = [x, *(o for o in operands if isinstance(o, Tensor))]
    if recompute and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return torch.utils.checkpoint.checkpoint(_blocked_traced, x, *operands, use_reentrant=False)
    return _blocked_traced(x, *operands)


def _operands(rows: Tensor, D: int, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
              features: tuple[Tensor | None, ...], weight: Tensor | None = None) -> list[Tensor | int | None]:
    """``_blocked_traced``'s arguments after ``x``, in ``rows``' dtype."""
    dt = rows.dtype
    m1 = feature_major_conv_matrix(w1.to(dt), D)
    if weight is not None:
        m1 = weight.to(dt).t() @ m1  # the projection folded into the first convolution
    return [m1, b1.to(dt), w2.to(dt), b2.to(dt), *(None if w is None else w.to(dt) for w in features),
            block_size(D, w2.shape[-1])]


def _rows(x: Tensor, width: int) -> Tensor:
    # in the dtype a projection of x would compute in (autocast's), as the GEMMs that follow will
    return x.reshape(-1, width).to(projection_dtype(x))


def simulate_qk_blocked(
    x_BTHD: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    w3: Tensor, b3: Tensor, w4: Tensor, b4: Tensor,
) -> Tensor:
    """Head then feature simulation, (..., H, D) -> (..., H', D'); equals the naive pair."""
    D = x_BTHD.shape[-1]
    rows = _rows(x_BTHD, x_BTHD.shape[-2] * D)
    out = _simulate(rows, *_operands(rows, D, w1, b1, w2, b2, (w3, b3, w4, b4)))
    return out.view(*x_BTHD.shape[:-2], w1.shape[0], w3.shape[0])


def simulate_heads_blocked(x_BTHD: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """Head simulation only, (..., H, D) -> (..., H', D)."""
    D = x_BTHD.shape[-1]
    rows = _rows(x_BTHD, x_BTHD.shape[-2] * D)
    out = _simulate(rows, *_operands(rows, D, w1, b1, w2, b2, (None,) * 4))
    return out.view(*x_BTHD.shape[:-2], w1.shape[0], D)


def simulate_qk_blocked_folded(
    x_BTd: Tensor, weight: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    w3: Tensor, b3: Tensor, w4: Tensor, b4: Tensor,
) -> Tensor:
    """``simulate_qk_blocked(linear(x, weight) as heads, ...)``, the projection folded into the first
    convolution: (..., d) -> (..., H', D')."""
    rows, D = _rows(x_BTd, x_BTd.shape[-1]), weight.shape[0] // w1.shape[1]
    out = _simulate(rows, *_operands(rows, D, w1, b1, w2, b2, (w3, b3, w4, b4), weight))
    return out.view(*x_BTd.shape[:-1], w1.shape[0], w3.shape[0])


def simulate_heads_blocked_folded(x_BTd: Tensor, weight: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor
                                  ) -> Tensor:
    """``simulate_heads_blocked(linear(x, weight) as heads, ...)``, folded: (..., d) -> (..., H', D)."""
    rows, D = _rows(x_BTd, x_BTd.shape[-1]), weight.shape[0] // w1.shape[1]
    out = _simulate(rows, *_operands(rows, D, w1, b1, w2, b2, (None,) * 4, weight))
    return out.view(*x_BTd.shape[:-1], w1.shape[0], D)
