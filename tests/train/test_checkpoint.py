from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sasformer.models.decoder import DecoderLM
from sasformer.models.presets import preset
from sasformer.train import checkpoint as ckpt


def _model(tie: bool = True) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(preset("tiny", "mha", d_model=32, n_layers=2, vocab_size=50, tie_embeddings=tie,
                            attention_args={"n_heads": 2}))


def _save(root, step, model, keep_last=3):
    opt_state = {"state": {}, "param_groups": []}
    return ckpt.save_checkpoint(root, step, model.state_dict(), model.config, opt_state,
                                {"rng": ckpt.rng_state(), "loader": {"step": step}}, {"train": {}}, keep_last)


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_and_load_model(tmp_path, tie):
    model = _model(tie)
    path = _save(tmp_path, 7, model)
    assert path.name == "step_000007" and ckpt.is_complete(path)
    loaded = ckpt.load_model(path)
    assert loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.embed.weight) == tie
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 50, (2, 7))
    assert torch.equal(model(ids), loaded(ids))


def test_keep_last_and_latest(tmp_path):
    model = _model()
    for step in (2, 4, 6, 8):
        _save(tmp_path, step, model, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000006", "step_000008"]
    (tmp_path / "step_000010").mkdir()  # a directory without its files is not a checkpoint
    (tmp_path / ".tmp-step_000012-1").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000008"


def test_failed_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model = _model()
    good = _save(tmp_path, 4, model)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    calls = []

    def broken_save(obj, f, *args, **kwargs):  # the optimizer file is written, the state file fails
        calls.append(f)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    real_save = torch.save
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 8, model)
    assert [p.name for p in tmp_path.iterdir()] == ["step_000004"]  # no partial directory left behind
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before


def test_failed_resave_of_same_step_keeps_it(tmp_path, monkeypatch):
    model = _model()
    good = _save(tmp_path, 4, model)

    def fail_rename(self, target):
        raise OSError("rename failed")

    real_rename = type(good).rename
    monkeypatch.setattr(type(good), "rename", lambda self, t: fail_rename(self, t) if ".tmp-" in self.name
                        else real_rename(self, t))
    with pytest.raises(OSError, match="rename failed"):
        _save(tmp_path, 4, model)
    assert ckpt.latest_checkpoint(tmp_path) == good and ckpt.is_complete(good)


class _Killed(BaseException):
    """The process died here: nothing after it runs, save_checkpoint's own clean-up included."""


def _kill(monkeypatch, rename: int | None = None, rmtree_of: str | None = None) -> None:
    """Die at the ``rename``-th os.rename (before it happens), or in the first rmtree of a directory whose name
    contains ``rmtree_of`` (after it has deleted one file); from then on no rename or rmtree changes the disk."""
    real_rename, real_rmtree = os.rename, shutil.rmtree
    state = {"renames": 0, "dead": False}

    def fake_rename(src, dst, *args, **kwargs):
        state["renames"] += 1
        if state["dead"] or state["renames"] == rename:
            state["dead"] = True
            raise _Killed
        return real_rename(src, dst, *args, **kwargs)

    def fake_rmtree(path, *args, **kwargs):
        if rmtree_of is not None and rmtree_of in Path(path).name and Path(path).is_dir():
            (Path(path) / ckpt.MODEL_FILE).unlink()
            state["dead"] = True
        if state["dead"]:
            raise _Killed
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "rename", fake_rename)
    monkeypatch.setattr(shutil, "rmtree", fake_rmtree)


def _embed(path: Path) -> torch.Tensor:
    return ckpt.read_model_state(path)["embed.weight"]


# (step saved over a complete step 4, where the save dies, the checkpoint that must be found with its weights)
KILLS = {
    "new step, before its rename": (8, {"rename": 1}, "step_000004", "first"),
    "new step, pruning the previous one": (8, {"rmtree_of": "step_000004"}, "step_000008", "second"),
    "same step, before the old copy is renamed away": (4, {"rename": 1}, "step_000004", "first"),
    "same step, between the two renames": (4, {"rename": 2}, "step_000004", "second"),
    "same step, deleting the old copy": (4, {"rmtree_of": ".old-"}, "step_000004", "second"),
}


@pytest.mark.parametrize("then", ["recover", "next save"])
@pytest.mark.parametrize("kill", KILLS, ids=list(KILLS))
def test_a_killed_save_leaves_one_good_checkpoint_and_no_leftovers(tmp_path, monkeypatch, kill, then):
    step, where, survivor, weights = KILLS[kill]
    first, second = _model(), _model()
    with torch.no_grad():
        second.embed.weight.add_(1.0)
    _save(tmp_path, 4, first, keep_last=1)  # keep_last 1: the only checkpoint is at stake
    _kill(monkeypatch, **where)
    with pytest.raises(_Killed):
        _save(tmp_path, step, second, keep_last=1)
    monkeypatch.undo()  # the next process
    if then == "recover":  # what the trainer does before it picks the checkpoint to resume from
        ckpt.recover_interrupted_saves(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [survivor]
    else:
        _save(tmp_path, 12, first, keep_last=2)
        assert sorted(p.name for p in tmp_path.iterdir()) == [survivor, "step_000012"]
    assert ckpt.is_complete(tmp_path / survivor)
    assert torch.equal(_embed(tmp_path / survivor), (first if weights == "first" else second).embed.weight)


def test_recovery_touches_only_the_savers_own_directories(tmp_path):
    outside = tmp_path / "elsewhere"
    _save(outside, 4, _model())
    root = tmp_path / "checkpoints"
    root.mkdir()
    names = [".tmp-notes", ".old-step_000004", ".tmp-step_000004-1x", ".cache-step_000004-1"]
    for name in names:
        (root / name).mkdir()
    (root / ".tmp-step_000006-1").write_text("a file, not a directory")
    (root / ".old-step_000008-1").symlink_to(outside / "step_000004")  # a link: never followed into
    ckpt.recover_interrupted_saves(root)
    assert sorted(p.name for p in root.iterdir()) == sorted([*names, ".tmp-step_000006-1", ".old-step_000008-1"])
    assert ckpt.is_complete(outside / "step_000004")


def test_a_leftover_old_copy_does_not_block_saving_that_step_again(tmp_path):
    model = _model()
    good = _save(tmp_path, 4, model)
    shutil.copytree(good, tmp_path / f".old-{good.name}-{os.getpid()}")  # a killed replacement of this pid's
    assert _save(tmp_path, 4, model) == good and sorted(p.name for p in tmp_path.iterdir()) == [good.name]


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    model = _model()
    _save(tmp_path, 12, model)  # a later step's checkpoint (e.g. another run's)
    written = _save(tmp_path, 8, model, keep_last=1)
    assert ckpt.is_complete(written)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000008", "step_000012"]


def test_incomplete_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "step_000001").mkdir()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.load_model(tmp_path / "step_000001")


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    ckpt.set_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_recovery_leaves_the_saves_of_a_running_process_alone(tmp_path):
    """Another run writing to the same directory is mid-save, not crashed: its working folders stay."""
    good = _save(tmp_path, 4, _model())
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        in_progress = tmp_path / f".tmp-step_000008-{alive.pid}"
        shutil.copytree(good, in_progress)
        with pytest.warns(UserWarning, match=f"running process {alive.pid}"):
            ckpt.recover_interrupted_saves(tmp_path)
        assert in_progress.is_dir()
    finally:
        alive.kill()
        alive.wait()
    ckpt.recover_interrupted_saves(tmp_path)  # its process is gone: now a left-over
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]


def test_pruning_a_linked_checkpoint_drops_the_link_only(tmp_path):
    outside = _save(tmp_path / "elsewhere", 2, _model())
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "step_000002").symlink_to(outside)
    _save(root, 4, _model(), keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["step_000004"] and ckpt.is_complete(outside)
