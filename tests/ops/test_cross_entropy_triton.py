"""The Triton cross-entropy kernel matches its PyTorch reference row by row, and the fused linear +
cross-entropy built on it matches ``F.cross_entropy(h @ W.T)``: loss and gradients, at odd sizes.

On a machine without CUDA the kernel runs in Triton's interpreter (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from sasformer.ops.cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_fused,
    linear_cross_entropy_naive,
    resolve_impl,
)
from sasformer.ops.cross_entropy.kernel import TILE_ENV_VAR, block_and_warps, cross_entropy_rows_
from sasformer.ops.cross_entropy.naive import cross_entropy_rows_naive
from tests.ops.compile_helpers import run_without_interpreter
from tests.ops.test_cross_entropy import (
    _loss_and_grads,
    assert_matches_naive_fp32,
    assert_matches_naive_under_bf16_autocast,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB, D = 97, 24


def _rows(C: int, V: int, dtype: torch.dtype):
    logits = (3 * torch.randn(C, V, device=DEVICE)).to(dtype)
    targets = torch.randint(0, V, (C,), device=DEVICE)
    if C > 2:
        targets[1] = -100
    return logits, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("C", "V", "block"), [(1, 97, 32), (7, 97, 32), (63, 200, 64), (7, 16, 16), (7, 97, None)])
def test_kernel_matches_reference(dtype, C, V, block):
    logits, targets = _rows(C, V, dtype)
    scale = torch.tensor([0.37], device=DEVICE)
    want_loss, want_grad = cross_entropy_rows_naive(logits, targets, scale)
    loss = torch.full((C,), float("nan"), device=DEVICE)  # an unwritten row stays NaN and fails
    got = logits.clone()
    cross_entropy_rows_(got, targets, loss, scale, -100, with_grad=True, block=block)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    # one bf16 rounding step of the largest gradient entry
    atol = 1e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.float(), want_grad.float(), rtol=0, atol=atol)
    if C > 2:
        assert loss[1] == 0 and not got[1].any(), "an ignored row has loss 0 and gradient 0"


def test_kernel_without_grad_leaves_logits_and_flags_bad_targets():
    logits, targets = _rows(7, 97, torch.float32)
    targets[3] = 97  # outside the vocabulary
    targets[4] = -5
    loss = torch.full((7,), float("nan"), device=DEVICE)
    got = logits.clone()
    cross_entropy_rows_(got, targets, loss, torch.ones(1, device=DEVICE), -100, with_grad=False, block=32)
    assert torch.equal(got, logits)
    want_loss, _ = cross_entropy_rows_naive(logits, targets, torch.ones(1, device=DEVICE))
    assert loss[3].isnan() and loss[4].isnan() and want_loss[3].isnan() and want_loss[4].isnan()
    keep = torch.tensor([0, 1, 2, 5, 6])
    torch.testing.assert_close(loss[keep], want_loss[keep], rtol=1e-5, atol=1e-5)


def test_kernel_rejects_bad_layouts_and_blocks(monkeypatch):
    monkeypatch.delenv(TILE_ENV_VAR, raising=False)
    logits, targets = _rows(7, 97, torch.float32)
    loss = torch.empty(7, device=DEVICE)
    with pytest.raises(ValueError, match="row-contiguous"):
        cross_entropy_rows_(logits.T.contiguous().T, targets, loss, torch.ones(1, device=DEVICE), -100, True)
    with pytest.raises(ValueError, match="power of two"):
        block_and_warps(97, block=48)
    with pytest.raises(ValueError, match="from 16 to 16384"):
        block_and_warps(50304, block=32768)  # spills registers at 32 warps
    assert block_and_warps(50304) == (4096, 4)
    assert block_and_warps(2000) == (2048, 2)
    assert block_and_warps(97) == (128, 1)
    assert block_and_warps(50304, 4096, 8) == (4096, 8)
    with pytest.raises(ValueError, match="warps=3"):
        block_and_warps(97, block=64, warps=3)
    with pytest.raises(ValueError, match="512 values; at most 128"):
        block_and_warps(50304, block=16384, warps=1)


@pytest.mark.parametrize(("V", "block", "warps"), [(200, 32, 1), (200, 64, 2), (200, 128, 4), (200, 32, 8),
                                                  (5000, 4096, 4), (5000, None, None)])
def test_every_launch_shape_gives_the_reference(V, block, warps):
    """The shape only changes how a row is split over programs' threads: loss and gradient stay the
    reference's. (Triton's interpreter runs a program as one, whatever its warps: on the CPU only the block
    varies; on a GPU both do.)"""
    logits, targets = _rows(9, V, torch.bfloat16)
    scale = torch.tensor([0.37], device=DEVICE)
    want_loss, want_grad = cross_entropy_rows_naive(logits, targets, scale)
    loss = torch.full((9,), float("nan"), device=DEVICE)
    got = logits.clone()
    cross_entropy_rows_(got, targets, loss, scale, -100, with_grad=True, block=block, warps=warps)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.float(), want_grad.float(), rtol=0, atol=2e-3)


def test_launch_shape_from_the_environment(monkeypatch):
    monkeypatch.setenv(TILE_ENV_VAR, "256x4")
    assert block_and_warps(50304) == (256, 4)
    assert block_and_warps(50304, block=64) == (64, 1), "a shape named by the caller wins over the variable"
    monkeypatch.setenv(TILE_ENV_VAR, "4096")
    with pytest.raises(ValueError, match="SASFORMER_CE_TILE='4096': expected BLOCKxWARPS"):
        block_and_warps(50304)
    monkeypatch.setenv(TILE_ENV_VAR, "4096x3")
    with pytest.raises(ValueError, match="SASFORMER_CE_TILE=4096x3: warps=3"):
        block_and_warps(50304)
    monkeypatch.setenv(TILE_ENV_VAR, "16384x1")
    with pytest.raises(ValueError, match="SASFORMER_CE_TILE=16384x1: block=16384 over 1 warps"):
        block_and_warps(50304)


def _inputs(n: int, ignore_every: int | None = 3):
    h = torch.randn(n, D, device=DEVICE)
    w = 0.3 * torch.randn(VOCAB, D, device=DEVICE)
    targets = torch.randint(0, VOCAB, (n,), device=DEVICE)
    if ignore_every is not None and n > 1:
        targets[::ignore_every] = -100
    return h, w, targets


@pytest.mark.parametrize("n", [1, 7, 63])
@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
def test_fused_matches_reference_fp32(n, chunk_size):
    assert_matches_naive_fp32(linear_cross_entropy_fused, *_inputs(n), chunk_size=chunk_size)


def test_fused_bf16_autocast_matches_autocast_reference():
    assert_matches_naive_under_bf16_autocast(linear_cross_entropy_fused, *_inputs(63), chunk_size=16)


def test_fused_other_ignore_index_all_ignored_and_no_grad():
    h, w, targets = _inputs(7, ignore_every=None)
    targets[2] = 5
    torch.testing.assert_close(linear_cross_entropy_fused(h, w, targets, ignore_index=5, chunk_size=2),
                               linear_cross_entropy_naive(h, w, targets, ignore_index=5))
    assert linear_cross_entropy_fused(h, w, torch.full_like(targets, -100)).isnan()
    h.requires_grad_()
    with torch.no_grad():
        got = linear_cross_entropy_fused(h, w, targets, chunk_size=3)
    assert not got.requires_grad
    torch.testing.assert_close(got, linear_cross_entropy_naive(h, w, targets).detach())


def test_fused_compiles_in_one_graph_and_matches():
    h, w, targets = _inputs(63)
    compiled = torch.compile(linear_cross_entropy_fused, backend="aot_eager", fullgraph=True)
    want = _loss_and_grads(linear_cross_entropy_naive, h, w, targets)
    got = _loss_and_grads(compiled, h, w, targets, chunk_size=16)
    torch._dynamo.reset()
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_dispatch(monkeypatch):
    h, w, targets = _inputs(7)
    want = linear_cross_entropy_naive(h, w, targets)
    for impl in ("chunked", "chunked_torch", "chunked_triton", "naive"):
        torch.testing.assert_close(linear_cross_entropy(h, w, targets, impl=impl, chunk_size=3), want)
    # the Triton kernel is the default for CUDA tensors (TRITON_DEFAULT); the CPU keeps the PyTorch chunks
    assert resolve_impl("chunked", h) == ("chunked_triton" if h.is_cuda else "chunked_torch")
    monkeypatch.setattr("sasformer.ops.cross_entropy.TRITON_DEFAULT", False)
    assert resolve_impl("chunked", h) == "chunked_torch"
    with pytest.raises(ValueError, match="impl='fast'"):
        resolve_impl("fast", h)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_impl("chunked_triton", h.cpu())


SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sasformer.ops.cross_entropy import kernel

for dtype in ("bf16", "fp32"):
    for with_grad in (True, False):
        block, warps = kernel.block_and_warps(50304)
        signature = {"logits_ptr": "*" + dtype, "targets_ptr": "*i64", "loss_ptr": "*fp32", "scale_ptr": "*fp32",
                     "V": "i32", "stride_row": "i64", "ignore_index": "i32", "BLOCK": "constexpr",
                     "N_BLOCKS": "constexpr", "WITH_GRAD": "constexpr"}
        consts = {"BLOCK": block, "N_BLOCKS": triton.cdiv(50304, block), "WITH_GRAD": with_grad}
        compiled = triton.compile(ASTSource(fn=kernel._cross_entropy_rows_kernel, signature=signature,
                                            constexprs=consts),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        assert ".entry" in compiled.asm["ptx"] and compiled.asm["cubin"]
        print("compiled", dtype, with_grad)
"""


def test_kernel_compiles_for_sm90():
    # the interpreter does not type-check loop-carried values or layouts; the real compiler does
    assert run_without_interpreter(SCRIPT).count("compiled") == 4
