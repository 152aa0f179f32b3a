"""Which part of a SAS layer does ``torch.compile`` get wrong? Gradients of each piece, eager vs traced.

    python3 benchmarks/compile_probe.py [--device cuda] [--backends eager aot_eager] [--out FILE]

:mod:`benchmarks.train_check` says whether a whole compiled model is right; this script says where a
fault sits. It compiles the SAS layer (each simulation implementation, and with the math attention
backend), then the simulation ops, RoPE and attention alone, with Dynamo's ``eager`` backend (graph
capture only) and ``aot_eager`` (plus AOTAutograd), and prints, per input, the relative L2 error of the
traced gradient against the eager one, in fp32: about 1e-7 is right; 1 means the gradient was lost.
Exits 1 when a case exceeds ``--max-error``.
(Inductor is left out on purpose: it changes the arithmetic, and ``train_check`` covers it.)
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from benchmarks.checks import relative_error
from sasformer.layers.base import AttentionContext
from sasformer.layers.sas import SASArgs, SimulatedAttention
from sasformer.ops import simulate
from sasformer.ops.attention import attend
from sasformer.ops.rope import RotaryCache
from sasformer.ops.simulate.rotate import rope_simulated


def gradient_errors(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], backend: str) -> list[float]:
    """Relative error of each input's gradient, ``torch.compile(fn, backend)`` against eager ``fn``."""
    grads = []
    for compiled in (False, True):
        torch._dynamo.reset()
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        out = (torch.compile(fn, backend=backend) if compiled else fn)(*leaves)
        # a fixed non-uniform weighting, so that no gradient vanishes by symmetry
        weights = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
        (out.float() * weights).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    return [relative_error(traced, eager) for eager, traced in zip(*grads)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", nargs="+", default=["eager", "aot_eager"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512, help="8 x 512 tokens reach the CUDA 'banded' default")
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--max-error", type=float, default=1e-3,
                        help="fail above this (fp32 rounding gives about 1e-6; the faults this finds gave 1)")
    args = parser.parse_args()
    dev, B, T = args.device, args.batch, args.seq_len
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    # the `mini` shape: d 512, 8 heads of 64 -> 16 simulated heads of 128
    layer = SimulatedAttention(512, SASArgs(n_heads=8, n_sim_heads=16, sim_head_dim=128, kernel_size=3)).to(dev)
    rotary = RotaryCache([128], T, 10000.0).to(dev)
    positions = torch.arange(T, device=dev).unsqueeze(0)
    cos, sin = rotary.tables(positions, T)(128)
    x = torch.randn(B, T, 512, device=dev)

    def run_layer(x: torch.Tensor) -> torch.Tensor:
        return layer(x, AttentionContext(rotary.tables(positions, T)))

    hq, fq = layer.heads_q, layer.features_q
    q = torch.randn(B, T, 8, 64, device=dev)
    ws = [hq.w1, hq.b1, hq.w2, hq.b2, fq.w3, fq.b3, fq.w4, fq.b4]
    qs, ks = (torch.randn(B, 16, T, 128, device=dev) for _ in range(2))
    vs = torch.randn(B, 16, T, 64, device=dev)
    cases: list[tuple[str, Callable, list[torch.Tensor], dict[str, str]]] = []
    impls = ["naive", *simulate.PYTORCH_FAST_IMPLS]
    if dev == "cuda" and simulate.triton_available():
        impls.append("triton")
    for impl in (None, *impls):
        cases.append((f"layer, simulation {impl or 'auto'}", run_layer, [x], {"SASFORMER_SIMULATE": impl or ""}))
    cases.append(("layer, math attention", run_layer, [x], {"SASFORMER_ATTENTION": "math"}))
    for impl in impls:
        cases.append((f"simulate_qk {impl}", lambda q, *w, i=impl: simulate.simulate_qk(q, *w, impl=i), [q, *ws], {}))
        cases.append((f"simulate_qk {impl} + rope", lambda q, *w, i=impl: simulate.simulate_qk(
            q, *w, impl=i, rope=(cos, sin)), [q, *ws], {}))
        cases.append((f"simulate_heads {impl}", lambda q, *w, i=impl: simulate.simulate_heads(q, *w, impl=i),
                      [q, *ws[:4]], {}))
    y = torch.randn(B, T, 16, 128, device=dev)
    cases.append(("rope_simulated", lambda y: rope_simulated(y, cos, sin), [y], {}))
    for backend in ("auto", "math", "default"):
        cases.append((f"attend q/k 128, v 64, {backend}", lambda a, b, c, be=backend: attend(
            a, b, c, None, scale=0.1, backend=be), [qs, ks, vs], {}))
    cases.append(("F.scaled_dot_product_attention", lambda a, b, c: F.scaled_dot_product_attention(
        a, b, c, is_causal=True), [qs, ks, vs], {}))

    name = torch.cuda.get_device_name() if dev == "cuda" else dev
    lines = [f"`{shlex.join(['benchmarks/compile_probe.py', *sys.argv[1:]])}` on {name}, torch {torch.__version__}",
             "", "| case | backend | result | relative gradient error per input |", "|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    failures = 0
    for label, fn, inputs, env in cases:
        for backend in args.backends:
            try:
                with mock.patch.dict(os.environ, env):
                    values = gradient_errors(fn, inputs, backend)
                ok = all(e <= args.max_error for e in values)  # NaN fails
                errors = " ".join(f"{e:.2g}" for e in values)
            except Exception as error:  # noqa: BLE001 -- one failing case must not hide the others
                ok, errors = False, f"{type(error).__name__}: {str(error)[:80]}"
            failures += not ok
            lines.append(f"| {label} | {backend} | {'pass' if ok else 'FAIL'} | {errors} |")
            print(lines[-1], flush=True)
    outcome = "every case passed." if not failures else f"{failures} case(s) FAILED."
    lines += ["", f"Limit {args.max_error}: " + outcome]
    print(lines[-1])
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
