"""Every invalid configuration raises a ValueError that names the field."""

from __future__ import annotations

import pytest

from sasformer import ModelConfig, preset
from sasformer.layers.registry import build_attention

BAD_ATTENTION_ARGS = [
    ("mha", {"n_heads": 5}, "n_heads=5"),  # 768 not divisible by 5
    ("mha", {"n_heads": 0}, "n_heads=0"),
    ("gqa", {"n_heads": 12, "n_kv_heads": 5}, "n_kv_heads=5"),
    ("mqa", {"n_heads": 12, "n_kv_heads": 2}, "n_kv_heads=1"),
    ("mha", {"n_heads": 4, "head_dim": 7}, "head_dim=7"),
    ("mha", {"n_heads": 12, "n_kv_heads": 4}, "n_kv_heads unset or equal to n_heads=12, got n_kv_heads=4"),  # GQA
    ("mla", {"kv_lora_rank": 0}, "kv_lora_rank=0"),
    ("mla", {"q_lora_rank": -1}, "q_lora_rank=-1"),
    ("mla", {"qk_rope_head_dim": 5}, "qk_rope_head_dim=5"),
    ("mla", {"v_head_dim": 0}, "v_head_dim=0"),
    ("tpa", {"q_rank": 0}, "q_rank=0"),
    ("tpa", {"n_heads": 7}, "n_heads=7"),
    ("sas", {"n_heads": 12, "n_sim_heads": 30}, "n_sim_heads=30 must be a multiple of n_heads=12"),
    ("sas", {"n_heads": 12, "n_sim_heads": 6}, "n_sim_heads=6"),
    ("sas", {"kernel_size": 2}, "kernel_size=2"),
    ("sas", {"kernel_size": 0}, "kernel_size=0"),
    ("sas", {"sim_head_dim": 0}, "sim_head_dim=0"),
    ("sas", {"sim_head_dim": 9}, "sim_head_dim=9"),  # odd D' with rope after
    ("sas", {"rope": "middle"}, "rope='middle'"),
    ("sas", {"peaa": "sum"}, "peaa='sum'"),
    ("sas", {"cache_mode": "fast"}, "cache_mode='fast'"),
    ("sas", {"sim_init": "zeros"}, "sim_init='zeros'"),
    ("sas", {"n_heads": 12, "n_kv_heads": 5}, "n_kv_heads=5"),
]


@pytest.mark.parametrize("variant,args,message", BAD_ATTENTION_ARGS)
def test_invalid_attention_args(variant, args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(attention=variant, attention_args=args)


def test_unknown_attention_args_key_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['n_head'\].*known"):
        ModelConfig(attention="mha", attention_args={"n_head": 12})


def test_unknown_variant():
    with pytest.raises(ValueError, match="attention='flash' is not a known variant"):
        ModelConfig(attention="flash")


@pytest.mark.parametrize("field,value", [("vocab_size", 1), ("d_model", 0), ("n_layers", 0), ("max_seq_len", 0),
                                         ("rope_theta", 0.0), ("norm_eps", 0.0), ("mlp_hidden", 0), ("init_std", 0.0)])
def test_invalid_model_fields(field, value):
    with pytest.raises(ValueError, match=f"{field}="):
        ModelConfig(**{field: value})


def test_unknown_model_key():
    with pytest.raises(ValueError, match=r"unknown model config key\(s\) \['n_layer'\]"):
        ModelConfig.from_dict({"n_layer": 3})


def test_unknown_preset():
    with pytest.raises(ValueError, match="size='huge'"):
        preset("huge")


def test_build_attention_unknown_and_missing():
    with pytest.raises(ValueError, match="not a known variant"):
        build_attention("linear", 64, {})


@pytest.mark.parametrize("args", [{"n_heads": 8, "n_kv_heads": 8, "head_dim": 64}, {"n_kv_heads": None}, {}])
def test_saved_mha_configs_keep_loading(args):
    """Results and checkpoints may spell out ``n_kv_heads`` (resolved: = n_heads) or leave it at its default."""
    config = ModelConfig.from_dict({"attention": "mha", "attention_args": args})
    resolved = config.resolved_attention_args()
    assert resolved.n_kv_heads == resolved.n_heads
    again = ModelConfig.from_dict({**config.to_dict(), "attention_args": resolved.to_dict()})
    assert again.resolved_attention_args() == resolved


def test_saved_mha_hf_config_keeps_loading():
    pytest.importorskip("transformers")
    from sasformer.models.hf.configuration_sasformer import SASFormerConfig

    saved = SASFormerConfig(d_model=64, n_layers=2, attention="mha", attention_args={"n_heads": 4, "n_kv_heads": 4})
    loaded = SASFormerConfig.from_dict(saved.to_dict())
    assert loaded.to_model_config().resolved_attention_args().n_kv_heads == 4


def test_round_trip_dict():
    config = preset("tiny", "sas", attention_args={"kernel_size": 5})
    assert ModelConfig.from_dict(config.to_dict()) == config
