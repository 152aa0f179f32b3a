"""Checkpoints: one directory per step, written atomically, readable by any world size.

Layout of ``OUT/checkpoints/step_000123/``::

    model.safetensors   weights by parameter name (a tied LM head is stored once, as embed.weight)
    config.json         {"model": ModelConfig dict, "train": TrainConfig dict, "step": 123, ...}
    optimizer.pt        AdamW state keyed by parameter name (not position, so sharding does not matter)
    state.pt            step, tokens seen, schedule, RNG states, data-loader state, tokenizer fingerprint

A checkpoint is written into a hidden temporary directory, every file fsynced, then renamed into
place; a crash mid-write leaves only the temporary directory, which readers ignore and the next save
(or the trainer's start) removes, see :func:`recover_interrupted_saves`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
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
# save_checkpoint's own working names: .tmp- (being written), .old- (a step's previous copy while it is
# replaced), .del- (being pruned); each followed by the final name and the writer's pid
_WORK_DIR = re.compile(r"^\.(tmp|old|del)-(step_\d+)-(\d+)$")
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
    """Write ``root/step_NNNNNN`` atomically, then delete all but the newest ``keep_last``.

    The sequence: write and fsync ``.tmp-step_NNNNNN-PID``; if ``step_NNNNNN`` exists, rename it to
    ``.old-step_NNNNNN-PID``; rename the temporary directory to ``step_NNNNNN``; delete the old copy; prune.
    What a crash leaves between these is finished or undone by :func:`recover_interrupted_saves`, which runs
    first.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    recover_interrupted_saves(root)
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
    _prune(root, final, keep_last)
    return final


def _prune(root: Path, final: Path, keep_last: int) -> None:
    """Delete the oldest checkpoints before ``final`` so that ``keep_last`` remain, ``final`` always among them.

    Checkpoints of later steps (another run's, or restored by recovery) are not this save's to delete, and
    never push out the one just written. Each goes out of the listing in one rename before it is deleted, so
    a crash mid-delete leaves a ``.del-`` directory for the next save to finish, not a half-deleted checkpoint.
    """
    step = checkpoint_step(final)
    older = [p for p in list_checkpoints(root) if checkpoint_step(p) < step]
    for stale in older[: max(0, len(older) - (keep_last - 1))]:
        if stale.is_symlink():  # a checkpoint linked in from elsewhere: drop the link, keep its target
            stale.unlink()
            continue
        trash = root / f".del-{stale.name}-{os.getpid()}"
        try:
            stale.rename(trash)
        except OSError:
            continue  # still a complete checkpoint; the next save tries again
        shutil.rmtree(trash, ignore_errors=True)


def _another_live_process(pid: int) -> bool:
    """Whether ``pid`` is a running process other than this one (on this machine)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else (or cannot tell): leave its directories alone
    return True


def recover_interrupted_saves(root: str | Path) -> None:
    """Finish or undo what a process killed inside :func:`save_checkpoint` left in ``root``.

    Only directories named as ``save_checkpoint`` names its own (``.tmp-``, ``.old-``, ``.del-`` followed by
    ``step_NNNNNN-PID``) directly in ``root`` are touched. Where ``step_NNNNNN`` itself is missing:

    - a complete ``.tmp-`` with an ``.old-`` of the same name and pid is put in place: the old copy is
      renamed away only after the new one is fsynced, so the new one is whole;
    - otherwise a complete ``.old-`` (a checkpoint that was in place) is put back.

    Every other working directory is deleted: a ``.tmp-`` without its ``.old-`` never reached its rename, and
    all its files being present does not prove them whole (the process may have died inside a write), so
    trusting it could put a truncated checkpoint in place and let pruning delete the good ones; the run
    repeats those steps exactly instead. Where ``step_NNNNNN`` exists but is incomplete, its working
    directories are left alone: nothing says which copy is good. Directories whose pid is another running
    process on this machine are saves in progress and are left alone too.
    """
    root = Path(root)
    if not root.is_dir():
        return
    found: dict[str, list[tuple[str, str, Path]]] = {}  # final name -> [(kind, pid, path)]
    for path in root.iterdir():
        match = _WORK_DIR.match(path.name)
        if match and path.is_dir() and not path.is_symlink():
            kind, name, pid = match.groups()
            if _another_live_process(int(pid)):
                # a save in progress (another run writing to this directory), or a crashed run's pid reused
                warnings.warn(f"{path} belongs to running process {pid} and is left as it is; if no other run "
                              "writes to this directory, that process only reuses a crashed run's pid: move the "
                              "folder to step_NNNNNN by hand if it is the newest complete checkpoint", stacklevel=2)
                continue
            found.setdefault(name, []).append((kind, pid, path))
    for name, entries in sorted(found.items()):
        final = root / name
        if final.exists() and not is_complete(final):
            entries = [e for e in entries if e[0] == "del"]
        elif not final.exists():
            old_pids = {pid for kind, pid, _ in entries if kind == "old"}
            ranked = [path for kind, pid, path in entries if kind == "tmp" and pid in old_pids] + \
                     [path for kind, _, path in entries if kind == "old"]
            source = next((p for p in ranked if all((p / f).is_file() for f in REQUIRED)), None)
            if source is not None:
                source.rename(final)
                _fsync(root)
                entries = [e for e in entries if e[2] != source]
        for _, _, path in entries:
            shutil.rmtree(path, ignore_errors=True)


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
