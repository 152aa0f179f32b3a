"""The fused forward kernel on weights prepared in advance (decode_fused) against the plain reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from sasformer.ops.rope import apply_rope
from sasformer.ops.simulate import fused
from sasformer.ops.simulate.decode_fused import (
    prepare_simulation,
    simulate_prepared,
    simulate_prepared_op,
    simulate_prepared_pair_op,
    stack_simulations,
)
from sasformer.ops.simulate.naive import simulate_features_naive, simulate_heads_naive
from tests.decode_helpers import record_launches
from tests.ops.compile_helpers import run_without_interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {"atol": 1e-5, "rtol": 1e-5}


def weights(H: int, HS: int, k: int, D: int, DS: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(H + 10 * HS + 100 * k + 1000 * D)
    shapes = [(HS, H, k), (HS,), (HS, HS, k), (HS,), (DS, D), (DS,), (DS, DS), (DS,)]
    fans = [H * k, H * k, HS * k, HS * k, D, D, DS, DS]
    return [(torch.randn(s, generator=g) / f**0.5).to(DEVICE) for s, f in zip(shapes, fans)]


def nan_empty(*shape, **kwargs) -> torch.Tensor:
    size = shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape
    return torch.full(size, float("nan"), **kwargs)


def strided_input(B: int, T: int, H: int, D: int) -> torch.Tensor:
    """(B*T, H, D) as the middle slice of a wider row, the way a fused projection's output is read."""
    wide = torch.randn(B * T, 3 * H * D, device=DEVICE)
    return wide[:, H * D : 2 * H * D].view(B * T, H, D)


@pytest.mark.parametrize("B,T", [(1, 1), (2, 3), (1, 7)])
@pytest.mark.parametrize("H,HS,k,D,DS", [(3, 6, 3, 8, 12), (1, 3, 1, 5, 6), (2, 4, 5, 7, 10)])
@pytest.mark.parametrize("table_rows", [1, "B"])
@torch.no_grad()
def test_qk_with_rope_matches_reference(B, T, H, HS, k, D, DS, table_rows, monkeypatch):
    monkeypatch.setattr(fused, "_empty", nan_empty)  # an unwritten element fails the comparison
    w = weights(H, HS, k, D, DS)
    x = strided_input(B, T, H, D)
    rows = B if table_rows == "B" else 1
    cos, sin = torch.randn(rows, T, DS, device=DEVICE), torch.randn(rows, T, DS, device=DEVICE)
    prepared = prepare_simulation(*w, head_dim=D, rope=True)
    got = simulate_prepared(x, prepared, T, (cos, sin)).view(B, T, HS, DS)
    ref = simulate_features_naive(simulate_heads_naive(x.reshape(B, T, H, D), *w[:4]), *w[4:])
    torch.testing.assert_close(got, apply_rope(ref, cos, sin), **TOL)
    # the same operands without the rotation
    torch.testing.assert_close(simulate_prepared(x, prepared).view(B, T, HS, DS), ref, **TOL)


@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float64])
@torch.no_grad()
def test_rope_tables_in_their_own_dtype(table_dtype, monkeypatch):
    # a bf16 model's tables are bf16: the kernel converts what it loads, as apply_rope does
    monkeypatch.setattr(fused, "_empty", nan_empty)
    B, T, H, HS, k, D, DS = 2, 3, 3, 6, 3, 8, 12
    w = weights(H, HS, k, D, DS)
    x = strided_input(B, T, H, D)
    cos, sin = (torch.randn(1, T, DS, device=DEVICE).to(table_dtype) for _ in range(2))
    got = simulate_prepared(x, prepare_simulation(*w, head_dim=D, rope=True), T, (cos, sin)).view(B, T, HS, DS)
    ref = simulate_features_naive(simulate_heads_naive(x.reshape(B, T, H, D), *w[:4]), *w[4:])
    torch.testing.assert_close(got, apply_rope(ref, cos, sin), **TOL)


@pytest.mark.parametrize("N", [1, 7, 63])
@pytest.mark.parametrize("H,HS,k,D", [(3, 6, 3, 8), (2, 6, 1, 7)])
@torch.no_grad()
def test_heads_only_matches_reference(N, H, HS, k, D, monkeypatch):
    monkeypatch.setattr(fused, "_empty", nan_empty)
    w = weights(H, HS, k, D, 4)[:4]
    x = strided_input(1, N, H, D)
    got = simulate_prepared(x, prepare_simulation(*w, head_dim=D))
    torch.testing.assert_close(got, simulate_heads_naive(x.reshape(1, N, H, D), *w).view(N, HS, D), **TOL)


def test_forward_only_and_bad_arguments_are_refused():
    w = weights(3, 6, 3, 8, 12)
    prepared = prepare_simulation(*w, head_dim=8)
    x = torch.randn(2, 3, 8, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="forward only"):
        simulate_prepared(x, prepared)
    with torch.no_grad():
        tables = (torch.ones(1, 2, 12, device=DEVICE), torch.zeros(1, 2, 12, device=DEVICE))
        with pytest.raises(ValueError, match="without rope=True"):
            simulate_prepared(x, prepared, 2, tables)
        with pytest.raises(ValueError, match="for these prepared weights"):
            simulate_prepared(torch.randn(2, 4, 8, device=DEVICE), prepared)  # H = 4, prepared for 3
        with pytest.raises(ValueError, match="do not fit"):  # the launch checks the padded shapes itself
            fused.launch_forward(torch.randn(2, 3, 40, device=DEVICE), prepared.weights, 6, 12)
        with pytest.raises(ValueError, match="dtype"):
            simulate_prepared(torch.randn(2, 3, 8, device=DEVICE, dtype=torch.float16), prepared)
    with pytest.raises(ValueError, match="feature MLP"):
        prepare_simulation(*w[:4], head_dim=8, rope=True)


def test_prepared_op_passes_opcheck():
    # schema, fake implementation (what torch.compile traces) and the real one agree
    w = weights(3, 6, 3, 8, 12)
    prepared = prepare_simulation(*w, head_dim=8, rope=True)
    x = torch.randn(4, 3, 8, device=DEVICE)
    cos, sin = torch.randn(1, 2, 12, device=DEVICE), torch.randn(1, 2, 12, device=DEVICE)
    torch.library.opcheck(simulate_prepared_op, (x, prepared.weights, prepared.rot, cos, sin, 6, 12, 2))
    heads = prepare_simulation(*w[:4], head_dim=8)
    torch.library.opcheck(simulate_prepared_op, (x, heads.weights, None, None, None, 6, None, 1))


def reference(x_NHD: torch.Tensor, w: list[torch.Tensor], rope: tuple | None, T: int) -> torch.Tensor:
    N, H, D = x_NHD.shape
    y = simulate_heads_naive(x_NHD.reshape(N // T, T, H, D), *w[:4])
    if len(w) == 8:
        y = simulate_features_naive(y, *w[4:])
    if rope is not None:
        y = apply_rope(y, *rope)
    return y.reshape(N, *y.shape[2:])


# (H, H', k, D, D'): the odd sizes of one program per token block, and H' = 18, D' = 34, which split
# into two head groups (the second holding 2 real heads) and two column blocks per half of D'
# (the second holding 1 real column)
SPLIT_SIZES = [(3, 6, 3, 7, 10), (2, 18, 3, 7, 34)]


# the interpreter takes seconds for the 64 programs of N = 63 at the larger sizes: with RoPE only there
SPLIT_CASES = [(N, *sizes, rope) for N in (1, 2, 7, 63) for sizes in SPLIT_SIZES for rope in (True, False)
               if not (N == 63 and sizes[1] > 16 and not rope)]


@pytest.mark.parametrize("N,H,HS,k,D,DS,rope", SPLIT_CASES)
@torch.no_grad()
def test_stacked_split_matches_reference(N, H, HS, k, D, DS, rope, monkeypatch):
    # with RoPE: queries, keys and values (no feature MLP) in one launch; without: queries and keys
    monkeypatch.setattr(fused, "_empty", nan_empty)
    grids = record_launches(monkeypatch)
    T = N if N < 63 else 9  # 63 tokens as 7 rows of 9, with one table row per batch row
    ws = [weights(H, HS, k, D, DS)] + [[w.flip(0) for w in weights(H, HS, k, D, DS)]]
    prepared = [prepare_simulation(*w, head_dim=D, rope=rope) for w in ws]
    if rope:
        ws.append([2 * w for w in ws[0][:4]])
        prepared.append(prepare_simulation(*ws[2], head_dim=D))
    G = len(ws)
    stacked = stack_simulations(prepared)
    # the tensors side by side in a fused projection's rows
    wide = torch.randn(N, 3 * H * D, device=DEVICE)
    x = wide[:, : G * H * D].view(N, G, H, D)
    tables = tuple(torch.randn(N // T, T, DS, device=DEVICE) for _ in range(2)) if rope else None
    got = simulate_prepared(x, stacked, T, tables, split=True)
    qk, v = got if rope else (got, None)
    assert qk.shape == (2, N, HS, DS)
    for g in range(2):
        torch.testing.assert_close(qk[g], reference(x[:, g], ws[g], tables, T), **TOL)
    if rope:
        assert v.shape == (1, N, HS, D)
        torch.testing.assert_close(v[0], reference(x[:, 2], ws[2], None, T), **TOL)
    splits = (2 if HS > 16 else 1) * (2 if DS > 32 else 1)
    assert grids == [("_simulate_split_kernel", (fused._Sizes(N, H, D, HS, k, DS, None).n_blocks, splits, G))]
    if N == 63:
        return
    # one of the tensors alone, split, gives the same as the one-program-per-block kernel
    alone = simulate_prepared(x[:, 1], prepared[1], T, tables, split=True)
    torch.testing.assert_close(alone, simulate_prepared(x[:, 1], prepared[1], T, tables), **TOL)
    assert [name for name, _ in grids[1:]] == ["_simulate_split_kernel", "_simulate_fwd_kernel"]


@pytest.mark.parametrize("N", [1, 7])
@pytest.mark.parametrize("H,HS,k,D", [(3, 6, 3, 7), (2, 18, 1, 7)])
@torch.no_grad()
def test_split_heads_only_matches_reference(N, H, HS, k, D, monkeypatch):
    # the values' launch: no feature MLP, split by head groups only
    monkeypatch.setattr(fused, "_empty", nan_empty)
    grids = record_launches(monkeypatch)
    w = weights(H, HS, k, D, 4)[:4]
    x = strided_input(1, N, H, D)
    got = simulate_prepared(x, prepare_simulation(*w, head_dim=D), split=True)
    torch.testing.assert_close(got, reference(x, w, None, 1), **TOL)
    assert grids[0][1][1:] == (2 if HS > 16 else 1, 1)


@torch.no_grad()
def test_split_only_while_the_grid_stays_small(monkeypatch):
    grids = record_launches(monkeypatch)
    w = weights(2, 18, 3, 7, 34)
    prepared = prepare_simulation(*w, head_dim=7, rope=False)
    x = torch.randn(20, 2, 7, device=DEVICE)
    n_blocks = fused._Sizes(20, 2, 7, 18, 3, 34, None).n_blocks
    monkeypatch.setattr(fused, "SPLIT_MAX_PROGRAMS", n_blocks * 4)
    split = simulate_prepared(x, prepared, split=True)
    monkeypatch.setattr(fused, "SPLIT_MAX_PROGRAMS", n_blocks * 4 - 1)
    whole = simulate_prepared(x, prepared, split=True)
    assert [grid for _, grid in grids] == [(n_blocks, 4, 1), (n_blocks, 1, 1)]
    torch.testing.assert_close(split, whole, **TOL)
    torch.testing.assert_close(whole, reference(x, w, None, 1), **TOL)


@torch.no_grad()
def test_stacking_refuses_mismatched_operands():
    a = prepare_simulation(*weights(3, 6, 3, 8, 12), head_dim=8, rope=True)
    with pytest.raises(ValueError, match=r"same D' and rope choice.*\(3, 8, 6, 10, True\)"):
        stack_simulations([a, prepare_simulation(*weights(3, 6, 3, 8, 10), head_dim=8, rope=True)])
    with pytest.raises(ValueError, match=r"same D' and rope choice.*\(3, 8, 6, 12, False\)"):
        stack_simulations([a, prepare_simulation(*weights(3, 6, 3, 8, 12), head_dim=8)])
    values = prepare_simulation(*weights(3, 6, 3, 8, 12)[:4], head_dim=8)
    with pytest.raises(ValueError, match=r"feature MLP first.*\(3, 8, 6, None, False\), \(3, 8, 6, 12"):
        stack_simulations([values, a])
    with pytest.raises(ValueError, match=r"equal head shapes.*\(3, 8, 4, 12, True\)"):
        stack_simulations([a, prepare_simulation(*weights(3, 4, 3, 8, 12), head_dim=8, rope=True)])
    stacked = stack_simulations([a, a])
    with pytest.raises(ValueError, match="unstacked"):
        stack_simulations([stacked, stacked])
    with pytest.raises(ValueError, match=r"\(N, G=2, H=3, D=8\)"):
        simulate_prepared(torch.randn(4, 3, 8, device=DEVICE), stacked)
    with pytest.raises(ValueError, match="do not fit"):  # stacked input, unstacked operands
        fused.launch_forward(torch.randn(4, 2, 3, 8, device=DEVICE), a.weights, 6, 12)


def test_stacked_op_passes_opcheck():
    w = weights(2, 18, 3, 7, 34)
    stacked = stack_simulations([prepare_simulation(*w, head_dim=7, rope=True)] * 2)
    x = torch.randn(4, 2, 2, 7, device=DEVICE)
    cos, sin = torch.randn(1, 2, 34, device=DEVICE), torch.randn(1, 2, 34, device=DEVICE)
    torch.library.opcheck(simulate_prepared_op, (x, stacked.weights, stacked.rot, cos, sin, 18, 34, 2, True))
    values = prepare_simulation(*w[:4], head_dim=7)
    with_values = stack_simulations([prepare_simulation(*w, head_dim=7, rope=True)] * 2 + [values])
    x3 = torch.randn(4, 3, 2, 7, device=DEVICE)
    args = (x3, with_values.weights, with_values.rot, cos, sin, 18, 34, 2, False)
    torch.library.opcheck(simulate_prepared_pair_op, args)


COMPILE_SCRIPT = r"""
import torch
from unittest import mock
from sasformer.ops.simulate import fused
from sasformer.ops.simulate.decode_fused import prepare_simulation, stack_simulations
from sasformer.ops.simulate.fused_inspect import _record, compile_launch, ptxas_stats

# GPT-small at batch 1 in bf16: queries, keys and values stacked, split and not; values alone, split
H, HS, k, D, DS = 12, 24, 3, 64, 128
g = torch.Generator().manual_seed(0)
shapes = ((HS, H, k), (HS,), (HS, HS, k), (HS,), (DS, D), (DS,), (DS, DS), (DS,))
w = [torch.randn(*s, generator=g).bfloat16() for s in shapes]
v = prepare_simulation(*w[:4], head_dim=D)
qkv = stack_simulations([prepare_simulation(*w, head_dim=D, rope=True)] * 2 + [v])
x = torch.randn(1, 3 * H * D).bfloat16()
tables = torch.ones(1, 1, DS), torch.zeros(1, 1, DS)
fused.SPLIT_MAX_PROGRAMS = 264
launches = []
with mock.patch.object(fused, "_launch", _record(launches)), mock.patch.object(fused, "_empty", torch.zeros):
    fused.launch_forward(x.view(1, 3, H, D), qkv.weights, HS, DS, 1, qkv.rot, *tables, split=True)
    fused.launch_forward(x.view(1, 3, H, D), qkv.weights, HS, DS, 1, qkv.rot, *tables)
    fused.launch_forward(x[:, 2 * H * D :].view(1, H, D), v.weights, HS, None, split=True)
for launch in launches:
    compiled = compile_launch(launch)
    assert ".entry" in compiled.asm["ptx"] and compiled.asm["cubin"]
    print("compiled", launch.name, launch.constexprs["HG"], launch.constexprs["E_BLOCKS"], "|",
          ptxas_stats(compiled.asm["ptx"]))
"""


def test_split_kernel_compiles_for_sm90_without_spills():
    # the interpreter hides layout errors and register pressure: compile for Hopper in a subprocess
    # (the interpreter setting replaces the kernels at import time)
    stdout = run_without_interpreter(COMPILE_SCRIPT)
    lines = [line for line in stdout.splitlines() if line.startswith("compiled")]
    expected = [("16", "4"), ("32", "1"), ("16", "1")]  # (heads, column blocks) per program
    assert [line.split("|")[0].split()[1:] for line in lines] == [
        ["_simulate_split_kernel", *hg_eb] for hg_eb in expected
    ], stdout
    for line in lines:
        if "ptxas not found" not in line:
            assert "spill stores/loads 0/0 bytes" in line, line
