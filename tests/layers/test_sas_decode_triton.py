"""The SAS decode path with the fused Triton kernel (``kernel="triton"``) against the plain forward pass.

On a machine without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before any kernel module is imported)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from sasformer.generation import StaticDecoder
from sasformer.layers import sas_decode
from sasformer.models.decoder import DecoderLM
from tests.decode_helpers import cached_logits, record_launches, tiny_model, token_ids, trace_step

torch.set_num_threads(2)

VOCAB = 41
# H = 3 heads of D = 8 (d = 24), H' = 6, D' = 12
BASE = {"n_heads": 3, "n_sim_heads": 6, "sim_head_dim": 12}
CONFIGS: dict[str, dict] = {
    "rope-after-mean-k3": {**BASE, "kernel_size": 3},
    "rope-after-full-k1": {**BASE, "kernel_size": 1, "peaa": "full"},
    "rope-before-mean-k1": {**BASE, "kernel_size": 1, "rope": "before"},
    "rope-before-full-k3": {**BASE, "kernel_size": 3, "rope": "before", "peaa": "full"},
    "mqa-base-values-unsimulated": {**BASE, "n_kv_heads": 1, "simulate_v": False},
}


def tiny_sas(args: dict, seed: int = 0, n_layers: int = 2) -> DecoderLM:
    return tiny_model("sas", args, vocab=VOCAB, n_layers=n_layers, max_seq_len=32, seed=seed)


def ids(B: int, T: int) -> torch.Tensor:
    return token_ids(B, T, vocab=VOCAB, seed=4)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


def kernel_names(calls: list[tuple[str, int]]) -> list[str]:
    return [kernel for kernel, _ in calls]


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_triton_decode_equals_plain_forward(name: str, decode_calls: list[tuple[str, int]]) -> None:
    model = tiny_sas(CONFIGS[name])
    sas_decode.set_decode_kernel(model, "triton")
    tokens = ids(2, 5 + 1 + 3 + 1)
    got = cached_logits(model, tokens, [5, 1, 3, 1])  # prefill, then T = 1, a 3-token chunk, T = 1
    assert kernel_names(decode_calls) == ["triton"] * 6  # three decode calls, two layers
    assert rel_err(got, model(tokens)) <= 1e-5


@torch.no_grad()
def test_environment_variable_selects_the_kernel(monkeypatch, decode_calls: list[tuple[str, int]]) -> None:
    model = tiny_sas(CONFIGS["rope-after-mean-k3"])
    tokens = ids(2, 5)
    monkeypatch.setenv(sas_decode.KERNEL_ENV_VAR, "triton")
    got = cached_logits(model, tokens, [4, 1])
    assert rel_err(got, model(tokens)) <= 1e-5
    # read when a plan is built: the plans keep their kernel until they are rebuilt
    monkeypatch.setenv(sas_decode.KERNEL_ENV_VAR, "dense")
    cached_logits(model, tokens, [4, 1])
    sas_decode.clear_decode_plans(model)
    cached_logits(model, tokens, [4, 1])
    assert kernel_names(decode_calls) == ["triton"] * 4 + ["dense"] * 2
    # a layer's own choice wins over the variable
    sas_decode.set_decode_kernel(model, "triton")
    cached_logits(model, tokens, [4, 1])
    assert kernel_names(decode_calls)[-2:] == ["triton"] * 2
    monkeypatch.setenv(sas_decode.KERNEL_ENV_VAR, "fastest")
    sas_decode.set_decode_kernel(model, None)
    with pytest.raises(ValueError, match="SASFORMER_DECODE_KERNEL.*'fastest'"):
        cached_logits(model, tokens, [4, 1])


def test_unusable_choices_are_refused(monkeypatch) -> None:
    model = tiny_sas(CONFIGS["rope-after-mean-k3"], n_layers=1)
    tokens = ids(1, 3)
    with pytest.raises(ValueError, match="decode kernel 'cuda'"):
        sas_decode.set_decode_kernel(model, "cuda")
    sas_decode.set_decode_kernel(model, "triton")
    with torch.no_grad():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        if not torch.cuda.is_available():
            with pytest.raises(ValueError, match="needs the model on CUDA"):
                cached_logits(model, tokens, [2, 1])
        monkeypatch.setattr(sas_decode, "triton_available", lambda: False)
        with pytest.raises(ValueError, match="needs the triton package"):
            cached_logits(model, tokens, [2, 1])
        with pytest.raises(ValueError, match="needs the triton package"):
            sas_decode.set_decode_kernel(model, "triton")
        monkeypatch.undo()
        sas_decode.set_decode_kernel(model, "triton")
        with pytest.raises(ValueError, match="float64"):
            cached_logits(model.double(), tokens, [2, 1])


@torch.no_grad()
def test_prepared_weights_refresh_in_place(decode_calls: list[tuple[str, int]]) -> None:
    model = tiny_sas(CONFIGS["rope-after-mean-k3"])
    other = tiny_sas(CONFIGS["rope-after-mean-k3"], seed=7)
    sas_decode.set_decode_kernel(model, "triton")
    tokens = ids(2, 6)
    cached_logits(model, tokens, [5, 1])
    attn = model.blocks[0].attn
    plan = attn.__dict__["_decode_plan"]
    storage = [t.data_ptr() for t in plan.tensors()]
    model.load_state_dict(other.state_dict())  # copies into the same parameters
    assert rel_err(cached_logits(model, tokens, [5, 1]), other(tokens)) <= 1e-5
    attn.heads_q.w1.mul_(-1.5)
    attn.features_k.w4.mul_(2.0)
    attn.heads_v.b2.add_(0.5)
    attn.q_proj.weight.mul_(0.5)
    attn.o_proj.bias.add_(1.0)
    assert rel_err(cached_logits(model, tokens, [5, 1]), model(tokens)) <= 1e-5
    assert attn.__dict__["_decode_plan"] is plan and [t.data_ptr() for t in plan.tensors()] == storage
    assert set(kernel_names(decode_calls)) == {"triton"}


def traced_triton_decoder(T: int) -> tuple[DecoderLM, torch.Tensor, StaticDecoder, list]:
    """A SAS model on the Triton decode kernel, T tokens, and its static decoder traced by dynamo alone
    (the prepared-kernel launches are custom ops inside the step's graph), with the graphs it traces."""
    model = tiny_sas(CONFIGS["rope-after-mean-k3"])
    sas_decode.set_decode_kernel(model, "triton")
    decoder = StaticDecoder(model, 1, 8, cuda_graph=False)
    return model, ids(1, T), decoder, trace_step(decoder)


def decode_two_steps(model: DecoderLM, decoder: StaticDecoder, tokens: torch.Tensor) -> None:
    """Prefill 3 tokens, decode 2, and hold the logits to the plain forward."""
    out = [decoder.prefill(tokens[:, :3])]
    out += [decoder.step(tokens[:, t : t + 1]).clone() for t in range(3, 5)]
    assert rel_err(torch.stack(out, dim=1), model(tokens[:, :5])[:, 2:]) <= 1e-5


@torch.no_grad()
def test_static_step_traces_as_one_graph_and_sees_refreshed_weights(monkeypatch) -> None:
    monkeypatch.setattr(sas_decode, "DECODE_LAUNCH", "off")  # one launch per tensor (stacked: below)
    model, tokens, decoder, graphs = traced_triton_decoder(7)
    decode_two_steps(model, decoder, tokens)
    assert len(graphs) == 1
    targets = [str(node.target) for node in graphs[0].graph.nodes]
    assert sum("simulate_prepared" in t for t in targets) == 3 * 2  # Q, K, V in two layers
    assert not any("baddbmm" in t for t in targets)  # no dense operand left
    plan = model.blocks[1].attn.__dict__["_decode_plan"]
    model.blocks[1].attn.heads_q.w2.mul_(3.0)
    decoder.refresh_weights()  # refreshes the operands in place: the traced step stays valid
    after = decoder.step(tokens[:, 5:6])
    assert model.blocks[1].attn.__dict__["_decode_plan"] is plan and len(graphs) == 1
    assert rel_err(after, model(tokens[:, :6])[:, -1]) <= 1e-5


@torch.no_grad()
def test_left_padded_rows_get_their_own_positions(decode_calls: list[tuple[str, int]]) -> None:
    # per-row RoPE tables (B, T, D') inside the kernel
    model = tiny_sas(CONFIGS["rope-after-mean-k3"])
    sas_decode.set_decode_kernel(model, "triton")
    tokens = ids(3, 9)
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0
    mask[2, :5] = 0
    cache = model.new_cache(9)
    out = [model(tokens[:, :6], attention_mask=mask[:, :6], cache=cache)]
    out.append(model(tokens[:, 6:8], attention_mask=mask[:, :8], cache=cache))
    out.append(model(tokens[:, 8:9], attention_mask=mask, cache=cache))
    assert kernel_names(decode_calls) == ["triton"] * 4
    real = mask.bool()
    assert rel_err(torch.cat(out, dim=1)[real], model(tokens, attention_mask=mask)[real]) <= 1e-5


LAUNCH_CONFIGS = {**CONFIGS, "mha-base-values-unsimulated": {**BASE, "kernel_size": 3, "simulate_v": False}}
# (config, stacked operands, tensors per launch in a layer); rope "after" with values simulated is
# test_stacked_step_traces_as_one_graph's
LAUNCH_CASES = [
    ("rope-before-full-k3", ["qkv"], [3]),
    ("mqa-base-values-unsimulated", ["k", "q"], [1, 1]),
    ("mha-base-values-unsimulated", ["qk"], [2]),
]


@pytest.mark.parametrize("name,fused,per_layer", LAUNCH_CASES)
@torch.no_grad()
def test_launch_options_equal_plain_forward(name: str, fused: list[str], per_layer: list[int], monkeypatch) -> None:
    # queries, keys and values in one launch where their shapes agree (not on an MQA base), each launch split
    model = tiny_sas(LAUNCH_CONFIGS[name])
    sas_decode.set_decode_kernel(model, "triton")
    tokens = ids(2, 5 + 1 + 3)
    monkeypatch.setenv(sas_decode.LAUNCH_ENV_VAR, "stack, split")
    calls = record_launches(monkeypatch)
    got = cached_logits(model, tokens, [5, 1, 3])
    assert rel_err(got, model(tokens)) <= 1e-5
    plan = model.blocks[0].attn.__dict__["_decode_plan"]
    assert plan.split and sorted(plan.fused) == fused
    grids = [grid for kernel, grid in calls if kernel == "_simulate_split_kernel"]
    assert len(calls) == len(grids) == 2 * 2 * len(per_layer)
    assert [grid[2] for grid in grids] == per_layer * 4


@torch.no_grad()
def test_launch_option_is_read_when_a_plan_is_built(monkeypatch) -> None:
    model = tiny_sas(CONFIGS["rope-after-mean-k3"], n_layers=1)
    sas_decode.set_decode_kernel(model, "triton")
    tokens = ids(1, 4)
    calls = record_launches(monkeypatch)
    monkeypatch.delenv(sas_decode.LAUNCH_ENV_VAR, raising=False)
    cached_logits(model, tokens, [3, 1])
    assert sas_decode.DEFAULT_LAUNCH == "stack"
    assert calls == [("_simulate_split_kernel", (1, 1, 3))]  # unset: Q, K, V stacked in one launch, not split
    monkeypatch.setattr(sas_decode, "DECODE_LAUNCH", "off")  # the module setting wins over the variable
    monkeypatch.setenv(sas_decode.LAUNCH_ENV_VAR, "split")
    sas_decode.clear_decode_plans(model)
    assert rel_err(cached_logits(model, tokens, [3, 1]), model(tokens)) <= 1e-5
    assert [kernel for kernel, _ in calls[1:]] == ["_simulate_fwd_kernel"] * 3  # one launch per tensor
    monkeypatch.setattr(sas_decode, "DECODE_LAUNCH", None)
    monkeypatch.setenv(sas_decode.LAUNCH_ENV_VAR, "stack,fast")
    sas_decode.clear_decode_plans(model)
    with pytest.raises(ValueError, match=r"SASFORMER_DECODE_LAUNCH.*\['fast'\]"):
        cached_logits(model, tokens, [3, 1])


@torch.no_grad()
def test_stacked_step_traces_as_one_graph(monkeypatch) -> None:
    monkeypatch.setattr(sas_decode, "DECODE_LAUNCH", "stack,split")  # read when the decoder builds its plans
    model, tokens, decoder, graphs = traced_triton_decoder(6)
    decode_two_steps(model, decoder, tokens)
    # the stacked operands are refreshed in place from changed weights
    plan = model.blocks[1].attn.__dict__["_decode_plan"]
    model.blocks[1].attn.features_q.w4.mul_(3.0)  # queries: the cached keys and values stay valid
    decoder.refresh_weights()
    after = decoder.step(tokens[:, 5:6])
    assert rel_err(after, model(tokens)[:, -1]) <= 1e-5
    assert model.blocks[1].attn.__dict__["_decode_plan"] is plan and sorted(plan.fused) == ["qkv"] and plan.split
    assert len(graphs) == 1
    targets = [str(node.target) for node in graphs[0].graph.nodes]
    assert sum("simulate_prepared" in t for t in targets) == 2  # Q, K, V in one launch, two layers
