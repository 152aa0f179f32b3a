"""Whole-model gradient check on the GPU: does a training step in bf16 (eager and compiled) give the
gradients of the fp32 eager reference (naive simulation, math attention)?

    python3 benchmarks/train_check.py --out DIR [--size mini] [--attention mha sas] [--batch 8]

For every variant and setting it prints the loss difference and the parameters whose gradient is furthest
from the reference (relative L2 error). bf16 alone gives errors of about 1e-2 (up to 0.1 on a few bias
gradients); a wrong kernel or backend gives errors of order 1, or NaN. Eager bf16 is the baseline every
other bf16 setting is held to (``--bf16-factor``, ``--bf16-min``); fp32 settings to ``--max-error-fp32``.
Parameters whose true gradient is about zero are listed and not judged. Every compiled setting's graph
breaks are reported beside its gradients (column and notes in the Markdown, ``graph_breaks`` in the JSON,
a warning on the console): a broken graph has cost a compiled model its gradients before. Writes
``train_check.json`` and ``train_check.md``; exits 1 when a setting fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.checks import relative_error
from sasformer.models.decoder import DecoderLM
from sasformer.models.presets import preset
from sasformer.utils import graph_breaks

SETTINGS = {  # name: (compile backend or None for eager, bf16, environment, inductor config overrides)
    "eager bf16, auto paths": (None, True, {}),
    "eager bf16, naive simulation": (None, True, {"SASFORMER_SIMULATE": "naive"}),
    "eager bf16, math attention": (None, True, {"SASFORMER_ATTENTION": "math"}),
    "compiled bf16, auto paths": ("inductor", True, {}),
    "compiled bf16, math attention": ("inductor", True, {"SASFORMER_ATTENTION": "math"}),
    "compiled bf16, naive simulation": ("inductor", True, {"SASFORMER_SIMULATE": "naive"}),
    "compiled bf16, banded simulation": ("inductor", True, {"SASFORMER_SIMULATE": "banded"}),
    "compiled bf16, blocked simulation": ("inductor", True, {"SASFORMER_SIMULATE": "blocked"}),
    "compiled bf16, triton simulation": ("inductor", True, {"SASFORMER_SIMULATE": "triton"}),
    "compiled bf16, banded recompute": ("inductor", True, {"SASFORMER_BANDED_RECOMPUTE": "1"}),
    "compiled bf16, default attention": ("inductor", True, {"SASFORMER_ATTENTION": "default"}),
    # cuDNN with unpadded values while compiling (auto does the same on CUDA in bf16 without a mask since run 16;
    # before, it padded them there, for a fault seen on CPU)
    "compiled bf16, cudnn attention": ("inductor", True, {"SASFORMER_ATTENTION": "cudnn"}),
    # the plain-PyTorch RoPE and SwiGLU gating (auto takes their Triton kernels on CUDA)
    "compiled bf16, plain RoPE and SwiGLU": ("inductor", True, {"SASFORMER_ROPE": "torch",
                                                                "SASFORMER_SWIGLU": "torch"}),
    "compiled fp32, auto paths": ("inductor", False, {}),
    "compiled fp32, math attention": ("inductor", False, {"SASFORMER_ATTENTION": "math"}),
    # where a fault could sit: Dynamo alone, Dynamo + AOTAutograd, Inductor without some of its passes
    "compiled bf16, eager backend": ("eager", True, {}),
    "compiled bf16, aot_eager backend": ("aot_eager", True, {}),
    "compiled bf16, inductor without pattern matcher": ("inductor", True, {}, {"pattern_matcher": False}),
    "compiled bf16, inductor without padding": ("inductor", True, {}, {"shape_padding": False,
                                                                      "comprehensive_padding": False}),
}
ENV_VARS = ("SASFORMER_SIMULATE", "SASFORMER_ATTENTION", "SASFORMER_BANDED_RECOMPUTE", "SASFORMER_ROPE",
            "SASFORMER_SWIGLU")


def gradients(model: DecoderLM, x: torch.Tensor, y: torch.Tensor, backend: str | None, bf16: bool,
              env: dict[str, str], inductor: dict | None = None,
              ) -> tuple[float, dict[str, torch.Tensor], dict[str, Any] | None]:
    """Loss, gradients and, when compiled, the graph breaks (``GraphBreaks.to_dict``) of one step.

    The breaks are reported because a broken graph has cost gradients before: on the H200 (run 17) a
    break before cuDNN attention gave a compiled SAS model wrong gradients with the right loss."""
    import torch._inductor.config as inductor_config

    for name in ENV_VARS:
        os.environ[name] = env.get(name, "")
    torch._dynamo.reset()
    model.zero_grad(set_to_none=True)
    step = model if backend is None else torch.compile(model, backend=backend)
    with contextlib.ExitStack() as stack:
        stack.enter_context(inductor_config.patch(inductor or {}))
        stack.enter_context(torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16))
        breaks = None if backend is None else stack.enter_context(graph_breaks.watch_graph_breaks())
        loss = step(x, targets=y)
        loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, None if breaks is None else breaks.to_dict()


BASELINE = "eager bf16, auto paths"


def relative_errors(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per parameter ``|g - ref| / |ref|`` (L2 norms); a gradient that is missing altogether is inf."""
    return {n: relative_error(grads[n], ref[n]) if n in grads else math.inf for n in ref}


def judged_parameters(ref: dict[str, torch.Tensor]) -> list[str]:
    """Parameters whose reference gradient is not about zero (>= 1e-2 of the median norm). One that is
    (without RoPE, the bias of SAS's last key layer shifts every score of a query equally, which the
    softmax ignores) has no relative error worth the name, only rounding noise against a tiny norm."""
    norms = {n: r.norm().item() for n, r in ref.items()}
    floor = 1e-2 * sorted(norms.values())[len(norms) // 2]
    return [n for n, v in norms.items() if v >= floor]


def _value(text: str):
    """``"1"`` -> 1, ``"none"`` -> "none": variant arguments from the command line."""
    try:
        return int(text)
    except ValueError:
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", default="mini")
    parser.add_argument("--attention", nargs="+", default=["mha", "sas"],
                        help="variants, optionally with arguments: sas:rope=none,kernel_size=1")
    parser.add_argument("--settings", nargs="+", default=["eager bf16, auto paths", "compiled bf16, auto paths",
                                                        "compiled fp32, math attention"],
                        choices=list(SETTINGS))
    parser.add_argument("--layers", type=int, help="override the preset's number of layers")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cuda", help="cuda (the point of the check), or cpu for a smoke run")
    parser.add_argument("--bf16-factor", type=float, default=3.0,
                        help="a bf16 setting passes when each error <= max(factor x eager bf16's, --bf16-min)")
    parser.add_argument("--bf16-min", type=float, default=0.1,
                        help="rounding noise stays below about 0.1 here; the faults this catches gave 1 or NaN")
    parser.add_argument("--max-error-fp32", type=float, default=0.01, help="pass limit of an fp32 setting")
    parser.add_argument("--baseline-max", type=float, default=0.3,
                        help="pass limit of eager bf16 itself (about 0.1 at most from rounding)")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report: dict = {}
    failures = 0
    began = time.perf_counter()
    machine = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    command = f"`{shlex.join(['benchmarks/train_check.py', *sys.argv[1:]])}`"
    lines = ["# Whole-model gradient check", "", f"{command} on {machine}, torch {torch.__version__}", ""]
    for checked, spec in enumerate(args.attention, 1):
        attention, _, arg_text = spec.partition(":")
        attention_args = {k: _value(v) for k, v in (item.split("=") for item in arg_text.split(",") if item)}
        overrides = {"n_layers": args.layers} if args.layers else {}
        torch.manual_seed(0)
        model = DecoderLM(preset(args.size, attention, attention_args=attention_args, **overrides)).to(args.device)
        T = model.config.max_seq_len
        x = torch.randint(0, model.config.vocab_size, (args.batch, T), device=args.device)
        y = torch.roll(x, -1, dims=1)
        ref_loss, ref, _ = gradients(model, x, y, None, False, {"SASFORMER_SIMULATE": "naive",
                                                                     "SASFORMER_ATTENTION": "math"})
        report[spec] = {"reference_loss": ref_loss, "settings": {}}
        lines += [f"## {spec} (reference loss {ref_loss:.5f})", "",
                  "| setting | result | loss diff | worst parameters (relative gradient error) | graph breaks |",
                  "|---|---|---:|---|---|"]
        judged = judged_parameters(ref)
        baseline: dict[str, float] | None = None
        breaks_by_setting: list[tuple[str, dict[str, Any] | None]] = []
        for name in [BASELINE, *(n for n in args.settings if n != BASELINE)]:
            try:
                loss, grads, breaks = gradients(model, x, y, *SETTINGS[name])
            except Exception as error:  # noqa: BLE001 -- report and go on: one broken setting must not hide the others
                lines.append(f"| {name} | FAIL | {type(error).__name__}: {str(error)[:80]} | | |")
                failures += 1
                continue
            errors = relative_errors(grads, ref)
            if name == BASELINE:  # eager bf16 is itself held to an absolute limit: its kernels may be wrong too
                baseline = errors
                limits = dict.fromkeys(judged, args.baseline_max)
            elif SETTINGS[name][1]:  # bf16: held to eager bf16, the numerics training runs with anyway
                base = baseline or {}
                limits = {n: max(args.bf16_factor * min(base.get(n, 0.0), args.baseline_max), args.bf16_min)
                          for n in judged}
            else:
                limits = dict.fromkeys(judged, args.max_error_fp32)
            over = [n for n in judged if not errors[n] <= limits[n]]  # NaN counts as over
            passed = not over
            failures += not passed
            result = "pass" if passed else "FAIL (" + ", ".join(
                f"`{n}` {errors[n]:.3g} > {limits[n]:.3g}" for n in over[:3]) + ")"
            if name == BASELINE and passed:
                result = "pass (baseline)"
            worst = sorted(((n, errors[n]) for n in judged), key=lambda kv: -kv[1])[:4]
            report[spec]["settings"][name] = {"loss": loss, "errors": errors, "passed": passed,
                                              "graph_breaks": breaks}
            breaks_by_setting.append((name, breaks))
            warning = graph_breaks.warning_line(f"{spec}, {name}", breaks)
            if warning:
                print(warning, flush=True)
            lines.append(f"| {name} | {result} | {loss - ref_loss:+.5f} | "
                         + ", ".join(f"`{n}` {e:.3g}" for n, e in worst) + f" | {graph_breaks.cell(breaks)} |")
        lines += graph_breaks.markdown_notes(breaks_by_setting, measured="gradients")
        unjudged = sorted(set(ref) - set(judged))
        if unjudged:
            lines += ["", "Not judged (reference gradient below 1e-2 of the median parameter's, so only rounding "
                      "noise): " + ", ".join(f"`{n}`" for n in unjudged)]
        lines.append("")
        # saved after every variant, so a run cut off by a time limit keeps what it checked
        write_report(Path(args.out), report, lines, failures, args,
                     f"{checked} of {len(args.attention)} variants checked")
        print(f"[{checked}/{len(args.attention)}] {spec} checked at {time.perf_counter() - began:.0f} s", flush=True)
    print((Path(args.out) / "train_check.md").read_text())
    sys.exit(1 if failures else 0)


def write_report(out: Path, report: dict, lines: list[str], failures: int, args: argparse.Namespace,
                 progress: str) -> None:
    """Write train_check.json / .md with the verdict so far."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_check.json").write_text(json.dumps(report, indent=1))
    verdict = "every setting passed" if not failures else f"{failures} setting(s) FAILED"
    footer = (f"Limits: `{BASELINE}` passes when every judged parameter's error is <= {args.baseline_max}; "
              f"another bf16 setting when <= max({args.bf16_factor} x its error under `{BASELINE}`, "
              f"{args.bf16_min}); an fp32 one when <= {args.max_error_fp32}. {progress}: {verdict}.")
    (out / "train_check.md").write_text("\n".join([*lines, footer]) + "\n")

if __name__ == "__main__":
    main()
