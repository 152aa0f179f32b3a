"""Where a benchmark's time goes: torch.profiler over a few calls, summed into kernels per call.

Shared by ``train_speed.py --profile`` (a training step per call) and ``decode.py --profile`` (a decode
step per call). On a GPU the table lists CUDA kernels by self device time (kernels replayed from a CUDA
graph included) and, apart, the host's own time by operation; on a CPU it lists CPU operations.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

# kernel-name fragments -> category, first match wins (cuBLAS/CUTLASS GEMMs, attention, Inductor's Triton code)
CATEGORIES = (
    ("cross-entropy", ("cross_entropy",)),
    ("attention", ("flash", "fmha", "cudnn", "attention")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "splitk", "mm_")),
    ("optimizer", ("multi_tensor", "adam", "foreach")),
    ("communication", ("nccl",)),
    ("compiled elementwise", ("triton",)),
)


def kernel_category(name: str) -> str:
    lower = name.lower()
    for category, fragments in CATEGORIES:
        if any(f in lower for f in fragments):
            return category
    return "other"


def profile_calls(call: Callable[[], object], calls: int, sync: Callable[[], None], cuda: bool,
                  trace: Path | None = None, top: int = 20) -> dict:
    """Run ``call`` ``calls`` times under torch.profiler; per call: wall time (profiler on), the ``top``
    kernels (CPU ops without ``cuda``) with their category, time by category, and the host's top ops.
    With ``trace``, the timeline too (Chrome trace format; gzipped if the name ends in ``.gz``)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(calls):
            call()
        sync()
    wall_ms = 1000 * (time.perf_counter() - start) / calls
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    events = prof.key_averages()
    kernels = []
    for event in events:
        if cuda:
            # CPU-side ops also carry the device time of the kernels they launch: count kernels only; a
            # record_function region (the optimiser's "Optimizer.step#AdamW.step") also appears on the GPU,
            # spanning the kernels it launched, which would count them twice
            kernel = event.device_type == torch.autograd.DeviceType.CUDA and not getattr(event, "is_user_annotation",
                                                                                          False)
            self_us = event.self_device_time_total if kernel else 0.0
        else:
            self_us = event.self_cpu_time_total
        if self_us > 0:
            kernels.append({"name": event.key, "calls_per_step": event.count / calls,
                            "ms_per_step": self_us / 1000 / calls, "category": kernel_category(event.key)})
    kernels.sort(key=lambda k: k["ms_per_step"], reverse=True)
    # on a GPU, where the host's own time goes too (a host-bound step shows here, not in the kernels)
    host_ops = sorted(({"name": e.key, "calls_per_step": e.count / calls,
                        "ms_per_step": e.self_cpu_time_total / 1000 / calls} for e in events
                       if cuda and e.self_cpu_time_total > 0), key=lambda o: o["ms_per_step"], reverse=True)
    categories: dict[str, float] = {}
    for k in kernels:
        categories[k["category"]] = categories.get(k["category"], 0.0) + k["ms_per_step"]
    return {"steps": calls, "kind": "CUDA kernels" if cuda else "CPU ops", "wall_ms_per_step": wall_ms,
            "kernel_ms_per_step": sum(k["ms_per_step"] for k in kernels),
            "kernel_launches_per_step": sum(k["calls_per_step"] for k in kernels),
            "categories": dict(sorted(categories.items(), key=lambda kv: -kv[1])),
            "top_kernels": kernels[:top], "host_ms_per_step": sum(o["ms_per_step"] for o in host_ops),
            "top_host_ops": host_ops[:12]}


def _cell(name: str) -> str:
    name = name.replace("|", "\\|")
    return name if len(name) <= 100 else name[:97] + "..."


def profile_markdown(title: str, prof: dict, unit: str = "ms") -> list[str]:
    """A profile from :func:`profile_calls` as Markdown lines: a summary, the kernel table and the host ops.
    ``unit`` "us" prints microseconds, for short steps such as a decode step."""
    scale, fmt = (1000.0, ".1f") if unit == "us" else (1.0, ".2f")
    total = prof["kernel_ms_per_step"] or float("nan")
    lines = [
        "",
        f"## Profile: {title} ({prof['steps']} steps)",
        "",
        f"Per step: {prof['wall_ms_per_step'] * scale:{fmt}} {unit} wall (profiler on), "
        f"{prof['kernel_ms_per_step'] * scale:{fmt}} {unit} of {prof['kind']} (self time), "
        f"{prof.get('kernel_launches_per_step', float('nan')):.0f} of them. By category: "
        + ", ".join(f"{name} {ms * scale:{fmt}} {unit} ({100 * ms / total:.0f}%)"
                    for name, ms in prof["categories"].items()),
        "",
        f"| {prof['kind']} | category | calls/step | {unit}/step | % of total |",
        "|---|---|---:|---:|---:|",
    ]
    for k in prof["top_kernels"]:
        lines.append(f"| `{_cell(k['name'])}` | {k['category']} | {k['calls_per_step']:.1f} | "
                     f"{k['ms_per_step'] * scale:{fmt}} | {100 * k['ms_per_step'] / total:.1f}% |")
    if prof.get("top_host_ops"):
        lines += ["", f"Host: {prof['host_ms_per_step'] * scale:{fmt}} {unit} of self CPU time per step (profiler "
                  "on), by operation (self time; the host-side work of the step):", "",
                  f"| host op | calls/step | {unit}/step |", "|---|---:|---:|"]
        for o in prof["top_host_ops"]:
            lines.append(f"| `{_cell(o['name'])}` | {o['calls_per_step']:.1f} | {o['ms_per_step'] * scale:{fmt}} |")
    return lines
