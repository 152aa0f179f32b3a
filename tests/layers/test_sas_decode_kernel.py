"""Which kernel the SAS decode path uses: "auto" (the default), "dense" or "triton".

The resolution is tested on stand-in layers whose weight claims to be on CUDA, so the GPU branch of
"auto" is covered on a machine without one; the CPU behaviour on real models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sasformer.layers import sas_decode
from tests.decode_helpers import cached_logits, tiny_model, token_ids

torch.set_num_threads(2)

VOCAB = 37
ARGS = {"n_heads": 3, "n_sim_heads": 6, "sim_head_dim": 12}
ENV = sas_decode.KERNEL_ENV_VAR


def layer(kernel: str | None = None, cuda: bool = True, dtype: torch.dtype = torch.bfloat16) -> SimpleNamespace:
    """What resolve_decode_kernel reads of a layer: its choice and its output projection's weight."""
    weight = SimpleNamespace(is_cuda=cuda, dtype=dtype)
    return SimpleNamespace(decode_kernel=kernel, o_proj=SimpleNamespace(weight=weight))


@pytest.fixture
def conditions(monkeypatch):
    """Start from: Triton installed, no interpreter, no kernel variable."""
    monkeypatch.setattr(sas_decode, "triton_available", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(ENV, raising=False)
    return monkeypatch


# (layer's choice, SASFORMER_DECODE_KERNEL, Triton installed, weights on CUDA, dtype, TRITON_INTERPRET) -> kernel
RESOLVED = [
    (None, None, True, True, torch.bfloat16, None, "triton"),
    (None, None, True, True, torch.float16, None, "triton"),
    (None, None, True, True, torch.float32, None, "triton"),
    (None, None, True, True, torch.float64, None, "dense"),  # a dtype the kernel does not take
    (None, None, False, True, torch.bfloat16, None, "dense"),  # no Triton
    (None, None, True, False, torch.bfloat16, None, "dense"),  # CPU
    (None, None, True, False, torch.float32, "1", "dense"),  # CPU: never the interpreter by itself
    (None, "auto", True, True, torch.bfloat16, None, "triton"),
    (None, " AUTO ", True, False, torch.bfloat16, None, "dense"),
    (None, "dense", True, True, torch.bfloat16, None, "dense"),
    (None, "triton", True, False, torch.float32, "1", "triton"),  # asked for: the interpreter runs it
    ("dense", "triton", True, True, torch.bfloat16, None, "dense"),  # the layer's choice wins
    ("auto", "dense", True, True, torch.bfloat16, None, "triton"),
    ("auto", "triton", True, False, torch.bfloat16, "1", "dense"),
    ("triton", "dense", True, True, torch.float16, None, "triton"),
]


@pytest.mark.parametrize(("kernel", "env", "installed", "cuda", "dtype", "interpret", "expected"), RESOLVED)
def test_resolution(conditions, kernel, env, installed, cuda, dtype, interpret, expected) -> None:
    conditions.setattr(sas_decode, "triton_available", lambda: installed)
    if env is not None:
        conditions.setenv(ENV, env)
    if interpret is not None:
        conditions.setenv("TRITON_INTERPRET", interpret)
    assert sas_decode.resolve_decode_kernel(layer(kernel, cuda, dtype)) == expected


@pytest.mark.parametrize(("kernel", "env", "installed", "cuda", "dtype", "message"), [
    ("triton", None, False, True, torch.bfloat16, "set_decode_kernel: decode kernel 'triton' needs the triton package"),
    (None, "triton", False, True, torch.bfloat16, f"{ENV}: decode kernel 'triton' needs the triton package"),
    ("triton", None, True, False, torch.bfloat16, "'triton' needs the model on CUDA"),
    (None, "triton", True, True, torch.float64, "'triton' takes weights in .* got torch.float64"),
    (None, "fastest", True, True, torch.bfloat16, f"{ENV}: decode kernel 'fastest' is not one of"),
])
def test_explicit_choice_that_cannot_run_is_refused(conditions, kernel, env, installed, cuda, dtype,
                                                    message) -> None:
    conditions.setattr(sas_decode, "triton_available", lambda: installed)
    if env is not None:
        conditions.setenv(ENV, env)
    with pytest.raises(ValueError, match=message):
        sas_decode.resolve_decode_kernel(layer(kernel, cuda, dtype))


def test_set_decode_kernel_accepts_auto_and_refuses_unknown_names() -> None:
    model = tiny_model("sas", ARGS, vocab=VOCAB, n_layers=2, max_seq_len=16)
    sas_decode.set_decode_kernel(model, "auto")
    assert [m.decode_kernel for m in sas_decode.sas_layers(model)] == ["auto", "auto"]
    with pytest.raises(ValueError, match=r"decode kernel 'fast' is not one of \('auto', 'dense', 'triton'\)"):
        sas_decode.set_decode_kernel(model, "fast")


@pytest.mark.parametrize("choice", [None, "auto"])
@torch.no_grad()
def test_cpu_model_decodes_dense_by_default(monkeypatch, decode_calls, choice) -> None:
    # even where the interpreter could run the kernel, and with the variable asking for it when the
    # layer's own "auto" overrides it
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(ENV, raising=False)
    if choice == "auto":
        monkeypatch.setenv(ENV, "triton")
    model = tiny_model("sas", ARGS, vocab=VOCAB, max_seq_len=16)
    sas_decode.set_decode_kernel(model, choice)
    tokens = token_ids(2, 9, vocab=VOCAB, seed=1)
    got = cached_logits(model, tokens, [7, 1, 1])
    assert [kernel for kernel, _ in decode_calls] == ["dense"] * 4
    torch.testing.assert_close(got, model(tokens), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_auto_builds_the_kernel_it_resolves_to(monkeypatch, decode_calls) -> None:
    # "auto" where the kernel can run: pretend so on the CPU and let the interpreter run it
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(sas_decode, "triton_decode_problem", lambda weight, interpreter=True: None)
    model = tiny_model("sas", ARGS, vocab=VOCAB, max_seq_len=16)
    tokens = token_ids(1, 6, vocab=VOCAB, seed=2)
    got = cached_logits(model, tokens, [5, 1])
    assert [kernel for kernel, _ in decode_calls] == ["triton"] * 2
    assert {layer.__dict__["_decode_plan"].kernel for layer in sas_decode.sas_layers(model)} == {"triton"}
    rel = ((got - model(tokens)).abs().max() / model(tokens).abs().max()).item()
    assert rel <= 1e-5
