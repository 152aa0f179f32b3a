"""End to end on real token shards: ``prepare`` a tiny corpus, train on it, refuse to resume on
shards made by another tokenizer."""

from __future__ import annotations

import argparse
import json
import random

import pytest

pytest.importorskip("tokenizers")  # the `data` extra trains the BPE

from sasformer.commands import train as command
from sasformer.data.prepare import PrepareOptions, prepare
from sasformer.train import checkpoint as ckpt
from sasformer.train.metrics import read_metrics


def _corpus(path, seed: int) -> str:
    rng = random.Random(seed)
    words = ["attention", "score", "head", "simulated", "token", "layer", "model", "train", "loss", "data"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) for _ in range(60)]
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    return str(path)


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    dirs = []
    for vocab in (300, 330):
        out = root / f"bpe{vocab}"
        text = _corpus(root / f"corpus{vocab}.jsonl", seed=vocab)
        prepare(PrepareOptions(inputs=[text], out=str(out), vocab_size=vocab, val_fraction=0.2, workers=1,
                               progress=False))
        dirs.append(out)
    return dirs


def test_train_command_on_prepared_shards_then_refuse_other_tokenizer(tmp_path, two_datasets, capsys):
    first, second = two_datasets
    out_dir = tmp_path / "run"
    common = ["--model.d_model", "32", "--model.n_layers", "2", "--model.attention_args", "{n_heads: 2}",
              "--seq_len", "16", "--batch_size", "4", "--device", "cpu", "--eval_interval", "4",
              "--checkpoint_interval", "4", "--out_dir", str(out_dir), "--progress", "false", "--tensorboard", "false"]
    args = argparse.Namespace(config=None, print_config=False,
                              overrides=[*common, "--data_dir", str(first), "--max_steps", "4"])
    assert command.run(args) == 0
    assert "step 4: loss" in capsys.readouterr().out
    assert read_metrics(out_dir / "metrics.jsonl", kind="val")[-1]["val_loss"] > 0
    saved = ckpt.load_model(ckpt.latest_checkpoint(out_dir / "checkpoints"))
    assert saved.config.vocab_size == 320  # 300 padded to a multiple of 64
    args.overrides = [*common, "--data_dir", str(second), "--max_steps", "8"]
    with pytest.raises(ValueError, match="tokenizer"):
        command.run(args)
