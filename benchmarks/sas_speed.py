"""SAS speed and memory on one CUDA GPU: whole-model training, the SAS layer alone, SDPA backends.

    python3 benchmarks/sas_speed.py --out DIR [--sections check,layer,profile,tiles,model,sdpa] [--budget-s 250]

Sections (each wrapped so a failure is recorded in the JSON and the run goes on) run in this
order, with ``check`` added whenever a section that times SAS paths is asked for; once --budget-s
seconds have passed, the remaining measurements are skipped (and recorded as skipped), so the whole
run stays within about 5 minutes. Results are saved after every model
row, so a crash in one variant keeps the rows measured before it.
- check: fast simulation paths against the plain reference on the GPU (bf16, forward and every
  gradient, relative norm error); when it fails, no speed of a failing path is reported.
- layer: one SAS layer (GPT-small shapes) forward+backward: fast paths vs the reference structure
  (Conv1d-style simulation over (B*T, H, D), per-group output projection then mean, default SDPA),
  eager; the --compiled-layer-paths also under torch.compile, with their graph breaks counted as in model.
- profile: torch.profiler over a few forward+backward steps of one SAS layer per simulation path
  and of an MHA layer: the top CUDA kernels by total time.
- tiles: the Triton kernels' tile settings, each checked (output and every gradient, bf16 vs fp32)
  on the Q simulation at GPT-small shapes and timed if it passes; runs even when the Triton path
  failed the check, to show which settings are wrong; at most --tiles-budget-s seconds.
- model: GPT-small training tokens/s and peak memory for MHA, GQA, MQA, MLA, TPA and SAS, eager and
  compiled, random tokens, fused AdamW, bf16 autocast, the loss computed in the model's forward (chunked LM
  head + cross-entropy, compiled with the model, as in the trainer); SAS runs the automatic simulation path.
  Compiled rows count their graph breaks (and recompilations, eager fallbacks): a warning in the log,
  the reasons under the table, and exit status 1 with --fail-on-graph-break.
- sdpa: attention with query/key size 128 and value size 64 on every backend.
Writes DIR/sas_speed.json and DIR/sas_speed.md and prints the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from benchmarks.checks import relative_error
from benchmarks.timing import median_ms
from sasformer import DecoderLM, preset
from sasformer.layers.base import AttentionContext
from sasformer.layers.sas import SASArgs, SimulatedAttention
from sasformer.layers.simulation import set_simulation_impl
from sasformer.ops import attention as attention_ops
from sasformer.ops import simulate
from sasformer.ops.rope import RotaryTables
from sasformer.ops.simulate import banded as banded_ops
from sasformer.ops.simulate import blocked as blocked_ops
from sasformer.ops.simulate import chunked as chunked_ops
from sasformer.utils import graph_breaks

SECTIONS = ("check", "layer", "profile", "tiles", "model", "sdpa")
SKIPPED = {"error": "skipped: time budget reached (raise --budget-s)"}
SAS_MAIN = {"n_sim_heads": 24, "sim_head_dim": 128, "kernel_size": 3}
SAS_SMALL = {"n_sim_heads": 24, "sim_head_dim": 64, "kernel_size": 3}
# name -> (preset attention, attention_args, structure): "fast" = the automatic simulation path,
# "reference" = the straightforward structure, or a simulation implementation forced (simulate.IMPLS)
VARIANTS: dict[str, tuple[str, dict, str]] = {
    "mha": ("mha", {}, "fast"),
    "gqa": ("gqa", {}, "fast"),
    "mqa": ("mqa", {}, "fast"),
    "mla": ("mla", {}, "fast"),
    "tpa": ("tpa", {}, "fast"),
    "sas_24x128": ("sas", SAS_MAIN, "fast"),
    "sas_24x64": ("sas", SAS_SMALL, "fast"),
    "sas_24x128_chunked": ("sas", SAS_MAIN, "chunked"),
    # chunks of 8 features: (8+2)/3 = 3.3x the useful convolution FLOPs instead of 6x, smaller GEMMs
    "sas_24x128_chunked8": ("sas", SAS_MAIN, "chunked8"),
    # exact convolution FLOPs (inner size k*H), hand-written backward
    "sas_24x128_matmul": ("sas", SAS_MAIN, "matmul"),
    # the two candidates for compiled training: banded GEMMs (traced) and the fused kernels (custom ops)
    "sas_24x128_banded": ("sas", SAS_MAIN, "banded"),
    # banded with the second head convolution as diagonal blocks of 16 features plus their borders
    "sas_24x128_blocked": ("sas", SAS_MAIN, "blocked"),
    # blocks of 32 features: twice the FLOPs of 16 in GEMMs of twice the inner size
    "sas_24x128_blocked32": ("sas", SAS_MAIN, "blocked32"),
    "sas_24x128_triton": ("sas", SAS_MAIN, "triton"),
    # banded with the traced simulation checkpointed (recomputed in the backward): memory against time
    "sas_24x128_banded_recompute": ("sas", SAS_MAIN, "banded_recompute"),
    "sas_24x128_reference": ("sas", SAS_MAIN, "reference"),
}
CHECK_MIN_TOL = 1e-2  # bf16 relative-norm floor for the correctness check
# set by main: "cuda" for real runs, "cpu" for a smoke run that only exercises the code paths
DEV = "cuda"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the reference structure -------------------------------------------------------------------
def _aggregate_per_group(self: SimulatedAttention, o_BTHD: torch.Tensor) -> torch.Tensor:
    """PEAA as first written: project every group of H heads, then average the G projections."""
    B, T = o_BTHD.shape[:2]
    groups = o_BTHD.reshape(B, T, self.groups, self.n_heads * self.head_dim)
    return self.o_proj(groups).mean(dim=2)


def make_reference(module: torch.nn.Module) -> None:
    """Turn every SAS layer in ``module`` into the straightforward structure (same weights, same math)."""
    for layer in module.modules():
        if isinstance(layer, SimulatedAttention):
            set_simulation_impl(layer, "naive")
            layer.aggregate = types.MethodType(_aggregate_per_group, layer)


@contextlib.contextmanager
def env(name: str, value: str | None):
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


# structures that are a simulation implementation plus one environment setting: (implementation, variable, value)
STRUCTURE_SETTINGS = {
    "banded_recompute": ("banded", banded_ops.RECOMPUTE_ENV_VAR, "1"),
    "chunked8": ("chunked", chunked_ops.CHUNK_ENV_VAR, "8"),
    "blocked32": ("blocked", blocked_ops.BLOCK_ENV_VAR, "32"),
}
STRUCTURE_IMPL = {structure: impl for structure, (impl, _, _) in STRUCTURE_SETTINGS.items()}


@contextlib.contextmanager
def structure_env(structure: str):
    """The reference structure also uses PyTorch's default SDPA choice, as it was first measured; a structure
    of :data:`STRUCTURE_SETTINGS` sets its variable, and every other structure's variable is unset."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(env(attention_ops.ENV_VAR, "default" if structure == "reference" else None))
        for name, (_, variable, value) in STRUCTURE_SETTINGS.items():
            stack.enter_context(env(variable, value if name == structure else None))
        yield


def fast_impls() -> list[str]:
    kernels = DEV == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return list(simulate.PYTORCH_FAST_IMPLS) + (["triton"] if kernels and simulate.triton_available() else [])


def auto_impl() -> str:
    """The simulation path a model gets without being told (what the training rows measure)."""
    # a GPT-small training-size query (B=16, T=1024, H=12, D=64); only shape, device and dtype matter
    return simulate.resolve_impl(None, torch.empty(16, 1024, 12, 64, device=DEV, dtype=torch.bfloat16))


# -- timing --------------------------------------------------------------------------------------
def cuda_time_ms(fn: Callable[[], Any], warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs timed with CUDA events, after ``warmup`` runs."""
    for _ in range(warmup if DEV == "cuda" else 0):
        fn()
    if DEV == "cuda":
        torch.cuda.synchronize()
    return median_ms(fn, reps, cuda=DEV == "cuda")


def fresh_memory() -> None:
    if DEV == "cpu":
        return
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def memory_allocated() -> int:
    return torch.cuda.memory_allocated() if DEV == "cuda" else 0


def max_memory_allocated() -> int:
    return torch.cuda.max_memory_allocated() if DEV == "cuda" else 0


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30


# -- layer helpers -------------------------------------------------------------------------------
def sas_layer(args: dict, dtype: torch.dtype, seed: int = 0) -> SimulatedAttention:
    torch.manual_seed(seed)
    return SimulatedAttention(768, SASArgs(n_heads=12, **args)).to(DEV).to(dtype)


def layer_ctx(T: int) -> AttentionContext:
    return AttentionContext(RotaryTables(torch.arange(T, device=DEV).view(1, -1), 10000.0))


def layer_fwd_bwd(layer: SimulatedAttention, x: torch.Tensor, grad: torch.Tensor):
    x = x.detach().requires_grad_()
    out = layer(x, layer_ctx(x.shape[1]))
    out.backward(grad)
    return out.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


# -- sections ------------------------------------------------------------------------------------
def section_check(opts) -> dict:
    """Every fast path vs the reference on GPU-sized inputs; returns per-path verdicts."""
    res: dict[str, Any] = {"tolerance_rule": f"err(fast bf16) <= max(3 * err(naive bf16), {CHECK_MIN_TOL}) vs fp32"}
    torch.manual_seed(0)
    B, T = opts.check_shape
    impls = fast_impls()
    for name, args in (("sas_24x128", SAS_MAIN), ("sas_24x64", SAS_SMALL), ("sas_k1", {**SAS_MAIN, "kernel_size": 1})):
        ref32 = sas_layer(args, torch.float32)
        x = torch.randn(B, T, 768, device=DEV).to(torch.bfloat16)
        grad = torch.randn(B, T, 768, device=DEV).to(torch.bfloat16)
        set_simulation_impl(ref32, "naive")
        with env(attention_ops.ENV_VAR, "math"):
            gold = layer_fwd_bwd(ref32, x.float(), grad.float())
        rows = {}
        for impl in ["naive", *impls]:
            layer = sas_layer(args, torch.bfloat16)
            set_simulation_impl(layer, impl)
            out, dx, grads = layer_fwd_bwd(layer, x, grad)
            errs = {"out": relative_error(out, gold[0]), "x": relative_error(dx, gold[1])}
            errs.update({n: relative_error(g, gold[2][n]) for n, g in grads.items()})
            rows[impl] = errs
        verdict = {}
        for impl in impls:
            bad = {k: v for k, v in rows[impl].items() if not v <= max(3 * rows["naive"][k], CHECK_MIN_TOL)}
            verdict[impl] = {"ok": not bad, "failing": bad}
        # the reference structure must compute the same function as the fast layer
        ref_layer = sas_layer(args, torch.float32)
        make_reference(ref_layer)
        with env(attention_ops.ENV_VAR, "math"):
            ref_out = layer_fwd_bwd(ref_layer, x.float(), grad.float())[0]
        res[name] = {"errors": rows, "verdict": verdict, "reference_structure_err": relative_error(ref_out, gold[0])}
        log(f"check {name}: " + ", ".join(f"{k}={'ok' if v['ok'] else 'FAIL'}" for k, v in verdict.items()))
    res["passed"] = {impl: all(res[n]["verdict"][impl]["ok"] for n in res if isinstance(res[n], dict)
                               and "verdict" in res[n]) for impl in impls}
    return res


def section_layer(opts, passed: dict[str, bool], deadline: float) -> dict:
    """SAS layer (d=768, H=12, H'=24, D'=128, k=3) forward+backward, bf16, per path."""
    out: dict[str, Any] = {}
    for B, T in opts.layer_shapes:
        for cfg_name, args in (("sas_24x128", SAS_MAIN), ("sas_24x64", SAS_SMALL)):
            rows = {}
            # eager rows for every path, then the --compiled-layer-paths again under torch.compile
            paths = ["reference", "naive", *fast_impls()]
            paths += [f"{p} compiled" for p in opts.compiled_layer_paths if p == "reference" or p in paths]
            for path in paths:
                key = f"{cfg_name}/T{T}/{path}"
                impl, compiled = path.removesuffix(" compiled"), path.endswith(" compiled")
                if time.time() > deadline:
                    rows[path] = SKIPPED
                    continue
                if impl in passed and not passed[impl]:
                    rows[path] = {"error": "refused: correctness check failed"}
                    continue
                try:
                    layer = sas_layer(args, torch.bfloat16)
                    structure = "reference" if impl == "reference" else "fast"
                    if structure == "reference":
                        make_reference(layer)
                    else:
                        set_simulation_impl(layer, impl)
                    if compiled:
                        torch._dynamo.reset()  # each layer compiles afresh, not against an earlier one's cache
                    run_layer = torch.compile(layer) if compiled else layer
                    x = torch.randn(B, T, 768, device=DEV, dtype=torch.bfloat16, requires_grad=True)
                    grad = torch.randn_like(x)
                    with structure_env(structure), graph_breaks.watch_graph_breaks() as breaks:
                        def fwd():
                            return run_layer(x, layer_ctx(T))

                        def step():
                            fwd().backward(grad)

                        fwd_ms = cuda_time_ms(fwd, warmup=2, reps=opts.reps)
                        fresh_memory()
                        base = memory_allocated()
                        ms = cuda_time_ms(step, warmup=2, reps=opts.reps)
                        peak = max_memory_allocated() - base
                    rows[path] = {"fwd_ms": fwd_ms, "fwd_bwd_ms": ms, "peak_gib": gib(peak),
                                  **({"graph_breaks": breaks.to_dict()} if compiled else {})}
                    log(f"layer {key}: fwd {fwd_ms:.2f} ms, fwd+bwd {ms:.2f} ms, +{gib(peak):.2f} GiB")
                    if compiled and (warning := graph_breaks.warning_line(f"layer {key}", breaks.to_dict())):
                        log(warning)
                except Exception as err:  # noqa: BLE001 - recorded, run continues
                    rows[path] = {"error": f"{type(err).__name__}: {err}"}
                    log(f"layer {key}: {type(err).__name__}: {err}")
                finally:
                    fresh_memory()
            ref = rows.get("reference", {}).get("fwd_bwd_ms")
            for row in rows.values():
                if ref and "fwd_bwd_ms" in row:
                    row["speedup_vs_reference"] = ref / row["fwd_bwd_ms"]
            out[f"{cfg_name}/T{T}"] = {"B": B, "T": T, **rows}
    # the simulation alone (Q, K through heads+features, V through heads), forward+backward
    B, T = opts.layer_shapes[0]
    layer = sas_layer(SAS_MAIN, torch.bfloat16)
    q = torch.randn(B, T, 12, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    sim = {}
    for impl in ["naive", *fast_impls()]:
        if impl in passed and not passed[impl]:
            sim[impl] = {"error": "refused: correctness check failed"}
            continue
        try:
            hq, fq, hv = layer.heads_q, layer.features_q, layer.heads_v

            def run(impl=impl):
                qs = simulate.simulate_qk(q, hq.w1, hq.b1, hq.w2, hq.b2, fq.w3, fq.b3, fq.w4, fq.b4, impl=impl)
                vs = simulate.simulate_heads(q, hv.w1, hv.b1, hv.w2, hv.b2, impl=impl)
                (qs.float().sum() + vs.float().sum()).backward()

            fresh_memory()
            ms = cuda_time_ms(run, warmup=2, reps=opts.reps)
            sim[impl] = {"q_and_v_fwd_bwd_ms": ms, "peak_gib": gib(max_memory_allocated())}
            log(f"simulation {impl}: {ms:.2f} ms")
        except Exception as err:  # noqa: BLE001
            sim[impl] = {"error": f"{type(err).__name__}: {err}"}
    out[f"simulation_only/T{T}"] = sim
    return out


# (forward rows, backward rows, warps) per program; None rows = the module's automatic choice;
# 8 warps (two warp groups) is the setting that raced on an H200 with Triton 3.6, kept as a diagnostic
TILE_SETTINGS = ((None, 64, 4), (128, 64, 4), (64, 128, 4), (64, 32, 4), (None, 64, 8))


def section_tiles(opts, passed: dict[str, bool], deadline: float) -> dict:
    """Q simulation (H'=24, D'=128, k=3, RoPE) forward+backward per Triton tile setting: each setting
    is checked first (output, input and every weight gradient, bf16 against the fp32 matmul path,
    tolerance as in the check section) and timed only if it passes. Runs even when the Triton path
    failed the check section, so that the run shows which settings compute wrong gradients."""
    if "triton" not in fast_impls():
        return {"error": "triton not available"}
    from sasformer.ops.simulate import fused

    B, T = opts.layer_shapes[0]
    if opts.smoke:
        B, T = 1, 5
    layer = sas_layer(SAS_MAIN, torch.float32)
    hq, fq = layer.heads_q, layer.features_q
    weights32 = [w.detach() for w in (hq.w1, hq.b1, hq.w2, hq.b2, fq.w3, fq.b3, fq.w4, fq.b4)]
    names = ["out", "x", "w1", "b1", "w2", "b2", "w3", "b3", "w4", "b4"]
    torch.manual_seed(0)
    x32 = torch.randn(B, T, 12, 64, device=DEV)
    g32 = torch.randn(B, T, 24, 128, device=DEV)
    rope = layer_ctx(T).rotary(128)

    def run(impl: str, dtype: torch.dtype) -> list[torch.Tensor]:
        x = x32.to(dtype).requires_grad_()
        ws = [w.to(dtype).requires_grad_() for w in weights32]
        out = simulate.simulate_qk(x, *ws, impl=impl, rope=rope)
        return [out, *torch.autograd.grad(out, [x, *ws], g32.to(dtype))]

    def errors(got: list[torch.Tensor], gold: list[torch.Tensor]) -> dict[str, float]:
        return {n: relative_error(a, b) for n, a, b in zip(names, got, gold)}

    gold = run("matmul", torch.float32)
    base = errors(run("naive", torch.bfloat16), gold)
    rows: dict[str, Any] = {"naive_bf16_errors": base}
    # default tiles in fp32: tells a wrong kernel apart from a bf16 precision problem
    try:
        errs = errors(run("triton", torch.float32), gold)
        worst = max(errs, key=lambda n: errs[n] if math.isfinite(errs[n]) else math.inf)
        verdict = "ok" if errs[worst] <= 1e-3 else "WRONG"
        rows["default_fp32"] = {"note": f"fp32 check {verdict}: worst {worst} rel. err {errs[worst]:.3g}",
                                "errors": errs}
        log(f"triton tiles default fp32: {verdict} (worst {worst} {errs[worst]:.3g})")
    except Exception as err:  # noqa: BLE001
        rows["default_fp32"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    default = (fused.BLOCK_ROWS, fused.BWD_BLOCK_ROWS, fused.NUM_WARPS)
    try:
        for fwd_rows, bwd_rows, warps in TILE_SETTINGS:
            key = f"rows{fwd_rows or 'auto'}/{bwd_rows}_warps{warps}"
            if time.time() > deadline:
                rows[key] = SKIPPED
                continue
            fused.BLOCK_ROWS, fused.BWD_BLOCK_ROWS, fused.NUM_WARPS = fwd_rows, bwd_rows, warps
            try:
                errs = errors(run("triton", torch.bfloat16), gold)
                bad = {n: e for n, e in errs.items() if not e <= max(3 * base[n], CHECK_MIN_TOL)}
                if bad:
                    worst = max(bad, key=lambda n: bad[n] if math.isfinite(bad[n]) else math.inf)
                    rows[key] = {"error": f"refused: {len(bad)} of {len(errs)} wrong, worst {worst} "
                                          f"rel. err {bad[worst]:.3g}", "errors": errs}
                    log(f"triton tiles {key}: wrong ({', '.join(sorted(bad))})")
                    continue
                x = x32.bfloat16().requires_grad_()
                ws = [w.bfloat16() for w in weights32]
                g = g32.bfloat16()

                def step():
                    o = simulate.simulate_qk(x, *ws, impl="triton", rope=rope)
                    torch.autograd.grad(o, x, g)

                rows[key] = {"q_fwd_bwd_ms": cuda_time_ms(step, warmup=2, reps=opts.reps),
                             "rel_err": max(errs.values()), "errors": errs}
                log(f"triton tiles {key}: {rows[key]['q_fwd_bwd_ms']:.3f} ms")
            except Exception as err:  # noqa: BLE001
                rows[key] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
                log(f"triton tiles {key}: {type(err).__name__}")
    finally:
        fused.BLOCK_ROWS, fused.BWD_BLOCK_ROWS, fused.NUM_WARPS = default
    # the PyTorch paths on the same work, for comparison
    for impl in ("naive", *simulate.PYTORCH_FAST_IMPLS):
        x = x32.bfloat16().requires_grad_()
        ws = [w.bfloat16() for w in weights32]
        g = g32.bfloat16()

        def step(impl=impl):
            o = simulate.simulate_qk(x, *ws, impl=impl, rope=rope)
            torch.autograd.grad(o, x, g)

        rows[impl] = {"q_fwd_bwd_ms": cuda_time_ms(step, warmup=2, reps=opts.reps)}
    return {f"triton_tiles/T{T}": rows}


def _profile_rows(prof, top: int) -> tuple[list[dict], float]:
    """The ``top`` kernels by total device time (CPU ops on a CPU run), and the total in ms."""
    cuda = DEV == "cuda"
    events = [e for e in prof.key_averages()
              if (e.device_type == torch.autograd.DeviceType.CUDA) == cuda]
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    times = {e.key: getattr(e, attr) / 1e3 for e in events}
    total = sum(times.values())
    rows = [{"name": e.key, "calls": e.count, "total_ms": times[e.key],
             "share": times[e.key] / total if total else 0.0} for e in events]
    rows.sort(key=lambda r: -r["total_ms"])
    return rows[:top], total


def section_profile(opts, passed: dict[str, bool], deadline: float) -> dict:
    """torch.profiler over ``opts.profile_steps`` forward+backward steps of one layer (GPT-small,
    B x T of the first layer shape, bf16) per simulation path, and of MHA: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    from sasformer.layers.mha import MHAArgs, MultiHeadAttention

    B, T = opts.layer_shapes[0]
    out: dict[str, Any] = {"steps": opts.profile_steps, "B": B, "T": T}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    cases = [("mha", None)] + [(f"sas_24x128/{impl}", impl) for impl in ["naive", *fast_impls()]]
    for name, impl in cases:
        if time.time() > deadline:
            out[name] = SKIPPED
            continue
        if impl in passed and not passed[impl]:
            out[name] = {"error": "refused: correctness check failed"}
            continue
        try:
            if impl is None:
                torch.manual_seed(0)
                layer = MultiHeadAttention(768, MHAArgs(n_heads=12)).to(DEV).to(torch.bfloat16)
            else:
                layer = sas_layer(SAS_MAIN, torch.bfloat16)
                set_simulation_impl(layer, impl)
            x = torch.randn(B, T, 768, device=DEV, dtype=torch.bfloat16, requires_grad=True)
            grad = torch.randn_like(x)

            def step():
                layer(x, layer_ctx(T)).backward(grad)

            for _ in range(2):
                step()
            if DEV == "cuda":
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                for _ in range(opts.profile_steps):
                    step()
                if DEV == "cuda":
                    torch.cuda.synchronize()
            rows, total = _profile_rows(prof, opts.profile_top)
            out[name] = {"kernel_ms_per_step": total / opts.profile_steps, "top": rows}
            log(f"profile {name}: {total / opts.profile_steps:.2f} ms of kernels per step")
        except Exception as err:  # noqa: BLE001
            out[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            log(f"profile {name}: {type(err).__name__}: {str(err)[:200]}")
        finally:
            fresh_memory()
    return out


def section_sdpa(opts, deadline: float) -> dict:
    """Causal attention, 24 heads, q/k size 128, v size 64, forward+backward, bf16."""
    out: dict[str, Any] = {}
    flex = None
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = (torch.compile(flex_attention, dynamic=False), create_block_mask)
    except Exception as err:  # noqa: BLE001
        out["flex_import_error"] = f"{type(err).__name__}: {err}"
    for B, T in opts.sdpa_shapes:
        H, D, E = 24, 128, 64
        q = torch.randn(B, H, T, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, H, T, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, H, T, E, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(B, H, T, E, device=DEV, dtype=torch.bfloat16)
        scale = 1 / math.sqrt(D)
        with torch.no_grad():
            gold = attention_ops.attend(q[:1, :2].float(), k[:1, :2].float(), v[:1, :2].float(), None, scale,
                                        backend="math")
        fns: dict[str, Callable[[], torch.Tensor]] = {
            name: (lambda name=name: attention_ops.attend(q, k, v, None, scale, backend=name))
            for name in ("auto", "cudnn", "flash_pad", "efficient", "math")
        }
        if flex is not None:
            compiled, make_mask = flex
            block_mask = make_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device=DEV)
            fns["flex"] = lambda: compiled(q, k, v, block_mask=block_mask, scale=scale)
        rows: dict[str, Any] = {}
        for name, fn in fns.items():
            if time.time() > deadline:
                rows[name] = SKIPPED
                continue
            try:
                with torch.no_grad():
                    err = relative_error(fn()[:1, :2], gold)
                if err > 2e-2:
                    rows[name] = {"error": f"refused: relative error {err:.3g} vs math fp32"}
                    continue
                fresh_memory()
                ms = cuda_time_ms(lambda: fn().backward(g), warmup=3, reps=opts.reps)
                rows[name] = {"fwd_bwd_ms": ms, "rel_err": err, "peak_gib": gib(max_memory_allocated())}
                log(f"sdpa B={B} T={T} {name}: {ms:.3f} ms")
            except Exception as err:  # noqa: BLE001
                rows[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
                log(f"sdpa B={B} T={T} {name}: {type(err).__name__}")
            finally:
                q.grad = k.grad = v.grad = None
        rows["auto_picks"] = attention_ops.resolve_backend(None, q, v, causal_no_mask=True)
        out[f"B{B}_T{T}"] = rows
        fresh_memory()
    return out


def train_step_fn(model: DecoderLM, opt: torch.optim.Optimizer, ids: torch.Tensor, targets: torch.Tensor, fwd):
    def step() -> None:
        with torch.autocast(DEV, dtype=torch.bfloat16):
            # the loss inside forward (the chunked head + cross-entropy), as the trainer runs it: compiled with the
            # model, and no (B, T, vocab) logits; a separate eager loss adds one fixed cost to every variant
            loss = fwd(ids, targets=targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def section_model(opts, passed: dict[str, bool], deadline: float, out: dict, save: Callable[[], None]) -> dict:
    """Training rows, written into ``out`` and saved after each one (a crash keeps earlier rows)."""
    impl = auto_impl()
    out["simulation_impl"] = impl
    for T in opts.seq_lens:
        B = max(1, opts.tokens_per_step // T)
        for mode in opts.modes:
            variants = opts.variants if mode == "eager" else [v for v in opts.variants if v in opts.compiled_variants]
            for name in variants:
                key = f"T{T}/{mode}/{name}"
                if time.time() > deadline:
                    out[key] = SKIPPED
                    continue
                attn, args, structure = VARIANTS[name]
                forced = STRUCTURE_IMPL.get(structure, structure)
                path = impl if structure == "fast" else forced if forced in simulate.IMPLS else None
                if attn == "sas" and path is not None and not passed.get(path, True):
                    out[key] = {"error": f"refused: simulation path {path} failed the correctness check"}
                    continue
                model = opt = None
                breaks = None  # set once compilation starts
                try:
                    torch.manual_seed(0)
                    cfg = preset(opts.size, attn, attention_args=args, max_seq_len=T)
                    model = DecoderLM(cfg).to(DEV)
                    if structure == "reference":
                        make_reference(model)
                    elif forced in simulate.IMPLS:
                        set_simulation_impl(model, forced)
                    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
                    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), device=DEV)
                    fwd = torch.compile(model) if mode == "compiled" else model
                    step = train_step_fn(model, opt, ids[:, :-1], ids[:, 1:], fwd)
                    # a graph break or recompilation, in compilation or later, slows every timed step
                    with structure_env(structure), graph_breaks.watch_graph_breaks() as breaks:
                        t0 = time.time()
                        step()  # first step: compilation, allocator warmup
                        first_s = time.time() - t0
                        fresh_memory()
                        ms = cuda_time_ms(step, warmup=2, reps=opts.steps)
                        peak = max_memory_allocated()
                    out[key] = {
                        "B": B, "T": T, "step_ms": ms, "tokens_per_s": B * T / (ms / 1e3),
                        "peak_gib": gib(peak), "params": model.num_parameters(), "first_step_s": first_s,
                    }
                    log(f"model {key}: {B * T / (ms / 1e3):,.0f} tok/s, {gib(peak):.1f} GiB")
                except Exception as err:  # noqa: BLE001
                    out[key] = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
                    log(f"model {key}: {type(err).__name__}: {str(err)[:200]}")
                finally:
                    if mode == "compiled" and breaks is not None and key in out:
                        out[key]["graph_breaks"] = breaks.to_dict()
                        warning = graph_breaks.warning_line(f"model {key}", breaks.to_dict())
                        if warning:
                            log(warning)
                    del model, opt
                    if mode == "compiled":
                        torch._dynamo.reset()
                    fresh_memory()
                    save()
            mha = out.get(f"T{T}/{mode}/mha", {})
            for name in variants:
                row = out.get(f"T{T}/{mode}/{name}", {})
                if "tokens_per_s" in row and "tokens_per_s" in mha:
                    row["throughput_vs_mha"] = row["tokens_per_s"] / mha["tokens_per_s"]
                    if mha["peak_gib"] > 0:
                        row["memory_vs_mha"] = row["peak_gib"] / mha["peak_gib"]
    return out


# -- reporting -----------------------------------------------------------------------------------
def environment() -> dict:
    info: dict[str, Any] = {
        "command": " ".join([sys.executable, *sys.argv]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        info["git_rev"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                         text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - a copy without .git
        info["git_rev"] = None
    return info


def fmt(v: Any, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def markdown(res: dict) -> str:
    env_ = res["environment"]
    failed = [f"- {name}: {res[name]['error']}" for name in SECTIONS
              if isinstance(res.get(name), dict) and "error" in res[name]]
    failed += [f"- {name} (rows before the failure are kept): {res[name]['section_error']['error']}"
               for name in SECTIONS if isinstance(res.get(name), dict) and "section_error" in res[name]]
    res = {k: v for k, v in res.items() if not (isinstance(v, dict) and "error" in v and k in SECTIONS)}
    lines = ["# SAS speed", "", f"`{env_['command']}`", "",
             f"GPU {env_['gpu']}, torch {env_['torch']}, triton {env_['triton']}, CUDA {env_['cuda']}, "
             f"rev {env_['git_rev']}, {env_['date_utc']}", ""]
    if failed:
        lines += ["## Sections that failed", "", *failed, ""]
    check = res.get("check", {})
    if "passed" in check:
        lines += ["## Correctness check (bf16 vs fp32 reference)", "",
                  ", ".join(f"{k}: {'passed' if v else 'FAILED'}" for k, v in check["passed"].items()), ""]
    model = res.get("model", {})
    if model:
        lines += ["## GPT-small training (random tokens, fused AdamW, bf16 autocast, loss in the forward)", "",
                  ("SAS rows without a path in their name use the automatic simulation path: "
                   f"`{model.get('simulation_impl')}`."), "",
                  "| T | mode | variant | tokens/s | vs MHA | peak GiB | vs MHA | params | graph breaks |",
                  "|---|---|---|---|---|---|---|---|---|"]
        rows = {key: row for key, row in model.items() if isinstance(row, dict) and key != "section_error"}
        for key, row in rows.items():
            T, mode, name = key.split("/")
            breaks = graph_breaks.cell(row.get("graph_breaks"))
            if "error" in row:
                lines.append(f"| {T[1:]} | {mode} | {name} | {row['error']} | | | | | {breaks} |")
                continue
            lines.append(f"| {T[1:]} | {mode} | {name} | {row['tokens_per_s']:,.0f} | "
                         f"{fmt(row.get('throughput_vs_mha'), '.2f')} | {row['peak_gib']:.1f} | "
                         f"{fmt(row.get('memory_vs_mha'), '.2f')} | {row['params'] / 1e6:.1f}M | {breaks} |")
        lines += graph_breaks.markdown_notes([(key, row.get("graph_breaks")) for key, row in rows.items()])
        lines.append("")
    layer = res.get("layer", {})
    if layer:
        lines += ["## SAS layer forward+backward (bf16)", "",
                  "| config | path | fwd ms | fwd+bwd ms | extra GiB | speedup vs reference | graph breaks |",
                  "|---|---|---|---|---|---|---|"]
        for key, rows in layer.items():
            if not isinstance(rows, dict):
                continue
            for path, row in rows.items():
                if not isinstance(row, dict):
                    continue
                if "error" in row:
                    lines.append(f"| {key} | {path} | {row['error']} | | | | |")
                elif "fwd_bwd_ms" in row:
                    lines.append(f"| {key} | {path} | {row['fwd_ms']:.2f} | {row['fwd_bwd_ms']:.2f} | "
                                 f"{row['peak_gib']:.2f} | {fmt(row.get('speedup_vs_reference'), '.2f')} | "
                                 f"{graph_breaks.cell(row.get('graph_breaks'))} |")
                elif "q_and_v_fwd_bwd_ms" in row:
                    lines.append(f"| {key} (Q+V) | {path} | | {row['q_and_v_fwd_bwd_ms']:.2f} | "
                                 f"{row['peak_gib']:.2f} | | |")
        lines.append("")
    lines += _profile_markdown(res.get("profile", {}))
    lines += _tiles_markdown(res.get("tiles", {}))
    sdpa = res.get("sdpa", {})
    if sdpa:
        lines += ["## SDPA, 24 heads, q/k 128, v 64, causal, forward+backward (bf16)", "",
                  "| shape | backend | ms | rel. err |", "|---|---|---|---|"]
        for shape, rows in sdpa.items():
            if not isinstance(rows, dict):
                continue
            for name, row in rows.items():
                if name == "auto_picks":
                    lines.append(f"| {shape} | auto picks | {row} | |")
                elif "error" in row:
                    lines.append(f"| {shape} | {name} | {row['error']} | |")
                else:
                    lines.append(f"| {shape} | {name} | {row['fwd_bwd_ms']:.3f} | {row['rel_err']:.1e} |")
        lines.append("")
    return "\n".join(lines)


def _profile_markdown(prof: dict) -> list[str]:
    if not prof:
        return []
    title = (f"## Profile: one layer forward+backward, B={prof.get('B')}, T={prof.get('T')}, bf16, "
             f"top kernels over {prof.get('steps')} steps")
    lines = [title, ""]
    for name, row in prof.items():
        if not isinstance(row, dict):
            continue
        if "error" in row:
            lines += [f"### {name}: {row['error']}", ""]
            continue
        lines += [f"### {name}: {row['kernel_ms_per_step']:.2f} ms of kernels per step", "",
                  "| kernel | calls | total ms | share |", "|---|---|---|---|"]
        for k in row["top"]:
            kernel = k["name"].replace("|", "/")
            kernel = kernel if len(kernel) <= 110 else kernel[:107] + "..."
            lines.append(f"| `{kernel}` | {k['calls']} | {k['total_ms']:.3f} | {100 * k['share']:.1f}% |")
        lines.append("")
    return lines


def _tiles_markdown(tiles: dict) -> list[str]:
    lines: list[str] = []
    for key, rows in tiles.items():
        if not isinstance(rows, dict):
            continue
        lines += [f"## Q simulation forward+backward (H'=24, D'=128, k=3, RoPE), {key}, bf16", "",
                  "| path / Triton tiles (fwd rows/bwd rows, warps) | ms | max rel. err vs fp32 |", "|---|---|---|"]
        for path, row in rows.items():
            if not isinstance(row, dict) or path == "naive_bf16_errors":
                continue
            if "error" in row or "note" in row:
                lines.append(f"| {path} | {row.get('error') or row['note']} | |")
            else:
                lines.append(f"| {path} | {row['q_fwd_bwd_ms']:.3f} | {fmt(row.get('rel_err'), '.2e')} |")
        lines.append("")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory for sas_speed.json and sas_speed.md")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    p.add_argument("--compiled-variants", default="mha,sas_24x128",
                   help="variants also timed under torch.compile (compilation is slow)")
    p.add_argument("--modes", default="eager,compiled", help="comma list of eager,compiled")
    p.add_argument("--compiled-layer-paths", default="reference,banded",
                   help="layer-section paths also timed under torch.compile (speedups are against the eager "
                        "reference structure)")
    p.add_argument("--seq-lens", default="1024,4096", help="comma list of sequence lengths")
    p.add_argument("--tokens-per-step", type=int, default=16384, help="batch = this // T (16 x 1024)")
    p.add_argument("--steps", type=int, default=8, help="timed training steps per model")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per layer/SDPA measurement")
    p.add_argument("--profile-steps", type=int, default=3, help="profiled forward+backward steps per layer")
    p.add_argument("--profile-top", type=int, default=15, help="kernels listed per profiled layer")
    p.add_argument("--tiles-budget-s", type=float, default=45, help="time cap of the tiles section")
    p.add_argument("--budget-s", type=float, default=250,
                   help="skip remaining measurements after this many seconds (one in flight still finishes)")
    p.add_argument("--fail-on-graph-break", action="store_true",
                   help="exit with status 1 (after writing the results) when a compiled model row broke its graph "
                        "or its graph breaks cannot be counted; default: report them only")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on the CPU: checks that every code path runs; the numbers mean nothing")
    opts = p.parse_args(argv)
    opts.size = "small"
    opts.check_shape, opts.layer_shapes, opts.sdpa_shapes = (2, 1024), [(16, 1024), (4, 4096)], [(16, 1024), (4, 4096)]
    if opts.smoke:
        opts.size, opts.check_shape, opts.layer_shapes, opts.sdpa_shapes = "tiny", (1, 16), [(2, 16)], [(1, 16)]
    opts.sections = [s for s in opts.sections.split(",") if s]
    opts.variants = [v for v in opts.variants.split(",") if v]
    opts.compiled_variants = [v for v in opts.compiled_variants.split(",") if v]
    opts.modes = [m for m in opts.modes.split(",") if m]
    opts.compiled_layer_paths = [p for p in opts.compiled_layer_paths.split(",") if p]
    opts.seq_lens = [int(t) for t in opts.seq_lens.split(",") if t]
    for name, given, known in (("sections", opts.sections, SECTIONS), ("variants", opts.variants, VARIANTS),
                               ("compiled-variants", opts.compiled_variants, VARIANTS),
                               ("modes", opts.modes, ("eager", "compiled")),
                               ("compiled-layer-paths", opts.compiled_layer_paths,
                                ("reference", "naive", *simulate.PYTORCH_FAST_IMPLS, "triton"))):
        unknown = [g for g in given if g not in known]
        if unknown:
            p.error(f"--{name}: unknown {unknown}; choose from {list(known)}")
    # a simulation path's speed is only reported once the check has passed it
    if "check" not in opts.sections and {"layer", "profile", "tiles", "model"} & set(opts.sections):
        opts.sections.insert(0, "check")
    return opts


def main(argv: list[str] | None = None) -> int:
    global DEV
    opts = parse_args(argv)
    if opts.smoke:
        DEV = "cpu"
        opts.seq_lens, opts.tokens_per_step, opts.modes = [32], 64, ["eager"]
    elif not torch.cuda.is_available():
        print("sas_speed.py needs a CUDA GPU (or --smoke for a CPU run of the code paths)", file=sys.stderr)
        return 2
    opts.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    deadline = start + opts.budget_s
    res: dict[str, Any] = {"environment": environment(), "options": {k: str(v) for k, v in vars(opts).items()}}
    torch.backends.cuda.matmul.allow_tf32 = True
    passed: dict[str, bool] = {}

    def save() -> None:
        res["elapsed_s"] = time.time() - start
        (opts.out / "sas_speed.json").write_text(json.dumps(res, indent=2))
        (opts.out / "sas_speed.md").write_text(markdown(res))

    runners: dict[str, Callable[[], dict]] = {
        "check": lambda: section_check(opts),
        "layer": lambda: section_layer(opts, passed, deadline),
        "profile": lambda: section_profile(opts, passed, deadline),
        "model": lambda: section_model(opts, passed, deadline, res.setdefault("model", {}), save),
        "tiles": lambda: section_tiles(opts, passed, min(deadline, time.time() + opts.tiles_budget_s)),
        "sdpa": lambda: section_sdpa(opts, deadline),
    }
    for section in SECTIONS:
        if section not in opts.sections:
            continue
        log(f"section {section} (elapsed {time.time() - start:.0f} s)")
        try:
            res[section] = runners[section]()
            if section == "check":
                passed = res["check"]["passed"]
        except Exception as err:  # noqa: BLE001 - record and go on
            failure = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
            if res.get(section):  # rows measured before the failure stay
                res[section]["section_error"] = failure
            else:
                res[section] = failure
            log(f"section {section} failed: {type(err).__name__}: {err}")
            if section == "check":
                passed = {impl: False for impl in fast_impls()}
        fresh_memory()
        save()
    print()
    print(markdown(res))
    log(f"done in {time.time() - start:.0f} s; results in {opts.out}")
    return 1 if opts.fail_on_graph_break and any_graph_breaks(res) else 0


def any_graph_breaks(res: dict) -> bool:
    """Whether a compiled row of the model or layer section broke its graph; logs every such row."""
    layer_rows = {f"{config}/{path}": row for config, rows in res.get("layer", {}).items() if isinstance(rows, dict)
                  for path, row in rows.items()}
    # both sections are checked, so the log names every failing row
    failed = [failed_on_graph_breaks(res.get("model", {})), failed_on_graph_breaks(layer_rows, "layer")]
    return any(failed)


def failed_on_graph_breaks(rows: dict, section: str = "model") -> bool:
    """Log why each compiled row of a section's results fails ``--fail-on-graph-break``; True if any does."""
    labelled = [(f"{section} {key}", row.get("graph_breaks")) for key, row in rows.items() if isinstance(row, dict)]
    messages = graph_breaks.failures(labelled)
    for message in messages:
        log(f"--fail-on-graph-break: {message}")
    return bool(messages)


if __name__ == "__main__":
    raise SystemExit(main())
