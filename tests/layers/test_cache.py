"""KV cache: prefill + cached decoding must reproduce one full forward pass, for every variant."""

from __future__ import annotations

import pytest
import torch

from sasformer.models.config import ModelConfig
from sasformer.models.decoder import DecoderLM

# tiny models: thread start-up costs more than the math, and oversubscribed cores make it far worse
torch.set_num_threads(1)

VOCAB = 61
ATOL = 1e-4

VARIANTS: dict[str, tuple[str, dict]] = {
    "mha": ("mha", {"n_heads": 4}),
    "gqa": ("gqa", {"n_heads": 4, "n_kv_heads": 2}),
    "mqa": ("mqa", {"n_heads": 4}),
    "mla": ("mla", {"n_heads": 4, "q_lora_rank": 16, "kv_lora_rank": 12, "qk_nope_head_dim": 8,
                    "qk_rope_head_dim": 4, "v_head_dim": 6}),
    "mla-fullq": ("mla", {"n_heads": 3, "q_lora_rank": 0, "kv_lora_rank": 10, "qk_nope_head_dim": 6,
                          "qk_rope_head_dim": 6, "v_head_dim": 8}),
    "tpa": ("tpa", {"n_heads": 4, "q_rank": 3, "k_rank": 2, "v_rank": 2}),
    "sas-simulated": ("sas", {"n_heads": 4, "n_sim_heads": 8, "sim_head_dim": 12, "cache_mode": "simulated"}),
    "sas-compact": ("sas", {"n_heads": 4, "n_sim_heads": 8, "sim_head_dim": 12, "cache_mode": "compact"}),
    "sas-before-simulated": ("sas", {"n_heads": 4, "rope": "before", "cache_mode": "simulated"}),
    "sas-before-compact": ("sas", {"n_heads": 4, "rope": "before", "cache_mode": "compact"}),
    "sas-none-simulated": ("sas", {"n_heads": 4, "rope": "none", "sim_head_dim": 7}),
    "sas-none-compact": ("sas", {"n_heads": 4, "rope": "none", "sim_head_dim": 7, "cache_mode": "compact"}),
    "sas-gqa-simulated": ("sas", {"n_heads": 4, "n_kv_heads": 2, "n_sim_heads": 12, "kernel_size": 1}),
    "sas-gqa-compact": ("sas", {"n_heads": 4, "n_kv_heads": 2, "n_sim_heads": 12, "cache_mode": "compact"}),
    "sas-mqa-novsim-full": ("sas", {"n_heads": 4, "n_kv_heads": 1, "simulate_v": False, "peaa": "full",
                                    "cache_mode": "compact"}),
}


def tiny_model(name: str, seed: int = 0, **overrides) -> DecoderLM:
    attention, args = VARIANTS[name]
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, max_seq_len=128, attention=attention,
                         attention_args=dict(args), init_std=0.1, **overrides)
    return DecoderLM(config).eval()


def random_ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def decode_in_pieces(model: DecoderLM, ids: torch.Tensor, sizes: list[int], mask: torch.Tensor | None = None,
                     capacity: int | None = None) -> torch.Tensor:
    """Feed ``ids`` through the cache in consecutive pieces of ``sizes`` tokens; concatenated logits."""
    assert sum(sizes) == ids.shape[1]
    cache = model.new_cache(capacity)
    out, start = [], 0
    for n in sizes:
        piece_mask = None if mask is None else mask[:, : start + n]
        out.append(model(ids[:, start : start + n], attention_mask=piece_mask, cache=cache))
        start += n
    assert cache.seq_len == ids.shape[1]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("capacity", [None, 16])
@torch.no_grad()
def test_prefill_then_token_by_token_equals_full_forward(name: str, capacity: int | None) -> None:
    model = tiny_model(name)
    ids = random_ids(2, 13)
    full = model(ids)
    cached = decode_in_pieces(model, ids, [7] + [1] * 6, capacity=capacity)
    torch.testing.assert_close(cached, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(VARIANTS))
@torch.no_grad()
def test_chunked_prefill_equals_full_forward(name: str) -> None:
    model = tiny_model(name)
    ids = random_ids(3, 17)
    torch.testing.assert_close(decode_in_pieces(model, ids, [1, 5, 3, 1, 7]), model(ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(VARIANTS))
@torch.no_grad()
def test_explicit_positions_cached_equal_the_full_forward_or_are_refused(name: str) -> None:
    # positions 10.. given by the caller: a cached prefill must use them for queries and keys alike; the
    # compact cache, which rotates every cached key again, cannot know earlier calls' positions and says so
    model = tiny_model(name)
    ids = random_ids(2, 8)
    positions = torch.arange(8).unsqueeze(0) + 10
    full = model(ids, position_ids=positions)
    cache = model.new_cache()
    prefill = model(ids[:, :5], position_ids=positions[:, :5], cache=cache)
    torch.testing.assert_close(prefill, full[:, :5], atol=ATOL, rtol=0)
    if model.config.attention == "sas" and model.config.attention_args.get("cache_mode") == "compact":
        with pytest.raises(ValueError, match="needs all keys' positions"):
            model(ids[:, 5:], position_ids=positions[:, 5:], cache=cache)
        assert cache.seq_len == 5  # the refused call left the cache as it was
    else:
        rest = model(ids[:, 5:], position_ids=positions[:, 5:], cache=cache)
        torch.testing.assert_close(rest, full[:, 5:], atol=ATOL, rtol=0)
    # the positions the cache would use anyway (0..S-1, as Hugging Face callers pass them): accepted everywhere
    cache, default = model.new_cache(), torch.arange(8).unsqueeze(0)
    model(ids[:, :5], position_ids=default[:, :5], cache=cache)
    rest = model(ids[:, 5:], position_ids=default[:, 5:], cache=cache)
    torch.testing.assert_close(rest, model(ids)[:, 5:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(VARIANTS))
@torch.no_grad()
def test_left_padded_batch_matches_each_sequence_alone(name: str) -> None:
    model = tiny_model(name)
    lengths, T = [11, 4, 1], 11
    ids = random_ids(len(lengths), T, seed=3)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, T - n :] = 1
    ids = ids.masked_fill(mask == 0, 0)  # padding token ids must not matter

    full_padded = model(ids, attention_mask=mask)
    # prompt of 5 (some rows are all padding there), then chunks and single tokens
    cached = decode_in_pieces(model, ids, [5, 2, 1, 1, 1, 1], mask=mask)
    for row, n in enumerate(lengths):
        alone = model(ids[row : row + 1, T - n :])[0]
        torch.testing.assert_close(full_padded[row, T - n :], alone, atol=ATOL, rtol=0)
        torch.testing.assert_close(cached[row, T - n :], alone, atol=ATOL, rtol=0)
    assert torch.isfinite(cached).all() and torch.isfinite(full_padded).all()


@pytest.mark.parametrize("name", ["mha", "mla", "sas-compact", "sas-simulated"])
@torch.no_grad()
def test_long_sequence_and_single_token(name: str) -> None:
    model = tiny_model(name)
    ids = random_ids(1, 63, seed=5)
    torch.testing.assert_close(decode_in_pieces(model, ids, [1] * 3 + [60]), model(ids), atol=ATOL, rtol=0)
    one = random_ids(2, 1, seed=6)
    torch.testing.assert_close(decode_in_pieces(model, one, [1], capacity=1), model(one), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_cache_bytes_per_token_match_what_is_stored(name: str, dtype: torch.dtype) -> None:
    model = tiny_model(name).to(dtype)
    cache = model.new_cache()
    model(random_ids(2, 3), cache=cache)
    for block, layer in zip(model.blocks, cache.layers):
        assert layer.nbytes_per_token() == block.attn.cache_bytes_per_token(dtype)
        assert all(t.dtype == dtype for t in layer.tensors.values())


def test_sas_compact_cache_is_the_size_of_the_base_projection() -> None:
    compact, simulated, mha = tiny_model("sas-compact"), tiny_model("sas-simulated"), tiny_model("mha")
    assert compact.blocks[0].attn.cache_bytes_per_token() == mha.blocks[0].attn.cache_bytes_per_token()
    assert simulated.blocks[0].attn.cache_bytes_per_token() > compact.blocks[0].attn.cache_bytes_per_token()


@pytest.mark.parametrize("capacity", [None, 12])
@torch.no_grad()
def test_crop_reorder_and_repeat(capacity: int | None) -> None:
    model = tiny_model("sas-compact")
    ids = random_ids(2, 9)
    full = model(ids)
    cache = model.new_cache(capacity)
    model(ids[:, :6], cache=cache)
    cache.crop(-2)  # forget two tokens and feed them again
    assert cache.seq_len == 4
    again = model(ids[:, 4:], cache=cache)
    torch.testing.assert_close(again, full[:, 4:], atol=ATOL, rtol=0)

    cache.crop(5)
    cache.reorder(torch.tensor([1, 0]))
    swapped = model(ids.flip(0)[:, 5:], cache=cache)
    torch.testing.assert_close(swapped, full.flip(0)[:, 5:], atol=ATOL, rtol=0)

    cache.crop(5)
    cache.repeat_interleave(2)
    repeated = model(ids.flip(0).repeat_interleave(2, dim=0)[:, 5:], cache=cache)
    torch.testing.assert_close(repeated, full.flip(0).repeat_interleave(2, dim=0)[:, 5:], atol=ATOL, rtol=0)


def test_capacity_errors_are_clear() -> None:
    model = tiny_model("mha")
    cache = model.new_cache(capacity=4)
    with pytest.raises(ValueError, match="capacity 4 exceeded"):
        model(random_ids(1, 5), cache=cache)
    with pytest.raises(ValueError, match="capacity"):
        model.new_cache(capacity=0)
    with pytest.raises(ValueError, match="cannot crop"):
        model.new_cache().layers[0].crop(-1)


def _static_decode(model: DecoderLM, ids: torch.Tensor, prompt: int, capacity: int, cuda_graph: bool) -> torch.Tensor:
    from sasformer.generation import StaticDecoder

    decoder = StaticDecoder(model, ids.shape[0], capacity, cuda_graph=cuda_graph)
    out = [decoder.prefill(ids[:, :prompt])]
    for t in range(prompt, ids.shape[1]):
        out.append(decoder.step(ids[:, t : t + 1]).clone())
    assert decoder.cache.seq_len == ids.shape[1]
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("name", list(VARIANTS))
@torch.no_grad()
def test_static_decoding_equals_full_forward(name: str) -> None:
    model = tiny_model(name)
    ids = random_ids(2, 12)
    full = model(ids)[:, 4:]
    torch.testing.assert_close(_static_decode(model, ids, 5, capacity=15, cuda_graph=False), full, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="capacity"):
        _static_decode(model, ids, 5, capacity=11, cuda_graph=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("name", ["mha", "mla", "sas-simulated", "sas-compact"])
@torch.no_grad()
def test_cuda_graph_decoding_equals_full_forward(name: str) -> None:
    model = tiny_model(name).cuda()
    ids = random_ids(2, 12).cuda()
    full = model(ids)[:, 4:]
    torch.testing.assert_close(_static_decode(model, ids, 5, capacity=16, cuda_graph=True), full, atol=ATOL, rtol=0)
