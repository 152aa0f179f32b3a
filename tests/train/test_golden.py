"""Golden losses: a fixed 6-step CPU run must reproduce the stored losses.

A change to the model, optimiser, schedule or data order moves these numbers. When the change is
intended, regenerate them with ``PYTHONPATH=. python tests/train/test_golden.py`` and say why in the
commit message.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest import tiny_config
from fakes import FakeData

from sasformer.train.metrics import read_metrics
from sasformer.train.trainer import Trainer

GOLDEN = Path(__file__).with_name("golden_losses.json")
VARIANTS = ["mha", "sas"]


def golden_run(attention: str, out_dir: Path) -> list[float]:
    cfg = tiny_config(out_dir, max_steps=6, checkpoint_interval=0, model__attention=attention, micro_batch_size=2)
    Trainer(cfg, FakeData()).fit()
    return [r["loss"] for r in read_metrics(out_dir / "metrics.jsonl")]


@pytest.mark.parametrize("attention", VARIANTS)
def test_losses_match_golden(tmp_path, attention):
    want = json.loads(GOLDEN.read_text())[attention]
    got = golden_run(attention, tmp_path)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5), (
        f"{attention} losses moved from the stored golden values; if intended, regenerate them (see module doc)"
    )


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        losses = {a: golden_run(a, Path(tmp) / a) for a in VARIANTS}
    GOLDEN.write_text(json.dumps(losses, indent=2) + "\n")
    print(f"wrote {GOLDEN}")
