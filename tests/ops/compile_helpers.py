"""Running a kernel-compiling script outside Triton's interpreter, shared by the sm_90 compile tests."""

from __future__ import annotations

import json
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


def assert_kernels_compile_for_sm90(module: str, kernels: list[tuple[str, dict[str, str]]],
                                    constexprs: dict[str, int], num_warps: int = 4) -> None:
    """Each ``(kernel name, {argument: Triton type})`` of ``module`` compiles to PTX and a cubin for sm_90;
    arguments not typed are the ``constexprs`` (a kernel takes those of them it names). The interpreter does
    not type-check a kernel's branches; the real compiler does."""
    script = f"""
import importlib, json
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
k = importlib.import_module({module!r})
constexprs = json.loads({json.dumps(constexprs)!r})
for name, types in json.loads({json.dumps(kernels)!r}):
    fn = getattr(k, name)
    signature = {{n: types.get(n, "constexpr") for n in fn.arg_names}}
    consts = {{n: v for n, v in constexprs.items() if n in fn.arg_names}}
    compiled = k.triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                                target=GPUTarget("cuda", 90, 32), options={{"num_warps": {num_warps}}})
    assert ".entry" in compiled.asm["ptx"] and compiled.asm["cubin"]
    print("compiled", name)
"""
    assert run_without_interpreter(script).count("compiled") == len(kernels)
