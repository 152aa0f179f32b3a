"""Preset parameter parity and the FLOP model against torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sasformer import DecoderLM, ModelConfig, preset
from sasformer.commands.params import parameter_table
from sasformer.models.flops import attention_parameter_count, forward_flops_per_token, parameter_count

VARIANTS = ["mha", "gqa", "mqa", "mla", "tpa", "sas"]


def test_small_mha_is_124m():
    assert 123_000_000 <= parameter_count(preset("small", "mha")) <= 125_000_000


@pytest.mark.parametrize("size,tolerance", [("tiny", 0.05), ("small", 0.01), ("medium", 0.01)])
@pytest.mark.parametrize("variant", ["gqa", "mqa", "mla", "tpa"])
def test_attention_parameters_match_mha(size, tolerance, variant):
    mha = attention_parameter_count(preset(size, "mha"))
    other = attention_parameter_count(preset(size, variant))
    assert abs(other / mha - 1) <= tolerance, f"{variant}@{size}: {other} vs {mha}"


@pytest.mark.parametrize("size", ["small", "medium"])
def test_sas_within_one_percent_of_mha(size):
    mha, sas = parameter_count(preset(size, "mha")), parameter_count(preset(size, "sas"))
    assert 0 < sas / mha - 1 < 0.01


def test_small_head_counts():
    assert preset("small", "gqa").attention_args == {"n_heads": 22, "n_kv_heads": 2, "head_dim": 64}
    assert preset("small", "mqa").attention_args["n_heads"] == 23
    assert preset("small", "tpa").attention_args["n_heads"] == 33
    sas = preset("small", "sas").resolved_attention_args()
    assert (sas.n_sim_heads, sas.sim_head_dim, sas.kernel_size) == (24, 128, 3)


def test_sas_simulation_parameters_match_spec():
    """The method spec: d=768, H=12, D=64, H'=24, D'=128, k=3 adds 57,584 per layer (+768 output bias)."""
    mha = attention_parameter_count(preset("small", "mha"))
    sas = attention_parameter_count(preset("small", "sas"))
    assert sas - mha == 57_584 + 768


TINY = dict(vocab_size=97, d_model=48, n_layers=2, max_seq_len=64)
FLOP_VARIANTS = {
    "mha": {"n_heads": 4},
    "gqa": {"n_heads": 6, "n_kv_heads": 2, "head_dim": 8},
    "mla": {"n_heads": 3, "q_lora_rank": 16, "kv_lora_rank": 12, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
            "v_head_dim": 6},
    "mla_noq": {"n_heads": 3, "q_lora_rank": 0, "kv_lora_rank": 12, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
                "v_head_dim": 6},
    "tpa": {"n_heads": 5, "head_dim": 8, "q_rank": 3, "k_rank": 2, "v_rank": 2},
    "sas": {"n_heads": 4, "kernel_size": 3},
    "sas_gqa_full": {"n_heads": 4, "n_kv_heads": 2, "n_sim_heads": 12, "sim_head_dim": 10, "kernel_size": 5,
                     "peaa": "full"},
    "sas_novsim": {"n_heads": 4, "simulate_v": False, "kernel_size": 1},
}


@pytest.mark.parametrize("name", list(FLOP_VARIANTS))
@pytest.mark.parametrize("T", [7, 32])
def test_flops_match_flop_counter(name, T, monkeypatch):
    # the count is of the method's FLOPs (model FLOPs, as MFU uses): measure the plain reference path
    monkeypatch.setenv("SASFORMER_SIMULATE", "naive")
    variant = name.split("_")[0]
    config = ModelConfig(**TINY, attention=variant, attention_args=FLOP_VARIANTS[name])
    model = DecoderLM(config)
    ids = torch.randint(0, config.vocab_size, (3, T))
    # the math backend decomposes attention into matmuls the counter sees (the CPU flash kernel is not counted)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids)
    measured = counter.get_total_flops() / ids.numel()
    assert forward_flops_per_token(config, T) == pytest.approx(measured, rel=1e-9)


def test_params_command_rows():
    rows = parameter_table(["tiny", "small"], VARIANTS)
    assert len(rows) == 12
    small_sas = next(r for r in rows if r["size"] == "small" and r["variant"] == "sas")
    small_mha = next(r for r in rows if r["size"] == "small" and r["variant"] == "mha")
    assert small_sas["train_flops_per_token"] > small_mha["train_flops_per_token"]
    assert small_sas["params"] == parameter_count(preset("small", "sas"))
