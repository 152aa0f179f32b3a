"""``attend`` gives the same result on every backend it can choose, for query/key size != value size."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sasformer.ops import attention
from sasformer.ops.attention import attend, causal_mask, padded_causal_mask


def inputs(T: int, S: int, Hq: int = 4, Hkv: int = 2, D: int = 10, E: int = 6):
    g = torch.Generator().manual_seed(T * 100 + S)

    def make(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()

    return make(2, Hq, T, D), make(2, Hkv, S, D), make(2, Hkv, S, E)


def reference(q, k, v, mask, scale):
    """Plain softmax attention with explicit grouping and masking."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if mask is None:
        mask = causal_mask(q.shape[2], k.shape[2], q.device)
    scores = (q @ k.transpose(-1, -2)) * scale
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("backend", ["default", "flash_pad", "math", None])
@pytest.mark.parametrize(
    "T,S,masked", [(1, 1, False), (7, 7, False), (63, 63, False), (1, 9, False), (3, 9, False), (7, 7, True)]
)
def test_backends_match_reference(backend, T, S, masked):
    q, k, v = inputs(T, S)
    mask = None
    if masked:
        keep = torch.ones(2, S, dtype=torch.long)
        keep[0, :2] = 0  # left padding in the first row
        mask = padded_causal_mask(keep, T)
    out = attend(q, k, v, mask, scale=0.3, backend=backend)
    ref = reference(q, k, v, mask, 0.3)
    assert out.shape == (2, 4, T, 6)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, (q, k, v), grad), torch.autograd.grad(out, (q, k, v), grad)):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10)


def cuda_like(E: int, dtype: torch.dtype = torch.bfloat16) -> SimpleNamespace:
    """What ``resolve_backend`` reads of a CUDA query or value tensor (2, 24, 1024, E)."""
    return SimpleNamespace(shape=(2, 24, 1024, E), dtype=dtype, is_cuda=True)


def test_auto_keeps_cpu_on_default():
    q, k, v = inputs(5, 5)
    assert attention.resolve_backend(None, q, v, causal_no_mask=True) == "default"


def test_compiled_values_are_padded_only_when_gradients_are_on(monkeypatch):
    # the padding works around a compiled-backward fault; a compiled decode step has no backward, and
    # padding there would copy the whole value cache every step
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    q, k, v = inputs(1, 9)
    assert attention.resolve_backend(None, q, v, causal_no_mask=False) == "flash_pad"
    with torch.no_grad():
        assert attention.resolve_backend(None, q, v, causal_no_mask=False) == "default"
    q, k, v = inputs(1, 9, D=6)  # equal sizes: nothing to pad
    assert attention.resolve_backend(None, q, v, causal_no_mask=False) == "default"


def test_compiled_cuda_training_takes_cudnn_over_unpadded_values(monkeypatch):
    # the padding works around a fault seen on CPU; on CUDA only the cuDNN case was checked without it
    # (on the GPU), so every other compiled training call with a smaller V stays padded
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(attention, "_HAS_CUDNN", True)
    monkeypatch.setattr(attention, "_cudnn_failed", False)
    assert attention.resolve_backend(None, cuda_like(128), cuda_like(64), causal_no_mask=True) == "cudnn"
    assert attention.resolve_backend(None, cuda_like(128), cuda_like(64), causal_no_mask=False) == "flash_pad"
    fp32 = attention.resolve_backend(None, cuda_like(128, torch.float32), cuda_like(64, torch.float32), True)
    assert fp32 == "flash_pad"
    assert attention.resolve_backend(None, cuda_like(192), cuda_like(128), causal_no_mask=True) == "flash_pad"
    monkeypatch.setattr(attention, "_cudnn_failed", True)  # refused once: padded again
    assert attention.resolve_backend(None, cuda_like(128), cuda_like(64), causal_no_mask=True) == "flash_pad"


@pytest.fixture()
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("has_cudnn,expected", [(True, "cudnn"), (False, "flash_pad")])
def test_the_cuda_choice_traces_into_one_graph(monkeypatch, fresh_dynamo, has_cudnn, expected):
    # a graph break in the choice split every compiled SAS layer in two, and on the GPU the model's
    # gradients through cuDNN attention came out wrong that way
    monkeypatch.setattr(attention, "_HAS_CUDNN", has_cudnn, raising=False)
    monkeypatch.setattr(attention, "_cudnn_failed", False)
    q, v = cuda_like(128), cuda_like(64)

    @torch.compile(backend="eager", fullgraph=True)
    def choose(x: torch.Tensor) -> tuple[torch.Tensor, str]:
        return x + 1, attention.resolve_backend(None, q, v, causal_no_mask=True)

    assert choose(torch.zeros(3))[1] == expected


@pytest.mark.parametrize("T,S", [(7, 7), (1, 9), (3, 9)])
def test_flash_matches_reference_at_equal_sizes(T, S):
    q, k, v = inputs(T, S, E=10)
    out = attend(q, k, v, None, scale=0.3, backend="flash")
    ref = reference(q, k, v, None, 0.3)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, (q, k, v), grad), torch.autograd.grad(out, (q, k, v), grad)):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10)


def test_flash_refuses_unequal_sizes_with_the_way_out():
    q, k, v = inputs(5, 5)  # value size 6, query size 10
    with pytest.raises(ValueError, match="needs equal query and value sizes.*flash_pad"):
        attend(q, k, v, None, backend="flash")
    q, k, v = inputs(5, 5, D=6, E=10)  # value size above the query size: no padding helps
    with pytest.raises(ValueError, match="needs equal query and value sizes.*default"):
        attend(q, k, v, None, backend="flash")


def test_unknown_backend_is_refused(monkeypatch):
    q, k, v = inputs(2, 2)
    with pytest.raises(ValueError, match="backend"):
        attend(q, k, v, None, backend="flash3")
    monkeypatch.setenv(attention.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="SASFORMER_ATTENTION"):
        attend(q, k, v, None)


def test_pinned_backend_that_cannot_run_raises():
    q, k, v = inputs(4, 4)
    with pytest.raises(RuntimeError):
        attend(q.float(), k.float(), v.float(), None, backend="efficient" if not q.is_cuda else "cudnn")
