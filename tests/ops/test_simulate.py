"""Fast SAS simulation paths against the plain reference, forward and gradients."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sasformer.ops import simulate
from sasformer.ops.simulate import simulate_features_naive, simulate_heads_naive

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_weights(H: int, HS: int, k: int, D: int, DS: int, dtype: torch.dtype, features: bool = True):
    g = torch.Generator().manual_seed(H * 1000 + HS * 100 + k * 10 + D)
    shapes = [(HS, H, k), (HS,), (HS, HS, k), (HS,)]
    if features:
        shapes += [(DS, D), (DS,), (DS, DS), (DS,)]
    # fan-in scaling keeps activations O(1) so absolute tolerances are meaningful
    fans = [H * k, H * k, HS * k, HS * k, D, D, DS, DS]
    return [
        (torch.randn(s, generator=g) / fan**0.5).to(DEVICE, dtype).requires_grad_()
        for s, fan in zip(shapes, fans)
    ]


def nan_empty(*shape, **kwargs) -> torch.Tensor:
    """``torch.empty`` that fills with NaN, so an element a kernel fails to write fails the test."""
    size = shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape
    return torch.full(size, float("nan"), **kwargs)


def reference(x, ws):
    y = simulate_heads_naive(x, *ws[:4])
    return simulate_features_naive(y, *ws[4:]) if len(ws) == 8 else y


def fast(x, ws, impl):
    if len(ws) == 8:
        return simulate.simulate_qk(x, *ws, impl=impl)
    return simulate.simulate_heads(x, *ws, impl=impl)


def check(impl: str, N: int, H: int, HS: int, k: int, D: int, DS: int, features: bool,
          dtype: torch.dtype, atol: float, rtol: float) -> None:
    x = torch.randn(1, N, H, D, device=DEVICE, dtype=dtype, requires_grad=True)
    ws = make_weights(H, HS, k, D, DS, dtype, features)
    ref, out = reference(x, ws), fast(x, ws, impl)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    grad = torch.randn_like(ref)
    names = ["x", "w1", "b1", "w2", "b2", "w3", "b3", "w4", "b4"]
    for name, a, b in zip(names, torch.autograd.grad(ref, [x, *ws], grad), torch.autograd.grad(out, [x, *ws], grad)):
        torch.testing.assert_close(b, a, atol=atol, rtol=rtol, msg=lambda m, name=name: f"grad {name}: {m}")


PYTORCH_FAST = list(simulate.PYTORCH_FAST_IMPLS)


@pytest.mark.parametrize("impl", PYTORCH_FAST)
@pytest.mark.parametrize("N", [1, 7, 63])
@pytest.mark.parametrize("H,HS", [(1, 3), (3, 6), (12, 24)])
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("D,DS", [(5, 9), (8, 12)])
def test_pytorch_qk_matches_naive(impl, N, H, HS, k, D, DS):
    check(impl, N, H, HS, k, D, DS, True, torch.float64, 1e-10, 1e-10)


@pytest.mark.parametrize("impl", PYTORCH_FAST)
@pytest.mark.parametrize("N", [1, 7, 63])
@pytest.mark.parametrize("H,HS", [(1, 3), (12, 24)])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_pytorch_heads_matches_naive(impl, N, H, HS, k):
    check(impl, N, H, HS, k, 7, 7, False, torch.float64, 1e-10, 1e-10)


@pytest.mark.parametrize("impl", PYTORCH_FAST)
@pytest.mark.parametrize("N,k", [(9, 3), (4, 1)])
def test_pytorch_fp32_at_gpt_small_head_shape(impl, N, k):
    check(impl, N, 12, 24, k, 64, 128, True, torch.float32, 1e-4, 1e-4)


def test_banded_kernel_wider_than_features():
    # k > D: most taps fall into the padding for every feature
    check("banded", 5, 2, 4, 7, 3, 4, True, torch.float64, 1e-10, 1e-10)


def test_banded_conv_matrix_is_the_convolution():
    from sasformer.ops.simulate.banded import banded_conv_matrix

    w = torch.randn(4, 3, 5, dtype=torch.float64)
    x = torch.randn(6, 3, 11, dtype=torch.float64)
    conv = torch.nn.functional.conv1d(x, w, padding=2)
    torch.testing.assert_close(x.reshape(6, -1) @ banded_conv_matrix(w, 11), conv.reshape(6, -1))


@pytest.mark.parametrize("chunk", [1, 2, 4])
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("features", [True, False])
def test_chunked_several_chunks_per_token(chunk, k, features, monkeypatch):
    from sasformer.ops.simulate import chunked

    monkeypatch.setattr(chunked, "CHUNK", chunk)
    assert chunked.chunk_size(8) == chunk
    check("chunked", 7, 3, 6, k, 8, 10, features, torch.float64, 1e-10, 1e-10)


@pytest.mark.parametrize("block", [1, 2, 3, 4])
@pytest.mark.parametrize("k,D", [(1, 8), (3, 8), (5, 8), (7, 6), (7, 12)])
@pytest.mark.parametrize("features", [True, False])
def test_blocked_several_chunks_per_token(block, k, D, features, monkeypatch):
    # chunks of 1 to 4 features (every output crossing both borders; a border as wide as a whole chunk at
    # k = 5, block 2 and k = 7, block 3; a setting below (k-1)/2 raised to the next divisor that fits)
    from sasformer.ops.simulate import blocked

    monkeypatch.setattr(blocked, "BLOCK", block)
    check("blocked", 7, 3, 6, k, D, 10, features, torch.float64, 1e-10, 1e-10)
    check("blocked", 5, 2, 1, k, D, 3, features, torch.float64, 1e-10, 1e-10)  # one simulated head


def test_blocked_batched_input_equals_naive(monkeypatch):
    from sasformer.ops.simulate import blocked

    monkeypatch.setattr(blocked, "BLOCK", 4)
    x = torch.randn(3, 5, 2, 8, dtype=torch.float64, requires_grad=True)
    ws = make_weights(2, 4, 3, 8, 6, torch.float64)
    ref, out = reference(x, ws), fast(x, ws, "blocked")
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, [x, *ws], grad), torch.autograd.grad(out, [x, *ws], grad)):
        torch.testing.assert_close(b, a)


def test_block_size(monkeypatch):
    from sasformer.ops.simulate import blocked

    assert blocked.block_size(64, 3) == 16
    assert blocked.block_size(12, 3) == 12  # 16 > 12: one chunk
    monkeypatch.setenv(blocked.BLOCK_ENV_VAR, "5")
    assert blocked.block_size(12, 3) == 6  # the next divisor of 12
    monkeypatch.setenv(blocked.BLOCK_ENV_VAR, "1")
    assert blocked.block_size(12, 7) == 3  # a border of 3 features must fit in the neighbouring chunk
    monkeypatch.setenv(blocked.BLOCK_ENV_VAR, "one")
    with pytest.raises(ValueError, match="SASFORMER_BLOCK"):
        blocked.block_size(64, 3)


@pytest.mark.parametrize("features", [True, False])
def test_blocked_under_autocast_returns_the_projection_dtype(features):
    # as banded: fp32 heads under bf16 autocast give bf16 simulated heads, within bf16 error of fp32
    x = torch.randn(1, 9, 3, 8)
    ws = [w.detach() for w in make_weights(3, 6, 3, 8, 10, torch.float32, features)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, banded = fast(x, ws, "blocked"), fast(x, ws, "banded")
    assert out.dtype == banded.dtype == torch.bfloat16
    exact = reference(x.double(), [w.double() for w in ws])
    assert (out.double() - exact).norm() / exact.norm() < 3e-2


def test_blocked_second_convolution_is_the_convolution():
    # the in-chunk block and the two border blocks together are the convolution over the whole feature axis
    from sasformer.ops.simulate.blocked import second_conv_blocks, second_conv_product

    w = torch.randn(5, 5, 3, dtype=torch.float64)
    x_NCD = torch.randn(4, 5, 12, dtype=torch.float64)
    conv = torch.nn.functional.conv1d(x_NCD, w, padding=1)  # (N, OUT, D)
    rows = x_NCD.transpose(1, 2).reshape(4, -1)  # feature-major
    out = second_conv_product(rows, second_conv_blocks(w, 4), 4)  # (N, G, c, OUT)
    torch.testing.assert_close(out.reshape(4, 12, 5).transpose(1, 2), conv)


@pytest.mark.parametrize("features", [True, False])
def test_blocked_folded_equals_projection_then_blocked(features):
    from sasformer.ops.simulate import blocked

    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3 * 8, 7, dtype=torch.float64, requires_grad=True)
    ws = make_weights(3, 6, 3, 8, 10, torch.float64, features)
    heads = torch.nn.functional.linear(x, weight).unflatten(-1, (3, 8))
    if features:
        ref, out = blocked.simulate_qk_blocked(heads, *ws), blocked.simulate_qk_blocked_folded(x, weight, *ws)
    else:
        ref, out = blocked.simulate_heads_blocked(heads, *ws), blocked.simulate_heads_blocked_folded(x, weight, *ws)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, [x, weight, *ws], grad), torch.autograd.grad(out, [x, weight, *ws], grad)):
        torch.testing.assert_close(b, a)


def test_chunk_size_from_the_environment(monkeypatch):
    from sasformer.ops.simulate import chunked

    monkeypatch.setenv(chunked.CHUNK_ENV_VAR, "8")
    assert chunked.chunk_size(64) == 8
    assert chunked.chunk_size(12) == 12  # 8 does not divide 12: one chunk per token
    check("chunked", 7, 3, 6, 3, 16, 10, True, torch.float64, 1e-10, 1e-10)
    monkeypatch.setenv(chunked.CHUNK_ENV_VAR, "eight")
    with pytest.raises(ValueError, match="SASFORMER_CHUNK"):
        chunked.chunk_size(64)


@pytest.mark.parametrize("features", [True, False])
def test_banded_traced_form_equals_the_autograd_function(features):
    # under torch.compile the banded path runs as plain ops (the Function lost its gradients when traced
    # on the H200); both forms must be the same function with the same gradients
    from sasformer.ops.simulate.banded import _banded_traced, _BandedSimulate, _head_operands, _rows

    x = torch.randn(2, 5, 3, 8, dtype=torch.float64, requires_grad=True)
    ws = make_weights(3, 7, 3, 8, 10, torch.float64, features)
    def operands():
        return [*_head_operands(x, *ws[:4]), *(ws[4:] if features else [None] * 4)]

    a = _BandedSimulate.apply(_rows(x), *operands())
    b = _banded_traced(_rows(x), *operands())
    torch.testing.assert_close(b, a)
    grad = torch.randn_like(a)
    for ga, gb in zip(torch.autograd.grad(a, [x, *ws], grad), torch.autograd.grad(b, [x, *ws], grad)):
        torch.testing.assert_close(gb, ga)


@pytest.mark.parametrize("impl", ["banded", "chunked", "blocked"])
def test_gemm_paths_trace_into_one_graph(impl):
    # the trainer compiles the model: the CUDA paths must not break the graph
    torch._dynamo.reset()
    x = torch.randn(1, 7, 3, 8, requires_grad=True)
    ws = make_weights(3, 6, 3, 8, 12, torch.float32)
    compiled = torch.compile(lambda *a: simulate.simulate_qk(*a, impl=impl), backend="aot_eager", fullgraph=True)
    out, ref = compiled(x, *ws), reference(x, ws)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, [x, *ws], grad), torch.autograd.grad(out, [x, *ws], grad)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", PYTORCH_FAST)
@pytest.mark.parametrize("features", [True, False])
def test_pytorch_fast_saves_only_compact_tensors(impl, features):
    ws = make_weights(3, 6, 3, 8, 16, torch.float32, features)

    def saved_elements(T: int) -> int:
        x = torch.randn(2, T, 3, 8, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            fast(x, ws, impl)
        return sum(saved)

    # what is kept for the backward pass grows with the tokens only by the compact input (H*D each)
    assert saved_elements(9) - saved_elements(4) == 2 * 5 * 3 * 8


triton_cases = [
    # N, H, HS, k, D, DS, features
    (1, 1, 3, 1, 5, 9, True),
    (7, 3, 6, 3, 8, 12, True),
    (7, 3, 6, 5, 7, 7, False),
    (63, 2, 4, 3, 5, 6, True),
    (20, 12, 24, 3, 16, 32, False),
    (5, 12, 24, 3, 64, 128, True),
]


@pytest.mark.parametrize("N,H,HS,k,D,DS,features", triton_cases)
def test_triton_matches_naive(N, H, HS, k, D, DS, features, monkeypatch):
    pytest.importorskip("triton")
    from sasformer.ops.simulate import fused

    # every buffer a kernel writes starts as NaN, so an unwritten element fails the comparison
    monkeypatch.setattr(fused, "_empty", nan_empty)
    check("triton", N, H, HS, k, D, DS, features, torch.float32, 1e-4, 1e-4)


def test_env_var_override(monkeypatch):
    x = torch.randn(1, 2, 3, 4)
    monkeypatch.setenv(simulate.ENV_VAR, "naive")
    assert simulate.resolve_impl(None, x) == "naive"
    assert simulate.resolve_impl("matmul", x) == "matmul"
    monkeypatch.setenv(simulate.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="SASFORMER_SIMULATE"):
        simulate.resolve_impl(None, x)
    monkeypatch.delenv(simulate.ENV_VAR)
    assert simulate.resolve_impl(None, x) == simulate.default_impl(x) == "naive"  # few tokens, or CPU
    with pytest.raises(ValueError, match="impl"):
        simulate.resolve_impl("conv", x)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        simulate.resolve_impl("triton", torch.randn(1, 2, 3, 4))


def test_triton_gpt_small_qk_shape_with_rope_over_several_blocks(monkeypatch):
    # GPT-small's query simulation (H=12, H'=24, D=64, D'=128, k=3) with RoPE; 11 tokens at one token
    # per backward block, so each persistent backward program loops over several blocks and reuses
    # its scratch
    pytest.importorskip("triton")
    from sasformer.ops.rope import RotaryTables, apply_rope
    from sasformer.ops.simulate import fused

    monkeypatch.setattr(fused, "_empty", nan_empty)
    H, HS, k, D, DS, T = 12, 24, 3, 64, 128, 11
    cos, sin = RotaryTables(torch.arange(T, device=DEVICE).view(1, -1), 10000.0)(DS)
    x = torch.randn(1, T, H, D, device=DEVICE, requires_grad=True)
    ws = make_weights(H, HS, k, D, DS, torch.float32)
    ref = apply_rope(reference(x, ws), cos, sin)
    out = simulate.simulate_qk(x, *ws, impl="triton", rope=(cos, sin))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    grad = torch.randn_like(ref)
    names = ["x", "w1", "b1", "w2", "b2", "w3", "b3", "w4", "b4"]
    for name, a, b in zip(names, torch.autograd.grad(ref, [x, *ws], grad), torch.autograd.grad(out, [x, *ws], grad)):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("block_rows", [16, 256])
def test_triton_other_tile_sizes(block_rows, monkeypatch):
    pytest.importorskip("triton")
    from sasformer.ops.simulate import fused

    monkeypatch.setattr(fused, "BLOCK_ROWS", block_rows)
    monkeypatch.setattr(fused, "BWD_BLOCK_ROWS", block_rows)
    check("triton", 7, 3, 6, 3, 16, 20, True, torch.float32, 1e-4, 1e-4)


def test_triton_refuses_float64():
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match="float64"):
        simulate.resolve_impl("triton", torch.randn(1, 2, 3, 4, dtype=torch.float64, device=DEVICE))


@pytest.mark.parametrize("impl", ["matmul", "banded", "triton"])
@pytest.mark.parametrize("B,T,per_batch", [(1, 1, False), (2, 7, True), (3, 5, False)])
def test_rope_after_simulation(impl, B, T, per_batch, monkeypatch):
    if impl == "triton":
        pytest.importorskip("triton")
        from sasformer.ops.simulate import fused

        monkeypatch.setattr(fused, "_empty", nan_empty)
    from sasformer.ops.rope import RotaryTables, apply_rope

    H, HS, k, D, DS = 3, 6, 3, 8, 18
    positions = torch.randint(0, 50, (B if per_batch else 1, T), device=DEVICE)
    cos, sin = RotaryTables(positions, 10000.0)(DS)
    x = torch.randn(B, T, H, D, device=DEVICE, requires_grad=True)
    ws = make_weights(H, HS, k, D, DS, torch.float32)
    ref = apply_rope(reference(x, ws), cos, sin)
    out = simulate.simulate_qk(x, *ws, impl=impl, rope=(cos, sin))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, [x, *ws], grad), torch.autograd.grad(out, [x, *ws], grad)):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def _interpreter_bf16_dot(monkeypatch):
    """Triton 3.6's interpreter multiplies bf16 tiles as raw uint16 bits; convert them first."""
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def upcast(handle):
        data = interpreter._convert_float(handle.data, handle.dtype.scalar, interpreter.tl.float32, None)
        return interpreter.TensorHandle(data.view(np.float32), interpreter.tl.float32)

    def create_dot(self, a, b, d, *args):
        if a.dtype.scalar == interpreter.tl.bfloat16:
            a, b = upcast(a), upcast(b)
        return original(self, a, b, d, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


# the last case is GPT-small's query shape (H=12, H'=24, D=64, D'=128, k=3), where the H200 run
# found wrong Q/K weight gradients in bf16
@pytest.mark.parametrize("features,B,T,H,HS,k,D,DS", [
    (True, 2, 5, 12, 24, 3, 16, 32), (False, 2, 5, 12, 24, 3, 16, 32), (True, 1, 3, 12, 24, 3, 64, 128),
])
def test_triton_bf16_close_to_fp32_reference(features, B, T, H, HS, k, D, DS, monkeypatch):
    pytest.importorskip("triton")
    if DEVICE == "cpu":
        _interpreter_bf16_dot(monkeypatch)
    from sasformer.ops.rope import RotaryTables

    torch.manual_seed(0)
    x = torch.randn(B, T, H, D, device=DEVICE).bfloat16()
    ws = [w.detach().bfloat16() for w in make_weights(H, HS, k, D, DS, torch.float32, features)]
    rope = RotaryTables(torch.arange(T, device=DEVICE).view(1, -1), 10000.0)(DS) if features else None

    def run(impl, dtype):
        xx = x.to(dtype).requires_grad_()
        wws = [w.to(dtype).requires_grad_() for w in ws]
        if features:
            out = simulate.simulate_qk(xx, *wws, impl=impl, rope=rope)
        else:
            out = simulate.simulate_heads(xx, *wws, impl=impl)
        grads = torch.autograd.grad(out, [xx, *wws], torch.ones_like(out))
        return [out, *grads]

    # bf16 rounding of intermediates: the kernels may not be much worse than the reference run in bf16
    # (the interpreter also rounds fp32 -> bf16 toward zero, which doubles the rounding error)
    ref = run("matmul", torch.float32)
    naive = run("naive", torch.bfloat16)
    got = run("triton", torch.bfloat16)
    for name, a, n, b in zip(["out", "x", "w1", "b1", "w2", "b2", "w3", "b3", "w4", "b4"], got, naive, ref):
        err = ((a.float() - b).norm() / b.norm().clamp_min(1e-12)).item()
        err_naive = ((n.float() - b).norm() / b.norm().clamp_min(1e-12)).item()
        assert err <= 3 * err_naive + 5e-3, f"{name}: relative error {err:.3g} (naive bf16: {err_naive:.3g})"


@pytest.mark.parametrize("DS", [64, 96, 128, 256, None])
def test_triton_launches_use_one_warp_group(DS):
    # regression: at D' >= 128 the kernels ran with 8 warps (two Hopper warp groups), where Triton 3.6
    # races on shared memory read by wgmma; the H200 gave NaN w3/w4 and wrong upstream gradients
    pytest.importorskip("triton")
    from sasformer.ops.simulate.fused_inspect import launch_configs

    launches = launch_configs(12, 24, 3, 64, DS, dtype=torch.float32, tokens=7)
    assert [launch.name for launch in launches] == (
        ["_simulate_fwd_kernel", "_simulate_fwd_kernel", "_heads_bwd_kernel"] if DS else
        ["_simulate_fwd_kernel", "_heads_bwd_kernel"])
    assert all(launch.num_warps <= 4 for launch in launches)


@pytest.mark.parametrize("N,k,DS", [(7, 3, 128), (5, 5, 96), (3, 1, 256)])
def test_triton_failing_shape_class(N, k, DS, monkeypatch):
    # the class that failed on the H200: D' != D with D' a 128-class block, odd token counts, more
    # blocks than backward programs (the interpreter runs 3 persistent programs)
    pytest.importorskip("triton")
    from sasformer.ops.simulate import fused

    monkeypatch.setattr(fused, "_empty", nan_empty)
    check("triton", N, 12, 24, k, 64, DS, True, torch.float32, 1e-4, 1e-4)


@pytest.mark.parametrize("has_triton", [True, False])
@pytest.mark.parametrize("flag", [True, False])
def test_default_impl_rule(has_triton, flag, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(simulate, "triton_available", lambda: has_triton)
    monkeypatch.setattr(simulate, "TRITON_DEFAULT", flag)
    big = simulate.BANDED_MIN_TOKENS
    cuda = SimpleNamespace(is_cuda=True, shape=(2, big // 2, 12, 64), dtype=torch.bfloat16)
    assert simulate.default_impl(cuda) == ("triton" if has_triton and flag else "banded")
    few = SimpleNamespace(is_cuda=True, shape=(1, big - 1, 12, 64), dtype=torch.bfloat16)
    assert simulate.default_impl(few) == "naive"
    assert simulate.default_impl(SimpleNamespace(is_cuda=True, shape=(2, big, 12, 64), dtype=torch.float64)) == "banded"
    # fp32 would make the kernels multiply without tensor cores
    assert simulate.default_impl(SimpleNamespace(is_cuda=True, shape=(2, big, 12, 64), dtype=torch.float32)) == "banded"
    assert simulate.default_impl(torch.randn(2, big, 1, 1)) == "naive"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")
@pytest.mark.parametrize("features", [True, False])
def test_fused_custom_ops_pass_opcheck(features):
    from sasformer.ops.simulate import fused

    # inputs that need gradients: opcheck also checks the backward registered on the forward op
    x = torch.randn(5, 3, 8, device=DEVICE, requires_grad=True)
    ws = make_weights(3, 6, 3, 8, 12, torch.float32, features)
    feats = ws[4:] if features else [None] * 4
    cos, sin = (torch.randn(1, 5, 12, device=DEVICE) for _ in range(2)) if features else (None, None)
    torch.library.opcheck(fused.simulate_fused_op, (x, *ws[:4], *feats, 5, cos, sin))
    ws = [w.detach() for w in ws]
    x = x.detach()
    dy2 = torch.randn(5, 6, 8, device=DEVICE)
    torch.library.opcheck(fused.heads_backward_op, (x, *ws[:4], dy2))


@pytest.mark.parametrize("features", [True, False])
@pytest.mark.parametrize("H", [3, 1])  # a GQA/MQA base: fewer heads in than the projection's input width
def test_banded_folded_equals_projection_then_banded(features, H):
    # (x W^T) M1 = x (W^T M1): the projection folded into the first convolution, forward and every gradient
    torch.manual_seed(H)
    d, D, HS = 20, 8, 6
    x = torch.randn(2, 5, d, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(H * D, d, dtype=torch.float64, requires_grad=True)
    ws = [w.double().detach().requires_grad_() for w in make_weights(H, HS, 3, D, 10, torch.float64, features)]
    from sasformer.ops.simulate.banded import simulate_heads_banded_folded, simulate_qk_banded_folded

    heads = torch.nn.functional.linear(x, weight).unflatten(-1, (H, D))
    want = fast(heads, ws, "banded")
    got = (simulate_qk_banded_folded if features else simulate_heads_banded_folded)(x, weight, *ws)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(want)
    inputs = [x, weight, *ws]
    for a, b in zip(torch.autograd.grad(want, inputs, grad), torch.autograd.grad(got, inputs, grad)):
        torch.testing.assert_close(b, a)


def test_the_fold_is_taken_where_it_saves_flops():
    # d = 768, D = 64: an MHA base's 12 heads -> 24 fold (768*1536 < 768*768 + 768*1536); an MQA base's
    # single key head -> 2 does not (768*128 > 768*64 + 64*128)
    # ... from H*D = 768 tokens a call on, since building W^T M1 costs d*(H*D)*(H'*D) a call
    assert simulate.fold_pays(torch.empty(768, 768), torch.empty(24, 12, 3), tokens=2048)
    assert not simulate.fold_pays(torch.empty(768, 768), torch.empty(24, 12, 3), tokens=512)
    assert not simulate.fold_pays(torch.empty(64, 768), torch.empty(2, 1, 3), tokens=10**6)


def test_projection_dtype_follows_autocast_but_not_for_float64():
    from sasformer.ops.simulate.banded import projection_dtype

    x32, x64 = torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)
    assert projection_dtype(x32) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert projection_dtype(x32) == torch.bfloat16
        assert projection_dtype(x64) == torch.float64  # autocast leaves float64 alone, as F.linear does
        assert torch.nn.functional.linear(x64, x64).dtype == torch.float64
    assert projection_dtype(torch.zeros(2, 3, device="meta")) == torch.float32  # no autocast on meta


def test_projection_dtype_asks_for_autocast_support_only_off_cuda_and_cpu(monkeypatch):
    # torch 2.11's dynamo breaks the graph on `is_autocast_available`, once per simulated layer (a compiled
    # SAS model ran at 0.33x MHA instead of 0.43x on the H200); cuda and cpu must not call it
    from sasformer.ops.simulate.banded import projection_dtype

    asked = []
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device: asked.append(device) or False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert projection_dtype(torch.zeros(2, 3)) == torch.bfloat16
    assert projection_dtype(torch.zeros(2, 3, device="meta")) == torch.float32
    assert asked == ["meta"]


def test_banded_folded_traces_and_runs_under_bf16_autocast(monkeypatch):
    # compiled: the traced form in one graph; eager under autocast: the Function's backward, which runs
    # outside autocast, gets operands of one dtype (the projection's, bf16)
    torch.manual_seed(0)
    x = torch.randn(4, 64, 24, requires_grad=True)  # an MHA base: d = H*D, and 256 tokens, so the fold pays
    weight = (torch.randn(3 * 8, 24) / 24**0.5).requires_grad_()
    ws = make_weights(3, 6, 3, 8, 12, torch.float32)
    inputs = [x, weight, *ws]
    calls = []
    monkeypatch.setattr(simulate, "simulate_qk_banded_folded",
                        lambda *a, _f=simulate.simulate_qk_banded_folded: (calls.append(1), _f(*a))[1])

    def unfolded(x, weight, *ws):
        return simulate.simulate_qk(torch.nn.functional.linear(x, weight).unflatten(-1, (3, 8)), *ws, impl="banded")

    def folded(x, weight, *ws):
        return simulate.simulate_qk_projected(x, weight, *ws, impl="banded")

    torch._dynamo.reset()
    compiled = torch.compile(folded, backend="aot_eager", fullgraph=True)
    want = unfolded(*inputs)
    grad = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, inputs, grad)
    for fn in (compiled, folded):
        out = fn(*inputs)
        torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
        for a, b in zip(want_grads, torch.autograd.grad(out, inputs, grad)):
            torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, out, traced = unfolded(*inputs), folded(*inputs), compiled(*inputs)
    assert out.dtype == plain.dtype == traced.dtype == torch.bfloat16
    torch.testing.assert_close(traced, out, atol=2e-2, rtol=2e-2)  # the same bf16 GEMMs, compiled
    assert len(calls) == 4  # every folded call above took the fold: compiled and eager, fp32 and autocast

    def error(a: torch.Tensor, ref: torch.Tensor) -> float:
        return ((a.float() - ref).norm() / ref.norm()).item()

    # the folded form rounds W^T M1 (and its gradient) to bf16 where the plain one rounds the heads: its
    # error from fp32 is of the same size as the plain form's, not the same numbers
    assert error(out, want) < 2 * error(plain, want) + 1e-3
    got_grads = torch.autograd.grad(out.float(), inputs, grad)
    for a, b, ref in zip(torch.autograd.grad(plain.float(), inputs, grad), got_grads, want_grads):
        assert b.dtype == a.dtype
        assert error(b, ref) < 2 * error(a, ref) + 1e-2
