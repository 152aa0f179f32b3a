from __future__ import annotations

import json
import math
import types

import pytest

from sasformer.compare import runner
from sasformer.compare.runner import run_grid
from sasformer.compare.spec import GridSpec
from sasformer.train.trainer import Trainer
from tests.compare.conftest import grid_dict


def _run(tmp_path, prepared_data, **kw):
    spec = GridSpec.from_dict(grid_dict(prepared_data, tmp_path / "grid", **kw))
    return spec, run_grid(spec, tmp_path / "grid", "sasformer compare --config test.yaml", log=lambda _: None)


def test_two_run_grid_end_to_end(tmp_path, prepared_data):
    _run(tmp_path, prepared_data)
    grid = tmp_path / "grid"
    saved = json.loads((grid / "results.json").read_text())
    assert saved["command"] == "sasformer compare --config test.yaml"
    assert {"git_revision", "torch", "python", "device"} <= set(saved["environment"])
    assert [r["id"] for r in saved["runs"]] == ["mha-s0", "sas-s0"]
    for run in saved["runs"]:
        assert run["steps"] == 6 and run["tokens_seen"] == 6 * 4 * 16
        assert run["train_flops"] == pytest.approx(run["tokens_seen"] * run["train_flops_per_token"])
        assert [p["step"] for p in run["val_curve"]] == [0, 3, 6]
        assert run["val_curve"][0]["tokens"] == 0 and run["val_curve"][0]["train_seconds"] == 0
        assert run["initial_val_loss"] == run["val_curve"][0]["val_loss"] > run["final_val_loss"]
        assert run["val_curve"][-1]["val_loss"] == run["final_val_loss"]
        assert math.isfinite(run["final_val_loss"]) and run["final_val_loss"] < math.log(300)
        assert run["final_val_ppl"] == pytest.approx(math.exp(run["final_val_loss"]))
        assert run["tokens_per_s"] > 0 and run["train_seconds"] > 0 and run["params"] > 0
        assert run["mfu"] is None and run["peak_mem_gib"] is None  # CPU: no peak to compare against
        assert run["zero_shot"] is None and run["mqar_accuracy"] is None
        assert run["data_vocab_size"] == 300 and run["attention_init"] == "standard"  # what a report reads later
        split = run["wall_seconds_split"]
        assert split["zero_shot"] is None and split["mqar"] is None
        assert 0 < split["training"] <= run["wall_seconds_last_attempt"]
        assert (grid / "runs" / run["id"] / "result.json").is_file()
    sas = saved["runs"][1]
    assert sas["train_flops_per_token"] > saved["runs"][0]["train_flops_per_token"]
    assert sas["attention_args"]["n_heads"] == 2
    assert [a["entry"] for a in saved["aggregates"]] == ["mha", "sas"]
    assert saved["val_tokens"] == 2 * 4 * 16  # eval_batches x batch x seq_len, the same for every run
    report = (grid / "results.md").read_text()
    assert "| mha | 1 |" in report and "| sas | 1 |" in report and "iso-tokens" in report


def test_plots_are_written(tmp_path, prepared_data):
    pytest.importorskip("matplotlib")
    _, results = _run(tmp_path, prepared_data, variants=["mha"])
    assert results["plots"] == ["val_loss_vs_tokens.png", "val_loss_vs_flops.png", "val_loss_vs_time.png"]
    for name in results["plots"]:
        assert (tmp_path / "grid" / name).read_bytes()[:4] == b"\x89PNG"


def test_without_matplotlib_the_rest_is_written(tmp_path, prepared_data, monkeypatch):
    from sasformer.compare import plots

    monkeypatch.setattr(plots, "matplotlib_available", lambda: False)
    messages = []
    spec = GridSpec.from_dict(grid_dict(prepared_data, tmp_path / "grid", variants=["mha"]))
    results = run_grid(spec, tmp_path / "grid", log=messages.append)
    assert results["plots"] == [] and not list((tmp_path / "grid").glob("*.png"))
    assert (tmp_path / "grid" / "results.md").is_file()
    assert any("matplotlib is not installed" in m for m in messages)


class _Interrupt(Exception):
    pass


def test_interrupted_grid_resumes_without_redoing_finished_runs(tmp_path, prepared_data, monkeypatch):
    original = Trainer.train_step
    steps_done: dict[str, int] = {}

    def interrupt_second_run(self):
        original(self)
        if self.out_dir.name == "mha-s1" and self.step == 5:
            raise _Interrupt

    monkeypatch.setattr(Trainer, "train_step", interrupt_second_run)
    with pytest.raises(_Interrupt):
        _run(tmp_path, prepared_data, variants=["mha"], seeds=(0, 1, 2))
    runs = tmp_path / "grid" / "runs"
    first = runs / "mha-s0" / "result.json"
    assert first.is_file() and not (runs / "mha-s1" / "result.json").exists()
    assert not (runs / "mha-s2").exists()
    first_mtime = first.stat().st_mtime_ns

    def count_steps(self):
        original(self)
        steps_done[self.out_dir.name] = steps_done.get(self.out_dir.name, 0) + 1

    monkeypatch.setattr(Trainer, "train_step", count_steps)
    _, results = _run(tmp_path, prepared_data, variants=["mha"], seeds=(0, 1, 2))
    # seed 0 was finished; seed 1 resumes from its step-4 checkpoint; seed 2 trains from scratch
    assert steps_done == {"mha-s1": 2, "mha-s2": 6}
    assert first.stat().st_mtime_ns == first_mtime
    assert [r["id"] for r in results["runs"]] == ["mha-s0", "mha-s1", "mha-s2"]
    assert all(r["steps"] == 6 for r in results["runs"])

    # a third invocation trains nothing
    steps_done.clear()
    _run(tmp_path, prepared_data, variants=["mha"], seeds=(0, 1, 2))
    assert steps_done == {}


def test_time_limit_leaves_runs_that_would_overrun_for_the_next_call(tmp_path, prepared_data):
    spec = GridSpec.from_dict(grid_dict(prepared_data, tmp_path / "grid", variants=["mha"], seeds=(0, 1)))
    logged: list[str] = []
    # the first run always starts; after it, any run would end past a 1 ms limit
    results = run_grid(spec, tmp_path / "grid", log=logged.append, time_limit_s=1e-3)
    assert [r["id"] for r in results["runs"]] == ["mha-s0"] and results["missing_runs"] == ["mha-s1"]
    assert any("mha-s1 not started" in line for line in logged)
    assert not (tmp_path / "grid" / "runs" / "mha-s1").exists()
    assert "**Not in the table**" in (tmp_path / "grid" / "results.md").read_text()
    assert "mha-s1 (not run yet)" in (tmp_path / "grid" / "results.md").read_text()
    # the next call without a limit finishes the grid and keeps the first run
    results = run_grid(spec, tmp_path / "grid", log=lambda _: None)
    assert [r["id"] for r in results["runs"]] == ["mha-s0", "mha-s1"] and results["missing_runs"] == []
    assert "Not in the table" not in (tmp_path / "grid" / "results.md").read_text()
    with pytest.raises(ValueError, match="must be > 0"):
        run_grid(spec, tmp_path / "grid", log=lambda _: None, time_limit_s=0)


def test_finished_run_with_another_config_is_an_error(tmp_path, prepared_data):
    _run(tmp_path, prepared_data, variants=["mha"])
    grid = grid_dict(prepared_data, tmp_path / "grid", variants=["mha"])
    grid["train"]["optim"]["lr"] = 1e-3
    with pytest.raises(ValueError, match="another config"):
        run_grid(GridSpec.from_dict(grid), tmp_path / "grid", log=lambda _: None)


def test_time_budget_stops_early_with_the_schedule_of_the_token_estimate(tmp_path, prepared_data):
    budget = {"kind": "time", "seconds": 1e-6, "tokens": 6 * 4 * 16}
    _, results = _run(tmp_path, prepared_data, variants=["mha"], budget=budget)
    run = results["runs"][0]
    assert run["steps"] == 1 and run["tokens_seen"] == 4 * 16  # checked at every log step (log_interval 1)
    assert run["budget"] == {"max_tokens": 6 * 4 * 16, "max_time_s": 1e-6}
    assert [p["step"] for p in run["val_curve"]] == [0, 1]


def test_zero_shot_and_mqar_after_each_run(tmp_path, prepared_data):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    items = [{"task": "toy", "id": str(i), "context": "The cat sat on the", "choices": [" mat", " tree"], "gold": i % 2}
             for i in range(4)]
    (tasks / "toy.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    eval_section = {"zero_shot_dir": str(tasks), "mqar": {"enabled": True, "d_model": 32, "n_layers": 1,
                                                          "n_heads": 2, "steps": 3, "batch_size": 4, "n_test": 8,
                                                          "seq_len": 16, "vocab_size": 16, "num_kv_pairs": 2,
                                                          "num_queries": 2}}
    _, results = _run(tmp_path, prepared_data, variants=["mha"], eval=eval_section)
    run = results["runs"][0]
    assert set(run["zero_shot"]) == {"toy"}
    assert run["zero_shot_avg"] == pytest.approx(run["zero_shot"]["toy"]["acc"])
    assert run["zero_shot_avg"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert 0.0 <= run["mqar_accuracy"] <= 1.0
    split = run["wall_seconds_split"]
    assert split["zero_shot"] > 0 and split["mqar"] > 0
    assert sum(split.values()) <= run["wall_seconds_last_attempt"]
    assert "Zero-shot accuracy per task" in (tmp_path / "grid" / "results.md").read_text()


def test_redo_mqar_reruns_the_probe_of_finished_runs(tmp_path, prepared_data):
    mqar = {"enabled": True, "d_model": 32, "n_layers": 1, "n_heads": 2, "steps": 3, "batch_size": 4, "n_test": 8,
            "seq_len": 16, "vocab_size": 16, "num_kv_pairs": 2, "num_queries": 2}
    spec, results = _run(tmp_path, prepared_data, variants=["mha"], eval={"mqar": mqar})
    first = results["runs"][0]["mqar_accuracy"]
    path = tmp_path / "grid" / "runs" / "mha-s0" / "result.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "mqar_accuracy": 2.0}))  # as if made by another probe
    steps = saved["steps"]
    results = run_grid(spec, tmp_path / "grid", log=lambda _: None, report_only=True, redo_mqar=True)
    run = results["runs"][0]
    # the probe is seeded: the same accuracy again, the old value kept beside it, nothing retrained
    assert run["mqar_accuracy"] == first and run["mqar_redone"]["previous"] == 2.0
    assert run["mqar_redone"]["device"] == "cpu" and run["steps"] == steps
    assert json.loads(path.read_text())["mqar_accuracy"] == first


def test_missing_data_dir_is_a_clear_error(tmp_path):
    spec = GridSpec.from_dict(grid_dict(tmp_path / "nowhere", tmp_path / "grid"))
    with pytest.raises(ValueError, match="not a complete prepared data folder"):
        runner.ensure_data(spec.data)


def test_a_diverged_run_is_recorded_and_the_grid_goes_on(tmp_path, prepared_data, monkeypatch):
    original = Trainer.train_step

    def nan_in_sas(self):
        original(self)
        if self.out_dir.name == "sas-s0" and self.step == 2:
            self._bad_step.fill_(self.step)  # what a NaN loss at this step records

    monkeypatch.setattr(Trainer, "train_step", nan_in_sas)
    _, results = _run(tmp_path, prepared_data)
    mha, sas = results["runs"]
    assert mha["diverged"] is None and math.isfinite(mha["final_val_loss"])
    assert "step 2" in sas["diverged"] and sas["final_val_loss"] is None and sas["val_curve"] == []
    assert set(sas) == set(mha)
    assert [a["diverged"] for a in results["aggregates"]] == [[], [0]]
    assert "| sas | 1 (1 diverged) |" in (tmp_path / "grid" / "results.md").read_text()


def test_training_time_is_kept_in_checkpoints(tmp_path, prepared_data):
    from sasformer.train.checkpoint import latest_checkpoint, load_train_state

    _, results = _run(tmp_path, prepared_data, variants=["mha"])
    _, state = load_train_state(latest_checkpoint(tmp_path / "grid" / "runs" / "mha-s0" / "checkpoints"))
    assert state["train_seconds"] == pytest.approx(results["runs"][0]["train_seconds"])


def test_a_grid_folder_in_use_is_refused(tmp_path, prepared_data):
    import subprocess
    import sys

    grid = tmp_path / "grid"
    grid.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (grid / "compare.lock").write_text(str(other.pid))
        with pytest.raises(ValueError, match=f"in use by process {other.pid}"):
            _run(tmp_path, prepared_data, variants=["mha"])
    finally:
        other.kill()
        other.wait()
    # the process is gone: its stale lock is taken over, and released at the end
    _run(tmp_path, prepared_data, variants=["mha"])
    assert not (grid / "compare.lock").exists()


def test_a_run_validated_under_the_old_rule_is_not_mixed_with_new_ones(tmp_path):
    from sasformer.compare.runner import VALIDATION_RULE, _check_validation_rule

    with_micro = types.SimpleNamespace(train={"batch_size": 8, "micro_batch_size": 2})
    without = types.SimpleNamespace(train={"batch_size": 8, "micro_batch_size": None})
    _check_validation_rule(tmp_path, {"validation_rule": VALIDATION_RULE}, with_micro)
    _check_validation_rule(tmp_path, {}, without)  # no micro-batches: the old rule scored the same windows
    with pytest.raises(ValueError, match="validated on eval_batches x micro_batch_size windows"):
        _check_validation_rule(tmp_path, {}, with_micro)
    # the frontier keeps such runs apart from new ones (a different validation set is a different point)
    assert runner.validation_rule_of({"train_config": with_micro.train}) != VALIDATION_RULE
    assert runner.validation_rule_of({"train_config": without.train}) == VALIDATION_RULE
