"""The Triton SwiGLU gating of a fused gate/up projection matches ``silu(gate) * up``: outputs and the
projection's gradient, fp32 and bf16, odd sizes, non-contiguous rows, traced by ``torch.compile``, and in a
whole decoder. On a machine without CUDA the kernels run in Triton's interpreter (tests/conftest.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from sasformer.ops import swiglu as sw
from sasformer.ops.triton_support import choose_impl
from tests.ops.compile_helpers import assert_kernels_compile_for_sm90
from tests.ops.model_helpers import assert_model_matches_with_triton_op

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def output_and_grad(fn, gate_up: torch.Tensor) -> list[torch.Tensor]:
    x = gate_up.detach().clone().requires_grad_(True)
    h = fn(x)
    # bf16-representable, so that runs in bf16 and in fp32 get the same incoming gradient
    upstream = torch.randn(h.shape, generator=torch.Generator().manual_seed(5)).bfloat16().to(h)
    (h * upstream).sum().backward()
    return [h.detach(), x.grad]


@pytest.mark.parametrize("shape", [(2, 7, 2 * 5), (3, 2 * 33), (1, 1, 3, 2 * 1030)])
def test_triton_matches_reference_fp32(shape) -> None:
    torch.manual_seed(0)
    gate_up = 3 * torch.randn(shape, device=DEVICE)  # both signs, and the flat tails of the sigmoid
    want = output_and_grad(sw.swiglu_reference, gate_up)
    got = output_and_grad(sw.swiglu_op, gate_up)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.is_contiguous()
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_bf16_outputs_are_within_one_bf16_step_of_fp32_arithmetic() -> None:
    # the kernels compute in fp32 from the bf16 inputs and round once at the end (on the GPU to nearest;
    # Triton's CPU interpreter may round otherwise, so the bound is one bf16 step, not equality)
    torch.manual_seed(1)
    gate_up = torch.randn(64, 2 * 256, device=DEVICE).bfloat16()
    want = output_and_grad(sw.swiglu_reference, gate_up.float())
    for g, w in zip(output_and_grad(sw.swiglu_op, gate_up), want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w, atol=1e-6, rtol=2**-7)


def test_empty_and_float64_inputs_take_the_plain_form(monkeypatch) -> None:
    monkeypatch.setattr(sw, "SWIGLU_IMPL", "triton")
    assert sw.swiglu(torch.zeros(2, 0, device=DEVICE)).shape == (2, 0)  # nothing to launch
    monkeypatch.setattr(sw, "SWIGLU_IMPL", "auto")
    assert sw.resolve_impl(torch.zeros(2, 4, dtype=torch.float64, device=DEVICE)) == "torch"  # kernels are fp32


def test_rows_with_a_stride_and_a_gradient_of_other_strides() -> None:
    torch.manual_seed(2)
    wide = torch.randn(6, 2 * 16 + 3, device=DEVICE)
    gate_up = wide[:, : 2 * 16]  # rows of a larger buffer: stride 35, not 32
    x = gate_up.detach().clone().requires_grad_(True)
    want_h = sw.swiglu_reference(gate_up)
    h = sw.swiglu_op(gate_up)
    torch.testing.assert_close(h, want_h, atol=1e-5, rtol=1e-5)
    dh = torch.randn(16, 6, device=DEVICE).t()  # a transposed (non-contiguous) incoming gradient
    got = sw.swiglu_backward_op(gate_up, dh)
    torch.autograd.backward(sw.swiglu_reference(x), dh)
    torch.testing.assert_close(got, x.grad, atol=1e-5, rtol=1e-5)


def test_choice_of_implementation(monkeypatch) -> None:
    x = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="gate and up halves"):
        sw.swiglu(torch.zeros(2, 7, device=DEVICE))
    monkeypatch.delenv(sw.ENV_VAR, raising=False)
    assert sw.DEFAULT == "auto"
    trains = x.clone().requires_grad_()
    # auto: the kernel where a backward will run on CUDA; forward-only calls keep the plain form
    assert sw.resolve_impl(trains) == ("triton" if sw.TRITON_AVAILABLE and x.is_cuda else "torch")
    assert sw.resolve_impl(x) == "torch"
    with torch.no_grad():
        assert sw.resolve_impl(trains) == "torch"
    assert sw.resolve_impl(trains.detach().cpu().requires_grad_()) == "torch"
    cuda_like = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)  # what auto looks at, without a GPU
    assert choose_impl(None, "SWIGLU_IMPL", sw.ENV_VAR, cuda_like, True, sw.DEFAULT, auto_pays=True) == "triton"
    assert choose_impl(None, "SWIGLU_IMPL", sw.ENV_VAR, cuda_like, True, sw.DEFAULT, auto_pays=False) == "torch"
    monkeypatch.setenv(sw.ENV_VAR, "triton")
    assert sw.resolve_impl(x) == "triton"
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match=r"SASFORMER_SWIGLU='triton' needs CUDA tensors"):  # names its source
            sw.resolve_impl(x)
    monkeypatch.setattr(sw, "SWIGLU_IMPL", "fast")  # the module setting wins over the variable
    with pytest.raises(ValueError, match=r"SWIGLU_IMPL='fast'"):
        sw.resolve_impl(x)


def test_traced_by_compile_with_gradients() -> None:
    torch.manual_seed(3)
    gate_up = torch.randn(3, 5, 2 * 12, device=DEVICE)
    compiled = torch.compile(sw.swiglu_op, backend="aot_eager", fullgraph=True)
    want = output_and_grad(sw.swiglu_reference, gate_up)
    got = output_and_grad(compiled, gate_up)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_decoder_with_triton_swiglu_matches_plain(monkeypatch) -> None:
    assert_model_matches_with_triton_op(monkeypatch, sw, "SWIGLU_IMPL", "swiglu_op", "mha", {"n_heads": 2}, DEVICE)


def test_kernels_compile_for_sm90() -> None:
    from sasformer.ops import swiglu_kernel as k

    kernels = []
    for dtype in ("bf16", "fp32"):
        ints = {"N": "i32", "H": "i32"}
        kernels += [("_swiglu_fwd_kernel", {"gu_ptr": "*" + dtype, "h_ptr": "*" + dtype, "stride_gu": "i64",
                                            "stride_h": "i64", **ints}),
                    ("_swiglu_bwd_kernel", {"gu_ptr": "*" + dtype, "dh_ptr": "*" + dtype, "dgu_ptr": "*" + dtype,
                                            "stride_gu": "i64", "stride_dh": "i64", "stride_dgu": "i64", **ints})]
    assert_kernels_compile_for_sm90("sasformer.ops.swiglu_kernel", kernels,
                                    {"BLOCK_N": k.BLOCK_ROWS, "BLOCK_H": k.BLOCK_COLS})
