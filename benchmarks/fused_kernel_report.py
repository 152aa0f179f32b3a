"""Compile the fused SAS simulation kernels for an NVIDIA target and report registers and spills.

Needs no GPU: Triton compiles to PTX and its bundled ptxas assembles it. Use it to compare tile
settings before spending GPU time:

    python3 benchmarks/fused_kernel_report.py [--arch 90] [--block-n 1,2,4] [--warps 4,8]
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be real JIT functions

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sasformer.ops.simulate import fused  # noqa: E402


def ptxas_stats(ptx: str, arch: int) -> str:
    tools = sorted(glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas*")))
    if not tools:
        return "ptxas not found"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    suffix = "a" if arch >= 90 else ""
    proc = subprocess.run([tools[0], "-v", f"--gpu-name=sm_{arch}{suffix}", f.name, "-o", os.devnull],
                          capture_output=True, text=True)
    os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", proc.stderr)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr)
    if not regs:
        return proc.stderr.strip()[-300:]
    return f"{regs.group(1)} registers, spill stores/loads {spill.group(1)}/{spill.group(2)} bytes"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--block-n", default="1,2,4", help="tokens per program (rows = block_n * padded D)")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--heads", default="12,24", help="H,H'")
    p.add_argument("--dims", default="64,128", help="D,D'")
    p.add_argument("--kernel-size", type=int, default=3)
    opts = p.parse_args()
    H, HS = (int(v) for v in opts.heads.split(","))
    D, DS = (int(v) for v in opts.dims.split(","))
    pow2 = lambda n: max(16, triton.next_power_of_2(n))  # noqa: E731
    print(f"H={H} H'={HS} D={D} D'={DS} k={opts.kernel_size}, sm_{opts.arch}")
    for features in (True, False):
        ds = DS if features else D
        for block_n in (int(v) for v in opts.block_n.split(",")):
            for warps in (int(v) for v in opts.warps.split(",")):
                consts = dict(H=H, HS=HS, D=D, DS=ds, K=opts.kernel_size, HP=pow2(H), HSP=pow2(HS), DP=pow2(D),
                              DSP=pow2(ds), BLOCK_N=block_n, FEATURES=features, ROPE=features, PREC="tf32")
                for kernel in (fused._simulate_fwd_kernel, fused._simulate_bwd_kernel):
                    sig = {}
                    for name in kernel.arg_names:
                        if name in consts:
                            sig[name] = "constexpr"
                        elif name.endswith("_ptr") and name.startswith(("dw", "db", "scratch", "cos", "sin")):
                            sig[name] = "*fp32"
                        elif name.endswith("_ptr"):
                            sig[name] = "*bf16"
                        else:
                            sig[name] = "i32"
                    try:
                        compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                                                  target=GPUTarget("cuda", opts.arch, 32),
                                                  options={"num_warps": warps})
                        stats = ptxas_stats(compiled.asm["ptx"], opts.arch)
                    except Exception as err:  # noqa: BLE001 - reported per configuration
                        stats = f"compile error: {type(err).__name__}: {str(err)[:200]}"
                    kind = "qk" if features else "v "
                    print(f"{kind} block_n={block_n} warps={warps} {kernel.__name__:22s} {stats}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
