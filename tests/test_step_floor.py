"""benchmarks/step_floor.py on the CPU: the pieces it times are the model's FLOPs, all of them."""

from __future__ import annotations

import json

import pytest

from benchmarks import step_floor


@pytest.mark.parametrize("chunk", [64, 1000, 16, 48])
def test_the_timed_pieces_add_up_to_the_models_flop_count(tmp_path, chunk):
    argv = ["--out", str(tmp_path), "--size", "tiny", "--batch-size", "2", "--seq-len", "32",
            "--loss-chunk-size", str(chunk), "--reps", "1", "--warmup", "0", "--copy-bytes", "4096",
            "--peak-tflops", "1"]
    assert step_floor.main(argv) == 0
    res = json.loads((tmp_path / "step_floor.json").read_text())
    assert res["timed_tflop"] == pytest.approx(res["step_tflop"], rel=1e-9)
    # every token goes through the head once: whole chunks, and a shorter last one timed at its size
    logits = [r for r in res["rows"] if r["name"] == "LM head logits"]
    assert sum(r["calls"] * int(r["shape"].split("x")[0]) for r in logits) == 64
    assert len(logits) == (2 if chunk == 48 else 1)
    assert res["floor_ms"] == pytest.approx(sum(r["ms_per_step"] for r in res["rows"]))
    md = (tmp_path / "step_floor.md").read_text()
    assert "| attention forward + backward (causal) | 2x4x32x32 | 4 |" in md and "55% MFU" in md
