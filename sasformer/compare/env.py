"""Where the numbers came from: git revision, library versions, device."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch


def git_revision() -> str | None:
    """``HEAD`` of the repository holding this package, with ``+dirty`` when it has uncommitted changes."""
    root = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=root,
                              check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=root, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    revision = head.stdout.strip()
    if not revision:
        return None
    return revision + ("+dirty" if dirty.stdout.strip() else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and device, recorded with every grid's results."""
    import numpy

    info: dict[str, Any] = {
        "git_revision": git_revision(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "device": device_name(device),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["device_count"] = torch.cuda.device_count()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info
