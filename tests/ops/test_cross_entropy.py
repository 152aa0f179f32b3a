"""The chunked LM-head cross-entropy matches ``F.cross_entropy(h @ W.T)``: loss and gradients."""

from __future__ import annotations

import pytest
import torch

from sasformer.ops.cross_entropy import linear_cross_entropy, linear_cross_entropy_chunked, linear_cross_entropy_naive

VOCAB, D = 97, 24


def _inputs(n: int, dtype: torch.dtype = torch.float32, ignore_every: int | None = 3):
    h = torch.randn(n, D, dtype=dtype, requires_grad=True)
    w = (0.3 * torch.randn(VOCAB, D, dtype=dtype)).requires_grad_()
    targets = torch.randint(0, VOCAB, (n,))
    if ignore_every is not None and n > 1:
        targets[::ignore_every] = -100
    return h, w, targets


def _loss_and_grads(fn, h, w, targets, **kwargs):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(h, w, targets, **kwargs)
    (2.5 * loss).backward()  # a non-unit upstream gradient
    return loss.detach(), h.grad, w.grad


def assert_matches_naive_fp32(fn, h, w, targets, **kwargs):
    """Loss and both gradients of ``fn`` equal the full-logits reference's, in fp32."""
    want = _loss_and_grads(linear_cross_entropy_naive, h, w, targets)
    got = _loss_and_grads(fn, h, w, targets, **kwargs)
    for g, r, name in zip(got, want, ("loss", "grad h", "grad weight")):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("n", [1, 7, 63])
@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
def test_matches_reference_fp32(n, chunk_size):
    assert_matches_naive_fp32(linear_cross_entropy_chunked, *_inputs(n), chunk_size=chunk_size)


def test_gradcheck_float64():
    h, w, targets = _inputs(7, torch.float64)
    assert torch.autograd.gradcheck(lambda h, w: linear_cross_entropy_chunked(h, w, targets, chunk_size=3), (h, w))


def test_other_ignore_index_and_all_ignored_is_nan_like_reference():
    h, w, targets = _inputs(7, ignore_every=None)
    targets[2] = 5
    for ignore in (5, 0):
        want = linear_cross_entropy_naive(h, w, targets, ignore_index=ignore)
        got = linear_cross_entropy_chunked(h, w, targets, ignore_index=ignore, chunk_size=2)
        torch.testing.assert_close(got, want)
    all_ignored = torch.full((7,), -100)
    assert linear_cross_entropy_chunked(h, w, all_ignored).isnan()
    assert linear_cross_entropy_naive(h, w, all_ignored).isnan()


def assert_matches_naive_under_bf16_autocast(fn, h, w, targets, **kwargs):
    """Under autocast both run the matmuls in bf16 and the softmax in fp32; gradients keep input dtypes."""
    with torch.autocast(h.device.type, dtype=torch.bfloat16):
        want = _loss_and_grads(linear_cross_entropy_naive, h, w, targets)
        got = _loss_and_grads(fn, h, w, targets, **kwargs)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=2e-2, atol=2e-2)
    for g, r in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, r, rtol=5e-2, atol=2e-3)


def test_bf16_autocast_matches_autocast_reference():
    assert_matches_naive_under_bf16_autocast(linear_cross_entropy_chunked, *_inputs(63), chunk_size=16)


def test_compiles_in_one_graph_and_matches():
    h, w, targets = _inputs(63)
    compiled = torch.compile(linear_cross_entropy_chunked, backend="aot_eager", fullgraph=True)
    want = _loss_and_grads(linear_cross_entropy_naive, h, w, targets)
    got = _loss_and_grads(compiled, h, w, targets, chunk_size=16)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_bad_input_errors():
    h, w, targets = _inputs(7)
    with pytest.raises(ValueError, match="shapes do not match"):
        linear_cross_entropy_chunked(h, w, targets[:5])
    with pytest.raises(ValueError, match=r"h \(N, d\)"):
        linear_cross_entropy_chunked(h.unsqueeze(0), w, targets)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy_chunked(h, w, targets, chunk_size=0)
    with pytest.raises(ValueError, match="impl"):
        linear_cross_entropy(h, w, targets, impl="fast")


def test_no_grad_gives_the_same_loss():
    h, w, targets = _inputs(63)
    with torch.no_grad():
        got = linear_cross_entropy_chunked(h, w, targets, chunk_size=16)
    torch.testing.assert_close(got, linear_cross_entropy_naive(h, w, targets).detach())
    assert not got.requires_grad
