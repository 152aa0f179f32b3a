from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # fakes.py, also for training subprocesses

from sasformer.train.config import TrainConfig


def tiny_config(out_dir: Path, **changes) -> TrainConfig:
    """A 2-layer d=32 model on T=16, batch 4: a step takes milliseconds on a CPU."""
    data = {
        "model": {"size": "tiny", "attention": "mha", "d_model": 32, "n_layers": 2, "attention_args": {"n_heads": 2}},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 3},
        "data_dir": "unused",
        "seq_len": 16,
        "batch_size": 4,
        "max_steps": 12,
        "device": "cpu",
        "eval_interval": 0,
        "eval_batches": 2,
        "log_interval": 1,
        "checkpoint_interval": 4,
        "keep_last": 2,
        "out_dir": str(out_dir),
        "tensorboard": False,
        "progress": False,
    }
    for key, value in changes.items():
        node = data
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return TrainConfig.from_dict(data)


@pytest.fixture
def make_config(tmp_path):
    def make(name: str = "run", **changes) -> TrainConfig:
        return tiny_config(tmp_path / name, **changes)

    return make
