from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fakes import FakeData

from sasformer.train import checkpoint as ckpt
from sasformer.train.metrics import read_metrics
from sasformer.train.trainer import LossModel, NonFiniteLossError, Trainer


class Interrupt(Exception):
    pass


def _stop_at(step: int):
    def hook(trainer, current):
        if current == step:
            raise Interrupt

    return hook


def _losses(out_dir: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(Path(out_dir) / "metrics.jsonl")}


def test_trains_logs_evaluates_and_checkpoints(make_config):
    cfg = make_config(max_steps=12, eval_interval=6)
    last = Trainer(cfg, FakeData()).fit()
    out = cfg.out_dir
    records = read_metrics(f"{out}/metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "tflops", "mfu", "peak_mem_gib"):
        assert key in records[0], key
    assert records[-1]["tokens"] == 12 * 4 * 16 and records[0]["tflops"] > 0
    assert records[-1]["loss"] < records[0]["loss"] - 0.3  # it learns the repeating pattern
    vals = read_metrics(f"{out}/metrics.jsonl", kind="val")
    assert [v["step"] for v in vals] == [6, 12] and last["val_loss"] == vals[-1]["val_loss"]
    assert [p.name for p in ckpt.list_checkpoints(f"{out}/checkpoints")] == ["step_000008", "step_000012"]
    run = json.loads(Path(f"{out}/run.json").read_text())
    assert run["model"]["vocab_size"] == 64 and run["grad_accum"] == 1
    model = ckpt.load_model(f"{out}/checkpoints/step_000012")
    assert model.config.d_model == 32
    assert ckpt.trained_seq_len(f"{out}/checkpoints/step_000012") == 16 < model.config.max_seq_len
    assert ckpt.trained_tokenizer_fingerprint(f"{out}/checkpoints/step_000012") == "fake-tok-1"


def test_console_lines_without_the_bar(make_config, capsys):
    """Without the progress bar a line per log_interval and each validation loss reach the console, as the
    metrics file has them; ``console: false`` keeps it quiet (the compare grid prints its own lines)."""
    Trainer(make_config("loud", max_steps=4, log_interval=2, eval_interval=4), FakeData()).fit()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    records = read_metrics(make_config("loud").out_dir + "/metrics.jsonl")
    assert [line.split(":")[0] for line in lines] == ["step 2/4", "step 4/4", "step 4"]
    assert f"loss {records[0]['loss']:.4f}" in lines[0] and "tokens/s" in lines[0]
    assert ("MFU" in lines[0]) == (records[0]["mfu"] is not None)  # a CPU has no peak to hold it to
    val = read_metrics(make_config("loud").out_dir + "/metrics.jsonl", kind="val")[0]["val_loss"]
    assert lines[2].startswith(f"step 4: val loss {val:.4f}, ppl")
    Trainer(make_config("quiet", max_steps=4, log_interval=2, eval_interval=4, console=False), FakeData()).fit()
    assert capsys.readouterr().out == ""


def test_grad_accumulation_matches_one_big_batch(make_config):
    whole = make_config("whole", max_steps=4, checkpoint_interval=0)
    split = make_config("split", max_steps=4, checkpoint_interval=0, micro_batch_size=1)
    Trainer(whole, FakeData()).fit()
    t = Trainer(split, FakeData())
    assert t.accum == 4
    t.fit()
    a, b = _losses(whole.out_dir), _losses(split.out_dir)
    assert a.keys() == b.keys()
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-5)


def test_validation_covers_the_same_windows_whatever_the_micro_batch(make_config):
    # before any step the weights are the seed's: one batch of 4 or two micro-batches of 2 score the same windows
    whole = Trainer(make_config("whole", batch_size=4), FakeData()).evaluate()
    split = Trainer(make_config("split", batch_size=4, micro_batch_size=2), FakeData()).evaluate()
    assert split == pytest.approx(whole, rel=1e-6)


class NoValidationData(FakeData):
    """A validation split too short for one window (or one per process)."""

    def eval_batches(self, *args, **kwargs):
        return iter(())


def test_a_validation_split_without_a_batch_is_refused_before_the_first_step(make_config):
    cfg = make_config(max_steps=4, eval_interval=2)
    with pytest.raises(ValueError, match="validation split .* no batch .* for 1 process.*eval_interval: 0"):
        Trainer(cfg, NoValidationData())
    assert not Path(cfg.out_dir).exists()  # refused before anything was trained or written
    assert Trainer(make_config("no_eval", max_steps=4, eval_interval=0), NoValidationData()).fit()["step"] == 4


def test_resume_is_exact(make_config):
    full = make_config("full")
    Trainer(full, FakeData()).fit()
    part = make_config("part")
    with pytest.raises(Interrupt):
        Trainer(part, FakeData(), step_hooks=[_stop_at(6)]).fit()
    resumed = Trainer(part, FakeData())
    assert resumed.step == 4 and resumed.resumed_from.name == "step_000004"
    resumed.fit()
    assert _losses(part.out_dir) == _losses(full.out_dir)


def test_resume_auto_recovers_the_only_checkpoint_a_killed_save_left_renamed_away(make_config):
    full = make_config("full", keep_last=1)
    Trainer(full, FakeData()).fit()
    part = make_config("part", keep_last=1)
    with pytest.raises(Interrupt):
        Trainer(part, FakeData(), step_hooks=[_stop_at(10)]).fit()
    root = Path(part.out_dir) / "checkpoints"
    # step 8 saved over itself and killed between the renames: the old copy renamed away, the new one written;
    # and a write of step 12 killed half-way
    (root / "step_000008").rename(root / ".old-step_000008-4242")
    shutil.copytree(root / ".old-step_000008-4242", root / ".tmp-step_000008-4242")
    (root / ".tmp-step_000012-4243").mkdir()
    shutil.copy(root / ".tmp-step_000008-4242" / ckpt.CONFIG_FILE, root / ".tmp-step_000012-4243")
    resumed = Trainer(part, FakeData())
    assert resumed.step == 8 and resumed.resumed_from.name == "step_000008"
    assert [p.name for p in root.iterdir()] == ["step_000008"]
    resumed.fit()
    assert _losses(part.out_dir) == _losses(full.out_dir)


def test_a_step_that_logs_validates_and_saves_checks_finiteness_once(make_config, monkeypatch):
    from sasformer.train import distributed

    trainer = Trainer(make_config(max_steps=4, eval_interval=4, checkpoint_interval=4), FakeData())
    real_all_reduce_min, steps = distributed.all_reduce_min, []

    def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
        steps.append(trainer.step)
        return real_all_reduce_min(tensor)

    monkeypatch.setattr(distributed, "all_reduce_min", all_reduce_min)
    trainer.fit()
    # one all-reduce for the losses and gradient norms, one (after a pass over the weights) for the weights
    assert steps.count(4) == 2
    assert [p.name for p in ckpt.list_checkpoints(f"{trainer.out_dir}/checkpoints")] == ["step_000004"]
    assert [r["step"] for r in read_metrics(f"{trainer.out_dir}/metrics.jsonl", kind="val")] == [4]


def test_resume_logs_the_same_window_means_when_checkpoints_fall_inside_a_window(make_config):
    # checkpoints every 4 steps, log lines every 3: the window of steps 4-6 is open at the step-4 checkpoint
    full = make_config("full", log_interval=3, checkpoint_interval=4)
    Trainer(full, FakeData()).fit()
    part = make_config("part", log_interval=3, checkpoint_interval=4)
    with pytest.raises(Interrupt):
        Trainer(part, FakeData(), step_hooks=[_stop_at(7)]).fit()
    Trainer(part, FakeData()).fit()
    assert _losses(part.out_dir) == _losses(full.out_dir)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(make_config):
    cfg = make_config(log_interval=3)

    def poison(trainer, step):
        if step == 6:
            with torch.no_grad():
                trainer.model.blocks[0].mlp.up_proj.weight.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"at step 7\b.*step_000004") as err:
        Trainer(cfg, FakeData(), step_hooks=[poison]).fit()
    assert "optim.lr" in str(err.value)
    checkpoints = ckpt.list_checkpoints(f"{cfg.out_dir}/checkpoints")
    assert [p.name for p in checkpoints] == ["step_000004"]
    assert all(torch.isfinite(p).all() for p in ckpt.load_model(checkpoints[0]).parameters())


def test_poisoned_learning_rate_stops(make_config):
    cfg = make_config(optim__lr=1e30, optim__min_lr=1e30, optim__warmup_steps=0, optim__grad_clip=None)
    with pytest.raises(NonFiniteLossError, match="at step"):
        Trainer(cfg, FakeData()).fit()


def test_an_infinite_gradient_with_a_finite_loss_stops_before_the_checkpoint(make_config):
    # the loss of step 8 is finite, its gradient is not: clipping and AdamW would save NaN weights as step 8
    cfg = make_config(log_interval=3, keep_last=1)
    trainer = Trainer(cfg, FakeData())
    weight = trainer.model.blocks[0].mlp.up_proj.weight
    weight.register_hook(lambda grad: grad * float("inf") if trainer.step == 7 else grad)
    with pytest.raises(NonFiniteLossError, match=r"gradient norm became NaN/inf at step 8\b.*step_000004"):
        trainer.fit()
    checkpoints = ckpt.list_checkpoints(f"{cfg.out_dir}/checkpoints")
    assert [p.name for p in checkpoints] == ["step_000004"]
    assert all(torch.isfinite(p).all() for p in ckpt.load_model(checkpoints[0]).parameters())


def test_weights_that_overflow_are_not_saved(make_config):
    # a finite loss and gradient norm, then weights that are not finite: the save refuses them
    cfg = make_config(max_steps=4, checkpoint_interval=4, eval_interval=4)

    def overflow(trainer, step):
        if step == 4:
            with torch.no_grad():
                trainer.model.blocks[0].mlp.up_proj.weight[0, 0] = float("inf")

    with pytest.raises(NonFiniteLossError, match="weights hold NaN/inf after step 4.*no checkpoint was written"):
        Trainer(cfg, FakeData(), step_hooks=[overflow]).fit()
    assert ckpt.list_checkpoints(f"{cfg.out_dir}/checkpoints") == []
    assert read_metrics(f"{cfg.out_dir}/metrics.jsonl", kind="val") == []  # nor a validation of those weights


def test_a_new_run_beside_a_later_runs_checkpoints_is_refused(make_config):
    Trainer(make_config(max_steps=8), FakeData()).fit()
    for resume in ("none", "{out}/checkpoints/step_000004"):
        cfg = make_config(max_steps=8)
        cfg = make_config(max_steps=8, resume=resume.format(out=cfg.out_dir))
        with pytest.raises(ValueError, match="already holds checkpoints up to step_000008"):
            Trainer(cfg, FakeData())
    assert Trainer(make_config(max_steps=12), FakeData()).step == 8  # resume: auto continues it


def test_resume_with_other_tokenizer_is_refused(make_config):
    cfg = make_config(max_steps=4)
    Trainer(cfg, FakeData()).fit()
    cfg = make_config(max_steps=8)
    with pytest.raises(ValueError, match="fingerprint"):
        Trainer(cfg, FakeData(fingerprint="another-tokenizer"))


def test_resume_with_other_model_is_refused(make_config):
    Trainer(make_config(max_steps=4), FakeData()).fit()
    with pytest.raises(ValueError, match="another model.*n_layers"):
        Trainer(make_config(max_steps=8, model__n_layers=3), FakeData())


def test_resume_explicit_path_and_none(make_config, tmp_path, capsys):
    cfg = make_config(max_steps=8)
    Trainer(cfg, FakeData()).fit()
    t = Trainer(make_config("other", max_steps=8, resume=f"{cfg.out_dir}/checkpoints/step_000004",
                            console=True), FakeData())
    assert t.step == 4
    capsys.readouterr()
    t.fit()
    assert f"resumed from {cfg.out_dir}/checkpoints/step_000004 (step 4 of 8)" in capsys.readouterr().out
    assert Trainer(make_config("fresh", max_steps=8, resume="none"), FakeData()).step == 0
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        Trainer(make_config(resume=str(tmp_path / "missing")), FakeData())


def test_compile_options_reach_torch_compile_and_unknown_ones_are_refused(make_config, monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: (seen.append(kwargs), module)[1])
    Trainer(make_config("mode", compile=True, compile_mode="max-autotune-no-cudagraphs"), FakeData())
    Trainer(make_config("options", compile=True, compile_options={"coordinate_descent_tuning": True}), FakeData())
    # a dotted name given as nested keys, as ``--compile_options.triton.cudagraphs false`` gives it
    Trainer(make_config("nested", compile=True, compile_options={"triton": {"cudagraphs": False}}), FakeData())
    assert seen == [{"mode": "max-autotune-no-cudagraphs"}, {"options": {"coordinate_descent_tuning": True}},
                    {"options": {"triton.cudagraphs": False}}]
    with pytest.raises(ValueError, match=r"\['no_such_option'\] are not Inductor options"):
        Trainer(make_config("bad", compile=True, compile_options={"no_such_option": 1}), FakeData())


def test_compile_scope_decides_what_one_compile_covers(make_config, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: (compiled.append(fn), fn)[1])
    whole = Trainer(make_config("model", compile=True), FakeData())  # auto: one graph for model and loss
    assert whole.compile_scope == "model" and len(compiled) == 1 and isinstance(compiled[0], LossModel)
    compiled.clear()
    blocks = Trainer(make_config("block", compile=True, compile_scope="block"), FakeData())
    n_blocks = len(blocks.model.blocks)
    assert blocks.compile_scope == "block" and len(compiled) == n_blocks + 1
    assert [getattr(fn, "__self__", None) for fn in compiled[:n_blocks]] == list(blocks.model.blocks)
    assert compiled[-1].__func__ is type(blocks.model).head_loss


def test_blocks_compiled_one_by_one_train_like_eager(make_config):
    import torch._dynamo

    torch._dynamo.reset()
    eager = make_config("eager", max_steps=3, checkpoint_interval=0)
    Trainer(eager, FakeData()).fit()
    torch._dynamo.utils.counters.clear()
    blocks = make_config("blocks", max_steps=3, checkpoint_interval=0, compile=True, compile_scope="block")
    Trainer(blocks, FakeData()).fit()
    # one graph shared by the blocks and one for the head and loss, no graph breaks
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    assert not read_metrics(Path(blocks.out_dir) / "metrics.jsonl", kind="compile")  # a clean compile logs nothing
    for step, loss in _losses(blocks.out_dir).items():
        assert loss == pytest.approx(_losses(eager.out_dir)[step], rel=1e-4), step


def test_a_graph_break_in_the_compiled_step_is_warned_about_and_logged(make_config, monkeypatch):
    import torch._dynamo

    original = LossModel.forward

    def broken(self, *args):
        torch._dynamo.graph_break()
        return original(self, *args)

    monkeypatch.setattr(LossModel, "forward", broken)
    torch._dynamo.reset()
    cfg = make_config(max_steps=2, checkpoint_interval=0, compile=True)
    with pytest.warns(UserWarning, match=r"the compiled training step: 1 graph break"):
        Trainer(cfg, FakeData()).fit()
    (record,) = read_metrics(Path(cfg.out_dir) / "metrics.jsonl", kind="compile")
    assert record["step"] == 1 and record["graph_breaks"]["count"] == 1


@pytest.mark.parametrize("dtype, residual_dtype, stream", [
    ("bfloat16", "float32", torch.float32),
    ("bfloat16", "compute", torch.bfloat16),
    ("float32", "compute", torch.float32),  # no autocast: nothing to follow
])
def test_residual_dtype_sets_the_stream_the_blocks_add_to(make_config, dtype, residual_dtype, stream):
    trainer = Trainer(make_config(dtype=dtype, residual_dtype=residual_dtype, max_steps=2, eval_batches=1), FakeData())
    seen = []
    for block in trainer.model.blocks:
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    trainer.train_step()
    trainer.check_finite()
    assert seen == [stream] * len(trainer.model.blocks)
    seen.clear()
    trainer.evaluate()  # validation runs the stream of training
    assert seen and set(seen) == {stream}
