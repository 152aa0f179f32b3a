"""SAS head simulation as GEMMs over chunks of features: the banded matrix of :mod:`.banded`, cut
into blocks so that far fewer of the multiplied entries are zero.

The convolution over the D features of a token is the same map on every chunk of ``c``
consecutive features, given the chunk's input window: its own features plus (k-1)/2 neighbours on
each side (zero past the token's ends). With one row per (token, chunk) holding that window for
every input head, both convolutions are GEMMs

    windows (N*D/c, H*(c+k-1)) @ B1 (H*(c+k-1), H'*c)     B1[h*(c+k-1) + i, o*c + j] = w1[o, h, i - j]

with inner size H*(c+k-1) (216 at GPT-small with c = 16) and (c+k-1)/k times the useful FLOPs
(6x at c = 16, against D/k = 21x for the dense band). The price is a few copies: building the
windows and moving the result back to (token, head, feature) rows for the next step.

Plain autograd ops inside ``torch.utils.checkpoint``: the backward pass recomputes the forward,
so only the compact input is kept, and the function traces under ``torch.compile``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# features per chunk (``SASFORMER_CHUNK`` overrides it); a size that does not divide D falls back to one
# chunk per token. Smaller chunks waste fewer FLOPs ((c+k-1)/k of the useful) in smaller GEMMs.
CHUNK = 16
CHUNK_ENV_VAR = "SASFORMER_CHUNK"


def chunk_size(D: int) -> int:
    """Features per chunk for heads of ``D`` features."""
    text = os.environ.get(CHUNK_ENV_VAR, "").strip()
    if text and not text.isdigit():
        raise ValueError(f"{CHUNK_ENV_VAR}={text!r} must be a positive integer (features per chunk)")
    c = int(text) if text else CHUNK
    return c if 0 < c < D and D % c == 0 else D


def chunk_conv_matrix(w: Tensor, c: int) -> Tensor:
    """(OUT, C, k) conv weight -> (C*(c+k-1), OUT*c): one chunk's input window to its c outputs."""
    OUT, C, k = w.shape
    i = torch.arange(c + k - 1, device=w.device).view(-1, 1)
    j = torch.arange(c, device=w.device).view(1, -1)
    shifts = torch.stack([(i == j + t) for t in range(k)]).to(w.dtype)  # (k, c+k-1, c)
    return torch.einsum("oct,tij->cioj", w, shifts).reshape(C * (c + k - 1), OUT * c)


def _windows(y_NCD: Tensor, c: int, k: int) -> Tensor:
    """(N, C, D) -> (N*D/c, C*(c+k-1)): row (n, q) holds features q*c - (k-1)/2 .. of every channel."""
    N, C, D = y_NCD.shape
    pad = (k - 1) // 2
    win = F.pad(y_NCD, (pad, pad)).unfold(2, c + k - 1, c)  # (N, C, D/c, c+k-1), a view
    return win.permute(0, 2, 1, 3).reshape(N * (D // c), C * (c + k - 1))


def _to_heads(rows: Tensor, N: int, OUT: int, D: int, c: int) -> Tensor:
    """(N*D/c, OUT*c) rows (token, chunk) -> (N, OUT, D)."""
    return rows.view(N, D // c, OUT, c).permute(0, 2, 1, 3).reshape(N, OUT, D)


def _heads(x_NHD: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    N, _, D = x_NHD.shape
    OUT, _, k = w1.shape
    c = chunk_size(D)
    a1 = _to_heads(torch.addmm(b1.repeat_interleave(c), _windows(x_NHD, c, k), chunk_conv_matrix(w1, c)), N, OUT, D, c)
    conv2 = torch.addmm(b2.repeat_interleave(c), _windows(torch.relu(a1), c, k), chunk_conv_matrix(w2, c))
    # add in the chunk layout of conv2 read through a permuted view: one pass, no reshaping copy
    y2 = a1.view(N, OUT, D // c, c) + conv2.view(N, D // c, OUT, c).permute(0, 2, 1, 3)
    return y2.reshape(N, OUT, D)


def _qk(x_NHD: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
        w3: Tensor, b3: Tensor, w4: Tensor, b4: Tensor) -> Tensor:
    z1 = F.linear(_heads(x_NHD, w1, b1, w2, b2), w3, b3)
    return z1 + F.linear(torch.relu(z1), w4, b4)


def _run(fn, x_BTHD: Tensor, *weights: Tensor) -> Tensor:
    dt = x_BTHD.dtype
    args = (x_BTHD.reshape(-1, *x_BTHD.shape[-2:]), *(w.to(dt) for w in weights))
    if torch.is_grad_enabled() and any(a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def simulate_qk_chunked(
    x_BTHD: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    w3: Tensor, b3: Tensor, w4: Tensor, b4: Tensor,
) -> Tensor:
    """Head then feature simulation, (..., H, D) -> (..., H', D'); equals the naive pair."""
    out = _run(_qk, x_BTHD, w1, b1, w2, b2, w3, b3, w4, b4)
    return out.view(*x_BTHD.shape[:-2], w1.shape[0], w3.shape[0])


def simulate_heads_chunked(x_BTHD: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """Head simulation only, (..., H, D) -> (..., H', D)."""
    out = _run(_heads, x_BTHD, w1, b1, w2, b2)
    return out.view(*x_BTHD.shape[:-2], w1.shape[0], x_BTHD.shape[-1])
