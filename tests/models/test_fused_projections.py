"""Q/K/V and gate/up as one matmul: the same outputs and gradients as the separate projections, and
the same parameter names (checkpoints, Hugging Face export and the reference loader rely on them)."""

from __future__ import annotations

import pytest
import torch

import sasformer.layers.mha as mha_module
import sasformer.layers.sas as sas_module
import sasformer.models.decoder as decoder_module
from sasformer.layers.registry import build_attention
from sasformer.models.config import ModelConfig
from sasformer.models.decoder import DecoderLM
from sasformer.ops.linear import linear_fused_naive, linear_split_naive
from tests.layers.helpers import D_MODEL, VARIANTS, context

FUSED = [name for name, (kind, _) in VARIANTS.items() if kind in ("mha", "gqa", "mqa", "sas")]


def _separate(monkeypatch):
    for module in (mha_module, decoder_module):
        monkeypatch.setattr(module, "linear_fused", linear_fused_naive)
    monkeypatch.setattr(sas_module, "linear_split", linear_split_naive)


def _outputs_and_grads(fn, module, *inputs):
    out = fn(*inputs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * upstream).sum(), [p for p in module.parameters() if p.requires_grad])
    return out, grads


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("T", [1, 7])
def test_attention_fused_projection_matches_separate(name, T, monkeypatch):
    kind, args = VARIANTS[name]
    layer = build_attention(kind, D_MODEL, dict(args))
    x = torch.randn(2, T, D_MODEL)
    ctx = context(2, T)
    got = _outputs_and_grads(layer, layer, x, ctx)
    _separate(monkeypatch)
    want = _outputs_and_grads(layer, layer, x, ctx)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention", ["mha", "gqa", "sas"])
def test_decoder_fused_projections_match_separate(attention, monkeypatch):
    args = {"mha": {"n_heads": 2}, "gqa": {"n_heads": 4, "n_kv_heads": 2}, "sas": {"n_heads": 2}}[attention]
    config = ModelConfig(vocab_size=97, d_model=32, n_layers=2, max_seq_len=64, attention=attention,
                         attention_args=args)
    model = DecoderLM(config)
    assert {"blocks.0.attn.q_proj.weight", "blocks.0.attn.k_proj.weight", "blocks.0.attn.v_proj.weight",
            "blocks.0.mlp.gate_proj.weight", "blocks.0.mlp.up_proj.weight"} <= set(model.state_dict())
    inputs = torch.randint(0, 97, (2, 63))
    got = _outputs_and_grads(model, model, inputs)
    _separate(monkeypatch)
    want = _outputs_and_grads(model, model, inputs)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
