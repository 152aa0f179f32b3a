"""A whole decoder run with one op's Triton form against its plain form, shared by the op tests."""

from __future__ import annotations

from types import ModuleType

import torch


def assert_model_matches_with_triton_op(monkeypatch, module: ModuleType, setting: str, op_name: str,
                                        attention: str, attention_args: dict, device: str,
                                        left_pad: bool = False) -> None:
    """A 2-layer decoder's loss and every parameter's gradient with ``module.<setting>`` = ``"triton"`` equal
    those with ``"torch"``, and the op ``module.<op_name>`` ran once per layer. ``left_pad``: the second row
    starts with 3 padding tokens (per-row positions)."""
    from sasformer.models.config import ModelConfig
    from sasformer.models.decoder import DecoderLM

    torch.manual_seed(3)
    model = DecoderLM(ModelConfig(vocab_size=61, d_model=32, n_layers=2, max_seq_len=32, attention=attention,
                                  attention_args=attention_args)).to(device)
    ids = torch.randint(0, 61, (2, 11), device=device)
    mask = torch.ones_like(ids)
    if left_pad:
        mask[1, :3] = 0

    def loss_and_grads() -> list[torch.Tensor]:
        model.zero_grad()
        loss = model(ids, attention_mask=mask).float().logsumexp(-1).mean()
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    monkeypatch.setattr(module, setting, "torch")
    want = loss_and_grads()
    monkeypatch.setattr(module, setting, "triton")
    calls = []
    op = getattr(module, op_name)
    monkeypatch.setattr(module, op_name, lambda *a: (calls.append(1), op(*a))[1])
    got = loss_and_grads()
    assert len(calls) == 2  # the op ran, once per layer
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
