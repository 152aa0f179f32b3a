"""Checkpoints: one directory per step, written atomically, readable by any world size.

Layout of ``OUT/checkpoints/step_000123/``::

    model.safetensors   weights by parameter name (a tied LM head is stored once, as embed.weight)
    config.json         {"model": ModelConfig dict, "train": TrainConfig dict, "step": 123, ...}
    optimizer.pt        AdamW state keyed by parameter name (not position, so sharding does not matter)
    state.pt            step, tokens seen, schedule, RNG states, data-loader state, tokenizer fingerprint

A checkpoint is written into a hidden temporary directory, every file fsynced, then renamed into
place; a crash mid-write leaves only the temporary directory, which readers ignore.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sasformer.models.config import ModelConfig
from sasformer.models.decoder import DecoderLM

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.pt"
REQUIRED = (MODEL_FILE, CONFIG_FILE, OPTIMIZER_FILE, STATE_FILE)
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TIED = "lm_head.weight"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def is_complete(path: Path) -> bool:
    return path.is_dir() and _STEP_DIR.match(path.name) is not None and all((path / f).is_file() for f in REQUIRED)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_complete(p)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: str | Path) -> int:
    """The step of a checkpoint folder ``step_NNNNNN``."""
    match = _STEP_DIR.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint folder (step_NNNNNN)")
    return int(match.group(1))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_model_file(path: Path, state: dict[str, torch.Tensor], config: ModelConfig) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if config.tie_embeddings:
        tensors.pop(_TIED, None)  # the same storage as embed.weight; safetensors refuses shared tensors
    save_file(tensors, str(path), metadata={"format": "pt"})


def read_model_state(checkpoint: str | Path, config: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """Weights by parameter name, with the tied LM head restored as a reference to the embedding."""
    checkpoint = Path(checkpoint)
    config = config or read_model_config(checkpoint)
    state = load_file(str(checkpoint / MODEL_FILE))
    if config.tie_embeddings and "embed.weight" in state:
        state[_TIED] = state["embed.weight"]
    return state


def read_model_config(checkpoint: str | Path) -> ModelConfig:
    return ModelConfig.from_dict(read_config(checkpoint)["model"])


def read_config(checkpoint: str | Path) -> dict[str, Any]:
    checkpoint = Path(checkpoint)
    if not is_complete(checkpoint):
        missing = [f for f in REQUIRED if not (checkpoint / f).is_file()]
        raise ValueError(
            f"{checkpoint} is not a complete checkpoint (missing {missing}); pass a step_NNNNNN directory "
            "written by `sasformer train`"
        )
    return json.loads((checkpoint / CONFIG_FILE).read_text())


def trained_seq_len(checkpoint: str | Path) -> int | None:
    """The sequence length the checkpoint's run trained at (its config's ``train.seq_len``; None if not recorded).

    The model's ``max_seq_len`` can be longer (a preset's, or raised to fit ``seq_len``), so evaluations that
    speak of "the trained length" read this.
    """
    seq_len = read_config(checkpoint).get("train", {}).get("seq_len")
    return int(seq_len) if seq_len is not None else None


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> DecoderLM:
    """A :class:`DecoderLM` with the checkpoint's config and weights, in eval mode."""
    config = read_model_config(checkpoint)
    with torch.device(device):
        model = DecoderLM(config)
    state = read_model_state(checkpoint, config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{checkpoint}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    return model.eval()


def save_checkpoint(
    root: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    model_config: ModelConfig,
    optimizer_state: dict[str, Any],
    train_state: dict[str, Any],
    extra_config: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write ``root/step_NNNNNN`` atomically, then delete all but the newest ``keep_last``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    old = None
    try:
        write_model_file(tmp / MODEL_FILE, model_state, model_config)
        (tmp / CONFIG_FILE).write_text(
            json.dumps({"model": model_config.to_dict(), "step": step, **extra_config}, indent=2, default=str)
        )
        torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        torch.save({**train_state, "step": step}, tmp / STATE_FILE)
        for name in REQUIRED:
            _fsync(tmp / name)
        _fsync(tmp)
        if final.exists():  # the same step saved again (e.g. after a resume): swap, then drop the old copy
            old = root / f".old-{final.name}-{os.getpid()}"
            final.rename(old)
        tmp.rename(final)
        _fsync(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not final.exists():
            old.rename(final)
        raise
    for stale in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def trained_tokenizer_fingerprint(checkpoint: str | Path) -> str | None:
    """The fingerprint of the tokenizer the checkpoint's training data was prepared with (None if unknown)."""
    return _read_train_state(Path(checkpoint)).get("tokenizer_fingerprint")


def load_train_state(checkpoint: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(optimizer state keyed by parameter name, trainer state) of a checkpoint."""
    checkpoint = Path(checkpoint)
    train_state = _read_train_state(checkpoint)
    optimizer_state = torch.load(checkpoint / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    return optimizer_state, train_state


def _read_train_state(checkpoint: Path) -> dict[str, Any]:
    """``state.pt`` of a complete checkpoint (ValueError otherwise)."""
    read_config(checkpoint)  # raises if incomplete
    # RNG, loader and schedule states are plain containers, numbers, strings and tensors: nothing to execute,
    # so others' checkpoints (eval reads them) are read without running pickled code
    return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
