from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

_WORDS = ("the cat dog bird sat ran on under a mat tree house quickly slowly red blue green small big and then it was "
          "very happy sad with over near far to from").split()


def _documents(n_docs: int, seed: int = 0) -> list[str]:
    """Short pseudo-English documents with a repeating structure a tiny model can start to learn."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(6, 12)):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 9))]
            sentences.append(" ".join(words).capitalize() + ".")
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> Path:
    """A prepared folder (train and val shards, a 300-id BPE) built from generated text."""
    from sasformer.data.prepare import PrepareOptions, prepare

    root = tmp_path_factory.mktemp("compare_data")
    inputs = root / "text"
    inputs.mkdir()
    for i, doc in enumerate(_documents(60)):
        (inputs / f"doc{i:03d}.txt").write_text(doc)
    out = root / "prepared"
    prepare(PrepareOptions(inputs=[str(inputs)], out=str(out), vocab_size=300, val_fraction=0.2, workers=1,
                           progress=False))
    return out


def grid_dict(data_dir: Path, out_dir: Path, variants=None, seeds=(0,), **sections) -> dict:
    """A grid of very small runs: d=32, one layer, T=16, batch 4, six steps."""
    grid = {
        "name": "test",
        "out_dir": str(out_dir),
        "data": {"dir": str(data_dir)},
        "model": {"size": "tiny", "d_model": 32, "n_layers": 1},
        "variants": variants or [
            {"name": "mha", "attention": "mha", "attention_args": {"n_heads": 2}},
            {"name": "sas", "attention": "sas", "attention_args": {"n_heads": 2}},
        ],
        "seeds": list(seeds),
        "budget": {"kind": "tokens", "tokens": 6 * 4 * 16},
        "train": {"seq_len": 16, "batch_size": 4, "device": "cpu", "eval_interval": 3, "eval_batches": 2,
                  "log_interval": 1, "checkpoint_interval": 2, "keep_last": 2,
                  "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2}},
        "progress": False,
    }
    for key, value in sections.items():
        grid[key] = value
    return grid


def write_finished_runs(spec, grid_dir: Path, vocab_size: int, losses: dict[str, float | None] | None = None,
                        **extra) -> list[dict]:
    """A ``result.json`` for every run of ``spec`` as `compare` leaves it, without training: the loss in
    ``losses`` by run id (None: the run diverged), else 3.0; ``extra`` goes into every result."""
    import json

    from sasformer.compare.runner import RESULT_FILE, VALIDATION_RULE, plan_runs
    from sasformer.layers.registry import attention_class
    from sasformer.train.config import TrainConfig

    results = []
    for plan in plan_runs(spec, Path(spec.data.dir), vocab_size, Path(grid_dir)):
        loss = (losses or {}).get(plan.id, 3.0)
        tokens = None if loss is None else plan.budget.max_tokens
        result = {
            "id": plan.id, "entry": plan.entry, "attention": plan.variant.attention, "size": plan.size,
            "seed": plan.seed, "params": plan.params, "train_flops_per_token": plan.train_flops_per_token,
            "budget": {"max_tokens": plan.budget.max_tokens, "max_time_s": plan.budget.max_time_s},
            "diverged": "loss is nan at step 2" if loss is None else None,
            "zero_shot": None, "zero_shot_avg": None, "mqar_accuracy": None, "steps": None if loss is None else 6,
            "tokens_seen": tokens, "train_flops": None if loss is None else tokens * plan.train_flops_per_token,
            "train_seconds": None if loss is None else 1.0, "tokens_per_s": None if loss is None else 100.0,
            "tflops_per_s": None, "mfu": None, "peak_mem_gib": None, "final_train_loss": loss,
            "initial_val_loss": None, "final_val_loss": loss,
            "final_val_ppl": None if loss is None else math.exp(loss), "val_curve": [],
            "environment": {"git_revision": "abc", "device": "cpu", "torch": "2", "python": "3"},
            # as a run records it: the embedding's rows, the tokenizer's vocabulary padded (pad_vocab_to)
            "model_config": {"vocab_size": TrainConfig.from_dict(plan.train).model.build(vocab_size, 8).vocab_size},
            "train_config": plan.train,
            "validation_rule": VALIDATION_RULE, "attention_init": attention_class(plan.variant.attention).init_rule,
            **extra,
        }
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        (plan.run_dir / RESULT_FILE).write_text(json.dumps(result))
        results.append(result)
    return results
