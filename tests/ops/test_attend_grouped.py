"""Grouped-head attention over a cache (T < S) equals attention with keys/values repeated per head."""

import pytest
import torch
import torch.nn.functional as F

from sasformer.ops.attention import attend, causal_mask, padded_causal_mask


@pytest.mark.parametrize("T,S", [(1, 9), (3, 11), (7, 8)])
@pytest.mark.parametrize("padded", [False, True])
def test_folded_grouped_attention_matches_repeated(T, S, padded):
    B, H, G, D, E = 2, 6, 2, 8, 5
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, G, S, D), torch.randn(B, G, S, E)
    if padded:
        keep = torch.ones(B, S)
        keep[1, :3] = 0
        mask = padded_causal_mask(keep, T)
    else:
        mask = None
    ref_mask = causal_mask(T, S, q.device) if mask is None else mask
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1), attn_mask=ref_mask
    )
    torch.testing.assert_close(attend(q, k, v, mask), expected, rtol=1e-5, atol=1e-5)
