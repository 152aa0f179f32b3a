"""SAS inside ``torch.compile``: training and inference trace into one graph, with eager gradients."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from sasformer.layers.simulation import set_simulation_impl
from sasformer.models.decoder import DecoderLM
from sasformer.models.presets import preset


@pytest.fixture()
def model_and_batch():
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", "sas", n_layers=2, vocab_size=97, max_seq_len=32))
    x = torch.randint(0, 97, (3, 19))
    return model, x, torch.roll(x, -1, dims=1)


def _graphs(model, *args, **kwargs):
    torch._dynamo.reset()
    return torch._dynamo.explain(model)(*args, **kwargs)


def test_training_and_inference_trace_to_one_graph(model_and_batch):
    model, x, y = model_and_batch
    explained = _graphs(model, x, targets=y)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    with torch.no_grad():
        assert _graphs(model, x).graph_count == 1


def _compiled_matches_eager(model, x, y, backend: str = "inductor") -> None:
    """One graph with no break, and the compiled model's gradients equal eager's."""
    explained = _graphs(model, x, targets=y)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    eager = copy.deepcopy(model)
    eager(x, targets=y).backward()
    torch._dynamo.reset()
    torch.compile(model, backend=backend)(x, targets=y).backward()
    torch._dynamo.reset()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("impl", [None, "naive", "banded", "matmul", "chunked", "blocked"])
def test_traced_gradients_match_eager(model_and_batch, impl):
    model, x, y = model_and_batch
    set_simulation_impl(model, impl)
    _compiled_matches_eager(model, x, y, backend="aot_eager")


def test_traced_banded_with_recompute_matches_eager(model_and_batch, monkeypatch):
    # SASFORMER_BANDED_RECOMPUTE=1: the traced banded form is checkpointed (recomputed in the backward)
    model, x, y = model_and_batch
    set_simulation_impl(model, "banded")
    monkeypatch.setenv("SASFORMER_BANDED_RECOMPUTE", "1")
    _compiled_matches_eager(model, x, y)
    # the setting must reach the graph: Dynamo records a checkpointed region as its own operator
    code = " ".join(g.code for g in _graphs(model, x, targets=y).graphs)
    assert "checkpoint" in code
    monkeypatch.delenv("SASFORMER_BANDED_RECOMPUTE")
    assert "checkpoint" not in " ".join(g.code for g in _graphs(model, x, targets=y).graphs)


def test_compiled_folded_banded_matches_eager(monkeypatch):
    # 3 x 100 tokens: the Q/K/V projections fold into the banded convolution (it pays from 256 at this size)
    import sasformer.ops.simulate as simulate_ops

    calls = []
    for name in ("simulate_qk_banded_folded", "simulate_heads_banded_folded"):
        original = getattr(simulate_ops, name)
        monkeypatch.setattr(simulate_ops, name, lambda *a, _f=original: (calls.append(1), _f(*a))[1])
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", "sas", n_layers=2, vocab_size=97, max_seq_len=128))
    set_simulation_impl(model, "banded")
    x = torch.randint(0, 97, (3, 100))
    _compiled_matches_eager(model, x, torch.roll(x, -1, dims=1))
    assert calls  # the fold ran


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")
def test_fused_kernels_trace_as_custom_ops():
    # a compiled model that forces the fused kernels keeps one graph (they are custom ops; the CPU runs
    # them in Triton's interpreter) and Inductor calls them as they are. One layer and 14 tokens: the
    # interpreter's time grows with both, and the kernels' own sizes are covered by tests/ops
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", "sas", n_layers=1, vocab_size=97, max_seq_len=32))
    x = torch.randint(0, 97, (2, 7))
    set_simulation_impl(model, "triton")
    _compiled_matches_eager(model, x, torch.roll(x, -1, dims=1))
