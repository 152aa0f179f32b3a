"""The trainer's loss module: the fused chunked head + loss gives the loss and gradients of full logits."""

from __future__ import annotations

import pytest
import torch

from sasformer.models.config import ModelConfig
from sasformer.models.decoder import DecoderLM, lm_loss
from sasformer.ops.cross_entropy import IMPLS
from sasformer.train.trainer import LossModel


def _model() -> DecoderLM:
    config = ModelConfig(vocab_size=97, d_model=32, n_layers=2, max_seq_len=64, attention="mha",
                         attention_args={"n_heads": 2})
    return DecoderLM(config)


@pytest.mark.parametrize("T", [1, 7, 63])
def test_chunked_loss_model_matches_full_logits(T):
    model = _model()
    inputs, targets = torch.randint(0, 97, (2, T)), torch.randint(0, 97, (2, T))
    targets[0, -1] = -100
    want = lm_loss(model(inputs), targets)
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    for impl in IMPLS:
        got = LossModel(model, impl, chunk_size=5)(inputs, targets)
        got_grads = torch.autograd.grad(got, list(model.parameters()))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_targets_must_match_inputs():
    with pytest.raises(ValueError, match="targets must have the shape"):
        _model()(torch.zeros(2, 5, dtype=torch.long), targets=torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("attention", ["mha", "sas"])
def test_loss_model_traces_to_one_graph(attention):
    # the trainer compiles LossModel as a whole; a graph break would split it and slow every step
    from sasformer import preset

    config = preset("small", attention).replace(d_model=96, n_layers=2, vocab_size=97)
    inputs, targets = torch.randint(0, 97, (2, 7)), torch.randint(0, 97, (2, 7))
    explained = torch._dynamo.explain(LossModel(DecoderLM(config), chunk_size=5))(inputs, targets)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_loss_model_with_the_triton_loss_traces_to_one_graph_and_matches():
    # the kernel sits in a custom op, so the compiled step keeps the head and the loss in its graph
    pytest.importorskip("triton")
    model = _model()
    inputs, targets = torch.randint(0, 97, (2, 7)), torch.randint(0, 97, (2, 7))
    explained = torch._dynamo.explain(LossModel(model, "chunked_triton", chunk_size=5))(inputs, targets)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    compiled = torch.compile(LossModel(model, "chunked_triton", chunk_size=5), backend="aot_eager", fullgraph=True)
    got = compiled(inputs, targets)
    got_grads = torch.autograd.grad(got, list(model.parameters()))
    torch._dynamo.reset()
    want = lm_loss(model(inputs), targets)
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_loss_model_with_a_bf16_residual_stream_traces_to_one_graph():
    # residual_dtype casts inside the traced forward: under autocast it must not split the graph
    model = _model()
    inputs, targets = torch.randint(0, 97, (2, 7)), torch.randint(0, 97, (2, 7))
    loss_model = LossModel(model, chunk_size=5, residual_dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(loss_model)(inputs, targets)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
