"""benchmarks/loss_speed.py on the CPU (``--smoke``: Triton's interpreter, tiny shapes): every variant is
checked before it is timed, and a wrong one is reported and kept out of the timings."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")

from benchmarks import loss_speed  # noqa: E402
from sasformer.ops.cross_entropy import kernel  # noqa: E402

# --smoke needs Triton's interpreter, chosen at import (tests/conftest.py does so only on a machine without CUDA);
# on a GPU the script's real run is the check
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="--smoke is the CPU run of loss_speed.py")


def test_smoke_run_checks_and_times_every_variant(tmp_path):
    assert loss_speed.main(["--smoke", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "loss_speed.json").read_text())
    rows, loss = res["rows"]["variants"], res["loss"]["variants"]
    assert set(rows) == {"triton 64x1", "triton 128x2", "torch compiled (chunked_torch's code)"}
    # the third is the rows section's fastest shape, whichever it was
    fastest = min(("triton 64x1", "triton 128x2"), key=lambda name: rows[name]["ms"])
    assert list(loss) == ["chunked_torch, compiled", "chunked_triton, default shape",
                          f"chunked_triton, {fastest.split()[1]}"]
    for row in [*rows.values(), *loss.values()]:
        assert row["passed"] and row["ms"] > 0
    assert loss["chunked_triton, default shape"]["tile"] == "{}x{}".format(*kernel.block_and_warps(300))
    md = (tmp_path / "loss_speed.md").read_text()
    assert "| triton 128x2 |" in md and "FAILED" not in md


def test_a_wrong_kernel_is_reported_and_not_timed(tmp_path, monkeypatch):
    real = kernel.cross_entropy_rows_

    def off_by_a_tenth(logits, *args, **kwargs):
        real(logits, *args, **kwargs)
        logits.mul_(1.1)

    monkeypatch.setattr(kernel, "cross_entropy_rows_", off_by_a_tenth)
    assert loss_speed.main(["--smoke", "--sections", "rows", "--out", str(tmp_path)]) == 1
    rows = json.loads((tmp_path / "loss_speed.json").read_text())["rows"]["variants"]
    for name in ("triton 64x1", "triton 128x2"):
        assert not rows[name]["passed"] and "ms" not in rows[name]
        assert rows[name]["errors"]["grad"] == pytest.approx(0.1, rel=0.05)
    assert rows["torch compiled (chunked_torch's code)"]["passed"]
    assert "| triton 64x1 | FAILED |" in (tmp_path / "loss_speed.md").read_text()


def test_a_kernel_that_writes_no_loss_fails(tmp_path, monkeypatch):
    real = kernel.cross_entropy_rows_

    def loss_elsewhere(logits, targets, loss, *args, **kwargs):
        real(logits, targets, loss.clone(), *args, **kwargs)  # right gradient, the loss written to a copy

    monkeypatch.setattr(kernel, "cross_entropy_rows_", loss_elsewhere)
    assert loss_speed.main(["--smoke", "--sections", "rows", "--tiles", "64x1", "--out", str(tmp_path)]) == 1
    row = json.loads((tmp_path / "loss_speed.json").read_text())["rows"]["variants"]["triton 64x1"]
    assert not row["passed"] and "ms" not in row and row["errors"]["grad"] <= loss_speed.GRAD_LIMIT


def test_bad_tiles_are_refused():
    with pytest.raises(SystemExit, match="not BLOCKxWARPS"):
        loss_speed.parse_tiles("4096")
    with pytest.raises(ValueError, match="power of two"):
        loss_speed.parse_tiles("3000x8")
    assert loss_speed.parse_tiles("4096x8, 2048x4") == [(4096, 8), (2048, 4)]
