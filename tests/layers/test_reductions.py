"""Variants that must reduce to one another with shared weights."""

from __future__ import annotations

import pytest
import torch

from sasformer.layers.registry import build_attention
from tests.layers.helpers import context

D = 40


def test_gqa_with_all_kv_heads_is_mha():
    mha = build_attention("mha", D, {"n_heads": 5})
    gqa = build_attention("gqa", D, {"n_heads": 5, "n_kv_heads": 5})
    gqa.load_state_dict(mha.state_dict())
    x = torch.randn(2, 7, D)
    torch.testing.assert_close(gqa(x, context(2, 7)), mha(x, context(2, 7)))


def test_gqa_equals_mha_with_repeated_kv_weights():
    H, Hkv, Dh = 6, 2, 8
    gqa = build_attention("gqa", D, {"n_heads": H, "n_kv_heads": Hkv, "head_dim": Dh})
    mha = build_attention("mha", D, {"n_heads": H, "head_dim": Dh})
    sd = gqa.state_dict()
    for name in ("k_proj.weight", "v_proj.weight"):  # kv head g serves query heads g*3 .. g*3+2
        sd[name] = sd[name].view(Hkv, Dh, D).repeat_interleave(H // Hkv, dim=0).reshape(H * Dh, D)
    mha.load_state_dict(sd)
    x = torch.randn(2, 9, D)
    torch.testing.assert_close(gqa(x, context(2, 9)), mha(x, context(2, 9)))


def test_mqa_is_one_kv_head():
    mqa = build_attention("mqa", D, {"n_heads": 3, "head_dim": 8})
    assert mqa.n_kv_heads == 1 and mqa.k_proj.out_features == 8
    gqa = build_attention("gqa", D, {"n_heads": 3, "n_kv_heads": 1, "head_dim": 8})
    gqa.load_state_dict(mqa.state_dict())
    x = torch.randn(1, 7, D)
    torch.testing.assert_close(gqa(x, context(1, 7)), mqa(x, context(1, 7)))


def _sas_as_mha(rope: str, kernel_size: int):
    H = 4
    sas = build_attention("sas", D, {"n_heads": H, "n_sim_heads": H, "sim_head_dim": D // H,
                                      "kernel_size": kernel_size, "rope": rope, "sim_init": "identity"})
    torch.nn.init.zeros_(sas.o_proj.bias)
    mha = build_attention("mha", D, {"n_heads": H})
    mha.load_state_dict({k: v for k, v in sas.state_dict().items() if k.split(".")[0] in ("q_proj", "k_proj", "v_proj")}
                        | {"o_proj.weight": sas.o_proj.weight.detach()})
    return sas, mha


def test_identity_sas_is_mha():
    for rope in ("after", "before"):
        for k in (1, 3, 5):
            sas, mha = _sas_as_mha(rope, k)
            x = torch.randn(2, 11, D)
            torch.testing.assert_close(sas(x, context(2, 11)), mha(x, context(2, 11)), rtol=1e-5, atol=1e-6)


def test_identity_sas_with_more_heads_is_mha():
    """With H' = 3H and identity (tiled) simulation, every group repeats MHA, and PEAA averages them."""
    H = 4
    with pytest.warns(UserWarning, match="training keeps them equal"):  # fine for this check, a trap for training
        sas = build_attention("sas", D, {"n_heads": H, "n_sim_heads": 3 * H, "sim_head_dim": D // H,
                                         "sim_init": "identity"})
    torch.nn.init.zeros_(sas.o_proj.bias)
    mha = build_attention("mha", D, {"n_heads": H})
    shared = ("q_proj.weight", "k_proj.weight", "v_proj.weight")
    mha.load_state_dict({k: v for k, v in sas.state_dict().items() if k in shared}
                        | {"o_proj.weight": sas.o_proj.weight.detach()})
    x = torch.randn(2, 7, D)
    torch.testing.assert_close(sas(x, context(2, 7)), mha(x, context(2, 7)), rtol=1e-5, atol=1e-6)


def test_peaa_mean_equals_mean_of_projected_groups():
    sas = build_attention("sas", D, {"n_heads": 4, "n_sim_heads": 12})
    o = torch.randn(2, 5, 12, D // 4)
    groups = o.view(2, 5, 3, D)
    expected = torch.stack([sas.o_proj(groups[:, :, g]) for g in range(3)]).mean(0)
    torch.testing.assert_close(sas.aggregate(o), expected, rtol=1e-5, atol=1e-6)
