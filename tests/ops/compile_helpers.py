"""Running a kernel-compiling script outside Triton's interpreter, shared by the sm_90 compile tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_without_interpreter(script: str) -> str:
    """Run ``script`` in a fresh Python process without ``TRITON_INTERPRET`` (the interpreter setting replaces
    the kernels at import time) and with the repository on the path; return its stdout. Skips the calling
    test where Triton's ``ptxas`` is missing; fails it, with the script's stderr, on any other error."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("Triton's ptxas is not available here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
