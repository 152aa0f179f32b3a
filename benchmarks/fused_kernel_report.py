"""Check the fused (Triton) SAS simulation kernels on the GPU over a sweep of shapes, or report
their registers and spills without a GPU.

    python3 benchmarks/fused_kernel_report.py --out DIR [--full] [--tokens 1,7,189,1023,2005]
    python3 benchmarks/fused_kernel_report.py --registers [--arch 90]

Check (default, needs CUDA): for every shape, the Triton path in bf16 against the fp32 ``matmul``
path, forward output and every gradient (input, w1, b1, w2, b2 and for queries/keys w3, b3, w4,
b4), relative norm error; a tensor passes when its error is at most max(3 x the error of the plain
reference run in bf16, 0.01), the rule of ``sas_speed.py``'s check. Output buffers start as NaN so
an element a kernel does not write fails. Shapes: queries/keys (heads + features + RoPE) and values
(heads only) for H' in {16, 24, 48} (H = H'/2), D' in {64, 96, 128, 256} with D = 64, k in {1, 3, 5},
odd token counts. The default set covers every (H', D') pair with k chosen so that every (H', k)
and (D', k) pair also occurs (12 query/key shapes, 3 value shapes, well under a minute on an H200,
most of it compiling); ``--full`` runs the whole cross product. Writes DIR/fused_check.json and
DIR/fused_check.md and prints one PASS/FAIL line per shape and a verdict. Exit status 1 if any
shape fails.

Registers (``--registers``, no GPU): compiles the kernels as the wrapper launches them at GPT-small
shapes for sm_``--arch`` and prints ptxas' registers and spill bytes per thread.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from benchmarks.checks import relative_error

HS_VALUES = (16, 24, 48)
DS_VALUES = (64, 96, 128, 256)
K_VALUES = (1, 3, 5)
D = 64
MIN_TOL = 1e-2
# --smoke: the CPU interpreter, in fp32 (its bf16 dots multiply raw bit patterns)
DEV = "cuda"
DTYPE = torch.bfloat16
NAMES_QK = ["out", "x", "w1", "b1", "w2", "b2", "w3", "b3", "w4", "b4"]


def shapes(full: bool) -> list[tuple[int, int | None, int]]:
    """(H', D' or None for values, k). Default: each (H', D') once, k by a Latin square."""
    if full:
        qk = list(itertools.product(HS_VALUES, DS_VALUES, K_VALUES))
        v = list(itertools.product(HS_VALUES, [None], K_VALUES))
    else:
        qk = [(hs, ds, K_VALUES[(i + j) % 3]) for i, hs in enumerate(HS_VALUES) for j, ds in enumerate(DS_VALUES)]
        v = [(hs, None, K_VALUES[i]) for i, hs in enumerate(HS_VALUES)]
    return qk + v


def check_shape(HS: int, DS: int | None, k: int, B: int, T: int, seed: int) -> dict:
    from sasformer.ops import simulate
    from sasformer.ops.rope import RotaryTables

    H = HS // 2
    g = torch.Generator(device=DEV).manual_seed(seed)
    dev = dict(device=DEV, dtype=torch.float32)
    sizes = [(HS, H, k), (HS,), (HS, HS, k), (HS,)]
    fans = [H * k, H * k, HS * k, HS * k]
    if DS is not None:
        sizes += [(DS, D), (DS,), (DS, DS), (DS,)]
        fans += [D, D, DS, DS]
    weights = [torch.randn(s, generator=g, **dev) / f**0.5 for s, f in zip(sizes, fans)]
    x = torch.randn(B, T, H, D, generator=g, **dev)
    out_shape = (B, T, HS, DS if DS is not None else D)
    grad = torch.randn(out_shape, generator=g, **dev)
    rope = RotaryTables(torch.arange(T, device=DEV).view(1, -1), 10000.0)(DS) if DS is not None else None

    def run(impl: str, dtype: torch.dtype) -> list[torch.Tensor]:
        xx = x.to(dtype).requires_grad_()
        ws = [w.to(dtype).requires_grad_() for w in weights]
        if DS is not None:
            out = simulate.simulate_qk(xx, *ws, impl=impl, rope=rope)
        else:
            out = simulate.simulate_heads(xx, *ws, impl=impl)
        return [out, *torch.autograd.grad(out, [xx, *ws], grad.to(dtype))]

    names = NAMES_QK[: 2 + len(weights)]
    gold = run("matmul", torch.float32)
    base = {n: relative_error(a, b) for n, a, b in zip(names, run("naive", DTYPE), gold)}
    got = {n: relative_error(a, b) for n, a, b in zip(names, run("triton", DTYPE), gold)}
    failing = {n: e for n, e in got.items() if not e <= max(3 * base[n], MIN_TOL)}
    return {"H": H, "HS": HS, "D": D, "DS": DS, "k": k, "B": B, "T": T, "errors": got,
            "naive_bf16_errors": base, "failing": failing, "ok": not failing}


def run_check(opts) -> int:
    from sasformer.ops import simulate
    from sasformer.ops.simulate import fused

    global DEV, DTYPE
    if opts.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke runs in Triton's interpreter: start with TRITON_INTERPRET=1")
            return 2
        DEV, DTYPE = "cpu", torch.float32
    elif not torch.cuda.is_available() or not simulate.triton_available():
        print("the check needs a CUDA GPU and triton; use --registers for the compile-only report")
        return 2
    # every output buffer starts as NaN: an element a kernel does not write fails the check
    fused._empty = lambda *shape, **kw: torch.full(shape[0] if len(shape) == 1 and not isinstance(shape[0], int)
                                                   else shape, float("nan"), **kw)
    tokens = [int(t) for t in opts.tokens.split(",")]
    start = time.time()
    rows = []
    todo = shapes(opts.full)
    if opts.smoke:
        tokens, todo = [3], [todo[0], todo[-1]]
    for i, (HS, DS, k) in enumerate(todo):
        n = tokens[i % len(tokens)]
        # odd token counts as (B, T) with both odd where possible
        B = next(b for b in (5, 3, 1) if n % b == 0)
        try:
            row = check_shape(HS, DS, k, B, n // B, seed=i)
        except Exception as err:  # noqa: BLE001 - one broken shape is reported, the sweep goes on
            row = {"HS": HS, "DS": DS, "k": k, "B": B, "T": n // B, "ok": False,
                   "error": f"{type(err).__name__}: {err}"}
        rows.append(row)
        kind = f"qk D'={DS:<3}" if DS is not None else "v  D'=D  "
        if "error" in row:
            detail = row["error"][:200]
        else:
            errs = row["errors"]
            worst = max(errs, key=lambda n_: errs[n_] if errs[n_] == errs[n_] else 1e9)
            detail = f"worst {worst} {row['errors'][worst]:.3g} (naive bf16 {row['naive_bf16_errors'][worst]:.3g})"
            if row["failing"]:
                detail += " failing: " + ", ".join(f"{n_}={e:.3g}" for n_, e in row["failing"].items())
        print(f"{'PASS' if row['ok'] else 'FAIL'}  {kind} H'={HS:<2} k={k} N={n:<5} {detail}  "
              f"[{time.time() - start:.0f}s]", flush=True)
    failed = [r for r in rows if not r["ok"]]
    verdict = f"{len(rows) - len(failed)} of {len(rows)} shapes passed" + (" -- FAILED" if failed else "")
    print(verdict)
    if opts.out:
        out = Path(opts.out)
        out.mkdir(parents=True, exist_ok=True)
        env = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
               "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
               "triton": __import__("triton").__version__, "num_warps": fused.NUM_WARPS,
               "elapsed_s": time.time() - start}
        (out / "fused_check.json").write_text(json.dumps({"environment": env, "rule":
            f"err(triton bf16) <= max(3 * err(naive bf16), {MIN_TOL}) vs fp32 matmul", "rows": rows,
            "verdict": verdict}, indent=1))
        lines = [f"# Fused kernel check ({env['gpu']}, torch {env['torch']}, triton {env['triton']})", "",
                 f"`{env['command']}`", "", "| kind | H' | D' | k | B x T | result | worst tensor |",
                 "|---|---|---|---|---|---|---|"]
        for r in rows:
            errs = r.get("errors", {})
            worst = max(errs, key=lambda n_: errs[n_] if errs[n_] == errs[n_] else 1e9) if errs else None
            if r["ok"]:
                res = "pass"
            else:
                res = "error: " + r["error"][:80] if "error" in r else "FAIL " + ", ".join(r["failing"])
            lines.append(f"| {'qk' if r['DS'] else 'v'} | {r['HS']} | {r['DS'] or D} | {r['k']} | "
                         f"{r['B']} x {r['T']} | {res} | {f'{worst} {errs[worst]:.3g}' if worst else ''} |")
        lines += ["", verdict, ""]
        (out / "fused_check.md").write_text("\n".join(lines))
    return 1 if failed else 0


def run_registers(opts) -> int:
    os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be real JIT functions
    from sasformer.ops.simulate.fused_inspect import compile_launch, launch_configs, ptxas_stats

    print(f"H=12 H'=24 D=64, k=3, bf16, sm_{opts.arch}, as launched by the wrapper")
    for kind, DS in (("qk D'=128", 128), ("qk D'=64 ", 64), ("v        ", None)):
        for launch in launch_configs(12, 24, 3, 64, DS):
            stats = ptxas_stats(compile_launch(launch, opts.arch).asm["ptx"], opts.arch)
            rows = launch.constexprs["BLOCK_N"] * launch.constexprs["DP"]
            print(f"{kind} {launch.name:21s} rows={rows:<3} warps={launch.num_warps} {stats}", flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="folder for fused_check.json and fused_check.md")
    p.add_argument("--full", action="store_true", help="every (H', D', k) combination (slower: one compile each)")
    p.add_argument("--tokens", default="1,7,189,1023,2005", help="token counts B*T, used in turn")
    p.add_argument("--registers", action="store_true", help="compile-only register/spill report (no GPU)")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--smoke", action="store_true",
                   help="two tiny shapes, fp32, in the CPU interpreter (TRITON_INTERPRET=1 must be set before start)")
    opts = p.parse_args()
    return run_registers(opts) if opts.registers else run_check(opts)


if __name__ == "__main__":
    raise SystemExit(main())
