"""Tensor product attention: its equations written out, and the scale of q, k, v at initialisation."""

from __future__ import annotations

import math

import pytest
import torch

from sasformer.layers.registry import build_attention
from sasformer.layers.tpa import TensorProductAttention
from sasformer.models.config import ModelConfig
from sasformer.models.decoder import DecoderLM
from tests.layers.helpers import (
    assert_layer_matches_equations,
    causal_attention_written_out,
    rope_written_out,
)


def tpa_written_out(layer: TensorProductAttention, x_BTd: torch.Tensor) -> torch.Tensor:
    """TPA (Zhang et al., 2025) token by token, from the layer's parameters.

    For n in q, k, v with rank R_n: A_n(x_t) = W_A x_t read as (H, R_n), B_n(x_t) = W_B x_t read as
    (R_n, D); RoPE turns each row of B_q and B_k; n_t[h] = (1 / R_n) sum_r A_n(x_t)[h, r] B_n(x_t)[r].
    Then causal attention per head with scale 1/sqrt(D), and the output projection of the heads.
    """
    H, D = layer.n_heads, layer.head_dim
    out = []
    for x_Td in x_BTd:
        T = x_Td.shape[0]
        qkv = {}
        for n in ("q", "k", "v"):
            R = layer.ranks[n]
            a = (x_Td @ layer.head_factors[n].weight.T).reshape(T, H, R)
            b = (x_Td @ layer.feature_factors[n].weight.T).reshape(T, R, D)
            if n != "v":
                b = torch.stack([rope_written_out(b[:, r]) for r in range(R)], dim=1)
            total = torch.zeros(T, H, D, dtype=x_Td.dtype)
            for r in range(R):
                total = total + a[:, :, r, None] * b[:, r, None, :]
            qkv[n] = total / R
        heads = [causal_attention_written_out(qkv["q"][:, h], qkv["k"][:, h], qkv["v"][:, h], 1 / math.sqrt(D))
                 for h in range(H)]
        out.append(torch.cat(heads, dim=-1) @ layer.o_proj.weight.T)
    return torch.stack(out)


@pytest.mark.parametrize("d_model,args", [
    (21, {"n_heads": 3, "head_dim": 6, "q_rank": 3, "k_rank": 2, "v_rank": 1}),
    (17, {"n_heads": 5, "head_dim": 4, "q_rank": 1, "k_rank": 3, "v_rank": 2}),
])
def test_forward_and_input_gradient_match_the_equations(d_model, args):
    assert_layer_matches_equations("tpa", d_model, args, tpa_written_out)


# ---- scale at initialisation: TPA's q, k, v must have MHA's variance, so that comparisons start even ----

D_INIT, H_INIT = 256, 4
RANKS = [(6, 2, 2), (3, 8, 1)]  # the paper's default ranks, and others (a sqrt(R) or R error shows at R >= 2)


def _tpa_qkv_variances(layer: TensorProductAttention, x: torch.Tensor) -> dict[str, float]:
    # before RoPE: a rotation does not change the variance
    return {n: layer.contract(*layer.factors(n, x)).var().item() for n in ("q", "k", "v")}


def _mha_qkv_variances(layer, x: torch.Tensor) -> dict[str, float]:
    return {n: getattr(layer, f"{n}_proj")(x).var().item() for n in ("q", "k", "v")}


def _tpa_args(ranks: tuple[int, int, int]) -> dict[str, int]:
    return {"n_heads": H_INIT, "q_rank": ranks[0], "k_rank": ranks[1], "v_rank": ranks[2]}


def _mean_ratios(build_pair) -> dict[str, float]:
    """TPA's over MHA's q/k/v variance on unit-variance input, averaged over three seeds (each a fresh draw)."""
    sums = dict.fromkeys("qkv", 0.0)
    for seed in range(3):
        torch.manual_seed(seed)
        mha, tpa = build_pair()
        x = torch.randn(4, 32, D_INIT)
        with torch.no_grad():
            tpa_var, mha_var = _tpa_qkv_variances(tpa, x), _mha_qkv_variances(mha, x)
        for n in sums:
            sums[n] += tpa_var[n] / mha_var[n] / 3
    return sums


def _assert_mha_scale(ratios: dict[str, float]) -> None:
    # seed-to-seed spread of the 3-seed mean is about 0.93 .. 1.10; an error of sqrt(2) gives 1.41 or 0.71
    for n, ratio in ratios.items():
        assert 0.8 < ratio < 1.25, f"Var({n}) of TPA is {ratio:.3g} x MHA's at initialisation: {ratios}"


@pytest.mark.parametrize("ranks", RANKS)
def test_layer_init_gives_qkv_the_variance_of_mha(ranks):
    _assert_mha_scale(_mean_ratios(lambda: (build_attention("mha", D_INIT, {"n_heads": H_INIT}),
                                            build_attention("tpa", D_INIT, _tpa_args(ranks)))))


@pytest.mark.parametrize("init_std", [0.02, 0.05])
@pytest.mark.parametrize("ranks", RANKS)
def test_model_init_gives_qkv_the_variance_of_mha(ranks, init_std):
    """In a model, whose normal(0, init_std) initialisation re-draws every projection (as in comparisons)."""

    def attention(name: str, args: dict[str, int]):
        config = ModelConfig(vocab_size=64, d_model=D_INIT, n_layers=1, max_seq_len=32, attention=name,
                             attention_args=args, init_std=init_std)
        return DecoderLM(config).blocks[0].attn

    _assert_mha_scale(_mean_ratios(lambda: (attention("mha", {"n_heads": H_INIT}),
                                            attention("tpa", _tpa_args(ranks)))))


def test_state_dict_layout_is_unchanged():
    """Checkpoints name the head factors as a bias-free ``nn.Linear`` would: (H * R, d_model) ``weight``."""
    layer = build_attention("tpa", 24, {"n_heads": 3, "head_dim": 4, "q_rank": 5, "k_rank": 2, "v_rank": 1})
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {
        "head_factors.q.weight": (15, 24), "head_factors.k.weight": (6, 24), "head_factors.v.weight": (3, 24),
        "feature_factors.q.weight": (20, 24), "feature_factors.k.weight": (8, 24),
        "feature_factors.v.weight": (4, 24), "o_proj.weight": (24, 12),
    }
