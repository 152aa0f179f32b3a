"""A training process killed with SIGKILL (between steps, or in the middle of writing a checkpoint)
resumes to exactly the losses of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import tiny_config
from fakes import FakeData

from sasformer.train import checkpoint as ckpt
from sasformer.train.metrics import read_metrics
from sasformer.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    from conftest import tiny_config
    from fakes import FakeData
    from sasformer.train.trainer import Trainer

    out_dir, kill_at, kill_in_save = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "save"
    cfg = tiny_config(out_dir, max_steps=12, checkpoint_interval=4)
    hooks = []
    if kill_at and not kill_in_save:
        hooks.append(lambda trainer, step: step == kill_at and os.kill(os.getpid(), signal.SIGKILL))
    if kill_at and kill_in_save:
        real_save = torch.save

        def save_then_die(obj, path, *args, **kwargs):
            real_save(obj, path, *args, **kwargs)
            if f"step_{kill_at:06d}" in str(path):  # optimizer.pt of this step is on disk, the rest is not
                os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save_then_die
    Trainer(cfg, FakeData(), step_hooks=hooks).fit()
    """
)


def _run(tmp_path: Path, out_dir: Path, kill_at: int = 0, where: str = "step") -> subprocess.CompletedProcess:
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(REPO)])}
    return subprocess.run([sys.executable, str(script), str(out_dir), str(kill_at), where], env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def _losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir / "metrics.jsonl")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    out_dir = tmp_path_factory.mktemp("reference")
    Trainer(tiny_config(out_dir, max_steps=12, checkpoint_interval=4), FakeData()).fit()
    return _losses(out_dir)


@pytest.mark.parametrize("where, kill_at", [("step", 7), ("save", 8)])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, reference, where, kill_at):
    killed = tmp_path / "killed"
    result = _run(tmp_path, killed, kill_at, where)
    assert result.returncode == -signal.SIGKILL, result.stderr
    logged = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    # a step hook fires before that step is logged; a checkpoint is written after it
    assert max(logged) == (kill_at - 1 if where == "step" else kill_at)
    assert ckpt.latest_checkpoint(killed / "checkpoints").name == "step_000004"
    if where == "save":
        leftovers = [p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
        assert leftovers, "the kill should have interrupted a checkpoint write"
    resumed = Trainer(tiny_config(killed, max_steps=12, checkpoint_interval=4), FakeData())
    assert resumed.step == 4
    resumed.fit()
    assert _losses(killed) == reference
    assert ckpt.latest_checkpoint(killed / "checkpoints").name == "step_000012"
