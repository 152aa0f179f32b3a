"""Multi-head latent attention: its equations written out, checked against the layer."""

from __future__ import annotations

import math

import pytest
import torch

from sasformer.layers.mla import MultiHeadLatentAttention
from tests.layers.helpers import (
    assert_layer_matches_equations,
    causal_attention_written_out,
    rope_written_out,
)


def rms_norm_written_out(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * gain


def mla_written_out(layer: MultiHeadLatentAttention, x_BTd: torch.Tensor) -> torch.Tensor:
    """MLA (DeepSeek-V2) from the layer's parameters, head by head.

    Query: c_q = norm(W_DQ x) and [q_nope | q_rope] = W_UQ c_q per head (W_Q x when q_lora_rank is 0).
    Keys and values: [c_kv | k_rope] = W_DKV x, c_kv normalised, [k_nope | v] = W_UKV c_kv per head.
    RoPE turns q_rope and the one k_rope all heads share; scores are
    (q_nope . k_nope + q_rope . k_rope) / sqrt(nope + rope), causal; then the output projection.
    """
    a = layer.args
    H, nope, rope, dv, rkv = a.n_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank
    out = []
    for x_Td in x_BTd:
        T = x_Td.shape[0]
        if a.q_lora_rank > 0:
            c_q = rms_norm_written_out(x_Td @ layer.q_down.weight.T, layer.q_norm.weight, a.norm_eps)
            q = (c_q @ layer.q_up.weight.T).reshape(T, H, nope + rope)
        else:
            q = (x_Td @ layer.q_proj.weight.T).reshape(T, H, nope + rope)
        down = x_Td @ layer.kv_down.weight.T
        c_kv = rms_norm_written_out(down[:, :rkv], layer.kv_norm.weight, a.norm_eps)
        k_rope = rope_written_out(down[:, rkv:])  # (T, rope), one for all heads
        kv = (c_kv @ layer.kv_up.weight.T).reshape(T, H, nope + dv)
        heads = []
        for h in range(H):
            q_h = torch.cat((q[:, h, :nope], rope_written_out(q[:, h, nope:])), dim=-1)
            k_h = torch.cat((kv[:, h, :nope], k_rope), dim=-1)
            heads.append(causal_attention_written_out(q_h, k_h, kv[:, h, nope:], 1 / math.sqrt(nope + rope)))
        out.append(torch.cat(heads, dim=-1) @ layer.o_proj.weight.T)
    return torch.stack(out)


@pytest.mark.parametrize("d_model,args", [
    (19, {"n_heads": 3, "q_lora_rank": 5, "kv_lora_rank": 7, "qk_nope_head_dim": 3, "qk_rope_head_dim": 4,
          "v_head_dim": 5}),
    (15, {"n_heads": 2, "q_lora_rank": 0, "kv_lora_rank": 5, "qk_nope_head_dim": 5, "qk_rope_head_dim": 6,
          "v_head_dim": 3}),
    (13, {"n_heads": 5, "q_lora_rank": 3, "kv_lora_rank": 9, "qk_nope_head_dim": 0, "qk_rope_head_dim": 2,
          "v_head_dim": 7}),
])
def test_forward_and_input_gradient_match_the_equations(d_model, args):
    assert_layer_matches_equations("mla", d_model, args, mla_written_out)
