from __future__ import annotations

import random

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
