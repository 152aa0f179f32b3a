"""Hugging Face wrappers: config conversion, save/load, generate() with our cache, export, generate command."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import sasformer

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from sasformer.generation import generate, load_decoder, model_config_from_dict
from sasformer.models.hf import register
from sasformer.models.hf.configuration_sasformer import SASFormerConfig
from sasformer.models.hf.modeling_sasformer import SASFormerCache, SASFormerForCausalLM, SASFormerModel
from tests.models.hf_fixtures import (
    VARIANTS,
    VOCAB,
    tiny_config,
    tiny_decoder,
    write_tokenizer_json,
    write_training_checkpoint,
)

# tiny models: thread start-up costs more than the math
torch.set_num_threads(1)
register()


def hf_model(name: str, tie: bool = True, seed: int = 0) -> SASFormerForCausalLM:
    return SASFormerForCausalLM.from_decoder_lm(tiny_decoder(name, tie, seed), pad_token_id=0).eval()


def random_ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def test_config_converts_both_ways_and_validates(tmp_path) -> None:
    model_config = tiny_config("sas-gqa", tie=False)
    hf_config = SASFormerConfig.from_model_config(model_config, eos_token_id=0)
    assert hf_config.to_model_config() == model_config
    assert hf_config.hidden_size == 32 and hf_config.num_hidden_layers == 2 and hf_config.max_position_embeddings == 128
    hf_config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SASFormerConfig) and loaded.to_model_config() == model_config
    assert loaded.eos_token_id == 0 and loaded.tie_word_embeddings is False
    assert model_config_from_dict(json.loads((tmp_path / "config.json").read_text())) == model_config
    with pytest.raises(ValueError, match="n_sim_heads"):
        SASFormerConfig(attention="sas", attention_args={"n_heads": 4, "n_sim_heads": 6}, d_model=32)
    with pytest.raises(ValueError, match="unknown key"):
        SASFormerConfig(attention="mha", attention_args={"n_head": 4})


def test_register_is_idempotent() -> None:
    assert register() and register()
    assert AutoModelForCausalLM.from_config(SASFormerConfig.from_model_config(tiny_config("mha"))).__class__ is (
        SASFormerForCausalLM
    )


@pytest.mark.parametrize("name", list(VARIANTS))
@torch.no_grad()
def test_hf_model_computes_what_decoder_lm_computes(name: str) -> None:
    decoder = tiny_decoder(name)
    model = SASFormerForCausalLM.from_decoder_lm(decoder).eval()
    ids = random_ids(2, 7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    torch.testing.assert_close(model(ids).logits, decoder(ids), atol=0, rtol=0)
    padded = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(padded, decoder(ids, attention_mask=mask), atol=0, rtol=0)
    torch.testing.assert_close(model.to_decoder_lm()(ids), decoder(ids), atol=0, rtol=0)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("tie", [True, False])
@torch.no_grad()
def test_save_pretrained_round_trip_is_exact(name: str, tie: bool, tmp_path) -> None:
    model = hf_model(name, tie)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, SASFormerForCausalLM)
    assert (loaded.lm_head.weight is loaded.model.embed.weight) is tie
    expected = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    ids = random_ids(2, 7)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(base, SASFormerModel)
    torch.testing.assert_close(base(ids).last_hidden_state, model.model(ids).last_hidden_state, atol=0, rtol=0)


@pytest.mark.parametrize("name", list(VARIANTS))
@torch.no_grad()
def test_greedy_generate_with_and_without_cache(name: str) -> None:
    model = hf_model(name, tie=False)
    ids = random_ids(2, 9)
    lengths: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: lengths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    cached = model.generate(ids, max_new_tokens=6, do_sample=False)
    hook.remove()
    uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert lengths[:2] == [9, 1] and set(lengths[1:]) == {1}  # one prefill, then one token per step
    assert cached.shape == (2, 15)
    assert torch.equal(cached, uncached)
    assert len(set(cached[0, 9:].tolist())) > 1  # a non-degenerate continuation, so equality means something


@pytest.mark.parametrize("name", ["mha", "mla", "tpa", "sas-simulated", "sas-compact", "sas-gqa"])
@torch.no_grad()
def test_batched_generate_with_left_padding_matches_each_prompt(name: str) -> None:
    model = hf_model(name, tie=False)
    prompts = [random_ids(1, n, seed=n)[0] for n in (8, 3, 1)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, T - len(p):], mask[row, T - len(p):] = p, 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for row, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=5, do_sample=False)
        assert torch.equal(batched[row, T:], alone[0, len(p):]), row


@torch.no_grad()
def test_sampling() -> None:
    model = hf_model("sas-compact", tie=False)
    ids = random_ids(3, 4)
    greedy = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=True, top_k=1), greedy)
    torch.manual_seed(3)
    first = model.generate(ids, max_new_tokens=8, do_sample=True, temperature=1.5, top_k=20)
    torch.manual_seed(3)
    again = model.generate(ids, max_new_tokens=8, do_sample=True, temperature=1.5, top_k=20)
    assert torch.equal(first, again) and not torch.equal(first, model.generate(ids, max_new_tokens=8, do_sample=False))
    assert first.min() >= 0 and first.max() < VOCAB


@torch.no_grad()
def test_beam_search_and_several_samples_per_prompt_use_the_cache_correctly() -> None:
    model = hf_model("sas-compact", tie=False)
    ids = random_ids(2, 5)
    beams = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(beams, model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=False))
    several = model.generate(ids, max_new_tokens=4, do_sample=True, top_k=1, num_return_sequences=3)
    greedy = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(several, greedy.repeat_interleave(3, dim=0))


@torch.no_grad()
def test_labels_give_the_shifted_loss_and_cache_is_ours() -> None:
    from transformers import DynamicCache

    model = hf_model("mla")
    ids = random_ids(2, 6)
    out = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)
    from sasformer.models.hf.modeling_sasformer import CACHE_FIELD

    assert isinstance(getattr(out, CACHE_FIELD), SASFormerCache) and getattr(out, CACHE_FIELD).get_seq_length() == 6
    with pytest.raises(ValueError, match="own KV cache"):
        model(ids, **{CACHE_FIELD: DynamicCache()})


def test_requests_the_model_cannot_answer_are_errors() -> None:
    model = hf_model("mha")
    ids = random_ids(2, 6)
    for flag in ("output_hidden_states", "output_attentions"):  # None in their place would look like an answer
        with pytest.raises(ValueError, match=f"{flag}=True is not supported"):
            model(ids, **{flag: True})
    assert model(ids, output_hidden_states=False).logits.shape == (2, 6, model.config.vocab_size)
    model.config.output_hidden_states = True  # asked through the config, as transformers allows
    with pytest.raises(ValueError, match="output_hidden_states=True is not supported"):
        model(ids)
    model.config.output_hidden_states = False
    with pytest.raises(ValueError, match="logits_to_keep=2 keeps only the last"):
        model(ids, labels=ids, logits_to_keep=2)


@pytest.mark.parametrize("nested", [True, False])
@torch.no_grad()
def test_export_checkpoint_then_load_everywhere(nested: bool, tmp_path) -> None:
    from sasformer.commands import export

    decoder = tiny_decoder("sas-compact", tie=True)
    ckpt = write_training_checkpoint(decoder, tmp_path / "ckpt", nested=nested)
    tokenizer = write_tokenizer_json(tmp_path / "tok.json")
    out = tmp_path / "hf"
    args = argparse.Namespace(checkpoint=str(ckpt), out=str(out), tokenizer=str(tokenizer), dtype=None)
    assert export.run(args) == 0

    ids = random_ids(2, 7)
    expected = decoder(ids)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.lm_head.weight is model.model.embed.weight
    assert model.config.eos_token_id == 0
    torch.testing.assert_close(model(ids).logits, expected, atol=0, rtol=0)
    torch.testing.assert_close(load_decoder(out)(ids), expected, atol=0, rtol=0)
    torch.testing.assert_close(load_decoder(ckpt)(ids), expected, atol=0, rtol=0)
    assert sasformer.load_decoder is load_decoder  # the package root's loader is this one

    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok("the cat sat", add_special_tokens=False)["input_ids"] == [2, 3, 4]
    assert hf_tok.eos_token_id == 0


def test_loading_errors_name_the_problem(tmp_path) -> None:
    ckpt = write_training_checkpoint(tiny_decoder("mha"), tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["model"]["attention"] = "gqa"
    config["model"]["attention_args"] = {"n_heads": 4, "n_kv_heads": 2}
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match its config"):
        load_decoder(ckpt)
    with pytest.raises(ValueError, match="config.json not found"):
        load_decoder(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown model config key"):
        model_config_from_dict({"d_model": 32, "layers": 2})


@torch.no_grad()
def test_plain_generate_matches_hf_generate() -> None:
    decoder = tiny_decoder("sas-simulated", tie=False)
    model = SASFormerForCausalLM.from_decoder_lm(decoder).eval()
    ids = torch.zeros(2, 6, dtype=torch.long)
    ids[0], ids[1, 2:] = random_ids(1, 6)[0], random_ids(1, 4, seed=9)[0]
    mask = (torch.arange(6) >= torch.tensor([[0], [2]])).long()
    ours = generate(decoder, ids, 7, temperature=0.0, attention_mask=mask)
    theirs = model.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)
    eos = int(ours[0, 6])
    stopped = generate(decoder, ids[:1], 7, temperature=0.0, eos_id=eos)
    assert stopped.shape == (1, 7) and stopped[0, -1] == eos


@pytest.mark.parametrize("name", ["mha", "mla", "tpa", "sas-simulated", "sas-compact", "sas-gqa"])
@torch.no_grad()
def test_static_generate_matches_the_ordinary_loop(name: str) -> None:
    # the static decoder (run eagerly on CPU; a CUDA graph on GPUs) gives the ordinary loop's tokens
    decoder = tiny_decoder(name, tie=False)
    ids = random_ids(2, 6)
    ordinary = generate(decoder, ids, 7, temperature=0.0, static=False)
    static = generate(decoder, ids, 7, temperature=0.0, attention_mask=torch.ones_like(ids), static=True)
    assert torch.equal(static, ordinary) and static.shape == (2, 13)
    assert len(set(ordinary[0, 6:].tolist())) > 1  # a non-degenerate continuation
    eos = int(ordinary[0, 8])
    stopped = [generate(decoder, ids, 7, temperature=0.0, eos_id=eos, static=flag) for flag in (False, True)]
    assert torch.equal(stopped[0], stopped[1]) and (stopped[1][0, 8:] == eos).all()
    limited = generate(decoder, ids, 5, temperature=5.0, vocab_limit=7, static=True,
                       generator=torch.Generator().manual_seed(0))
    assert limited[:, 6:].max() < 7


def test_static_generate_needs_unpadded_prompts_and_is_chosen_on_cuda_only() -> None:
    from sasformer.generation import use_static_decoder

    decoder = tiny_decoder("mha", tie=False)
    ids = random_ids(2, 4)
    mask = torch.ones_like(ids)
    mask[1, 0] = 0
    with pytest.raises(ValueError, match="unpadded prompts"):
        generate(decoder, ids, 3, attention_mask=mask, static=True)
    assert use_static_decoder(True, True, 8)
    assert not use_static_decoder(False, True, 8)  # the CPU: no graph to replay
    assert not use_static_decoder(True, False, 8)  # left padding: the ordinary loop
    assert not use_static_decoder(True, True, 1)  # one token does not repay the capture
    assert torch.equal(generate(decoder, ids, 0, static=True), ids)


def test_generate_command_prints_a_continuation(tmp_path, capsys) -> None:
    from sasformer.commands import generate as generate_command

    ckpt = write_training_checkpoint(tiny_decoder("mqa"), tmp_path / "ckpt")
    tokenizer = write_tokenizer_json(tmp_path / "tok.json")
    args = argparse.Namespace(model=str(ckpt), prompt=["the cat sat", "a dog"], max_new_tokens=4, temperature=0.0,
                              top_k=0, seed=0, tokenizer=str(tokenizer), device="cpu", dtype=None, stop_at_eot=False)
    assert generate_command.run(args) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if not line.startswith("---")]
    assert lines[0].startswith("the cat sat") and lines[1].startswith("a dog")
    assert all(len(line.split()) > 3 for line in lines[:1])


@torch.no_grad()
def test_from_config_initialises_like_decoder_lm() -> None:
    config = SASFormerConfig(vocab_size=61, d_model=64, n_layers=3, attention="sas", init_std=0.02,
                             attention_args={"n_heads": 4, "n_sim_heads": 4, "sim_head_dim": 16,
                                             "sim_init": "identity"})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    attn = model.model.blocks[0].attn
    copy = torch.zeros(4, 4, 3)
    copy[torch.arange(4), torch.arange(4), 1] = 1.0
    assert torch.equal(attn.heads_q.w1, copy) and not attn.heads_q.w2.any()
    assert torch.equal(attn.features_k.w3, torch.eye(16))
    # identity simulation with H' = H, D' = D: the layer is MHA with a biased output projection
    assert abs(model.model.embed.weight.std().item() - 0.02) < 2e-3
    assert abs(attn.o_proj.weight.std().item() - 0.02 / 6**0.5) < 1e-3
    default = AutoModelForCausalLM.from_config(SASFormerConfig(vocab_size=61, d_model=64, n_layers=1, attention="sas",
                                                               attention_args={"n_heads": 4}))
    w1 = default.model.blocks[0].attn.heads_q.w1
    assert 0.5 * (1 / 12) ** 0.5 < w1.abs().max() <= (1 / 12) ** 0.5


@torch.no_grad()
def test_from_config_gives_tpa_head_factors_their_own_scale() -> None:
    """TPA's head factors are drawn at std sqrt(R / d), not the projections' init_std (see layers/tpa.py)."""
    config = SASFormerConfig(vocab_size=61, d_model=256, n_layers=1, attention="tpa", init_std=0.02,
                             attention_args={"n_heads": 4, "head_dim": 16, "q_rank": 6, "k_rank": 2, "v_rank": 2})
    torch.manual_seed(0)
    attn = AutoModelForCausalLM.from_config(config).model.blocks[0].attn
    for name, rank in (("q", 6), ("k", 2)):
        std = attn.head_factors[name].weight.std().item()
        assert abs(std - (rank / 256) ** 0.5) < 0.1 * (rank / 256) ** 0.5, (name, std)
    assert abs(attn.feature_factors["q"].weight.std().item() - 0.02) < 2e-3


@torch.no_grad()
def test_loading_initialises_missing_tpa_head_factors(tmp_path) -> None:
    """A checkpoint without TPA's head factors loads them at their own scale (not left uninitialised)."""
    from safetensors.torch import load_file, save_file

    config = SASFormerConfig(vocab_size=61, d_model=256, n_layers=1, attention="tpa",
                             attention_args={"n_heads": 4, "head_dim": 16, "q_rank": 6, "k_rank": 2, "v_rank": 2})
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    kept = {k: v for k, v in load_file(weights).items() if "head_factors.q" not in k}
    save_file(kept, weights, metadata={"format": "pt"})
    std = AutoModelForCausalLM.from_pretrained(tmp_path).model.blocks[0].attn.head_factors["q"].weight.std().item()
    assert abs(std - (6 / 256) ** 0.5) < 0.1 * (6 / 256) ** 0.5, std


@torch.no_grad()
def test_loading_never_reinitialises_trained_identity_simulation(tmp_path) -> None:
    config = SASFormerConfig(vocab_size=61, d_model=32, n_layers=2, attention="sas",
                             attention_args={"n_heads": 4, "sim_init": "identity"})
    model = SASFormerForCausalLM(config).eval()
    for p in model.parameters():
        p.add_(0.01 * torch.randn_like(p))  # "trained": no longer the identity
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@torch.no_grad()
def test_generate_respects_vocab_limit() -> None:
    decoder = tiny_decoder("gqa", tie=False)
    ids = random_ids(4, 3)
    torch.manual_seed(0)
    out = generate(decoder, ids, 12, temperature=5.0, vocab_limit=7)
    assert out[:, 3:].max() < 7


@torch.no_grad()
def test_generation_continues_from_a_returned_cache() -> None:
    from sasformer.models.hf.modeling_sasformer import CACHE_FIELD

    model = hf_model("sas-compact", tie=False)
    ids = random_ids(2, 5)
    full = model.generate(ids, max_new_tokens=8, do_sample=False)
    first = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = first[CACHE_FIELD]
    assert isinstance(cache, SASFormerCache) and cache.get_seq_length() == 8
    second = model.generate(first.sequences, max_new_tokens=4, do_sample=False, **{CACHE_FIELD: cache})
    assert torch.equal(second, full)
