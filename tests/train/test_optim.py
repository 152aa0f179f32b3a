from __future__ import annotations

import math

import pytest
import torch

from sasformer.models.decoder import DecoderLM
from sasformer.models.presets import preset
from sasformer.train.config import OptimSection
from sasformer.train.optim import CosineSchedule, apply_hyperparameters, build_optimizer, param_groups


def test_schedule_warmup_cosine_and_floor():
    s = CosineSchedule(lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=14)
    assert [s.lr_at(i) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert s.lr_at(4) == pytest.approx(1.0)
    mid = 4 + (14 - 1 - 4) / 2
    assert s.lr_at(int(mid)) < 1.0 and s.lr_at(13) == pytest.approx(0.1)
    assert s.lr_at(100) == pytest.approx(0.1)  # past the end: stays at the floor
    values = [s.lr_at(i) for i in range(4, 14)]
    assert values == sorted(values, reverse=True)
    assert s.lr_at(8) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 4 / 9)))


def test_schedule_without_warmup_and_single_step():
    assert CosineSchedule(1.0, 0.0, 0, 1).lr_at(0) == pytest.approx(1.0)
    assert CosineSchedule(1.0, 0.0, 0, 3).lr_at(2) == pytest.approx(0.0)


@pytest.mark.parametrize("attention", ["mha", "sas"])
def test_decay_only_on_matrices_not_embeddings_or_norms(attention):
    cfg = preset("tiny", attention, d_model=32, n_layers=2, vocab_size=50, attention_args={"n_heads": 2})
    model = DecoderLM(cfg)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    assert "embed.weight" not in decayed and not any("norm" in n for n in decayed)
    assert all(p.dim() >= 2 for p in decay["params"])
    # every parameter exactly once, the tied head included once through the embedding
    listed = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(listed) == len(set(listed)) == len({id(p) for p in model.parameters()})


def test_build_optimizer_uses_config():
    model = torch.nn.Linear(3, 5)
    section = OptimSection(lr=0.5, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.2)
    opt = build_optimizer(model, section, torch.device("cpu"))
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (0.5, (0.8, 0.9), 1e-6, 0.2)


def test_config_hyperparameters_replace_loaded_ones():
    model = DecoderLM(preset("tiny", "mha", d_model=32, n_layers=1, vocab_size=50, attention_args={"n_heads": 2}))
    old = build_optimizer(model, OptimSection(weight_decay=0.1, betas=(0.9, 0.95)), torch.device("cpu"))
    new = build_optimizer(model, OptimSection(weight_decay=0.3, betas=(0.8, 0.99), eps=1e-6), torch.device("cpu"))
    new.load_state_dict(old.state_dict())
    assert new.param_groups[0]["weight_decay"] == 0.1  # what loading alone does
    apply_hyperparameters(new, OptimSection(weight_decay=0.3, betas=(0.8, 0.99), eps=1e-6))
    assert [g["weight_decay"] for g in new.param_groups] == [0.3, 0.0]
    assert all(g["betas"] == (0.8, 0.99) and g["eps"] == 1e-6 for g in new.param_groups)


def test_resume_runs_adamw_the_way_of_this_device():
    # a checkpoint's param groups carry the flags of the machine that wrote it (foreach on a CPU)
    model = DecoderLM(preset("tiny", "mha", d_model=32, n_layers=1, vocab_size=50, attention_args={"n_heads": 2}))
    written_on_cpu = build_optimizer(model, OptimSection(), torch.device("cpu"))
    model(torch.randint(0, 50, (1, 5)), targets=torch.randint(0, 50, (1, 5))).backward()
    written_on_cpu.step()  # a state with step tensors
    loaded = build_optimizer(model, OptimSection(), torch.device("cpu"))
    loaded.load_state_dict(written_on_cpu.state_dict())
    for state in loaded.state.values():  # as the checkpoint loader leaves them: not where fusing wants them
        state["step"] = state["step"].to(torch.float64)
    apply_hyperparameters(loaded, OptimSection(), torch.device("cuda"))
    assert all(g["fused"] is True and g["foreach"] is None for g in loaded.param_groups)
    for group in loaded.param_groups:
        for param in group["params"]:
            step = loaded.state[param]["step"]
            assert step.device == param.device and step.dtype == torch.float32
