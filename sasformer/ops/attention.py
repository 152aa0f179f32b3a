"""Scaled dot-product attention for every variant, through one function.

The caller passes heads-first tensors; query/key size may differ from value size (SAS, MLA) and the
key/value head count may divide the query head count (GQA/MQA, possibly after simulation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def attend(
    q_BHTD: Tensor,
    k_BHSD: Tensor,
    v_BHSE: Tensor,
    mask_BTS: Tensor | None,
    scale: float | None = None,
) -> Tensor:
    """Attention of T queries over S keys; returns (B, H, T, E).

    ``mask_BTS`` is a boolean (B, 1, T, S) mask (True = may attend) or None, which means plain causal
    attention with queries and keys aligned at the end (T == S: ordinary causal; T < S: the last T
    positions of S, as in cached decoding without padding).
    """
    n_q, n_kv = q_BHTD.shape[1], k_BHSD.shape[1]
    if n_q != n_kv:
        # Grouped heads: query head i reads key/value head i // (n_q // n_kv).
        rep = n_q // n_kv
        k_BHSD = k_BHSD.repeat_interleave(rep, dim=1)
        v_BHSE = v_BHSE.repeat_interleave(rep, dim=1)
    T, S = q_BHTD.shape[2], k_BHSD.shape[2]
    if mask_BTS is None:
        if T == S:
            return F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSE, is_causal=True, scale=scale)
        if T == 1:
            return F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSE, scale=scale)
        mask_BTS = causal_mask(T, S, q_BHTD.device)
    return F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSE, attn_mask=mask_BTS, scale=scale)


def _positions(T: int, S: int, device: torch.device) -> tuple[Tensor, Tensor]:
    q_pos = torch.arange(S - T, S, device=device).view(1, 1, T, 1)
    k_pos = torch.arange(S, device=device).view(1, 1, 1, S)
    return q_pos, k_pos


def causal_mask(T: int, S: int, device: torch.device) -> Tensor:
    """(1, 1, T, S) boolean mask: query t (at absolute position S - T + t) sees keys 0 .. S - T + t."""
    q_pos, k_pos = _positions(T, S, device)
    return k_pos <= q_pos


def padded_causal_mask(key_padding_BS: Tensor, T: int) -> Tensor:
    """Causal mask for the last T of S positions, combined with a (B, S) key mask (1 = real token).

    A query row whose keys are all masked (a padding query) may see itself, so softmax has no empty
    row and produces no NaN; the output at padding positions is never used.
    """
    B, S = key_padding_BS.shape
    q_pos, k_pos = _positions(T, S, key_padding_BS.device)
    mask = (k_pos <= q_pos) & key_padding_BS.bool().view(B, 1, 1, S)
    empty_row = ~mask.any(dim=-1, keepdim=True)
    return mask | (empty_row & (k_pos == q_pos))
