"""benchmarks/trace_launchers.py ties device events to the host operations that launched them."""

from __future__ import annotations

import gzip
import json

from benchmarks import trace_launchers as tl


def _op(name, ts, dur, ext=None, tid=1, cat="cpu_op", **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": tid, "ts": ts, "dur": dur,
            "args": {**({"External id": ext} if ext is not None else {}), **args}}


def _events():
    return [
        _op("autograd::engine::evaluate_function", 0, 100),
        _op("CompiledFxGraph", 10, 80),
        _op("aten::contiguous", 20, 10, ext=1),
        _op("aten::copy_", 21, 8, ext=2),
        _op("aten::copy_", 40, 5, ext=3),  # a second copy, outside contiguous
        _op("cudaMemcpyAsync", 22, 2, cat="cuda_runtime", correlation=7),
        _op("cudaMemcpyAsync", 60, 2, cat="cuda_runtime", correlation=9),  # launched outside any op
        _op("Memcpy DtoD (Device -> Device)", 200, 30, ext=2, tid=7, cat="gpu_memcpy", correlation=7),
        _op("Memcpy DtoD (Device -> Device)", 300, 10, ext=3, tid=7, cat="gpu_memcpy", correlation=8),
        _op("Memcpy DtoD (Device -> Device)", 400, 5, tid=7, cat="gpu_memcpy", correlation=9),
        _op("Memcpy DtoD (Device -> Device)", 500, 20, ext=2, tid=7, cat="gpu_memcpy", correlation=10),
        _op("triton_poi_fused_add", 250, 50, ext=2, tid=7, cat="kernel"),
    ]


def test_kernels_are_grouped_by_the_operations_around_their_launch():
    rows = tl.group_launches(_events(), "memcpy dtod", depth=3)
    assert [(r["chain"], r["calls"], round(r["device_ms"], 3)) for r in rows] == [
        (["CompiledFxGraph", "aten::contiguous", "aten::copy_"], 2, 0.05),
        (["autograd::engine::evaluate_function", "CompiledFxGraph", "aten::copy_"], 1, 0.01),
        # no External id: found through the runtime call's correlation, inside the two outer operations
        (["autograd::engine::evaluate_function", "CompiledFxGraph", "cudaMemcpyAsync"], 1, 0.005),
    ]
    assert rows[0]["kernels"] == ["Memcpy DtoD (Device -> Device)"]
    assert tl.group_launches(_events(), "triton", depth=1)[0]["chain"] == ["aten::copy_"]


def test_the_command_reads_a_gzipped_trace_and_says_when_nothing_matches(tmp_path, capsys):
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": _events()}, f)
    assert tl.main([str(path), "--kernel", "Memcpy", "--depth", "2"]) == 0
    out = capsys.readouterr().out
    assert "| 2 | 0.050 | `aten::contiguous` > `aten::copy_` |" in out
    assert tl.main([str(path), "--kernel", "nccl"]) == 1
    assert "no device event's name contains 'nccl'" in capsys.readouterr().out
