"""The Triton RoPE of a fused Q/K/V projection matches the plain split-and-rotate: outputs and the
projection's gradient, at odd sizes, with tables per row or shared, gradients in transposed strides,
and traced by ``torch.compile``. On a machine without CUDA the kernels run in Triton's interpreter
(tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from sasformer.ops import rope_qkv as rq
from sasformer.ops.rope import RotaryTables
from tests.ops.compile_helpers import assert_kernels_compile_for_sm90
from tests.ops.model_helpers import assert_model_matches_with_triton_op

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tables(B: int, T: int, D: int, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(T, device=DEVICE).unsqueeze(0)
    if per_row:  # left padding: each row its own positions
        positions = (positions - torch.arange(B, device=DEVICE).unsqueeze(1)).clamp(min=0)
    return RotaryTables(positions, 10000.0)(D)


def run(fn, qkv: torch.Tensor, cos, sin, H: int, Hkv: int, transpose_grads: bool):
    x = qkv.detach().clone().requires_grad_(True)
    q, k, v = fn(x, cos, sin, H, Hkv)
    if transpose_grads:  # attention's gradients come in (B, H, T, D) memory order: feed the op such strides
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    weights = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i)).to(t) for i, t in enumerate((q, k, v))]
    loss = sum((t * w).sum() for t, w in zip((q, k, v), weights))
    loss.backward()
    return [q.detach(), k.detach(), v.detach(), x.grad]


@pytest.mark.parametrize(("B", "T", "H", "Hkv", "D"), [(2, 7, 3, 3, 8), (1, 5, 4, 1, 12), (3, 33, 2, 1, 6)])
@pytest.mark.parametrize("per_row", [False, True])
def test_triton_matches_reference_fp32(B, T, H, Hkv, D, per_row) -> None:
    torch.manual_seed(0)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, device=DEVICE)
    cos, sin = tables(B, T, D, per_row)
    for transpose_grads in (False, True):
        want = run(rq.rope_qkv_reference, qkv, cos, sin, H, Hkv, transpose_grads)
        got = run(rq.rope_qkv_op, qkv, cos, sin, H, Hkv, transpose_grads)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_unused_outputs_and_bf16() -> None:
    torch.manual_seed(1)
    B, T, H, Hkv, D = 2, 9, 2, 1, 16
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, device=DEVICE, dtype=torch.bfloat16)
    cos, sin = tables(B, T, D, per_row=False)
    x = qkv.clone().requires_grad_(True)
    q, _, _ = rq.rope_qkv_op(x, cos, sin, H, Hkv)
    q.float().sum().backward()  # keys and values unused: no gradient reaches the projection from them
    assert x.grad[..., H * D:].abs().max() == 0 and x.grad[..., : H * D].abs().max() > 0
    ref = rq.rope_qkv_reference(qkv.float(), cos, sin, H, Hkv)
    out = rq.rope_qkv_op(qkv, cos, sin, H, Hkv)
    for o, r in zip(out, ref):
        assert o.dtype == torch.bfloat16
        torch.testing.assert_close(o.float(), r, atol=2e-2, rtol=2e-2)  # one bf16 rounding of fp32 results


def test_traced_by_compile_with_gradients() -> None:
    torch.manual_seed(2)
    B, T, H, Hkv, D = 2, 6, 2, 2, 8
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, device=DEVICE)
    cos, sin = tables(B, T, D, per_row=False)
    compiled = torch.compile(rq.rope_qkv_op, backend="aot_eager", fullgraph=True)
    want = run(rq.rope_qkv_reference, qkv, cos, sin, H, Hkv, transpose_grads=False)
    got = run(compiled, qkv, cos, sin, H, Hkv, transpose_grads=False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_choice_of_implementation(monkeypatch) -> None:
    x = torch.zeros(1, 2, 12, device=DEVICE)
    cos, sin = tables(1, 2, 4, per_row=False)
    with pytest.raises(ValueError, match="D even"):
        rq.rope_qkv(x, cos, sin, 2, 1)  # 12 features: 4 heads of 3, an odd size
    monkeypatch.delenv(rq.ENV_VAR, raising=False)
    auto = "triton" if rq.TRITON_AVAILABLE and x.is_cuda else "torch"
    assert rq.resolve_impl(x) == auto  # unset: auto, Triton on CUDA only
    monkeypatch.setenv(rq.ENV_VAR, "auto")
    assert rq.resolve_impl(x) == auto
    assert rq.resolve_impl(x.cpu()) == "torch"
    available = rq.TRITON_AVAILABLE
    monkeypatch.setattr(rq, "TRITON_AVAILABLE", False)
    assert rq.resolve_impl(x) == "torch"  # no Triton: the plain form, whatever the device
    monkeypatch.setattr(rq, "TRITON_AVAILABLE", available)
    monkeypatch.setenv(rq.ENV_VAR, "triton")
    assert rq.resolve_impl(x) == "triton"
    monkeypatch.setattr(rq, "ROPE_IMPL", "fast")  # the module setting wins over the variable
    with pytest.raises(ValueError, match=r"ROPE_IMPL='fast'"):
        rq.resolve_impl(x)
    monkeypatch.setattr(rq, "ROPE_IMPL", None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA tensors"):
            rq.resolve_impl(x)


@pytest.mark.parametrize(("attention", "args"), [("mha", {"n_heads": 2}), ("gqa", {"n_heads": 4, "n_kv_heads": 2})])
def test_model_with_triton_rope_matches_plain(attention, args, monkeypatch) -> None:
    # the whole decoder, loss and every parameter's gradient, with left padding (per-row tables)
    assert_model_matches_with_triton_op(monkeypatch, rq, "ROPE_IMPL", "rope_qkv_op", attention, args, DEVICE,
                                        left_pad=True)


def test_kernels_compile_for_sm90() -> None:
    from sasformer.ops import rope_qkv_kernel as k

    D = 64
    ints = {name: "i32" for name in ("N", "T", "H", "HKV", "F")}
    kernels = []
    for dtype in ("bf16", "fp32"):
        fwd = {"x_ptr": "*" + dtype, "cos_ptr": "*fp32", "sin_ptr": "*fp32", "q_ptr": "*" + dtype,
               "k_ptr": "*" + dtype, "v_ptr": "*" + dtype, "stride_x": "i64", "stride_cb": "i64", "stride_ct": "i64"}
        strides = ("sqb", "sqt", "sqh", "skb", "skt", "skh", "svb", "svt", "svh", "stride_cb", "stride_ct")
        bwd = {"dq_ptr": "*" + dtype, "dk_ptr": "*" + dtype, "dv_ptr": "*" + dtype, "cos_ptr": "*fp32",
               "sin_ptr": "*fp32", "dx_ptr": "*" + dtype, **{s: "i64" for s in strides}}
        kernels += [("_rope_qkv_fwd_kernel", {**ints, **fwd}), ("_rope_qkv_bwd_kernel", {**ints, **bwd})]
    assert_kernels_compile_for_sm90("sasformer.ops.rope_qkv_kernel", kernels,
                                    {"D": D, "HALF": D // 2, "BLOCK_HALF": D // 2, "BLOCK_N": k.BLOCK_TOKENS})
