"""Runs of one grid side by side, one process per GPU (``sasformer compare --gpus 0,1``).

The parent process (the one holding the grid lock) starts each pending run as a worker process,
``python -m sasformer.compare.workers GRID_DIR RUN_ID``, with ``CUDA_VISIBLE_DEVICES`` set to one
GPU of the list, and starts the next run on a GPU as soon as that GPU's run ends. A worker reads the
grid from ``GRID_DIR/grid.json`` (written by the parent), trains and evaluates its run exactly as a
single-process grid would, and writes the run's ``result.json``; its output goes to the run's
``worker.log``. A run whose worker fails is reported and left for the next call (it resumes from its
last checkpoint); the other runs go on.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WORKER_LOG = "worker.log"
POLL_S = 1.0


@dataclass
class _Running:
    plan: Any  # RunPlan
    gpu: str
    process: subprocess.Popen
    started: float
    number: int


def parse_gpus(text: str) -> list[str]:
    """``"0,1"`` -> ``["0", "1"]``: CUDA device indices, each at most once."""
    gpus = [g.strip() for g in text.split(",") if g.strip()]
    if not gpus or not all(g.isdigit() for g in gpus) or len(set(gpus)) != len(gpus):
        raise ValueError(f"--gpus {text!r}: give distinct CUDA device indices separated by commas, e.g. 0,1")
    return gpus


def worker_command(grid_dir: Path, run_id: str) -> list[str]:
    return [sys.executable, "-m", "sasformer.compare.workers", str(grid_dir), run_id]


def run_in_workers(pending: list[tuple[int, Any]], grid_dir: Path, gpus: list[str], log: Callable[[str], None],
                   time_limit_s: float | None, called: float, total: int) -> tuple[dict[str, dict], list[str]]:
    """Run the pending ``(number, RunPlan)`` pairs over ``gpus``; returns the finished runs' results by
    run id, and the ids of the runs whose worker failed (runs not started appear in neither).

    ``time_limit_s`` counts from ``called``: a run starts only if it should end in time, judged by the
    longest run finished so far (the first run on each GPU always starts). ``number`` of ``total``
    labels the log lines as the single-process grid does.
    """
    pool = _WorkerPool(grid_dir, gpus, log, time_limit_s, called, total)
    with _sigterm_unwinds():
        try:
            pool.run(list(pending))
        finally:  # interrupted: stop the workers; their runs resume from their checkpoints next time
            pool.stop()
    return pool.results, pool.failed


class _WorkerPool:
    """One worker process per free GPU; the next run starts on a GPU as soon as its worker exits."""

    def __init__(self, grid_dir: Path, gpus: list[str], log: Callable[[str], None], time_limit_s: float | None,
                 called: float, total: int) -> None:
        self.grid_dir, self.free, self.log = grid_dir, list(gpus), log
        self.time_limit_s, self.called, self.total = time_limit_s, called, total
        self.running: list[_Running] = []
        self.spent: list[float] = []
        self.results: dict[str, dict] = {}
        self.failed: list[str] = []

    def run(self, queue: list[tuple[int, Any]]) -> None:
        while queue or self.running:
            while queue and self.free:
                self._start(*queue.pop(0))
            time.sleep(POLL_S)
            for job in [j for j in self.running if j.process.poll() is not None]:
                self._finish(job)

    def _start(self, number: int, plan: Any) -> None:
        from sasformer.compare.runner import _duration

        if self.time_limit_s is not None and self.spent and \
                time.perf_counter() - self.called + max(self.spent) > self.time_limit_s:
            self.log(f"[run {number}/{self.total}] {plan.id} not started: it would likely end after the time limit "
                     f"of {self.time_limit_s:g} s (longest run so far {_duration(max(self.spent))})")
            return
        gpu = self.free.pop(0)
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        with (plan.run_dir / WORKER_LOG).open("a") as out:
            process = subprocess.Popen(worker_command(self.grid_dir, plan.id), stdout=out, stderr=subprocess.STDOUT,
                                       env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu})
        self.running.append(_Running(plan, gpu, process, time.perf_counter(), number))
        self.log(f"[run {number}/{self.total}] {plan.entry} seed {plan.seed}: started on GPU {gpu} "
                 f"(log: {plan.run_dir / WORKER_LOG})")

    def _finish(self, job: _Running) -> None:
        from sasformer.compare.runner import _duration, load_finished

        self.running.remove(job)
        self.free.append(job.gpu)
        self.spent.append(time.perf_counter() - job.started)
        label = f"[run {job.number}/{self.total}]"
        result = load_finished(job.plan) if job.process.returncode == 0 else None
        if result is None:
            self.failed.append(job.plan.id)
            self.log(f"{label} {job.plan.id} FAILED (exit status {job.process.returncode}); "
                     f"see {job.plan.run_dir / WORKER_LOG}")
            return
        self.results[job.plan.id] = result
        outcome = "diverged" if result["diverged"] else \
            f"val loss {result['final_val_loss']:.4f} after {result['tokens_seen']:,} tokens"
        self.log(f"{label} {job.plan.entry} seed {job.plan.seed}: {outcome} "
                 f"({_duration(self.spent[-1])}, GPU {job.gpu})")

    def stop(self) -> None:
        for job in self.running:
            job.process.terminate()
        for job in self.running:
            job.process.wait()


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Make SIGTERM (a job's time limit, ``timeout``) unwind like Ctrl-C, so the workers are stopped, not orphaned."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_one(grid_dir: Path, run_id: str) -> int:
    """The worker: train and evaluate one run of the grid in ``grid_dir`` (its ``grid.json``)."""
    from sasformer.compare.runner import execute_run, plan_runs
    from sasformer.compare.spec import GridSpec
    from sasformer.data.prepare import read_meta

    print(f"run {run_id}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}", flush=True)
    spec = GridSpec.from_dict(json.loads((grid_dir / "grid.json").read_text())["spec"])
    data_dir = Path(spec.data.dir)
    meta = read_meta(data_dir)  # the parent prepared it; workers only read
    if meta is None:
        raise ValueError(f"{data_dir} is not a complete prepared data folder")
    plans = {p.id: p for p in plan_runs(spec, data_dir, int(meta["vocab_size"]), grid_dir)}
    if run_id not in plans:
        raise ValueError(f"{grid_dir}/grid.json has no run {run_id!r}; it has {sorted(plans)}")
    tasks = None
    if spec.eval.zero_shot_dir is not None:
        from sasformer.eval import read_eval_dir

        tasks = read_eval_dir(spec.eval.zero_shot_dir, spec.eval.zero_shot_tasks, spec.eval.zero_shot_limit)
    execute_run(spec, plans[run_id], data_dir, tasks, log=lambda message: print(message, flush=True))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m sasformer.compare.workers GRID_DIR RUN_ID")
    sys.exit(run_one(Path(sys.argv[1]), sys.argv[2]))
