"""Run metrics: throughput, model FLOP utilisation and a JSON-lines log (plus TensorBoard when installed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# dense (no sparsity) bf16 tensor-core peak per device, in TFLOP/s, from the vendors' data sheets;
# matched against the device name, longest key first, so "H100 PCIe" wins over "H100"
PEAK_BF16_TFLOPS: dict[str, float] = {
    "B200": 2250.0,
    "B100": 1750.0,
    "GH200": 989.0,
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX A6000": 155.0,
    "MI300X": 1307.0,
    "MI250X": 383.0,
}


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The per-device bf16 dense peak: ``override`` if given, else the table entry, else None (unknown)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return PEAK_BF16_TFLOPS[key]
    return None


def throughput(tokens: int, seconds: float, flops_per_token: float, world_size: int,
               peak: float | None) -> dict[str, float | None]:
    """tokens/s over all processes, achieved TFLOP/s per device and MFU (None without a known peak)."""
    tokens_per_s = tokens / max(seconds, 1e-9)
    tflops = tokens_per_s * flops_per_token / world_size / 1e12
    return {"tokens_per_s": tokens_per_s, "tflops": tflops, "mfu": tflops / peak if peak else None}


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


class MetricsLogger:
    """Appends one JSON object per line to ``OUT/metrics.jsonl``; mirrors numbers to TensorBoard if asked."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record.get("step", 0)
            prefix = record.get("kind", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "kind"):
                    self._tb.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path, kind: str | None = "train") -> list[dict[str, Any]]:
    """Records of ``metrics.jsonl``; when a step was logged twice (a resumed run) the last one wins."""
    by_step: dict[tuple[str, int], dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if kind is None or record.get("kind") == kind:
                by_step[(record.get("kind", ""), record.get("step", -1))] = record
    return [by_step[k] for k in sorted(by_step, key=lambda k: (k[1], k[0]))]
