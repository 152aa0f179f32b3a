"""Compile the fused simulation kernels exactly as :mod:`.fused` launches them, without a GPU.

:func:`launch_configs` runs the fused op's forward and backward on CPU tensors with the kernel
launches replaced by a recorder, so each recorded launch carries the constexprs, argument types and
warps the wrapper would use for those shapes. :func:`compile_launch` compiles one for an NVIDIA
target with Triton's bundled compiler, and :func:`ptxas_stats` reports its registers and spills.
Used by ``tests/ops/test_fused_compiles.py`` and ``benchmarks/fused_kernel_report.py``; needs the
real (not interpreted) kernels, so run it without ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import subprocess
import tempfile
from unittest import mock

import torch

from sasformer.ops.simulate import fused

_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclasses.dataclass
class Launch:
    name: str
    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int


def _record(launches: list[Launch]):
    def launch(kernel, grid, *args, **meta):
        meta = dict(meta)
        num_warps = meta.pop("num_warps")
        names = [n for n in kernel.arg_names if n not in meta]
        sig = {n: (f"*{_TRITON_TYPES[a.dtype]}" if isinstance(a, torch.Tensor) else "i32") for n, a in zip(names, args)}
        sig.update({n: "constexpr" for n in meta})
        launches.append(Launch(kernel.__name__, kernel, sig, meta, num_warps))

    return launch


def launch_configs(H: int, HS: int, k: int, D: int, DS: int | None, rope: bool = True,
                   dtype: torch.dtype = torch.bfloat16, tokens: int = 5) -> list[Launch]:
    """The kernel launches of one forward + backward at these shapes (``DS=None``: heads only)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, H, D, generator=g).to(dtype).requires_grad_()
    ws = [torch.randn(*s, generator=g).to(dtype).requires_grad_()
          for s in ((HS, H, k), (HS,), (HS, HS, k), (HS,))]
    launches: list[Launch] = []
    with mock.patch.object(fused, "_launch", _record(launches)), mock.patch.object(fused, "_empty", torch.zeros):
        if DS is None:
            out = fused.simulate_heads_triton(x, *ws)
        else:
            ws += [torch.randn(*s, generator=g).to(dtype).requires_grad_() for s in ((DS, D), (DS,), (DS, DS), (DS,))]
            tables = (torch.ones(1, tokens, DS), torch.zeros(1, tokens, DS)) if rope else None
            out = fused.simulate_qk_triton(x, *ws, rope=tables)
        out.sum().backward()
    return launches


def compile_launch(launch: Launch, arch: int = 90):
    """Compile one recorded launch for sm_``arch``; returns Triton's compiled kernel (PTX in ``.asm``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=launch.kernel, signature=launch.signature, constexprs=launch.constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": launch.num_warps})


def ptxas_stats(ptx: str, arch: int = 90) -> str:
    """Registers and spill bytes per thread from Triton's bundled ptxas, as one line."""
    import triton

    tools = sorted(glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas*")))
    if not tools:
        return "ptxas not found"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    suffix = "a" if arch >= 90 else ""
    # some Triton releases bundle two (e.g. ptxas and ptxas-blackwell), and the first may be too old for
    # the PTX version Triton emits: take the first that accepts it
    for tool in tools:
        proc = subprocess.run([tool, "-v", f"--gpu-name=sm_{arch}{suffix}", f.name, "-o", os.devnull],
                              capture_output=True, text=True)
        if "Unsupported .version" not in proc.stderr:
            break
    os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", proc.stderr)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr)
    if not regs:
        return proc.stderr.strip()[-300:]
    return f"{regs.group(1)} registers, spill stores/loads {spill.group(1)}/{spill.group(2)} bytes"
