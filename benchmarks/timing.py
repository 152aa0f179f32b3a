"""Kernel timing that the benchmark scripts share."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(call: Callable[[], object], reps: int, cuda: bool, prepare: Callable[[], object] | None = None) -> float:
    """Median milliseconds of ``call`` over ``reps`` runs: CUDA events around it on a GPU (the host's clock on the
    CPU), each run after an untimed ``prepare`` (e.g. restoring an input the call overwrites)."""
    times = []
    for _ in range(reps):
        if prepare is not None:
            prepare()
        if not cuda:
            began = time.perf_counter()
            call()
            times.append(1000 * (time.perf_counter() - began))
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
