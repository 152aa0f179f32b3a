"""SAS inside ``torch.compile``: a layer that needs gradients leaves the graph (see
``sasformer.layers.sas._run_eagerly_in_graph``); inference stays in one graph."""

from __future__ import annotations

import copy

import pytest
import torch

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


def test_training_forward_runs_each_sas_layer_outside_the_graph(model_and_batch):
    model, x, y = model_and_batch
    explained = _graphs(model, x, targets=y)
    reasons = " ".join(str(b.reason) for b in explained.break_reasons)
    assert explained.graph_break_count >= 2 and "disable" in reasons.lower()

    eager = copy.deepcopy(model)
    eager(x, targets=y).backward()
    torch._dynamo.reset()
    torch.compile(model, backend="eager")(x, targets=y).backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_inference_and_the_override_keep_one_graph(model_and_batch, monkeypatch):
    model, x, y = model_and_batch
    with torch.no_grad():
        assert _graphs(model, x).graph_count == 1
    monkeypatch.setenv("SASFORMER_COMPILE_SAS", "1")
    assert _graphs(model, x, targets=y).graph_break_count == 0
