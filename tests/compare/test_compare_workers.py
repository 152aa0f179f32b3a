"""``--gpus``: a grid's runs in worker processes side by side, one per listed GPU (here on CPU)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest
import yaml

from sasformer.commands import compare
from sasformer.compare import workers
from sasformer.compare.runner import run_grid
from sasformer.compare.spec import GridSpec
from tests.compare.conftest import grid_dict


def _grid(tmp_path, prepared_data, name: str, gpus=None):
    messages: list[str] = []
    spec = GridSpec.from_dict(grid_dict(prepared_data, tmp_path / name))
    results = run_grid(spec, tmp_path / name, "sasformer compare", log=messages.append, gpus=gpus)
    return results, messages


def test_runs_go_to_one_worker_per_gpu_and_match_one_process(tmp_path, prepared_data):
    results, messages = _grid(tmp_path, prepared_data, "workers", gpus=["0", "1"])
    assert [r["id"] for r in results["runs"]] == ["mha-s0", "sas-s0"]
    assert results["missing_runs"] == [] and results["failed_runs"] == []
    # both runs start before either ends: one per GPU at once
    started = [i for i, m in enumerate(messages) if "started on GPU" in m]
    ended = [i for i, m in enumerate(messages) if "val loss" in m]
    assert len(started) == 2 and len(ended) == 2 and max(started) < min(ended)
    devices = {(tmp_path / "workers" / "runs" / run / workers.WORKER_LOG).read_text().splitlines()[0].split("=")[-1]
               for run in ("mha-s0", "sas-s0")}
    assert devices == {"0", "1"}
    # the same runs in this process give the same numbers (CPU training is deterministic)
    serial, _ = _grid(tmp_path, prepared_data, "serial")
    for got, want in zip(results["runs"], serial["runs"]):
        assert got["final_val_loss"] == pytest.approx(want["final_val_loss"], rel=1e-6)
        assert got["steps"] == want["steps"] and got["tokens_seen"] == want["tokens_seen"]


def test_a_failed_worker_is_reported_and_the_other_runs_finish(tmp_path, prepared_data, monkeypatch):
    real = workers.worker_command

    def failing_for_mha(grid_dir, run_id):
        return [sys.executable, "-c", "raise SystemExit(3)"] if run_id == "mha-s0" else real(grid_dir, run_id)

    monkeypatch.setattr(workers, "worker_command", failing_for_mha)
    results, messages = _grid(tmp_path, prepared_data, "grid", gpus=["0"])
    assert results["failed_runs"] == ["mha-s0"] and results["missing_runs"] == ["mha-s0"]
    assert [r["id"] for r in results["runs"]] == ["sas-s0"]
    assert any("mha-s0 FAILED (exit status 3)" in m and workers.WORKER_LOG in m for m in messages)
    # the next call runs only what is left
    monkeypatch.setattr(workers, "worker_command", real)
    results, messages = _grid(tmp_path, prepared_data, "grid", gpus=["0"])
    assert [r["id"] for r in results["runs"]] == ["mha-s0", "sas-s0"] and results["failed_runs"] == []
    assert sum("started on GPU" in m for m in messages) == 1


@pytest.mark.parametrize("text", ["", "a", "0,0", "0,-1", "1.5"])
def test_gpu_lists_are_checked(text):
    with pytest.raises(ValueError, match="--gpus"):
        workers.parse_gpus(text)


def test_gpu_list_parses():
    assert workers.parse_gpus(" 0, 3 ") == ["0", "3"]


def test_sigterm_stops_the_workers_and_leaves_the_runs_to_resume(tmp_path, prepared_data, monkeypatch):
    pid_file = tmp_path / "worker.pid"

    def sleeper(grid_dir, run_id):
        code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
        return [sys.executable, "-c", code]

    monkeypatch.setattr(workers, "worker_command", sleeper)

    def terminate_when_started():
        for _ in range(300):
            if pid_file.is_file() and pid_file.read_text():
                break
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_when_started, daemon=True).start()
    with pytest.raises(SystemExit) as stopped:
        _grid(tmp_path, prepared_data, "grid", gpus=["0"])
    assert stopped.value.code == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):  # the worker was stopped and reaped, not orphaned
        os.kill(int(pid_file.read_text()), 0)
    assert not (tmp_path / "grid" / "compare.lock").exists()


def test_the_command_exits_1_when_a_worker_failed(tmp_path, prepared_data, monkeypatch, capsys):
    from tests.compare.test_compare_command import _parse

    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(grid_dict(prepared_data, tmp_path / "grid")))
    failing = [sys.executable, "-c", "raise SystemExit(2)"]
    monkeypatch.setattr(workers, "worker_command", lambda grid_dir, run_id: failing)
    args = _parse(["--config", str(config), "--only", "mha", "--gpus", "0"])
    assert compare.run(args) == 1
    printed = capsys.readouterr().out
    assert "FAILED" in printed and "mha-s0" in printed
    with pytest.raises(ValueError, match="--gpus"):
        compare.run(_parse(["--config", str(config), "--gpus", "first"]))
