"""The SAS decode path (sasformer.layers.sas_decode) against the ordinary path, inside a model."""

from __future__ import annotations

import pytest
import torch

from sasformer.layers import sas_decode
from sasformer.layers.simulation import set_simulation_impl
from sasformer.models.decoder import DecoderLM
from tests.decode_helpers import cached_logits, tiny_model, token_ids

torch.set_num_threads(1)

VOCAB = 53
TOL = dict(atol=1e-5, rtol=1e-5)

CONFIGS: dict[str, dict] = {
    "mha-base": {"n_heads": 3, "n_sim_heads": 9, "sim_head_dim": 10},
    "gqa-base-k1": {"n_heads": 4, "n_kv_heads": 2, "n_sim_heads": 8, "kernel_size": 1},
    "mqa-base-full-peaa": {"n_heads": 4, "n_kv_heads": 1, "peaa": "full", "kernel_size": 5},
    "rope-before": {"n_heads": 3, "n_sim_heads": 6, "sim_head_dim": 14, "rope": "before"},
    "rope-none-values-unsimulated": {"n_heads": 2, "n_sim_heads": 6, "rope": "none", "simulate_v": False,
                                     "sim_head_dim": 7},
}


def tiny_sas(args: dict, seed: int = 0) -> DecoderLM:
    return tiny_model("sas", args, vocab=VOCAB, max_seq_len=96, seed=seed)


def ids(B: int, T: int) -> torch.Tensor:
    return token_ids(B, T, vocab=VOCAB, seed=3)


def tokens_per_call(calls: list[tuple[str, int]]) -> list[int]:
    return [T for _, T in calls]


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_decode_path_equals_reference_path(name: str, decode_calls: list[tuple[str, int]]) -> None:
    model = tiny_sas(CONFIGS[name])
    tokens = ids(2, 1 + 1 + 7 + 63)
    pieces = [1, 1, 7, 63]  # the first piece fills the empty cache on the ordinary path
    fast = cached_logits(model, tokens, pieces)
    assert tokens_per_call(decode_calls) == [1, 1, 7, 7, 63, 63]  # two layers
    set_simulation_impl(model, "naive")
    reference = cached_logits(model, tokens, pieces)
    torch.testing.assert_close(fast, reference, **TOL)
    torch.testing.assert_close(fast, model(tokens), **TOL)


@torch.no_grad()
def test_plan_follows_weight_changes_in_place(decode_calls: list[tuple[str, int]]) -> None:
    model = tiny_sas(CONFIGS["mha-base"])
    other = tiny_sas(CONFIGS["mha-base"], seed=5)
    tokens = ids(1, 6)
    cached_logits(model, tokens, [5, 1])
    attn = model.blocks[0].attn
    plan = attn.__dict__["_decode_plan"]
    storage = [t.data_ptr() for t in plan.tensors()]
    model.load_state_dict(other.state_dict())  # copies into the same parameters
    fresh = cached_logits(model, tokens, [5, 1])
    torch.testing.assert_close(fresh, other(tokens), **TOL)
    assert attn.__dict__["_decode_plan"] is plan and [t.data_ptr() for t in plan.tensors()] == storage
    with torch.no_grad():
        attn.features_k.w4.mul_(-2.0)
        attn.o_proj.bias.add_(1.0)
    changed = cached_logits(model, tokens, [5, 1])
    set_simulation_impl(model, "naive")
    torch.testing.assert_close(changed, cached_logits(model, tokens, [5, 1]), **TOL)


@torch.no_grad()
def test_plan_rebuilt_for_a_new_dtype() -> None:
    model = tiny_sas(CONFIGS["gqa-base-k1"])
    tokens = ids(2, 8)
    cached_logits(model, tokens, [7, 1])
    model.double()
    out = cached_logits(model, tokens, [7, 1])
    assert model.blocks[1].attn.__dict__["_decode_plan"].groups[0].m1.dtype == torch.float64
    torch.testing.assert_close(out, model(tokens), atol=1e-10, rtol=1e-10)


def test_ordinary_path_when_not_decoding(decode_calls: list[tuple[str, int]], monkeypatch) -> None:
    model = tiny_sas(CONFIGS["mha-base"])
    tokens = ids(1, 3 + sas_decode.DECODE_MAX_TOKENS + 1)
    cached_logits(model, tokens, [3, 1], preallocate=False).sum().backward()  # gradients on: training-style call
    with torch.no_grad():
        cached_logits(model, tokens, [3, sas_decode.DECODE_MAX_TOKENS + 1])  # too many tokens
        model(tokens[:, :5])  # no cache
        monkeypatch.setenv("SASFORMER_SIMULATE", "naive")  # an implementation forced
        cached_logits(model, tokens, [3, 1])
        monkeypatch.delenv("SASFORMER_SIMULATE")
        compact = tiny_sas({**CONFIGS["mha-base"], "cache_mode": "compact"})
        cached_logits(compact, tokens, [3, 1])
        sas_decode.set_decode_path(model, "off")
        cached_logits(model, tokens, [3, 1])
        sas_decode.set_decode_path(model, "auto")
        cached_logits(model, tokens, [3, 1])  # CPU tensors
    assert decode_calls == []
    with torch.no_grad():
        sas_decode.set_decode_path(model, "on")
        cached_logits(model, tokens, [3, 1])
    assert tokens_per_call(decode_calls) == [1, 1]
    with pytest.raises(ValueError, match="decode path mode"):
        sas_decode.set_decode_path(model, "cuda")


@torch.no_grad()
def test_inference_mode_weights_and_clearing() -> None:
    with torch.inference_mode():
        model = tiny_sas(CONFIGS["rope-before"])
        tokens = ids(1, 5)
        out = cached_logits(model, tokens, [4, 1])
        torch.testing.assert_close(out, model(tokens), **TOL)
    sas_decode.clear_decode_plans(model)
    assert all("_decode_plan" not in m.__dict__ for m in model.modules())
    assert sas_decode.prepare_decode(model)  # built anew: new storage
    assert not sas_decode.prepare_decode(model)  # unchanged weights: nothing to do


@pytest.mark.parametrize("name", ["mha-base", "gqa-base-k1"])
@torch.no_grad()
def test_decode_path_with_left_padding(name: str, decode_calls: list[tuple[str, int]]) -> None:
    model = tiny_sas(CONFIGS[name])
    tokens = ids(3, 12)
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0
    mask[2, :7] = 0
    cache = model.new_cache(12)
    out = [model(tokens[:, :8], attention_mask=mask[:, :8], cache=cache)]
    for t in range(8, 12):
        out.append(model(tokens[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache))
    assert tokens_per_call(decode_calls) == [1] * 8
    full = model(tokens, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(out, dim=1)[real], full[real], **TOL)
