"""benchmarks/step_floor.py on the CPU: the pieces it times are the model's FLOPs, all of them."""

from __future__ import annotations

import json

import pytest

from benchmarks import step_floor


@pytest.mark.parametrize("chunk", [64, 1000])
def test_the_timed_pieces_add_up_to_the_models_flop_count(tmp_path, chunk):
    argv = ["--out", str(tmp_path), "--size", "tiny", "--batch-size", "2", "--seq-len", "32",
            "--loss-chunk-size", str(chunk), "--reps", "1", "--warmup", "0", "--copy-bytes", "4096",
            "--peak-tflops", "1"]
    assert step_floor.main(argv) == 0
    res = json.loads((tmp_path / "step_floor.json").read_text())
    assert res["timed_tflop"] == pytest.approx(res["step_tflop"], rel=1e-9)
    head = [r for r in res["rows"] if r["name"].startswith("LM head")]
    assert {r["calls"] for r in head} == {-(-64 // chunk)}
    assert res["floor_ms"] == pytest.approx(sum(r["ms_per_step"] for r in res["rows"]))
    assert res["floor_ms"] == pytest.approx(res["gemm_ms"] + res["attention_ms"])
    assert res["floor_mfu"] == pytest.approx(res["step_tflop"] * 1000 / res["floor_ms"] / 1.0)  # peak 1 TFLOP/s
    assert res["left_for_the_rest_ms"] == pytest.approx(res["target_step_ms"] - res["floor_ms"])
    md = (tmp_path / "step_floor.md").read_text()
    assert "| attention forward + backward (causal) | 2x4x32x32 | 4 |" in md and "55% MFU" in md
