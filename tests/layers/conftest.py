"""Fixtures of the layer tests."""

from __future__ import annotations

import pytest

import sasformer.layers.sas as sas_module


@pytest.fixture
def decode_calls(monkeypatch) -> list[tuple[str, int]]:
    """(plan kernel, tokens in the call) of every call that takes the SAS decode path."""
    calls: list[tuple[str, int]] = []
    real = sas_module.decode_forward

    def recording(attn, plan, x, ctx):
        calls.append((plan.kernel, x.shape[1]))
        return real(attn, plan, x, ctx)

    monkeypatch.setattr(sas_module, "decode_forward", recording)
    return calls
