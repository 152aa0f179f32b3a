"""StaticDecoder: the compiled static step against the eager one, and the SAS decode path inside it."""

from __future__ import annotations

import pytest
import torch

from sasformer.generation import StaticDecoder
from sasformer.models.decoder import DecoderLM
from tests.decode_helpers import run_static, tiny_model, token_ids, trace_step

torch.set_num_threads(2)

VOCAB = 47
SAS_ARGS = {"n_heads": 3, "n_sim_heads": 6, "sim_head_dim": 10}


def tiny(attention: str, args: dict, n_layers: int = 1) -> DecoderLM:
    return tiny_model(attention, args, vocab=VOCAB, n_layers=n_layers)


def ids(B: int, T: int) -> torch.Tensor:
    return token_ids(B, T, vocab=VOCAB, seed=2)


@torch.no_grad()
def test_compiled_step_equals_eager_step() -> None:
    # one inductor compilation on CPU (about 10 s): SAS, whose step holds the most distinct ops
    model = tiny("sas", SAS_ARGS)
    tokens = ids(2, 9)
    eager = run_static(StaticDecoder(model, 2, 11, cuda_graph=False), tokens, 3)
    compiled = run_static(StaticDecoder(model, 2, 11, cuda_graph=False, compile=True), tokens, 3)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eager, model(tokens)[:, 2:], atol=1e-5, rtol=1e-5)
    assert torch.equal(compiled.argmax(-1), eager.argmax(-1))


TRACED = [
    ("sas", SAS_ARGS),
    ("sas", {**SAS_ARGS, "n_kv_heads": 1, "rope": "before"}),
    ("sas", {**SAS_ARGS, "cache_mode": "compact"}),
    ("mha", {"n_heads": 3}),
    ("gqa", {"n_heads": 4, "n_kv_heads": 2, "head_dim": 6}),
    ("mla", {"n_heads": 3, "q_lora_rank": 12, "kv_lora_rank": 8, "qk_nope_head_dim": 6, "qk_rope_head_dim": 4,
             "v_head_dim": 5}),
    ("tpa", {"n_heads": 3, "head_dim": 8, "q_rank": 3, "k_rank": 2, "v_rank": 2}),
]


@pytest.mark.parametrize(("attention", "args"), TRACED)
@torch.no_grad()
def test_step_traces_as_one_graph(attention: str, args: dict) -> None:
    # dynamo only (no inductor): every step replays one graph, and SAS's goes through the decode path
    model = tiny(attention, args, n_layers=2)
    tokens = ids(1, 7)
    decoder = StaticDecoder(model, 1, 8, cuda_graph=False)
    graphs = trace_step(decoder)
    traced = run_static(decoder, tokens, 3)
    torch.testing.assert_close(traced, model(tokens)[:, 2:], atol=1e-5, rtol=1e-5)
    assert len(graphs) == 1
    targets = {str(node.target) for node in graphs[0].graph.nodes}
    decode_path = attention == "sas" and args.get("cache_mode", "simulated") == "simulated"
    assert any("baddbmm" in t for t in targets) == decode_path


@torch.no_grad()
def test_weight_changes_between_compiled_steps_are_seen_after_a_refresh() -> None:
    # a compiled step does not check the weights: refresh_weights (called by prefill) updates the operands
    model = tiny("sas", SAS_ARGS, n_layers=2)
    tokens = ids(1, 6)
    decoder = StaticDecoder(model, 1, 8, cuda_graph=False)
    torch._dynamo.reset()
    decoder._step_fn = torch.compile(type(decoder)._step, backend="eager", fullgraph=True, dynamic=False)
    decoder.prefill(tokens[:, :4])
    decoder.step(tokens[:, 4:5])
    plan = model.blocks[1].attn.__dict__["_decode_plan"]
    # the last layer's query side and output projection: the cached keys and values stay valid
    model.blocks[1].attn.heads_q.w2.mul_(3.0)
    model.blocks[1].attn.o_proj.weight.mul_(-1.0)
    decoder.refresh_weights()
    after = decoder.step(tokens[:, 5:6])
    assert model.blocks[1].attn.__dict__["_decode_plan"] is plan  # refreshed in place
    torch.testing.assert_close(after, model(tokens)[:, -1], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_step_reads_kept_concatenations_and_sees_weight_changes() -> None:
    # the fused projections' weights are concatenated once, not in every step, and refreshed on request
    model = tiny("mha", {"n_heads": 3}, n_layers=2)
    tokens = ids(1, 7)
    decoder = StaticDecoder(model, 1, 8, cuda_graph=False)
    graphs = trace_step(decoder)
    decoder.prefill(tokens[:, :4])
    decoder.step(tokens[:, 4:5])
    cats = [node for node in graphs[0].graph.nodes if node.target in (torch.cat, torch.ops.aten.cat.default)]
    inputs = [str(arg) for node in cats for arg in node.args[0]]
    assert cats and not [name for name in inputs if "weight" in name]  # RoPE's cats only
    # the last layer's query and gate projections change in place; the cached keys and values stay valid
    model.blocks[1].attn.q_proj.weight.mul_(-1.5)
    model.blocks[1].mlp.gate_proj.weight.mul_(2.0)
    decoder.refresh_weights()
    decoder.step(tokens[:, 5:6])
    after = decoder.step(tokens[:, 6:7])
    assert len(graphs) == 1
    torch.testing.assert_close(after, model(tokens)[:, -1], atol=1e-5, rtol=1e-5)
    del decoder
    assert not any("_kept_concat" in vars(m) for m in model.modules())  # freed with the decoder


@torch.no_grad()
def test_steps_do_no_host_pass_over_the_weights(monkeypatch) -> None:
    # per-token host work is what a CUDA graph saves: the weight checks run at prefill, not per step
    import sasformer.generation as generation

    model = tiny("sas", SAS_ARGS, n_layers=2)
    tokens = ids(1, 9)
    decoder = StaticDecoder(model, 1, 10, cuda_graph=False)
    decoder._step_fn = torch.compile(type(decoder)._step, backend="eager", fullgraph=True, dynamic=False)
    calls: list[str] = []

    def counted(name: str):
        real = getattr(generation, name)

        def wrapper(*args):
            calls.append(name)
            return real(*args)
        return wrapper

    for name in ("prepare_decode", "keep_concats"):
        monkeypatch.setattr(generation, name, counted(name))
    decoder.prefill(tokens[:, :4])
    assert sorted(calls) == ["keep_concats", "prepare_decode"]
    calls.clear()
    for t in range(4, 6):
        decoder.step(tokens[:, t:t + 1])
    assert calls == []
    torch.testing.assert_close(decoder.step(tokens[:, 6:7]), model(tokens[:, :7])[:, -1], atol=1e-5, rtol=1e-5)
    assert calls == []


def test_compile_mode_needs_compile() -> None:
    with pytest.raises(ValueError, match="compile=True"):
        StaticDecoder(tiny("mha", {"n_heads": 3}), 1, 8, cuda_graph=False, compile_mode="max-autotune-no-cudagraphs")


def test_compile_modes_with_their_own_cuda_graphs_are_refused() -> None:
    # checked before the device, so this runs on CPU too
    with pytest.raises(ValueError, match="max-autotune-no-cudagraphs"):
        StaticDecoder(tiny("mha", {"n_heads": 3}), 1, 8, compile=True, compile_mode="reduce-overhead")


@torch.no_grad()
def test_a_dropped_decoder_frees_its_cache_without_a_gc_pass() -> None:
    # the decoder holds no reference cycle, so its cache (the bulk of decoding memory) goes with it
    import gc
    import weakref

    model = tiny("sas", SAS_ARGS)
    gc.disable()
    try:
        decoder = StaticDecoder(model, 2, 11, cuda_graph=False)
        run_static(decoder, ids(2, 5), 2)
        cache = weakref.ref(decoder.cache)
        del decoder
        assert cache() is None
    finally:
        gc.enable()


@pytest.mark.parametrize(("attention", "args"), [("mha", {"n_heads": 3}), ("sas", SAS_ARGS)])
@torch.no_grad()
def test_a_decoder_serves_one_generation_after_another(attention: str, args: dict) -> None:
    model = tiny(attention, args, n_layers=2)
    decoder = StaticDecoder(model, 2, 11, cuda_graph=False)
    first, second = ids(2, 9), token_ids(2, 6, vocab=VOCAB, seed=5)
    run_static(decoder, first, 4)
    again = run_static(decoder, second, 2)  # the first generation's cache must not leak into the second
    torch.testing.assert_close(again, run_static(StaticDecoder(model, 2, 11, cuda_graph=False), second, 2))
    torch.testing.assert_close(again, model(second)[:, 1:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="prompt batch 1 != the decoder's batch 2"):
        decoder.prefill(second[:1])

